"""Building open_clip models with real weights: pretrained tags, local files, imported weights.

``INSPECT_WEIGHTS`` names one of
- an open_clip pretrained tag of the architecture (downloaded once into the hub cache),
- a local file (safetensors, or a torch checkpoint read with ``weights_only=True``),
- weights imported with ``inspect models import`` (fetched from the object store, sha256 checked),
- ``random``: seeded random initialisation, for smoke tests only; every result says so.
Nothing falls back to random weights silently.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import nn

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "models" / "configs"
RANDOM = "random"
RANDOM_SEED = 0


class WeightsNotFound(RuntimeError):
    """No usable weights for the configured model: the message says what to do."""


@dataclass(frozen=True)
class LoadedClip:
    model: nn.Module
    tokenizer: Any
    arch: str
    weights_ref: str  # what INSPECT_WEIGHTS resolved to (tag, path, imported name@sha, random)
    random_weights: bool
    fingerprint: str  # identifies (arch, weights) for cached text features


def register_configs() -> None:
    """Make the project's architectures (``inspect-tiny``) known to open_clip."""
    if "inspect-tiny" not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_DIR)


def state_dict_from_bytes(data: bytes) -> dict[str, torch.Tensor]:
    """safetensors or a plain torch checkpoint, never unpickling arbitrary objects."""
    if _looks_like_safetensors(data):
        return dict(load_safetensors_bytes(data))
    obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise WeightsNotFound("checkpoint does not contain a state dict")
    return {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _looks_like_safetensors(data: bytes) -> bool:
    if len(data) < 8:
        return False
    header_len = int.from_bytes(data[:8], "little")
    return 0 < header_len < len(data) and data[8:9] == b"{"


def to_safetensors(state: dict[str, torch.Tensor]) -> bytes:
    return save_safetensors_bytes({k: v.contiguous() for k, v in state.items()})


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def build_model(arch: str) -> nn.Module:
    register_configs()
    if arch not in open_clip.list_models():
        raise WeightsNotFound(f"unknown open_clip architecture {arch!r} (INSPECT_CLIP_MODEL)")
    model, _, _ = open_clip.create_model_and_transforms(arch, pretrained=None)
    return model


def load_clip(
    arch: str, weights: str, *, imported: tuple[str, bytes] | None = None, device: str = "cpu"
) -> LoadedClip:
    """Build ``arch`` and load ``weights``; ``imported`` = (sha256, bytes) of registry weights."""
    register_configs()
    tokenizer = open_clip.get_tokenizer(arch) if arch in open_clip.list_models() else None
    if weights == RANDOM:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_SEED)  # every worker builds the same random model
            model = build_model(arch)
        log.warning("using RANDOM weights for %s: results are marked random_weights", arch)
        return _ready(model, tokenizer, arch, RANDOM, True, f"{arch}@random{RANDOM_SEED}", device)
    if imported is not None:
        sha, data = imported
        if sha256_bytes(data) != sha:
            raise WeightsNotFound(f"imported weights {weights!r} fail their sha256 check")
        model = _with_state(build_model(arch), state_dict_from_bytes(data), weights)
        return _ready(model, tokenizer, arch, f"{weights}@{sha[:12]}", False, f"{arch}@{sha}", device)
    if os.path.isfile(weights):
        data = Path(weights).read_bytes()
        sha = sha256_bytes(data)
        model = _with_state(build_model(arch), state_dict_from_bytes(data), weights)
        return _ready(model, tokenizer, arch, weights, False, f"{arch}@{sha}", device)
    if weights in open_clip.list_pretrained_tags_by_model(arch):
        try:
            model, _, _ = open_clip.create_model_and_transforms(
                arch, pretrained=weights, require_pretrained=True
            )
        except Exception as exc:  # network, hub cache, corrupt download
            raise WeightsNotFound(
                f"could not load pretrained weights {arch}/{weights}: {exc}. Without internet, "
                "import a checkpoint with `inspect models import FILE --name NAME --arch "
                f"{arch}` and set INSPECT_WEIGHTS=NAME, or point INSPECT_WEIGHTS at a local file"
            ) from exc
        return _ready(model, tokenizer, arch, weights, False, f"{arch}@{weights}", device)
    raise WeightsNotFound(
        f"INSPECT_WEIGHTS={weights!r} is not a pretrained tag of {arch}, an existing file, or "
        "an imported weights name; use INSPECT_WEIGHTS=random only for smoke tests"
    )


def _with_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> nn.Module:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WeightsNotFound(f"weights {source!r} do not fit the architecture: {exc}") from exc
    return model


def _ready(
    model: nn.Module, tokenizer: Any, arch: str, ref: str, rnd: bool, fp: str, device: str
) -> LoadedClip:
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedClip(model, tokenizer, arch, ref, rnd, re.sub(r"[^A-Za-z0-9._-]", "_", fp))


def best_device(setting: str = "auto") -> str:
    if setting != "auto":
        return setting
    return "cuda" if torch.cuda.is_available() else "cpu"
