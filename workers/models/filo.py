"""FiLo scoring: position-enhanced fine-grained prompts, MMCI and linear decoders, adapter, maps.

Gu et al., "FiLo: Zero-Shot Anomaly Detection by Fine-Grained Description and High-Quality
Localization" (arXiv 2404.13671, ACM MM 2024; seed 000), checked against the official code
(CASIA-IVA-Lab/FiLo, ``models/FiLo.py``, ``test.py``, ``models/vv_open_clip/transformer.py``).

- FG-Des: abnormal sentences "abnormal {cls} with {detail}" for each LLM-written
  detail plus 5 generic states, 7 normal states. Learnable context (12 vectors shifted by a small
  net on the image CLS) is a training-time component and not part of this module: here the
  sentences go through fixed templates (default "{}." = the official sentence without context).
- HQ-Loc position-enhanced prompts (Grounding DINO: sec. 3.3.1): every abnormal sentence gets " at {pos}"
  for one of 9 positions of a 3x3 grid (the best Grounding DINO box's centre).
- MMCI (sec. 3.3.3): six Conv2d branches (1x1, 3x3, 5x5, 7x7, 1x5, 5x1; "same" padding) on the
  patch grid, summed; plus one Linear decoder per tap.
- Maps and score (the paper's M and S_global): per head, 100 x cosine with the text
  pair, bilinear upsampling (align_corners=True), softmax over (normal, abnormal); Gaussian blur
  (torchvision GaussianBlur(3, 4.0)) of the abnormal probability; M = mean over heads;
  S_global = (CLS-text abnormal similarity + max M) / 2, with the CLS through the adapter
  x + SiLU(up(ReLU(down(x)))).

Which tokens feed which heads (official code, ViT-L/14, taps 6/12/18/24): blocks 7-24 run a
dual path whose v-v ("surgery") path starts from the block-6 output and accumulates v-v
attention residuals (no FFN, no reset). ``encode_image`` returns 7 raw (pre-ln_post,
unprojected, width-1024) tensors [t6, s12, o12, s18, o18, s24, o24]; ``[::2]`` (t6 and the
original path at 12/18/24) feeds the 4 Linear decoders, ``[1::2]`` (the v-v path at 12/18/24)
the 3 MMCI modules: 7 heads, CLS dropped. Generalised here to any ViT cut into S stages (tap
at each stage end, v-v path from the stage-1 output): S Linear heads and S - 1 MMCI heads, all
from one ``StagedDualPathViT`` pass (``DualPathFeatures``), so SDP and FiLo can share it.

Official-code behaviours reproduced by default because they change the numbers:
- in-place taps (``official_quirks``, see ``filo_head_inputs``): the v-v path is one tensor
  object updated in place (``x += x_res``) from block 7 to 24, and t6, s12, s18 and s24 are all
  that object, so every one of them ends up equal to the *final* v-v path (block-6 output plus
  all 18 v-v residuals): the three MMCI heads see the same tokens and the first Linear head sees
  them too. The original-path taps o12, o18 gain the next block's attention residual in place
  (``x_ori += x_ori_res``); o24 is clean. The released decoder weights were trained on these
  tensors. ``official_quirks=False`` gives the evident intent: Linear heads on the clean
  original path at every stage end, MMCI heads on the v-v path as it stands at stage ends 2..S.
- pair normalisation (``pair_norm``): the (normal, abnormal) text pair is normalised as one
  tensor, which scales every similarity and logit by 1/sqrt(2).
- image score term (``score_term="similarity"``): ``test.py`` adds the raw CLS-text abnormal
  similarity (cosine / sqrt(2)), not a softmax probability, to the map maximum.
Pure torch: no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workers.models.clip_surgery import ABNORMAL, DualPathFeatures

# Row-major 3x3 grid; the same words as workers.models.hqloc.POSITIONS, which turns a Grounding
# DINO box into one of them (and damps the map outside kept boxes).
POSITIONS: tuple[str, ...] = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
NORMAL_STATES: tuple[str, ...] = (
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
)
GENERIC_ABNORMAL: tuple[str, ...] = (
    "damaged {}",
    "broken {}",
    "{} with flaw",
    "{} with defect",
    "{} with damage",
)
# The official sentence is "<12 learned context tokens> {state}[ at {position}]."; without the
# learned context the fixed template keeps the trailing period.
DEFAULT_TEMPLATES: tuple[str, ...] = ("{}.",)
MMCI_KERNELS: tuple[tuple[int, int], ...] = ((1, 1), (3, 3), (5, 5), (7, 7), (1, 5), (5, 1))
ADAPTER_TEMPERATURE = 0.07  # stage-2 training: cross-entropy of the CLS-text similarities / 0.07


class UntrainedFiLoError(RuntimeError):
    """FiLoHead was asked to score with randomly initialised decoders."""


# --------------------------------------------------------------------------------------------
# Text side: position-enhanced fine-grained sentences
# --------------------------------------------------------------------------------------------


def _check_position(position: str | None) -> None:
    if position is not None and position not in POSITIONS:
        raise ValueError(f"unknown position {position!r}; choose one of {', '.join(POSITIONS)} or None")


def filo_sentences(
    class_name: str,
    phrases: Sequence[str],
    generic_abnormal: Sequence[str] | None = None,
    normal_states: Sequence[str] | None = None,
    position: str | None = None,
) -> tuple[list[str], list[str]]:
    """(normal, abnormal) sentences for one class, before templates.

    Abnormal: "abnormal {class_name} with {phrase}" for each phrase (stripped; empty ones
    skipped), then each generic state ("{}" = class name; default the 5 of ``GENERIC_ABNORMAL``),
    each followed by " at {position}" when a position is given. Normal: the states of
    ``normal_states`` (default the 7 of ``NORMAL_STATES``), never positioned. The class name
    goes in verbatim (the official code maps e.g. pcb1 -> pcb beforehand; that is the caller's
    vocabulary).
    """
    _check_position(position)
    generic = GENERIC_ABNORMAL if generic_abnormal is None else generic_abnormal
    normal = NORMAL_STATES if normal_states is None else normal_states
    suffix = "" if position is None else f" at {position}"
    details = [p.strip() for p in phrases if p.strip()]
    abnormal = [f"abnormal {class_name} with {d}{suffix}" for d in details]
    abnormal += [g.format(class_name) + suffix for g in generic]
    return [s.format(class_name) for s in normal], abnormal


def _encode_mean(
    encode_text: Callable[[Tensor], Tensor],
    tokenize: Callable[[list[str]], Tensor],
    sentences: list[str],
    device: torch.device | str,
    chunk: int,
) -> Tensor:
    """Mean of the L2-normalised sentence embeddings (E,), not re-normalised."""
    parts = [
        encode_text(tokenize(sentences[i : i + chunk]).to(device)).float() for i in range(0, len(sentences), chunk)
    ]
    return F.normalize(torch.cat(parts), dim=-1).mean(dim=0)  # (N, E) -> (E,)


def _templated(sentences: Sequence[str], templates: Sequence[str]) -> list[str]:
    return [t.format(s) for s in sentences for t in templates]


@torch.no_grad()
def encode_filo_text_bank(
    encode_text: Callable[[Tensor], Tensor],
    tokenize: Callable[[list[str]], Tensor],
    class_name: str,
    phrases: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    device: torch.device | str = "cpu",
    *,
    generic_abnormal: Sequence[str] | None = None,
    normal_states: Sequence[str] | None = None,
    chunk: int = 256,
) -> dict[str | None, Tensor]:
    """All 10 text pairs of a class in one encoding pass: each position and None, each (E, 2).

    Column 0 (normal) = normalise(mean of the normalised normal sentence embeddings); column 1
    (abnormal) for a position = the same over that position's sentences; for None = normalise(
    mean over all 9 x A x T normalised abnormal sentence embeddings), which equals normalise(mean
    over the 9 positions of the per-position *un-normalised* means) because every position has
    the same A x T sentences. This is the official ``positions=None`` path. Deterministic, a
    pure function of its inputs: cache it per (weights, class, phrases, templates).
    """
    if not templates:
        raise ValueError("at least one template is needed")
    normal, _ = filo_sentences(class_name, phrases, generic_abnormal, normal_states, None)
    if not normal:
        raise ValueError("no normal sentences: give normal states")
    normal_vec = F.normalize(_encode_mean(encode_text, tokenize, _templated(normal, templates), device, chunk), dim=0)
    groups = [
        _templated(filo_sentences(class_name, phrases, generic_abnormal, normal_states, p)[1], templates)
        for p in POSITIONS
    ]
    n = len(groups[0])
    if n == 0:
        raise ValueError("no abnormal sentences: give phrases or generic states")
    flat = [s for g in groups for s in g]
    parts = [encode_text(tokenize(flat[i : i + chunk]).to(device)).float() for i in range(0, len(flat), chunk)]
    emb = F.normalize(torch.cat(parts), dim=-1).view(len(POSITIONS), n, -1)  # (9 * n, E) -> (9, n, E)
    per_pos = emb.mean(dim=1)  # (9, E) un-normalised means
    bank: dict[str | None, Tensor] = {}
    for i, p in enumerate(POSITIONS):
        bank[p] = torch.stack([normal_vec, F.normalize(per_pos[i], dim=0)], dim=1).cpu()  # (E, 2)
    bank[None] = torch.stack([normal_vec, F.normalize(per_pos.mean(dim=0), dim=0)], dim=1).cpu()
    return bank


@torch.no_grad()
def encode_filo_text(
    encode_text: Callable[[Tensor], Tensor],
    tokenize: Callable[[list[str]], Tensor],
    class_name: str,
    phrases: Sequence[str],
    position: str | None = None,
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    device: torch.device | str = "cpu",
    *,
    generic_abnormal: Sequence[str] | None = None,
    normal_states: Sequence[str] | None = None,
    chunk: int = 256,
) -> Tensor:
    """(E, 2) L2-normalised (normal, abnormal) text pair for one class and position.

    position None: the abnormal column is normalise(mean of all 9 x A x T normalised abnormal
    sentence embeddings), i.e. the 9 positions averaged (see ``encode_filo_text_bank``).
    Note: the official ``test.py`` never uses None; when no kept Grounding DINO box exists it
    falls back to the image centre, i.e. position "center". None is the training-time prompt.
    """
    _check_position(position)
    if position is None:
        bank = encode_filo_text_bank(
            encode_text,
            tokenize,
            class_name,
            phrases,
            templates,
            device,
            generic_abnormal=generic_abnormal,
            normal_states=normal_states,
            chunk=chunk,
        )
        return bank[None]
    if not templates:
        raise ValueError("at least one template is needed")
    normal, abnormal = filo_sentences(class_name, phrases, generic_abnormal, normal_states, position)
    if not normal or not abnormal:
        raise ValueError("every group needs a sentence: give normal states and phrases or generic states")
    cols = [_encode_mean(encode_text, tokenize, _templated(g, templates), device, chunk) for g in (normal, abnormal)]
    return F.normalize(torch.stack(cols, dim=1), dim=0).cpu()  # (E, 2) per-column unit norm


# --------------------------------------------------------------------------------------------
# Image side: decoders, adapter
# --------------------------------------------------------------------------------------------


class MMCI(nn.Module):
    """Multi-scale multi-shape cross-modal interaction: summed "same"-padded conv branches.

    ``forward`` by default applies one conv whose kernel is the sum of the branch kernels, each
    zero-padded (centred) to the largest shape: with odd kernel sizes and zero "same" padding
    that is exactly the sum of the branch outputs (up to float rounding) at about half the
    multiply-adds (49 vs 94 taps for the default six). ``fuse=False`` runs the six branches.
    The parameters are always the six branches (``branches.{k}.weight/bias``). Without autograd
    the fused kernel is cached (keyed on the parameters' storage and version counters, so
    ``load_state_dict``, optimiser steps and ``.to()`` rebuild it); building it costs more than
    the conv itself. The cache holds one (out, in, 7, 7) kernel: ~52% more memory than the
    branches' 94 taps. With autograd it is rebuilt on every call (differentiable).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        kernels: Sequence[tuple[int, int]] = MMCI_KERNELS,
        fuse: bool = True,
    ):
        super().__init__()
        if any(k % 2 == 0 for kh_kw in kernels for k in kh_kw):
            raise ValueError("MMCI kernel sizes must be odd for symmetric 'same' padding")
        self.kernels = tuple((int(kh), int(kw)) for kh, kw in kernels)
        self.branches = nn.ModuleList(nn.Conv2d(in_dim, out_dim, k, padding="same") for k in self.kernels)
        self.fuse = fuse
        self.kh = max(k[0] for k in self.kernels)
        self.kw = max(k[1] for k in self.kernels)
        self._cache: tuple[tuple[Any, ...], Tensor, Tensor] | None = None

    def fused_kernel(self) -> tuple[Tensor, Tensor]:
        """(out, in, kh_max, kw_max) weight and (out,) bias equal to the branch sum."""
        first = self.branches[0].weight
        weight = first.new_zeros(first.shape[0], first.shape[1], self.kh, self.kw)
        bias = first.new_zeros(first.shape[0])
        for (kh, kw), conv in zip(self.kernels, self.branches, strict=True):
            top, left = (self.kh - kh) // 2, (self.kw - kw) // 2
            weight = weight + F.pad(conv.weight, (left, self.kw - kw - left, top, self.kh - kh - top))
            if conv.bias is not None:
                bias = bias + conv.bias
        return weight, bias

    def _kernel(self, x: Tensor) -> tuple[Tensor, Tensor]:
        params = list(self.parameters())
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
            return self.fused_kernel()
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)
        if self._cache is None or self._cache[0] != key:
            # plain (not inference-mode) tensors, so the cache stays usable outside inference_mode
            with torch.inference_mode(False), torch.no_grad():
                weight, bias = self.fused_kernel()
            self._cache = (key, weight, bias)
        return self._cache[1], self._cache[2]

    def forward(self, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        """tokens (B, P, in_dim) patch tokens (no CLS), P = gh * gw row-major -> (B, P, out_dim)."""
        b, p, c = tokens.shape
        gh, gw = grid
        if p != gh * gw:
            raise ValueError(f"{p} tokens do not fill a {gh}x{gw} grid")
        x = tokens.transpose(1, 2).reshape(b, c, gh, gw)  # (B, P, C) -> (B, C, gh, gw)
        if self.fuse:
            weight, bias = self._kernel(x)
            y = F.conv2d(x, weight, bias, padding=(self.kh // 2, self.kw // 2))  # (B, out, gh, gw)
        else:
            y = sum(conv(x) for conv in self.branches)  # (B, out, gh, gw)
        return y.flatten(2).transpose(1, 2)  # (B, out, gh, gw) -> (B, P, out)


class LinearDecoders(nn.Module):
    """One Linear(in_dim -> out_dim) per tap, applied to that tap's patch tokens."""

    def __init__(self, in_dim: int, out_dim: int, n_taps: int):
        super().__init__()
        self.fc = nn.ModuleList(nn.Linear(in_dim, out_dim) for _ in range(n_taps))

    def forward(self, tokens: Sequence[Tensor]) -> list[Tensor]:
        """n_taps x (B, P, in_dim) -> n_taps x (B, P, out_dim)."""
        if len(tokens) != len(self.fc):
            raise ValueError(f"expected {len(self.fc)} taps, got {len(tokens)}")
        return [fc(t) for fc, t in zip(self.fc, tokens, strict=True)]


class Adapter(nn.Module):
    """x + SiLU(up(ReLU(down(x)))), dim -> dim // reduction -> dim, no biases."""

    def __init__(self, dim: int, reduction: int = 2):
        super().__init__()
        self.down = nn.Linear(dim, dim // reduction, bias=False)
        self.up = nn.Linear(dim // reduction, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """x (..., dim) -> (..., dim)."""
        return x + F.silu(self.up(F.relu(self.down(x))))


def gaussian_blur(maps: Tensor, kernel_size: int = 3, sigma: float = 4.0) -> Tensor:
    """torchvision ``GaussianBlur(kernel_size, sigma)`` on (B, H, W) maps, in pure torch.

    Same kernel (``linspace(-(k-1)/2, (k-1)/2, k)`` sampled, normalised, outer product) and the
    same torch "reflect" padding (mirror without repeating the edge) as torchvision's
    ``gaussian_blur``; unlike ``clip_surgery.gaussian_smooth`` (scipy semantics, truncate 4).
    """
    if kernel_size % 2 == 0 or kernel_size < 1:
        raise ValueError("kernel_size must be a positive odd integer")
    if kernel_size == 1:
        return maps
    half = (kernel_size - 1) * 0.5
    x = torch.linspace(-half, half, kernel_size, dtype=maps.dtype, device=maps.device)
    pdf = torch.exp(-0.5 * (x / sigma).pow(2))
    k1 = pdf / pdf.sum()
    k2 = torch.outer(k1, k1).view(1, 1, kernel_size, kernel_size)
    pad = kernel_size // 2
    out = F.pad(maps.unsqueeze(1), (pad, pad, pad, pad), mode="reflect")  # (B, 1, H + 2p, W + 2p)
    return F.conv2d(out, k2).squeeze(1)  # (B, H, W)


# --------------------------------------------------------------------------------------------
# The scoring head
# --------------------------------------------------------------------------------------------


def filo_head_inputs(features: DualPathFeatures, official_quirks: bool = True) -> tuple[list[Tensor], list[Tensor]]:
    """Token tensors (with CLS, raw width W) for the Linear heads (S) and the MMCI heads (S - 1).

    The v-v path at the end of stage s >= 1 is ``clean[0] + surgery_raw[1] + ... +
    surgery_raw[s]`` (the stage-1 output plus every later block's v-v residual).
    ``official_quirks=True`` (the official code's aliasing, module docstring): Linear inputs
    [final v-v path, clean[s] + next_attn[s] for s = 1..S-2, clean[S-1]]; MMCI inputs: the final
    v-v path S - 1 times. ``official_quirks=False``: Linear inputs ``clean``; MMCI inputs the v-v
    path at stage ends 2..S.
    """
    s_count = len(features.clean)
    if s_count < 2:
        raise ValueError("FiLo needs at least 2 stages of clean taps")
    if len(features.surgery_raw) != s_count or len(features.next_attn) != s_count - 1:
        raise ValueError(
            "DualPathFeatures lack FiLo's taps (surgery_raw / next_attn); "
            "produce them with workers.models.clip_surgery.StagedDualPathViT"
        )
    vv_path: list[Tensor] = []  # the v-v path at stage ends 2..S
    path = features.clean[0]
    for s in range(1, s_count):
        path = path + features.surgery_raw[s]
        vv_path.append(path)
    if not official_quirks:
        return list(features.clean), vv_path
    final = vv_path[-1]
    linear_in = [final] + [features.clean[s] + features.next_attn[s] for s in range(1, s_count - 1)]
    linear_in.append(features.clean[-1])
    return linear_in, [final] * (s_count - 1)


@dataclass(frozen=True)
class FiLoOutput:
    """Batched FiLo prediction."""

    anomaly_map: Tensor  # (B, H, W) mean over heads of the blurred abnormal probability, before box damping
    image_score: Tensor  # (B,) (cls term + map_max) / 2; cls term per FiLoHead.score_term
    cls_prob: Tensor  # (B,) softmax(cls_similarity pair / 0.07)[abnormal] (the adapter's training logits)
    map_max: Tensor  # (B,) max of anomaly_map
    cls_similarity: Tensor  # (B,) adapted-CLS . abnormal text, scaled by 1/sqrt(2) with pair_norm (official term)
    head_probs: Tensor | None = None  # (n_heads, B, H, W) per-head abnormal probability before blur, on request


class FiLoHead(nn.Module):
    """FiLo's trainable scoring head on a ``StagedDualPathViT`` pass.

    Heads: S Linear decoders then S - 1 MMCI modules on the raw (width W) tokens chosen by
    ``filo_head_inputs``; in_dim = the ViT width, out_dim = the CLIP embedding dim (1024 -> 768
    for ViT-L/14). The adapter acts on the projected CLS. Randomly initialised heads give
    meaningless maps: ``forward`` refuses them unless ``allow_untrained=True``; the ``trained``
    buffer is set by ``load_state_dict`` / ``from_state_dict`` (or ``mark_trained``).
    """

    def __init__(
        self,
        width: int,
        embed_dim: int,
        image_size: int | tuple[int, int],
        n_stages: int = 4,
        *,
        mmci_kernels: Sequence[tuple[int, int]] = MMCI_KERNELS,
        adapter_reduction: int = 2,
        blur_kernel: int = 3,
        blur_sigma: float = 4.0,
        official_quirks: bool = True,
        pair_norm: bool = True,
        score_term: Literal["similarity", "probability"] = "similarity",
        fuse_mmci: bool = True,
    ):
        super().__init__()
        if n_stages < 2:
            raise ValueError("FiLo needs at least 2 stages")
        if score_term not in ("similarity", "probability"):
            raise ValueError("score_term must be 'similarity' or 'probability'")
        self.width = width
        self.embed_dim = embed_dim
        self.image_size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.n_stages = n_stages
        self.linear = LinearDecoders(width, embed_dim, n_stages)
        self.mmci = nn.ModuleList(MMCI(width, embed_dim, mmci_kernels, fuse_mmci) for _ in range(n_stages - 1))
        self.adapter = Adapter(embed_dim, adapter_reduction)
        self.blur_kernel = blur_kernel
        self.blur_sigma = blur_sigma
        self.official_quirks = official_quirks
        self.pair_norm = pair_norm
        self.score_term = score_term
        self.register_buffer("trained", torch.zeros((), dtype=torch.bool))
        self.trained: Tensor

    # ---- construction and weights ------------------------------------------------------------

    @classmethod
    def for_visual(cls, visual: nn.Module, n_stages: int = 4, **kwargs: Any) -> FiLoHead:
        """Sized for an open_clip VisionTransformer (width, projection dim, input size)."""
        width = int(visual.transformer.width)
        embed_dim = int(visual.proj.shape[1])
        size = visual.image_size
        image_size = (int(size[0]), int(size[1])) if isinstance(size, tuple | list) else int(size)
        return cls(width, embed_dim, image_size, n_stages, **kwargs)

    @classmethod
    def from_state_dict(
        cls,
        state_dict: Mapping[str, Tensor],
        width: int,
        embed_dim: int,
        image_size: int | tuple[int, int],
        n_stages: int = 4,
        **kwargs: Any,
    ) -> FiLoHead:
        """A head loaded (strictly) from our keys or from an official FiLo checkpoint's ``filo``."""
        sd = dict(state_dict)
        if any(k.removeprefix("module.").startswith(("decoder_cov.", "decoder_linear.")) for k in sd):
            sd = convert_official_state_dict(sd)
        head = cls(width, embed_dim, image_size, n_stages, **kwargs)
        head.load_state_dict(sd)
        return head

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """As nn.Module; marks the head trained when every weight was loaded, unless the dict
        carries ``trained = False`` (the state of an untrained head round-trips as untrained)."""
        sd = dict(state_dict)
        flag = sd.get("trained")
        sd["trained"] = torch.zeros((), dtype=torch.bool)  # placeholder; set below
        result = super().load_state_dict(sd, strict=strict, assign=assign)
        complete = not result.missing_keys
        with torch.no_grad():
            self.trained.fill_(complete and (flag is None or bool(flag)))
        return result

    def mark_trained(self) -> None:
        """For training code: the current weights are trained."""
        with torch.no_grad():
            self.trained.fill_(True)

    @property
    def is_trained(self) -> bool:
        return bool(self.trained)

    @property
    def n_heads(self) -> int:
        return len(self.linear.fc) + len(self.mmci)

    # ---- scoring ---------------------------------------------------------------------------

    def forward(
        self,
        features: DualPathFeatures,
        text: Tensor,
        *,
        allow_untrained: bool = False,
        with_adapter: bool = True,
        return_heads: bool = False,
    ) -> FiLoOutput:
        """features from ``StagedDualPathViT``; text (E, 2) or (B, E, 2), L2-normalised columns.

        ``allow_untrained=True`` is for tests and cost measurements only.
        """
        if not allow_untrained and not self.is_trained:
            raise UntrainedFiLoError(
                "FiLoHead has randomly initialised decoders: load trained weights "
                "(FiLoHead.from_state_dict / load_state_dict) or pass allow_untrained=True for tests"
            )
        linear_in, mmci_in = filo_head_inputs(features, self.official_quirks)
        b = linear_in[0].shape[0]
        gh, gw = features.grid
        dtype = linear_in[0].dtype
        text_b = text.unsqueeze(0).expand(b, -1, -1) if text.dim() == 2 else text  # (B, E, 2)
        text_b = text_b.to(dtype)
        pair_scale = 2.0**-0.5 if self.pair_norm else 1.0

        heads = self.linear([t[:, 1:] for t in linear_in])  # S x (B, P, E); CLS dropped
        heads += [m(t[:, 1:], (gh, gw)) for m, t in zip(self.mmci, mmci_in, strict=True)]
        tokens = F.normalize(torch.stack(heads), dim=-1)  # (nH, B, P, E)
        logits = (100.0 * pair_scale) * torch.einsum("hbpe,bek->hbkp", tokens, text_b)  # (nH, B, 2, P)
        # softmax over 2 channels = sigmoid(abnormal - normal), and bilinear upsampling is linear,
        # so upsampling the logit difference alone equals the official upsample-then-softmax.
        diff = (logits[:, :, ABNORMAL] - logits[:, :, 1 - ABNORMAL]).reshape(-1, 1, gh, gw)  # (nH*B, 1, gh, gw)
        up = F.interpolate(diff, size=self.image_size, mode="bilinear", align_corners=True)
        h, w = self.image_size
        probs = torch.sigmoid(up).view(len(heads), b, h, w)  # (nH, B, H, W) abnormal probability
        # The blur is linear, so blurring the head mean equals the official mean of blurred heads.
        anomaly_map = gaussian_blur(probs.mean(dim=0), self.blur_kernel, self.blur_sigma)  # (B, H, W)
        map_max = anomaly_map.flatten(1).amax(dim=1)

        cls = features.surgery[-1][:, 0]  # (B, E): ln_post(last block's CLS) @ proj, CLIP's image embedding
        if with_adapter:
            cls = self.adapter(cls)
        cls = F.normalize(cls, dim=-1)
        sim = pair_scale * torch.einsum("be,bek->bk", cls, text_b)  # (B, 2)
        cls_prob = (sim / ADAPTER_TEMPERATURE).softmax(dim=-1)[:, ABNORMAL]
        cls_term = sim[:, ABNORMAL] if self.score_term == "similarity" else cls_prob
        image_score = (cls_term + map_max) / 2
        return FiLoOutput(
            anomaly_map=anomaly_map,
            image_score=image_score,
            cls_prob=cls_prob,
            map_max=map_max,
            cls_similarity=sim[:, ABNORMAL],
            head_probs=probs if return_heads else None,
        )


_OFFICIAL_MMCI = {"fc_11": 0, "fc_33": 1, "fc_55": 2, "fc_77": 3, "fc_15": 4, "fc_51": 5}


def convert_official_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Map an official FiLo ``ckpt["filo"]`` to FiLoHead keys; other keys (CLIP, prompt
    learners) are dropped. decoder_cov.fc_KK.i -> mmci.i.branches.k (order of MMCI_KERNELS),
    decoder_linear.fc.i -> linear.fc.i, adapter.fc.0 / .2 -> adapter.down / .up."""
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        k = key.removeprefix("module.")
        parts = k.split(".")
        if parts[0] == "decoder_cov" and parts[1] in _OFFICIAL_MMCI:
            out[f"mmci.{parts[2]}.branches.{_OFFICIAL_MMCI[parts[1]]}.{parts[3]}"] = value
        elif parts[0] == "decoder_linear" and parts[1] == "fc":
            out[f"linear.fc.{parts[2]}.{parts[3]}"] = value
        elif k == "adapter.fc.0.weight":
            out["adapter.down.weight"] = value
        elif k == "adapter.fc.2.weight":
            out["adapter.up.weight"] = value
    if not out:
        raise ValueError("no FiLo decoder or adapter weights in this state dict")
    return out
