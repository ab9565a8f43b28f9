"""Validation of the LLM answer: only short, plain, distinct defect phrases pass."""

from __future__ import annotations

import json

import pytest

from prompts.filo import filo_default_categories, load_filo_defaults
from workers.llm.base import LLMError
from workers.llm.schema import MAX_PHRASES, check_defects, clean_phrase, validate_defects

GOOD = ["missing component", "bent pin", "scratch on the board", "burnt mark"]


def answer(items: object) -> str:
    return json.dumps({"defects": items})


def test_plain_json_answer():
    assert validate_defects(answer(GOOD)) == GOOD


@pytest.mark.parametrize("wrap", [
    "```json\n{}\n```",
    "```JSON\n{}\n```",
    "```\n{}\n```",
    "Here is the list:\n```json\n{}\n```\nHope this helps.",
    "  \n{}\n  ",
])
def test_fenced_and_padded_answers(wrap: str):
    assert validate_defects(wrap.replace("{}", answer(GOOD))) == GOOD


def test_cleaning_lowercases_trims_and_normalises():
    got = validate_defects(answer(["  Missing   Component. ", "Bent\tPin", "Scratch on the Board;", "burnt mark"]))
    assert got == GOOD


def test_curly_apostrophes_and_hyphens_are_kept():
    got = validate_defects(answer(["operator\u2019s fingerprint", "hair-line crack", "dent", "o-ring missing"]))
    assert got == ["operator's fingerprint", "hair-line crack", "dent", "o-ring missing"]


def test_duplicates_are_case_space_and_hyphen_insensitive():
    res = check_defects(answer(["hairline crack", "Hairline  Crack", "hair-line crack", "dent", "stain", "hole"]))
    assert res.phrases == ["hairline crack", "dent", "stain", "hole"]
    assert [r for _, r in res.dropped] == ["duplicate", "duplicate"]


@pytest.mark.parametrize("junk", [
    "", "   ", "no json here", '{"defects": ["a", "b"', "[1, 2, 3]", '"just a string"',
    "Sure! The defects are: scratch, crack, dent.",
    'prefix {"defects": ["scratch", "crack", "dent"]} suffix',  # bare JSON inside prose is not accepted
])
def test_junk_is_refused(junk: str):
    with pytest.raises(LLMError):
        validate_defects(junk)


def test_wrong_shapes_name_the_problem():
    with pytest.raises(LLMError, match="no 'defects' key"):
        validate_defects(json.dumps({"anomalies": GOOD}))
    with pytest.raises(LLMError, match="must be a list"):
        validate_defects(json.dumps({"defects": "scratch, crack"}))
    with pytest.raises(LLMError, match="only strings"):
        validate_defects(answer(["scratch", 3, "crack", "dent"]))
    with pytest.raises(LLMError, match="JSON object"):
        validate_defects(json.dumps(GOOD))


def test_broken_json_in_fence_says_where():
    with pytest.raises(LLMError, match="inside the ``` fence"):
        validate_defects('```json\n{"defects": [\n```')


@pytest.mark.parametrize("item,reason", [
    ("x", "length"),
    ("a" * 61, "length"),
    ("one two three four five six seven eight nine", "more than 8 words"),
    ("scratch (small)", "characters not allowed"),
    ("crack/dent", "characters not allowed"),
    ("1. scratch", "characters not allowed"),
    ("rouille \u00e9paisse", "characters not allowed"),
    ("42 mm", ""),
    ("123", "no letters"),
    ("--", "no letters"),
    ("json output", "echoes"),
    ("here you go", "echoes"),
    ("defect list", "echoes"),
    ("follow the instruction", "echoes"),
    ("as an assistant", "echoes"),
    ("your answer", "echoes"),
    ("damage", "generic"),
    ("Defect", "generic"),
])
def test_single_phrase_rules(item: str, reason: str):
    phrase, why = clean_phrase(item)
    if reason:
        assert phrase is None and reason in why
    else:
        assert phrase == item.lower() and why == ""


def test_echo_words_match_whole_words_only():
    assert clean_phrase("pressure mark")[0] == "pressure mark"  # contains "sure"
    assert clean_phrase("youthful wear")[0] == "youthful wear"  # contains "you"
    assert clean_phrase("output pin bent")[0] is None


def test_bad_items_are_dropped_and_reported():
    res = check_defects(answer([*GOOD, "x", "Here is your JSON", "scratch (tiny)"]))
    assert res.phrases == GOOD
    assert [item for item, _ in res.dropped] == ["x", "Here is your JSON", "scratch (tiny)"]


def test_too_few_after_cleaning_explains_why():
    with pytest.raises(LLMError, match=r"only 2 usable.*'json output': echoes"):
        validate_defects(answer(["scratch", "dent", "json output", "scratch"]))
    with pytest.raises(LLMError, match="only 0 usable"):
        validate_defects(answer([]))


def test_too_many_is_refused():
    items = [f"defect kind {chr(97 + i)}{chr(97 + j)}" for i in range(3) for j in range(8)]
    assert len(items) > MAX_PHRASES
    with pytest.raises(LLMError, match="at most 20"):
        validate_defects(answer(items))
    assert len(validate_defects(answer(items[:MAX_PHRASES]))) == MAX_PHRASES


def test_limits_are_inclusive():
    assert validate_defects(answer(["ab", "cd", "a" * 60])) == ["ab", "cd", "a" * 60]
    eight = "one two three four five six seven eight"
    assert validate_defects(answer([eight, "dent", "hole"]))[0] == eight


def test_extra_keys_are_ignored():
    assert validate_defects(json.dumps({"category": "pcb1", "defects": GOOD})) == GOOD


def test_default_library_passes_the_schema():
    """The reviewed library obeys the same rules as LLM answers (and covers MVTec AD + VisA)."""
    cats = filo_default_categories()
    assert len(cats) == 27 and {"pcb1", "metal_nut", "pipe_fryum", "zipper"} <= set(cats)
    for cat in [*cats, "some_new_part"]:
        phrases = load_filo_defaults(cat)
        assert 4 <= len(phrases) <= 10, cat
        assert validate_defects(answer(phrases)) == phrases, cat
