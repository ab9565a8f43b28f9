"""Queries for the MES path: rejected intake messages, and the once-only result event marker."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from storage.orm import Line, RejectedMessage


def record_rejection(
    s: Session, *, queue: str, routing_key: str | None, message_id: str | None, reason: str,
    headers: dict[str, Any] | None, body: bytes,
) -> RejectedMessage:
    row = RejectedMessage(queue=_nul(queue)[:256], routing_key=routing_key and _nul(routing_key)[:256],
                          message_id=(message_id or None) and _nul(message_id)[:256],
                          reason=_nul(reason)[:4000], headers=headers, body_size=len(body),
                          body_excerpt=_nul(body[:512].decode("utf-8", "backslashreplace")))
    s.add(row)
    s.flush()
    return row


def _nul(text: str) -> str:
    # PostgreSQL text cannot hold NUL, and image bodies (and hostile ids) carry them: escape it.
    return text.replace("\x00", "\\x00")


def list_rejections(s: Session, limit: int = 100) -> list[RejectedMessage]:
    return list(s.scalars(select(RejectedMessage).order_by(RejectedMessage.id.desc()).limit(limit)))


def get_line(s: Session, name: str) -> Line | None:
    return s.scalars(select(Line).where(Line.name == name)).one_or_none()


def list_lines(s: Session) -> list[Line]:
    return list(s.scalars(select(Line).order_by(Line.name)))


def add_line(s: Session, name: str, description: str | None = None) -> tuple[Line, bool]:
    """Register a line for the MES intake: ``(line, created)``; an existing name is kept as is."""
    line = get_line(s, name)
    if line is not None:
        return line, False
    line = Line(name=name, description=description)
    s.add(line)
    s.flush()
    return line, True
