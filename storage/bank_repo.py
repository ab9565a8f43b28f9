"""Queries for CLIP-LAD memory banks (versioned per line and category; one active per pair)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from storage.db import utcnow
from storage.orm import BankStatus, Category, Line, MemoryBank


def create_bank(
    s: Session, *, category: Category, line: Line | None, spec: dict[str, Any], prompt_set_id: int | None
) -> MemoryBank:
    """A new 'building' bank with the next version for (category, line)."""
    line_id = line.id if line is not None else None
    current = s.scalar(
        select(func.max(MemoryBank.version)).where(
            MemoryBank.category_id == category.id,
            MemoryBank.line_id.is_(None) if line_id is None else MemoryBank.line_id == line_id,
        )
    )
    bank = MemoryBank(category_id=category.id, line_id=line_id, version=(current or 0) + 1,
                      status=BankStatus.building, active=False, progress=0.0, spec=spec,
                      prompt_set_id=prompt_set_id, random_weights=False)
    s.add(bank)
    s.flush()
    return bank


def get_bank(s: Session, bank_id: int) -> MemoryBank | None:
    return s.get(MemoryBank, bank_id)


def list_banks(s: Session, category: Category | None = None) -> list[MemoryBank]:
    stmt = select(MemoryBank).order_by(MemoryBank.category_id, MemoryBank.line_id, MemoryBank.version)
    if category is not None:
        stmt = stmt.where(MemoryBank.category_id == category.id)
    return list(s.scalars(stmt))


def finish_bank(s: Session, bank: MemoryBank, **fields: Any) -> MemoryBank:
    """Mark a bank ready (or failed) with its outputs."""
    for name, value in fields.items():
        setattr(bank, name, value)
    bank.finished_at = utcnow()
    s.flush()
    return bank


def activate_bank(s: Session, bank: MemoryBank) -> MemoryBank:
    """Make ``bank`` the one used for its (category, line); only a ready bank can be active."""
    if bank.status != BankStatus.ready:
        raise ValueError(f"bank {bank.id} is {bank.status.value}; only a ready bank can be activated")
    same = select(MemoryBank).where(
        MemoryBank.category_id == bank.category_id,
        MemoryBank.line_id.is_(None) if bank.line_id is None else MemoryBank.line_id == bank.line_id,
        MemoryBank.active.is_(True),
    )
    for other in s.scalars(same):
        other.active = False
    bank.active = True
    s.flush()
    return bank


def active_bank(s: Session, category_id: int, line_id: int | None) -> MemoryBank | None:
    """The line's own active bank, else the category's all-lines bank."""
    base = select(MemoryBank).where(MemoryBank.category_id == category_id, MemoryBank.active.is_(True))
    if line_id is not None:
        own = s.scalars(base.where(MemoryBank.line_id == line_id)).first()
        if own is not None:
            return own
    return s.scalars(base.where(MemoryBank.line_id.is_(None))).first()
