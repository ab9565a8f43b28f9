"""FiLo prompt data (FG-Des): default defect phrases, generic states, the describe instruction.

A FiLo prompt set (kind ``filo``) stores ``{"phrases": [...], "generic": [...]}``; the segment
stage builds "abnormal {category} with {phrase}" plus the generic states. Which FiLo set a
category uses is recorded in ``category.pipeline[FILO_PIPELINE_KEY]`` (the category's
``active_prompt_set`` stays the SDP set the segment stage reads).
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from importlib import resources
from typing import Any

FILO_KIND = "filo"
FILO_PIPELINE_KEY = "filo_prompt_set_id"
DEFAULTS_FILE = "filo_defaults.json"
GENERIC_KEY = "_generic"
# FiLo's generic abnormal states (WinCLIP's), kept next to the fine-grained phrases.
GENERIC_STATES = ["damaged {}", "broken {}", "{} with flaw", "{} with defect", "{} with damage"]
NORMAL_STATES = [
    "{}", "flawless {}", "perfect {}", "unblemished {}",
    "{} without flaw", "{} without defect", "{} without damage",
]


@lru_cache(maxsize=1)
def _defaults() -> dict[str, list[str]]:
    text = resources.files(__package__).joinpath(DEFAULTS_FILE).read_text(encoding="utf-8")
    return json.loads(text)["categories"]


def filo_default_categories() -> list[str]:
    """Categories with a reviewed list (without the generic fallback)."""
    return sorted(k for k in _defaults() if k != GENERIC_KEY)


def load_filo_defaults(category: str) -> list[str]:
    """The reviewed phrases for ``category`` ("metal nut" finds metal_nut), else the generic list."""
    table = _defaults()
    key = category if category in table else re.sub(r"[\s-]+", "_", category.strip().lower())
    return list(table.get(key, table[GENERIC_KEY]))


def filo_content(phrases: list[str]) -> dict[str, Any]:
    """Content of a FiLo prompt set."""
    return {"phrases": list(phrases), "generic": list(GENERIC_STATES)}


def with_filo_prompt_set(pipeline: dict[str, Any] | None, prompt_set_id: int) -> dict[str, Any]:
    """A new pipeline dict naming the FiLo prompt set (a new object: the JSON column sees the change)."""
    return {**(pipeline or {}), FILO_PIPELINE_KEY: prompt_set_id}


def load_describe_instruction(version: str = "v1") -> dict[str, Any]:
    """The describe stage's LLM instruction template (``prompts/describe/instructions_<version>.json``)."""
    if not re.fullmatch(r"v\d+", version):
        raise ValueError(f"instruction version {version!r} is not like 'v1'")
    path = resources.files(__package__).joinpath("describe", f"instructions_{version}.json")
    if not path.is_file():
        raise ValueError(f"no describe instruction {version!r}")
    data = json.loads(path.read_text(encoding="utf-8"))
    for key in ("version", "system", "user", "temperature", "max_tokens"):
        if key not in data:
            raise ValueError(f"describe instruction {version} lacks {key!r}")
    return data
