"""The Grounding DINO adapter through transformers' real save/load path, with a tiny random model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from workers.grounding import GroundingModel, GroundingNotFound, load_grounding, threshold_kwargs, tiny_random_grounding
from workers.models.hqloc import Box, build_caption, filter_boxes

CAPTION = build_caption(["crack", "missing cap"])
CAPTION_WORDS = {w for w in CAPTION.replace(".", " ").split()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> GroundingModel:
    path = tiny_random_grounding(tmp_path_factory.mktemp("gdino"))
    assert {"config.json", "model.safetensors", "processor_config.json", "vocab.txt"} <= {
        p.name for p in path.iterdir()
    }
    return load_grounding(str(path))


def images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (50, 70, 3), dtype=np.uint8), rng.integers(0, 256, (80, 60, 3), dtype=np.uint8)]


def test_detect_returns_normalised_boxes_with_caption_phrases(tiny: GroundingModel) -> None:
    out = tiny.detect(images(), CAPTION, box_threshold=0.0, text_threshold=0.25)
    assert len(out) == 2
    for boxes in out:
        assert len(boxes) == 20  # every query survives box_threshold 0
        for b in boxes:
            assert isinstance(b, Box)
            assert 0.0 <= b.x0 <= b.x1 <= 1.0 and 0.0 <= b.y0 <= b.y1 <= 1.0
            assert 0.0 <= b.score <= 1.0
            assert set(b.phrase.split()) <= CAPTION_WORDS
    assert any(b.phrase for boxes in out for b in boxes)
    assert isinstance(filter_boxes(out[0], ["crack", "missing cap"]), list)


def test_thresholds_reach_the_post_processing(tiny: GroundingModel) -> None:
    loose = tiny.detect(images()[:1], CAPTION, box_threshold=0.0, text_threshold=0.25)[0]
    cut = sorted(b.score for b in loose)[len(loose) // 2]
    strict = tiny.detect(images()[:1], CAPTION, box_threshold=cut, text_threshold=0.25)[0]
    assert strict and all(b.score > cut for b in strict) and len(strict) < len(loose)
    silent = tiny.detect(images()[:1], CAPTION, box_threshold=0.0, text_threshold=1.0)[0]
    assert all(b.phrase == "" for b in silent)
    assert tiny.detect([], CAPTION, box_threshold=0.0, text_threshold=0.25) == []


def test_batches_are_chunked(tiny: GroundingModel, monkeypatch: pytest.MonkeyPatch) -> None:
    whole = tiny.detect(images(), CAPTION, box_threshold=0.0, text_threshold=0.25)
    monkeypatch.setattr(tiny, "max_batch", 1)
    one_by_one = tiny.detect(images(), CAPTION, box_threshold=0.0, text_threshold=0.25)
    assert [len(b) for b in one_by_one] == [len(b) for b in whole]


def test_rejects_non_rgb_uint8(tiny: GroundingModel) -> None:
    with pytest.raises(ValueError, match="uint8"):
        tiny.detect([np.zeros((8, 8), np.uint8)], CAPTION, box_threshold=0.0, text_threshold=0.25)


def test_threshold_argument_name_follows_the_installed_signature(tiny: GroundingModel) -> None:
    def new(outputs, input_ids=None, threshold=0.25, text_threshold=0.25, target_sizes=None): ...

    def old(outputs, input_ids, box_threshold, text_threshold, target_sizes=None): ...

    def unknown(outputs, score_threshold=0.3): ...

    assert threshold_kwargs(new, 0.1, 0.2) == {"threshold": 0.1, "text_threshold": 0.2}
    assert threshold_kwargs(old, 0.1, 0.2) == {"box_threshold": 0.1, "text_threshold": 0.2}
    with pytest.raises(RuntimeError, match="pinned"):
        threshold_kwargs(unknown, 0.1, 0.2)
    # the pinned transformers takes the new name
    assert "threshold" in threshold_kwargs(tiny.processor.post_process_grounded_object_detection, 0.1, 0.2)


def test_detect_works_against_the_old_signature(tiny: GroundingModel, monkeypatch: pytest.MonkeyPatch) -> None:
    real = tiny.processor.post_process_grounded_object_detection
    seen: dict[str, float] = {}

    def old_style(outputs, input_ids, box_threshold, text_threshold, target_sizes=None):
        seen["box_threshold"] = box_threshold
        return real(outputs, input_ids, threshold=box_threshold, text_threshold=text_threshold)

    monkeypatch.setattr(tiny.processor, "post_process_grounded_object_detection", old_style)
    out = tiny.detect(images()[:1], CAPTION, box_threshold=0.3, text_threshold=0.25)
    assert seen == {"box_threshold": 0.3} and all(b.score > 0.3 for b in out[0])


def test_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(GroundingNotFound, match="does not exist.*save_pretrained"):
        load_grounding(str(tmp_path / "nowhere"))


def test_directory_without_a_model_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(GroundingNotFound, match="could not load Grounding DINO.*hub cache"):
        load_grounding(str(tmp_path / "empty"))


def test_uncached_hub_id_without_download_is_a_clear_error() -> None:
    with pytest.raises(GroundingNotFound, match="huggingface-cli download"):
        load_grounding("example-org/no-such-grounding-model", allow_download=False)
    with pytest.raises(GroundingNotFound, match="neither"):
        load_grounding("not a hub id!")


def test_other_model_type_is_a_clear_error(tmp_path: Path) -> None:
    from transformers import BertConfig

    BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=1).save_pretrained(tmp_path)
    with pytest.raises(GroundingNotFound, match="not a Grounding DINO"):
        load_grounding(str(tmp_path))


def test_shortest_edge_override(tmp_path: Path) -> None:
    model = load_grounding(str(tiny_random_grounding(tmp_path)), shortest_edge=96)
    assert model.processor.image_processor.size["shortest_edge"] == 96
    assert len(model.detect(images()[:1], CAPTION, box_threshold=0.0, text_threshold=0.25)[0]) == 20
