"""Which stages run for a category (pure): its pipeline configuration plus finalize."""

from __future__ import annotations

from typing import Any

KNOWN_STAGES = ("segment",)
DEFAULT_STAGES = ("segment",)


def plan_stages(pipeline: dict[str, Any] | None) -> list[str]:
    """Ordered stage names ending with finalize; unknown stage names are refused."""
    stages = list((pipeline or {}).get("stages") or DEFAULT_STAGES)
    unknown = [s for s in stages if s not in KNOWN_STAGES]
    if unknown:
        raise ValueError(f"unknown stages {unknown} in category pipeline; known: {KNOWN_STAGES}")
    return [*stages, "finalize"]
