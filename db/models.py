"""SQLAlchemy 2 models: received instances, their analysis jobs, and an audit trail of events.

Patient names and IDs are deliberately not stored here: the archive file holds them, the database holds
only what the queue, the CLI and the audit need (UIDs, accession number, technical facts).
"""

from __future__ import annotations

import enum
from datetime import datetime, timezone

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

SCHEMA_VERSION = 1
"""Bump when the tables change; start-up refuses a database written with another version."""

UID_LENGTH = 64


def utcnow() -> datetime:
    """Naive UTC timestamp: SQLite keeps no time zone, so every timestamp in the database is UTC by contract."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class JobState(str, enum.Enum):
    """Life cycle of an analysis job: queued -> running -> done | failed | not_analysed."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    NOT_ANALYSED = "not_analysed"


class SchemaInfo(Base):
    __tablename__ = "schema_info"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[int] = mapped_column(Integer, nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, nullable=False)


class Instance(Base):
    """One received SOP instance, archived at ``archive_path`` (relative to the storage root)."""

    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH), unique=True, nullable=False)
    sop_class_uid: Mapped[str] = mapped_column(String(UID_LENGTH), nullable=False)
    study_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH), nullable=False, index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH), nullable=False)
    accession_number: Mapped[str | None] = mapped_column(String(16))
    modality: Mapped[str | None] = mapped_column(String(16))
    calling_aet: Mapped[str] = mapped_column(String(16), nullable=False)
    received_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, nullable=False)
    archive_path: Mapped[str] = mapped_column(String(512), nullable=False)
    size_bytes: Mapped[int] = mapped_column(BigInteger, nullable=False)
    sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    transfer_syntax_uid: Mapped[str] = mapped_column(String(UID_LENGTH), nullable=False)
    in_scope: Mapped[bool] = mapped_column(Boolean, nullable=False)
    scope_reason: Mapped[str] = mapped_column(String(64), nullable=False)

    jobs: Mapped[list["Job"]] = relationship(back_populates="instance", order_by="Job.id")


class Job(Base):
    """An analysis job for one instance. The lease fields make claiming safe across worker processes."""

    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_state_id", "state", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id"), nullable=False, index=True)
    state: Mapped[JobState] = mapped_column(
        Enum(JobState, name="job_state", values_callable=lambda e: [m.value for m in e], native_enum=False,
             length=16),
        nullable=False,
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0, nullable=False)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime)
    reason: Mapped[str | None] = mapped_column(String(64))
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow, nullable=False)

    instance: Mapped[Instance] = relationship(back_populates="jobs")


class Event(Base):
    """Audit trail: what happened to which instance, when, and why. Never patient names or IDs."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, nullable=False, index=True)
    kind: Mapped[str] = mapped_column(String(32), nullable=False)
    sop_instance_uid: Mapped[str | None] = mapped_column(String(UID_LENGTH), index=True)
    calling_aet: Mapped[str | None] = mapped_column(String(16))
    detail: Mapped[str | None] = mapped_column(Text)
