"""The one adapter for transformers' Grounding DINO (the localize stage's detector).

Version-dependent calls live here only. transformers is pinned (pyproject: 5.23.0); its processor's
``post_process_grounded_object_detection`` takes ``threshold``, releases before ~4.51 took
``box_threshold`` (removed by 4.55), so the name is read from the installed signature.

Sources: a hub id (``from_pretrained``, hub cache, honours ``HF_HUB_OFFLINE``) or a local directory written
by ``save_pretrained``. FiLo's published numbers used its own Grounding DINO fine-tuned with MMDetection;
convert that checkpoint to this format and pass its directory. Nothing falls back to random weights:
``tiny_random_grounding`` exists for tests and writes a directory that loads like any other.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from huggingface_hub import is_offline_mode

from workers.models.hqloc import GENERIC_WORDS, Box

log = logging.getLogger(__name__)

DEFAULT_SOURCE = "IDEA-Research/grounding-dino-tiny"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class GroundingNotFound(RuntimeError):
    """No usable Grounding DINO for the configured source: the message says what to do."""


def threshold_kwargs(post_process: Callable[..., Any], box_threshold: float, text_threshold: float) -> dict[str, float]:
    """Keyword arguments for the installed post-processing: ``threshold`` (new) or ``box_threshold`` (old)."""
    params = inspect.signature(post_process).parameters
    if "threshold" in params:
        return {"threshold": box_threshold, "text_threshold": text_threshold}
    if "box_threshold" in params:
        return {"box_threshold": box_threshold, "text_threshold": text_threshold}
    raise RuntimeError(
        f"unsupported transformers Grounding DINO post-processing signature {list(params)}; "
        "install the version pinned in pyproject.toml"
    )


class GroundingModel:
    """A loaded detector: ``detect`` returns normalised boxes per image."""

    def __init__(self, model: Any, processor: Any, source: str, device: str, max_batch: int = 8) -> None:
        self.model, self.processor, self.source, self.device = model, processor, source, device
        self.max_batch = max_batch
        self._special = [s for s in getattr(processor.tokenizer, "all_special_tokens", []) if s]

    @torch.inference_mode()
    def detect(
        self, images: Sequence[np.ndarray], caption: str, *, box_threshold: float, text_threshold: float
    ) -> list[list[Box]]:
        """Boxes per (H, W, 3) uint8 RGB image with score > ``box_threshold``, in query order.

        Coordinates are fractions of each image's own size, clipped to [0, 1]. The phrase is the caption
        tokens scoring > ``text_threshold``, space-joined, without special tokens or separator dots.
        For FiLo's HQ-Loc call with ``box_threshold=0.0`` and let ``hqloc.filter_boxes`` apply 0.25
        (its fallback needs every query).
        """
        for img in images:
            if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
                raise ValueError(f"expected (H, W, 3) uint8 RGB images, got {img.shape} {img.dtype}")
        out: list[list[Box]] = []
        for start in range(0, len(images), self.max_batch):
            chunk = list(images[start : start + self.max_batch])
            inputs = self.processor(images=chunk, text=[caption] * len(chunk), return_tensors="pt").to(self.device)
            outputs = self.model(**inputs)
            post = self.processor.post_process_grounded_object_detection
            results = post(outputs, inputs["input_ids"], **threshold_kwargs(post, box_threshold, text_threshold))
            out.extend(self._boxes(r) for r in results)
        return out

    def _boxes(self, result: dict[str, Any]) -> list[Box]:
        coords = result["boxes"].float().clamp(0.0, 1.0).cpu().tolist()  # (n, 4) normalised xyxy
        scores = result["scores"].float().cpu().tolist()
        # "text_labels" since ~4.51; older releases returned the strings under "labels"
        labels = result["text_labels"] if "text_labels" in result else result.get("labels", [""] * len(scores))
        return [Box(*c, score=s, phrase=self._clean(t)) for c, s, t in zip(coords, scores, labels, strict=True)]

    def _clean(self, label: str) -> str:
        for tok in self._special:
            label = label.replace(tok, " ")
        # the processor decodes every token above text_threshold, separator dots included; FiLo's phrase
        # check looks for substrings, so plain space-joined words keep its meaning
        return " ".join(label.replace(".", " ").split())


def _is_path(source: str) -> bool:
    return Path(source).expanduser().is_dir() or os.path.isabs(source) or source.startswith((".", "~"))


def load_grounding(
    source: str = DEFAULT_SOURCE, device: str = "cpu", *, shortest_edge: int | None = None, allow_download: bool = True
) -> GroundingModel:
    """Load processor and model from a hub id or a ``save_pretrained`` directory.

    A hub id is read from the hub cache first, so a cached model never touches the network; only a miss
    downloads (unless ``allow_download`` is False or ``HF_HUB_OFFLINE`` is set). ``shortest_edge`` overrides
    the processor's resize (FiLo resized to 518 px; the hub default is 800).
    """
    local = _is_path(source)
    path = str(Path(source).expanduser()) if local else source
    if local and not Path(path).is_dir():
        raise GroundingNotFound(
            f"Grounding DINO directory {path!r} does not exist. Save a model there with "
            "`GroundingDinoForObjectDetection.save_pretrained` and `GroundingDinoProcessor.save_pretrained`, "
            f"or use a hub id such as {DEFAULT_SOURCE!r} already in the hub cache"
        )
    if not local and not _HUB_ID.match(source):
        raise GroundingNotFound(f"{source!r} is neither an existing directory nor a hub id like {DEFAULT_SOURCE!r}")
    try:
        try:
            processor, model = _from_pretrained(path, local_only=True)
        except OSError:  # not in the cache (or not a model directory)
            if local or not allow_download or is_offline_mode():
                raise
            processor, model = _from_pretrained(path, local_only=False)
    except Exception as exc:  # missing files, no network, wrong model type, corrupt weights
        raise GroundingNotFound(
            f"could not load Grounding DINO from {source!r}: {exc}. Without internet, run "
            f"`huggingface-cli download {DEFAULT_SOURCE}` on a connected machine and copy the hub cache "
            "(HF_HOME), or copy a `save_pretrained` directory here and configure its path"
        ) from exc
    if shortest_edge is not None:
        processor.image_processor.size = {"shortest_edge": shortest_edge, "longest_edge": 1333}
    model = model.to(device).eval()
    log.info("Grounding DINO loaded from %s on %s", source, device)
    return GroundingModel(model, processor, source, device)


def _from_pretrained(path: str, *, local_only: bool) -> tuple[Any, Any]:
    from transformers import AutoConfig, GroundingDinoForObjectDetection, GroundingDinoProcessor

    config = AutoConfig.from_pretrained(path, local_files_only=local_only)
    if config.model_type != "grounding-dino":
        raise ValueError(f"the model there is a {config.model_type!r}, not a Grounding DINO")
    processor = GroundingDinoProcessor.from_pretrained(path, local_files_only=local_only)
    model = GroundingDinoForObjectDetection.from_pretrained(path, config=config, local_files_only=local_only)
    return processor, model


def tiny_random_grounding(tmp_dir: str | os.PathLike[str], seed: int = 0) -> Path:
    """Write a tiny random Grounding DINO (model, BERT WordPiece tokenizer, processor) for tests only.

    Swin backbone with one block per stage, d_model 32 (its GroupNorms need multiples of 32), one encoder
    and two decoder layers (transformers ties the decoder's box heads and needs at least two), 20 queries,
    3 feature levels (no extra stride-2 level, whose 1x1 maps break GroupNorm on small test images).
    """
    from transformers import (
        BertConfig,
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        SwinConfig,
    )

    out = Path(tmp_dir)
    out.mkdir(parents=True, exist_ok=True)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = [*GENERIC_WORDS, "crack", "scratch", "hole", "stain", "bent", "missing", "cap", "."]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *letters, *(f"##{c}" for c in letters)]
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer.from_pretrained(out)  # reads vocab.txt like a converted BERT checkpoint
    backbone = SwinConfig(
        image_size=64, patch_size=4, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
        window_size=2, out_indices=[2, 3, 4],
    )  # fmt: skip
    text = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=64,
    )  # fmt: skip
    config = GroundingDinoConfig(
        backbone_config=backbone, text_config=text, d_model=32, encoder_layers=1, decoder_layers=2,
        encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_attention_heads=2, decoder_attention_heads=2,
        num_queries=20, num_feature_levels=3, encoder_n_points=2, decoder_n_points=2,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GroundingDinoForObjectDetection(config)
    image_processor = GroundingDinoImageProcessor(size={"shortest_edge": 64, "longest_edge": 96})
    GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    model.save_pretrained(out)
    return out
