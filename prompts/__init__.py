"""Prompt data shipped with the project (states, templates, RVS settings) as package data.

Stored in the database as a versioned prompt set the first time a category uses it.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

DEFAULT_SDP_FILE = "sdp_default.json"


def load_prompt_file(name: str = DEFAULT_SDP_FILE) -> dict[str, Any]:
    """A prompt file: {"content": {...}, "rvs_method": str, "rvs_params": {...}, ...}."""
    data = json.loads(resources.files(__package__).joinpath(name).read_text(encoding="utf-8"))
    validate_content(data["content"])
    return data


def validate_content(content: dict[str, Any]) -> None:
    """Refuse a prompt set that cannot produce sentences, with the reason."""
    for key in ("normal_states", "abnormal_states", "templates"):
        items = content.get(key)
        if not isinstance(items, list) or not items or not all(isinstance(s, str) for s in items):
            raise ValueError(f"prompt content needs a non-empty list of strings under {key!r}")
    for t in content["templates"]:
        if t.count("{}") != 1:
            raise ValueError(f"template {t!r} must contain exactly one '{{}}'")
    for s in content["normal_states"] + content["abnormal_states"]:
        if s.count("{}") != 1:
            raise ValueError(f"state {s!r} must contain exactly one '{{}}'")


def load_lad_vocabulary(category: str) -> dict[str, Any]:
    """CLIP-LAD vocabularies for a category (``prompts/clip_lad/<category>.json``), else the default."""
    base = resources.files(__package__).joinpath("clip_lad")
    path = base.joinpath(f"{category}.json")
    if not path.is_file():
        path = base.joinpath("default.json")
    data = json.loads(path.read_text(encoding="utf-8"))
    validate_lad_content(data["content"])
    return data


def validate_lad_content(content: dict[str, Any]) -> None:
    coarse, fg, fine = content.get("coarse"), content.get("foreground"), content.get("fine")
    if not (isinstance(coarse, list) and coarse and isinstance(fg, list) and len(fg) == len(coarse)):
        raise ValueError("CLIP-LAD content needs 'coarse' names and one 'foreground' flag per name")
    if not any(fg) or all(fg):
        raise ValueError("CLIP-LAD 'foreground' flags need at least one foreground and one background class")
    if not (isinstance(fine, list) and fine and all(isinstance(n, str) and n for n in fine)):
        raise ValueError("CLIP-LAD content needs a non-empty 'fine' vocabulary")
    if not content.get("templates") or any(t.count("{}") != 1 for t in content["templates"]):
        raise ValueError("CLIP-LAD templates must each contain exactly one '{}'")
    if int(content.get("n_clusters", 0)) < 2:
        raise ValueError("CLIP-LAD 'n_clusters' must be at least 2")
