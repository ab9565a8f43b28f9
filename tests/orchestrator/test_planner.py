"""Stage planning: pipeline configuration -> ordered stages -> messages by queue."""

from __future__ import annotations

import pytest

from orchestrator.planner import Message, plan_messages, plan_stages


def test_default_pipeline_is_segment_then_finalize():
    assert plan_stages(None) == ["segment", "finalize"]
    assert plan_stages({"stages": ["segment"]}) == ["segment", "finalize"]


def test_logical_joins_when_the_category_has_an_active_bank():
    assert plan_stages(None, has_bank=True) == ["segment", "logical", "finalize"]
    assert plan_stages({"stages": ["logical"]}, has_bank=True) == ["logical", "finalize"]
    assert plan_stages({"stages": ["segment", "logical"]}) == ["segment", "logical", "finalize"]


def test_unknown_stage_is_refused():
    with pytest.raises(ValueError, match="unknown stages"):
        plan_stages({"stages": ["segment", "telepathy"]})


def test_stages_on_one_queue_travel_together_and_finalize_rides_last():
    one = plan_messages(["segment", "logical", "finalize"], lambda s: "gpu")
    assert one == [Message("segment", ("logical",), True, "gpu")]
    routed = {"segment": "gpu.segment", "logical": "gpu.logical"}
    two = plan_messages(["segment", "logical", "finalize"], lambda s: routed.get(s, "gpu"))
    assert two == [Message("segment", (), False, "gpu.segment"), Message("logical", (), True, "gpu.logical")]
    assert plan_messages(["finalize"], lambda s: "gpu") == [Message("finalize", (), False, "gpu")]
