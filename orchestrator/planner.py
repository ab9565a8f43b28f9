"""Which stages run for a frame, and how they travel (pure functions)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

KNOWN_STAGES = ("localize", "segment", "logical")  # also their order in a frame's chain
DEFAULT_STAGES = ("segment",)


def plan_stages(pipeline: dict[str, Any] | None, has_bank: bool = False) -> list[str]:
    """Ordered stage names ending with finalize.

    The logical stage runs after segment for categories that have an active memory bank; a
    pipeline that names it explicitly runs it always (and fails clearly without a bank).
    """
    stages = list((pipeline or {}).get("stages") or DEFAULT_STAGES)
    unknown = [s for s in stages if s not in KNOWN_STAGES]
    if unknown:
        raise ValueError(f"unknown stages {unknown} in category pipeline; known: {KNOWN_STAGES}")
    if has_bank and "logical" not in stages:
        stages.append("logical")
    stages = sorted(dict.fromkeys(stages), key=KNOWN_STAGES.index)  # localize -> segment -> logical
    return [*stages, "finalize"]


@dataclass(frozen=True)
class Message:
    stage: str  # the task that carries the message
    with_stages: tuple[str, ...]  # further stages run in the same task (shared backbone pass)
    finalize: bool  # verdict written in the same task and transaction
    queue: str


def plan_messages(stages: list[str], queue_for: Callable[[str], str]) -> list[Message]:
    """Consecutive stages routed to the same queue travel as one message.

    A worker consuming that queue then runs them in one process with one backbone pass;
    finalize (a few SQL statements) rides on the last message, saving a broker round trip.
    """
    body = [s for s in stages if s != "finalize"]
    if not body:
        return [Message("finalize", (), False, queue_for("finalize"))]
    groups: list[list[str]] = []
    for st in body:
        if groups and queue_for(groups[-1][0]) == queue_for(st):
            groups[-1].append(st)
        else:
            groups.append([st])
    last = len(groups) - 1
    return [Message(g[0], tuple(g[1:]), i == last and "finalize" in stages, queue_for(g[0]))
            for i, g in enumerate(groups)]
