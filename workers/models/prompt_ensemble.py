"""Text features per (category, prompt set): state x template sentences, encoded, reduced by RVS.

CLIP-AD supplementary A: every normal / abnormal state is combined with every template, the
sentence embeddings are L2-normalised, one representative vector per group is chosen, and the
pair is stacked to (E, 2) as (normal, abnormal). Class names go in verbatim.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from workers.models.rvs import representative_vector


@dataclass(frozen=True)
class TextFeatures:
    features: Tensor  # (E, 2) L2-normalised columns: normal, abnormal
    n_sentences: tuple[int, int]  # (normal, abnormal)
    notes: list[str]


def build_sentences(content: dict[str, Any], class_name: str) -> tuple[list[str], list[str]]:
    """Every state (with the class name) inside every template, per group."""
    templates: Sequence[str] = content["templates"]

    def group(states: Sequence[str]) -> list[str]:
        return [t.format(s.format(class_name)) for s in states for t in templates]

    return group(content["normal_states"]), group(content["abnormal_states"])


@torch.no_grad()
def encode_text_features(
    encode_text: Callable[[Tensor], Tensor],
    tokenize: Callable[[list[str]], Tensor],
    content: dict[str, Any],
    class_name: str,
    rvs_method: str,
    rvs_params: dict[str, Any] | None = None,
    fp16_parity: bool = True,
    device: torch.device | str = "cpu",
    chunk: int = 256,
) -> TextFeatures:
    """Representative normal/abnormal text vectors for one class, shape (E, 2)."""
    columns: list[Tensor] = []
    notes: list[str] = []
    groups = build_sentences(content, class_name)
    for sentences in groups:
        if not sentences:
            raise ValueError("a prompt set needs at least one state and one template per group")
        parts = [
            encode_text(tokenize(sentences[i : i + chunk]).to(device)).float()
            for i in range(0, len(sentences), chunk)
        ]
        emb = F.normalize(torch.cat(parts), dim=-1)  # (N, E)
        result = representative_vector(emb, rvs_method, rvs_params)
        vec = result.vector
        if fp16_parity:
            # The official code casts the representative vector to fp16 before normalising.
            vec = vec.half().float()
        columns.append(F.normalize(vec, dim=0))
        notes.extend(result.notes)
    feats = torch.stack(columns, dim=1).cpu()  # (E, 2)
    return TextFeatures(feats, (len(groups[0]), len(groups[1])), notes)
