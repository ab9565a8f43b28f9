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


def fold_finalize(stages: list[str]) -> list[tuple[str, bool]]:
    """(stage, finalize) messages: finalize rides on the last compute stage.

    Finalize is a few SQL statements; running it inside the last stage's task writes the
    verdict in the same transaction and saves one broker round trip per frame.
    """
    if len(stages) >= 2 and stages[-1] == "finalize":
        body = stages[:-1]
        return [(st, i == len(body) - 1) for i, st in enumerate(body)]
    return [(st, False) for st in stages]
