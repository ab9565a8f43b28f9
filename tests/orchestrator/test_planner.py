"""Stage planning: pipeline configuration -> ordered stage messages."""

from __future__ import annotations

import pytest

from orchestrator.planner import fold_finalize, plan_stages


def test_default_pipeline_is_segment_then_finalize():
    assert plan_stages(None) == ["segment", "finalize"]
    assert plan_stages({"stages": ["segment"]}) == ["segment", "finalize"]


def test_unknown_stage_is_refused():
    with pytest.raises(ValueError, match="unknown stages"):
        plan_stages({"stages": ["segment", "telepathy"]})


def test_finalize_rides_on_the_last_stage():
    assert fold_finalize(["segment", "finalize"]) == [("segment", True)]
    assert fold_finalize(["localize", "segment", "finalize"]) == [("localize", False), ("segment", True)]
    assert fold_finalize(["finalize"]) == [("finalize", False)]
