"""Strict validation of the LLM's answer: ``{"defects": ["short phrase", ...]}`` -> clean phrases.

Each phrase is later spliced into CLIP text prompts ("abnormal {category} with {phrase} at
{position}"), whose context is 77 tokens: phrases must be short, plain words. A phrase that
breaks a rule is dropped with its reason; the answer is refused when too few phrases survive,
when it is not the asked JSON, or when it holds more phrases than a prompt set should carry.
Pure functions: no I/O, no model.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from workers.llm.base import LLMError

MIN_PHRASES, MAX_PHRASES = 3, 20
MIN_CHARS, MAX_CHARS = 2, 60
MAX_WORDS = 8

_FENCE = re.compile(r"```[ \t]*(?:json)?[ \t]*\r?\n(.*?)```", re.DOTALL | re.IGNORECASE)
_ALLOWED = re.compile(r"[a-z0-9' -]+")
_HAS_LETTER = re.compile(r"[a-z]")
# Words that only occur when the model talks about the task instead of answering it.
_ECHO_WORDS = frozenset({
    "json", "instruction", "instructions", "assistant", "you", "your", "output", "prompt", "answer",
    "phrase", "phrases", "example", "examples", "sure", "here", "ai", "user", "category",
})
_ECHO_PHRASES = ("defect list", "defects list", "list of defects", "language model")
# Already among FiLo's generic abnormal states; a duplicate would only re-weight them.
_GENERIC = frozenset({"damage", "damaged", "defect", "defects", "defective", "flaw", "flaws", "broken", "anomaly"})


@dataclass(frozen=True)
class Checked:
    phrases: list[str]
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (original item, reason)


def validate_defects(answer: str) -> list[str]:
    """The cleaned phrases of a valid answer; ``LLMError`` with the reason otherwise."""
    return check_defects(answer).phrases


def check_defects(answer: str) -> Checked:
    """Like ``validate_defects`` but also reports which items were dropped and why."""
    items = _defects_list(_parse(answer))
    phrases: list[str] = []
    dropped: list[tuple[str, str]] = []
    seen: set[str] = set()
    for item in items:
        if not isinstance(item, str):
            raise LLMError(f"'defects' must hold only strings, found {type(item).__name__} {item!r:.40}")
        phrase, reason = clean_phrase(item)
        if phrase is not None:
            key = re.sub(r"[\s-]+", "", phrase)  # "hair-line crack" == "hairline crack"
            if key in seen:
                phrase, reason = None, "duplicate"
            else:
                seen.add(key)
        if phrase is None:
            dropped.append((item, reason))
        else:
            phrases.append(phrase)
    if len(phrases) < MIN_PHRASES:
        why = "; ".join(f"{item[:40]!r}: {reason}" for item, reason in dropped[:5])
        raise LLMError(
            f"only {len(phrases)} usable defect phrases (need {MIN_PHRASES} to {MAX_PHRASES})"
            + (f"; dropped {why}" if why else "")
        )
    if len(phrases) > MAX_PHRASES:
        raise LLMError(f"{len(phrases)} defect phrases; at most {MAX_PHRASES} are allowed")
    return Checked(phrases, dropped)


def clean_phrase(item: str) -> tuple[str | None, str]:
    """(lower-cased, whitespace-normalised phrase, "") or (None, reason)."""
    text = item.replace("\u2019", "'").replace("\u2010", "-").replace("\u2011", "-")
    text = " ".join(text.split()).strip(" .,;:").lower()
    if not MIN_CHARS <= len(text) <= MAX_CHARS:
        return None, f"length {len(text)} outside {MIN_CHARS}..{MAX_CHARS} characters"
    if len(text.split()) > MAX_WORDS:
        return None, f"more than {MAX_WORDS} words"
    if not _ALLOWED.fullmatch(text):
        bad = sorted({c for c in text if not _ALLOWED.fullmatch(c)})
        return None, f"characters not allowed: {''.join(bad)!r}"
    if not _HAS_LETTER.search(text):
        return None, "no letters"
    words = set(re.split(r"[\s-]+", text))
    if words & _ECHO_WORDS or any(p in text for p in _ECHO_PHRASES):
        return None, "echoes the instruction"
    if text in _GENERIC:
        return None, "generic word (already a generic state)"
    return text, ""


def _parse(answer: str) -> object:
    """JSON of the whole answer, or of a fenced block (models often wrap JSON in ```json)."""
    if not isinstance(answer, str) or not answer.strip():
        raise LLMError("empty answer")
    text = answer.strip()
    fence = _FENCE.search(text)
    if fence is not None:
        text = fence.group(1).strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        where = "inside the ``` fence" if fence else "(expected only a JSON object, optionally in a ```json fence)"
        msg = f"answer is not valid JSON {where}: {exc.msg} at char {exc.pos}; began {answer[:80]!r}"
        raise LLMError(msg) from None


def _defects_list(doc: object) -> list[object]:
    if not isinstance(doc, dict):
        raise LLMError(f'answer must be a JSON object {{"defects": [...]}}, got {type(doc).__name__}')
    if "defects" not in doc:
        raise LLMError(f"answer has no 'defects' key (keys: {sorted(doc)[:5]})")
    items = doc["defects"]
    if not isinstance(items, list):
        raise LLMError(f"'defects' must be a list of strings, got {type(items).__name__}")
    return items
