"""Queries for the MES path: rejected intake messages, and the once-only result event marker."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from storage.db import utcnow
from storage.orm import Inspection, RejectedMessage


def record_rejection(
    s: Session, *, queue: str, routing_key: str | None, message_id: str | None, reason: str,
    headers: dict[str, Any] | None, body: bytes,
) -> RejectedMessage:
    row = RejectedMessage(queue=queue, routing_key=routing_key, message_id=(message_id or None) and message_id[:256],
                          reason=reason[:4000], headers=headers, body_size=len(body),
                          body_excerpt=body[:512].decode("utf-8", "backslashreplace"))
    s.add(row)
    s.flush()
    return row


def list_rejections(s: Session, limit: int = 100) -> list[RejectedMessage]:
    return list(s.scalars(select(RejectedMessage).order_by(RejectedMessage.id.desc()).limit(limit)))


def mark_event_sent(s: Session, inspection_id: str) -> bool:
    """True for the one caller that flips the marker (others see it already set)."""
    res = s.execute(update(Inspection).where(Inspection.id == inspection_id, Inspection.event_sent_at.is_(None))
                    .values(event_sent_at=utcnow()))
    return res.rowcount == 1
