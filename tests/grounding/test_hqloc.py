"""HQ-Loc pure functions: caption, FiLo's box filters in their official order, positions, masks, damping."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workers.models.hqloc import (
    GENERIC_WORDS,
    MAX_CAPTION_CHARS,
    POSITIONS,
    Box,
    best_box,
    box_mask,
    build_caption,
    damp_outside,
    draw_boxes,
    filter_boxes,
    position_word,
    prompt_positions,
)

GENERIC_CAPTION = "anomaly . damage . broken . defect . contamination . "


def box(x0: float, y0: float, x1: float, y1: float, score: float = 0.5, phrase: str = "crack") -> Box:
    return Box(x0, y0, x1, y1, score, phrase)


# --- caption ---------------------------------------------------------------------------------------


def test_caption_generic_then_details_lowercased_and_deduped() -> None:
    cap = build_caption(["Cracked Large", "damage", "missing cap", "missing cap", "  "])
    assert cap == GENERIC_CAPTION + "cracked large . missing cap . "


def test_caption_strips_separators_inside_phrases() -> None:
    assert build_caption(["bent. twisted, frayed"]) == GENERIC_CAPTION + "bent twisted frayed . "


def test_caption_cap_drops_whole_phrases_and_keeps_generic() -> None:
    phrases = [f"defect kind {i:03d}" for i in range(100)]
    cap = build_caption(phrases)
    assert len(cap) <= MAX_CAPTION_CHARS
    assert cap.startswith(GENERIC_CAPTION)
    kept = [p.strip() for p in cap.split(" . ") if p.strip()]
    assert all(p in GENERIC_WORDS or p in phrases for p in kept)  # nothing cut mid-phrase
    assert build_caption(["a" * 300, "crack"]) == GENERIC_CAPTION + "crack . "  # later phrases still fit
    assert build_caption(["crack"], max_chars=10) == GENERIC_CAPTION


def test_caption_fits_the_token_limit_of_a_bert_tokenizer(tmp_path) -> None:
    from transformers import BertTokenizer

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", *letters, *(f"##{c}" for c in letters)]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizer.from_pretrained(tmp_path)
    # worst case: a WordPiece token per character, plus accents and ligatures that normalise to letters
    cap = build_caption([letters[i:] + "éﬁö" for i in range(26)] * 2)
    assert len(cap) > 240
    assert len(tok(cap).input_ids) <= 256


# --- filters, in FiLo's order ----------------------------------------------------------------------


def test_keeps_score_above_and_area_below() -> None:
    good = box(0.1, 0.1, 0.3, 0.3, 0.6)
    low = box(0.1, 0.1, 0.3, 0.3, 0.25)  # not strictly above
    big = box(0.0, 0.0, 1.0, 0.8, 0.9)  # area 0.8
    assert filter_boxes([good, low, big], ["crack"]) == [good]


def test_area_limit_is_strict() -> None:
    edge = box(0.0, 0.0, 0.7, 1.0, 0.9)  # area 0.7, not < 0.7
    small = box(0.0, 0.0, 0.5, 0.5, 0.3)
    assert filter_boxes([edge, small], ["crack"]) == [small]


def test_fallback_is_the_single_highest_score_among_all_boxes() -> None:
    weak = box(0.1, 0.1, 0.2, 0.2, 0.1)
    huge = box(0.0, 0.0, 1.0, 1.0, 0.9, "anomaly")  # failed only on area, still the best score
    assert filter_boxes([weak, huge], []) == [huge]


def test_phrase_filter_applies_after_fallback() -> None:
    best = box(0.0, 0.0, 1.0, 1.0, 0.9, "")  # no token above text_threshold -> empty phrase
    assert filter_boxes([best, box(0.1, 0.1, 0.2, 0.2, 0.1)], ["crack"]) == []


def test_phrase_filter_needs_a_whole_detail_or_generic_word() -> None:
    whole = box(0.1, 0.1, 0.2, 0.2, 0.5, "cracked large")
    partial = box(0.1, 0.1, 0.2, 0.2, 0.5, "cracked")
    generic = box(0.1, 0.1, 0.2, 0.2, 0.5, "heat damaged")  # "damage" is a substring
    other = box(0.1, 0.1, 0.2, 0.2, 0.5, "cap")
    mixed_case = box(0.1, 0.1, 0.2, 0.2, 0.5, "uneven coating")
    kept = filter_boxes([whole, partial, generic, other, mixed_case], ["cracked large", "Uneven coating"])
    assert kept == [whole, generic, mixed_case]
    by_word = filter_boxes([partial, other], ["cracked large", "signs of corrosion"], match="word")
    assert by_word == [partial]
    assert filter_boxes([box(0, 0, 0.1, 0.1, 0.5, "of")], ["signs of corrosion"], match="word") == []


def test_threshold_filter_runs_before_phrase_filter() -> None:
    # the above-threshold box fails the phrase check: no fallback to the lower-scoring valid phrase
    wrong = box(0.1, 0.1, 0.2, 0.2, 0.8, "cap")
    right_but_weak = box(0.1, 0.1, 0.2, 0.2, 0.2, "crack")
    assert filter_boxes([wrong, right_but_weak], ["crack"]) == []
    assert filter_boxes([], ["crack"]) == []


# --- positions -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cx", "cy", "word"),
    [
        (0.1, 0.1, "top left"),
        (0.5, 0.1, "top"),
        (0.9, 0.1, "top right"),
        (0.1, 0.5, "left"),
        (0.5, 0.5, "center"),
        (0.9, 0.5, "right"),
        (0.1, 0.9, "bottom left"),
        (0.5, 0.9, "bottom"),
        (0.9, 0.9, "bottom right"),
        (0.0, 0.0, "top left"),
        (1.0, 1.0, "bottom right"),
        (1 / 3, 2 / 3, "bottom"),  # a boundary belongs to the next cell
        (0.3333, 0.6666, "left"),
    ],
)
def test_position_grid(cx: float, cy: float, word: str) -> None:
    assert position_word(box(cx, cy, cx, cy)) == word


def test_positions_list_and_no_box() -> None:
    assert len(POSITIONS) == 9 and POSITIONS[4] == "center"
    assert position_word(None) is None
    assert prompt_positions([]) == ("center",)  # official: centre when nothing is kept
    assert prompt_positions([], no_box=None) == ()  # paper reading: average all 9


def test_best_box_uses_two_decimals_and_later_wins_ties() -> None:
    a = box(0.0, 0.0, 0.1, 0.1, 0.437)
    b = box(0.8, 0.8, 0.9, 0.9, 0.432)  # same "0.43" -> the later one
    c = box(0.4, 0.4, 0.5, 0.5, 0.42)
    assert best_box([a, b, c]) is b
    assert best_box([box(0, 0, 0.1, 0.1, 0.29), box(0, 0, 0.2, 0.2, 0.285)]).x1 == 0.1
    assert best_box([]) is None
    assert prompt_positions([a, b, c]) == ("bottom right",)


# --- masks and damping -----------------------------------------------------------------------------


def test_box_mask_union_and_truncation() -> None:
    m = box_mask([box(0.0, 0.0, 0.25, 0.5), box(0.5, 0.5, 1.0, 1.0), box(-0.2, 0.9, 0.2, 1.3)], (10, 8))
    assert m.shape == (10, 8) and m.dtype == torch.bool
    assert m[:5, :2].all() and not m[5:9, :2].any()
    assert m[5:, 4:].all() and not m[:5, 4:].any()
    assert m[9, 0] and int(m.sum()) == 10 + 20 + 1  # third box clipped: row 9, col 0 (int(1.6) = 1)
    assert not box_mask([], (4, 4)).any()


def test_damp_outside() -> None:
    amap = torch.ones(2, 4, 4)
    mask = box_mask([box(0.0, 0.0, 0.5, 0.5)], (4, 4))
    out = damp_outside(amap, mask)
    assert torch.equal(out[:, :2, :2], torch.ones(2, 2, 2))
    assert torch.allclose(out[:, 2:, :], torch.full((2, 2, 4), 0.7))
    single = damp_outside(torch.ones(4, 4), mask, factor=0.5)
    assert single.shape == (4, 4) and float(single.sum()) == 4 + 12 * 0.5
    # no kept box: everything is outside, as in FiLo's test.py; None leaves the map alone
    assert torch.allclose(damp_outside(amap, box_mask([], (4, 4))), amap * 0.7)
    assert damp_outside(amap, None) is amap
    with pytest.raises(ValueError):
        damp_outside(amap, torch.ones(3, 3, dtype=torch.bool))


def test_draw_boxes() -> None:
    rgb = np.zeros((60, 80, 3), np.uint8)
    out = draw_boxes(rgb, [box(0.25, 0.25, 0.75, 0.75, 0.9, "crack")])
    assert out.shape == rgb.shape and out.dtype == np.uint8
    assert not rgb.any()  # input untouched
    assert tuple(out[30, 20]) == (0, 200, 0)  # left edge of the box, green in RGB
    plain = draw_boxes(rgb, [box(0.25, 0.25, 0.75, 0.75)], labels=False)
    assert (plain.sum(axis=2) > 0).sum() < (out.sum(axis=2) > 0).sum()
