"""Typed ORM classes (SQLAlchemy 2 ``Mapped``): the tables every stage reads and writes.

Keys are integers except inspections, whose id is a UUID string that doubles as the job id
printed to users and carried in task messages.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Enum,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from storage.db import Base, UTCDateTime, utcnow


class InspectionStatus(enum.StrEnum):
    queued = "queued"
    running = "running"
    done = "done"
    failed = "failed"


class StageStatus(enum.StrEnum):
    running = "running"
    done = "done"
    failed = "failed"


class Verdict(enum.StrEnum):
    OK = "OK"
    NG = "NG"


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    # Stored as VARCHAR + CHECK so adding a member is a plain migration on every backend.
    # create_constraint: SQLAlchemy 2 no longer emits the CHECK by default.
    return Enum(
        cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=16,
        validate_strings=True,
    )


class Line(Base):
    __tablename__ = "lines"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    description: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), server_default=func.now())


class Category(Base):
    __tablename__ = "categories"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    threshold: Mapped[float] = mapped_column(Float)
    # Per-term normalisation of the image score, e.g. {"cls": [lo, hi], "map": [lo, hi]},
    # fitted on normal images; null means raw scores.
    score_norm: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # Which stages run for this category, e.g. {"stages": ["segment"]}.
    pipeline: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    active_prompt_set_id: Mapped[int | None] = mapped_column(
        ForeignKey("prompt_sets.id", use_alter=True, ondelete="SET NULL")
    )
    auto_registered: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(
        UTCDateTime(), server_default=func.now(), onupdate=func.now()
    )

    active_prompt_set: Mapped[PromptSet | None] = relationship(
        foreign_keys=[active_prompt_set_id], post_update=True
    )


class PromptSet(Base):
    __tablename__ = "prompt_sets"
    __table_args__ = (UniqueConstraint("category_id", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    category_id: Mapped[int] = mapped_column(ForeignKey("categories.id", ondelete="CASCADE"))
    version: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(32), default="sdp")
    # {"normal_states": [...], "abnormal_states": [...], "templates": [...]}
    content: Mapped[dict[str, Any]] = mapped_column(JSON)
    rvs_method: Mapped[str] = mapped_column(String(32))
    rvs_params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # Where it came from: {"source": "default", "file": "prompts/sdp_default.json", ...}
    provenance: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), server_default=func.now())

    category: Mapped[Category] = relationship(foreign_keys=[category_id])


class ModelWeights(Base):
    __tablename__ = "model_weights"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    arch: Mapped[str] = mapped_column(String(128))
    tag: Mapped[str | None] = mapped_column(String(128))
    sha256: Mapped[str] = mapped_column(String(64))
    object_key: Mapped[str] = mapped_column(String(512))
    # BIGINT: large CLIP checkpoints exceed 2 GiB.
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), server_default=func.now())


class Inspection(Base):
    __tablename__ = "inspections"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    frame_id: Mapped[str] = mapped_column(String(256), unique=True)
    line_id: Mapped[int] = mapped_column(ForeignKey("lines.id"), index=True)
    station: Mapped[str | None] = mapped_column(String(64))
    category_id: Mapped[int] = mapped_column(ForeignKey("categories.id"), index=True)
    serial: Mapped[str | None] = mapped_column(String(256), index=True)
    source: Mapped[str] = mapped_column(String(32), default="cli")
    image_key: Mapped[str] = mapped_column(String(512))
    image_sha256: Mapped[str] = mapped_column(String(64))
    content_type: Mapped[str] = mapped_column(String(64))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    status: Mapped[InspectionStatus] = mapped_column(
        _enum(InspectionStatus, "inspection_status"), default=InspectionStatus.queued, index=True
    )
    reason: Mapped[str | None] = mapped_column(Text)
    # Python-side default: microsecond order within one transaction (PostgreSQL's now() is
    # the transaction start) and on SQLite (CURRENT_TIMESTAMP has one-second resolution).
    created_at: Mapped[datetime] = mapped_column(
        UTCDateTime(), default=utcnow, server_default=func.now(), index=True
    )
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # Set once the result (or failure) event was confirmed by the broker: one event per inspection.
    event_sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    line: Mapped[Line] = relationship()
    category: Mapped[Category] = relationship()
    result: Mapped[Result | None] = relationship(back_populates="inspection", uselist=False)
    stage_runs: Mapped[list[StageRun]] = relationship(
        back_populates="inspection", order_by="StageRun.id"
    )


class StageRun(Base):
    __tablename__ = "stage_runs"
    __table_args__ = (UniqueConstraint("inspection_id", "stage"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    inspection_id: Mapped[str] = mapped_column(
        ForeignKey("inspections.id", ondelete="CASCADE"), index=True
    )
    stage: Mapped[str] = mapped_column(String(32))
    status: Mapped[StageStatus] = mapped_column(_enum(StageStatus, "stage_status"))
    attempts: Mapped[int] = mapped_column(Integer, default=1)
    duration_ms: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)
    # Stage outputs that later stages read (scores, object keys), JSON only.
    output: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    worker: Mapped[str | None] = mapped_column(String(256))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime(), server_default=func.now())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    inspection: Mapped[Inspection] = relationship(back_populates="stage_runs")


class Result(Base):
    __tablename__ = "results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    inspection_id: Mapped[str] = mapped_column(
        ForeignKey("inspections.id", ondelete="CASCADE"), unique=True
    )
    image_score: Mapped[float] = mapped_column(Float)
    verdict: Mapped[Verdict] = mapped_column(_enum(Verdict, "verdict"), index=True)
    threshold: Mapped[float] = mapped_column(Float)
    scores: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    model_name: Mapped[str] = mapped_column(String(128))
    weights_ref: Mapped[str] = mapped_column(String(512))
    random_weights: Mapped[bool] = mapped_column(Boolean, default=False)
    prompt_set_id: Mapped[int | None] = mapped_column(
        ForeignKey("prompt_sets.id", ondelete="SET NULL")
    )
    prompt_set_version: Mapped[int | None] = mapped_column(Integer)
    anomaly_map_key: Mapped[str | None] = mapped_column(String(512))
    overlay_key: Mapped[str | None] = mapped_column(String(512))
    bank_id: Mapped[int | None] = mapped_column(ForeignKey("memory_banks.id", ondelete="SET NULL"))
    bank_version: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(
        UTCDateTime(), server_default=func.now(), index=True
    )

    inspection: Mapped[Inspection] = relationship(back_populates="result")


class BankStatus(enum.StrEnum):
    building = "building"
    ready = "ready"
    failed = "failed"


class MemoryBank(Base):
    """A CLIP-LAD memory bank: versioned per (line, category); line null = every line.

    The tensors (k-means centroids, histogram bank, patch bank, Mahalanobis statistics) live in
    the object store as one safetensors file; this row indexes and describes them.
    """

    __tablename__ = "memory_banks"
    __table_args__ = (UniqueConstraint("category_id", "line_id", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    category_id: Mapped[int] = mapped_column(ForeignKey("categories.id", ondelete="CASCADE"), index=True)
    line_id: Mapped[int | None] = mapped_column(ForeignKey("lines.id", ondelete="CASCADE"))
    version: Mapped[int] = mapped_column(Integer)
    status: Mapped[BankStatus] = mapped_column(_enum(BankStatus, "bank_status"), default=BankStatus.building)
    active: Mapped[bool] = mapped_column(Boolean, default=False)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    # Inputs: {"train": [image keys], "validation": [image keys], "shots": k, "config": {...}}
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    prompt_set_id: Mapped[int | None] = mapped_column(ForeignKey("prompt_sets.id", ondelete="SET NULL"))
    object_key: Mapped[str | None] = mapped_column(String(512))
    sha256: Mapped[str | None] = mapped_column(String(64))
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    # Outputs: Mahalanobis mean/cov, validation score summaries, patch counts, timings.
    stats: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    model_name: Mapped[str | None] = mapped_column(String(128))
    weights_ref: Mapped[str | None] = mapped_column(String(512))
    random_weights: Mapped[bool] = mapped_column(Boolean, default=False)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), server_default=func.now(), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    category: Mapped[Category] = relationship()
    line: Mapped[Line | None] = relationship()
    prompt_set: Mapped[PromptSet | None] = relationship()


class JobStatus(enum.StrEnum):
    queued = "queued"
    running = "running"
    done = "done"
    failed = "failed"


class Job(Base):
    """Background work that is not a frame (LLM descriptions, ...): the CLI waits on this row."""

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32), index=True)
    status: Mapped[JobStatus] = mapped_column(_enum(JobStatus, "job_status"), default=JobStatus.queued)
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), server_default=func.now(), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class Detection(Base):
    """A Grounding DINO box of one inspection (normalised xyxy), kept or filtered out, for SQL reports."""

    __tablename__ = "detections"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    inspection_id: Mapped[str] = mapped_column(ForeignKey("inspections.id", ondelete="CASCADE"), index=True)
    rank: Mapped[int] = mapped_column(Integer)
    phrase: Mapped[str] = mapped_column(String(256))
    score: Mapped[float] = mapped_column(Float)
    x0: Mapped[float] = mapped_column(Float)
    y0: Mapped[float] = mapped_column(Float)
    x1: Mapped[float] = mapped_column(Float)
    y1: Mapped[float] = mapped_column(Float)
    kept: Mapped[bool] = mapped_column(Boolean)
    position: Mapped[str | None] = mapped_column(String(32))


class RejectedMessage(Base):
    """A message the intake refused (malformed, invalid, unknown line/category, bad image): never lost."""

    __tablename__ = "rejected_messages"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime(), server_default=func.now(), default=utcnow,
                                                  index=True)
    queue: Mapped[str] = mapped_column(String(256))
    routing_key: Mapped[str | None] = mapped_column(String(256))
    message_id: Mapped[str | None] = mapped_column(String(256), index=True)
    reason: Mapped[str] = mapped_column(Text)
    headers: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    body_size: Mapped[int] = mapped_column(BigInteger)
    body_excerpt: Mapped[str | None] = mapped_column(Text)  # first bytes, escaped: enough to identify it
