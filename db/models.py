"""SQLAlchemy 2 models: received instances, their analysis jobs, results and exports, an audit trail of events, and
the retraining loop (labels, the frozen hold-out, training runs, the model registry).

Patient names and IDs are deliberately not stored here: the archive file holds them, the database holds
only what the queue, the CLI and the audit need (UIDs, accession number, technical facts) and a pseudonymous
patient key (a keyed hash, see ``dicom_node.patient_key``) that groups a patient's images for training.
"""

from __future__ import annotations

import enum
from datetime import UTC, date, datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

SCHEMA_VERSION = 4
"""Bump when the tables change; start-up upgrades the versions ``db.engine`` knows and refuses any other."""

PATIENT_KEY_LENGTH = 32

UID_LENGTH = 64


def utcnow() -> datetime:
    """Naive UTC timestamp: SQLite keeps no time zone, so every timestamp in the database is UTC by contract."""
    return datetime.now(UTC).replace(tzinfo=None)


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
    # keyed hash of Issuer of Patient ID + Patient ID (never the ID itself); None until computed (upgraded rows)
    patient_key: Mapped[str | None] = mapped_column(String(PATIENT_KEY_LENGTH), index=True)

    jobs: Mapped[list[Job]] = relationship(back_populates="instance", order_by="Job.id")


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
    actor: Mapped[str | None] = mapped_column(String(64))  # who did it, for actions of a person (console, CLI user)


class Result(Base):
    """One DICOM object the node wrote for a job (SR, SEG or heat-map SC), archived at ``archive_path``.

    ``sop_instance_uid`` is derived from the source UID, the result kind and the model versions, so that analysing
    the same input with the same models again gives the same row (and PACS never sees a duplicate)."""

    __tablename__ = "results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), nullable=False, index=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id"), nullable=False, index=True)
    kind: Mapped[str] = mapped_column(String(8), nullable=False)  # "sr", "seg", "sc"
    sop_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH), unique=True, nullable=False)
    sop_class_uid: Mapped[str] = mapped_column(String(UID_LENGTH), nullable=False)
    series_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH), nullable=False)
    transfer_syntax_uid: Mapped[str] = mapped_column(String(UID_LENGTH), nullable=False)
    archive_path: Mapped[str] = mapped_column(String(512), nullable=False)
    size_bytes: Mapped[int] = mapped_column(BigInteger, nullable=False)
    analysed: Mapped[bool] = mapped_column(Boolean, nullable=False)  # False: a "not analysed" SR
    reason: Mapped[str] = mapped_column(String(64), nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, nullable=False)

    exports: Mapped[list[Export]] = relationship(back_populates="result", order_by="Export.id")


class ExportState(str, enum.Enum):
    """pending (waiting for its next attempt) -> sending (leased by an exporter) -> sent | pending again (retry
    after backoff) | dead (attempts exhausted, or the peer refused it for good); ``dicom-node resend`` puts
    dead ones back to pending."""

    PENDING = "pending"
    SENDING = "sending"
    SENT = "sent"
    DEAD = "dead"


class Export(Base):
    """One result to one configured destination, with its retry schedule."""

    __tablename__ = "exports"
    __table_args__ = (
        UniqueConstraint("result_id", "destination", name="uq_exports_result_destination"),
        Index("ix_exports_state_next", "state", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("results.id"), nullable=False, index=True)
    destination: Mapped[str] = mapped_column(String(64), nullable=False)  # a destination name from config
    state: Mapped[ExportState] = mapped_column(
        Enum(ExportState, name="export_state", values_callable=lambda e: [m.value for m in e], native_enum=False,
             length=16),
        nullable=False,
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0, nullable=False)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, nullable=False)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime)
    last_status: Mapped[int | None] = mapped_column(Integer)  # DIMSE status of the last attempt, if any
    last_error: Mapped[str | None] = mapped_column(Text)
    sent_to: Mapped[str | None] = mapped_column(String(128))  # "AE@host:port" that acknowledged it
    sent_at: Mapped[datetime | None] = mapped_column(DateTime)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow, nullable=False)

    result: Mapped[Result] = relationship(back_populates="exports")


class Finding(Base):
    """What the classifier said about one analysed job, kept for the console (probability histograms per model,
    the readers' agreement with the model) and the metrics: the SR holds the same, this is its queryable copy."""

    __tablename__ = "findings"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), nullable=False, unique=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id"), nullable=False, index=True)
    model_name: Mapped[str] = mapped_column(String(64), nullable=False)
    model_version: Mapped[str] = mapped_column(String(64), nullable=False)
    model_sha256: Mapped[str] = mapped_column(String(64), nullable=False, default="")
    probability: Mapped[float] = mapped_column(Float, nullable=False)
    present: Mapped[bool] = mapped_column(Boolean, nullable=False)
    threshold: Mapped[float] = mapped_column(Float, nullable=False)
    category: Mapped[int] = mapped_column(Integer, nullable=False)  # most likely ILO major category 0-3
    category_probabilities: Mapped[str] = mapped_column(String(128), nullable=False)  # JSON list of 4
    analysis_seconds: Mapped[float] = mapped_column(Float, nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, nullable=False, index=True)


class AssociationRecord(Base):
    """One association requested of the Storage SCP: who, from where, how it ended, what it stored."""

    __tablename__ = "associations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    calling_aet: Mapped[str] = mapped_column(String(16), nullable=False, index=True)
    called_aet: Mapped[str] = mapped_column(String(16), nullable=False)
    peer_address: Mapped[str] = mapped_column(String(64), nullable=False)
    tls: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    accepted: Mapped[bool] = mapped_column(Boolean, nullable=False)
    outcome: Mapped[str] = mapped_column(String(32), nullable=False)  # open, released, aborted, rejected: <why>
    stores_ok: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    stores_failed: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    started_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, nullable=False, index=True)
    ended_at: Mapped[datetime | None] = mapped_column(DateTime)


class WorkerHeartbeat(Base):
    """One analysis worker process, as it last reported itself: the console's "workers alive" and the readiness
    check's "models loaded" come from here (workers may run on other hosts)."""

    __tablename__ = "workers"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)  # the worker's lease owner name
    host: Mapped[str] = mapped_column(String(128), nullable=False)
    pid: Mapped[int] = mapped_column(Integer, nullable=False)
    device: Mapped[str] = mapped_column(String(16), nullable=False)
    models_ok: Mapped[bool] = mapped_column(Boolean, nullable=False)
    models_detail: Mapped[str | None] = mapped_column(Text)  # the loaded models, or why they failed (log-safe)
    jobs_done: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    started_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, nullable=False)
    last_seen: Mapped[datetime] = mapped_column(DateTime, default=utcnow, nullable=False)
    stopped_at: Mapped[datetime | None] = mapped_column(DateTime)  # a clean stop; None while running or if it died


# --- the retraining loop -------------------------------------------------------------------------------------------


class LabelSource(str, enum.Enum):
    CSV = "csv"
    CONSOLE = "console"
    SR = "sr"


class Label(Base):
    """One reader's read of one image. Several reads of an image are kept (multi-reader); the training label is
    the consensus of ``db.labels`` (configured by ``training.consensus``)."""

    __tablename__ = "labels"
    __table_args__ = (Index("ix_labels_instance", "instance_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id"), nullable=False)
    present: Mapped[bool] = mapped_column(Boolean, nullable=False)
    category: Mapped[int] = mapped_column(Integer, nullable=False)  # ILO major profusion category 0-3
    subcategory: Mapped[str | None] = mapped_column(String(3))  # 12-point scale: "0/-", "0/0", ... "3/+"
    shape: Mapped[str | None] = mapped_column(String(3))  # small opacities, primary[/secondary]: "p", "q/t"
    large_opacities: Mapped[str | None] = mapped_column(String(1))  # "0", "A", "B", "C"
    reader: Mapped[str | None] = mapped_column(String(64))
    read_date: Mapped[date | None] = mapped_column(Date)
    source: Mapped[LabelSource] = mapped_column(
        Enum(LabelSource, name="label_source", values_callable=lambda e: [m.value for m in e], native_enum=False,
             length=16),
        nullable=False,
    )
    source_uid: Mapped[str | None] = mapped_column(String(UID_LENGTH))  # source "sr": the SR's SOP Instance UID
    imported_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, nullable=False)

    instance: Mapped[Instance] = relationship()


class SplitPart(str, enum.Enum):
    HOLDOUT = "holdout"
    TRAINING = "training"


class SplitAssignment(Base):
    """Which side of the frozen hold-out a patient is on. A row is never changed or removed: the first training
    draws the hold-out, later ones only assign new patients (``db.holdout``)."""

    __tablename__ = "split_assignments"

    patient_key: Mapped[str] = mapped_column(String(PATIENT_KEY_LENGTH), primary_key=True)
    part: Mapped[SplitPart] = mapped_column(
        Enum(SplitPart, name="split_part", values_callable=lambda e: [m.value for m in e], native_enum=False,
             length=16),
        nullable=False,
    )
    stratum: Mapped[str] = mapped_column(String(16), nullable=False)  # the label the draw was stratified on
    run_id: Mapped[int | None] = mapped_column(ForeignKey("training_runs.id"))
    assigned_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, nullable=False)


class RunState(str, enum.Enum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class TrainingRun(Base):
    """One retraining: what it was given, where it is, what came out (``db.training``)."""

    __tablename__ = "training_runs"
    # At most one running run, enforced by the database itself (a partial unique index, on SQLite and PostgreSQL):
    # two retrains starting at once cannot both insert one.
    __table_args__ = (Index("uq_training_runs_one_running", "state", unique=True,
                            sqlite_where=text("state = 'running'"), postgresql_where=text("state = 'running'")),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    state: Mapped[RunState] = mapped_column(
        Enum(RunState, name="run_state", values_callable=lambda e: [m.value for m in e], native_enum=False,
             length=16),
        nullable=False,
    )
    trigger: Mapped[str] = mapped_column(String(16), nullable=False)  # "command", "schedule"
    started_by: Mapped[str] = mapped_column(String(64), nullable=False)  # OS user
    host: Mapped[str] = mapped_column(String(128), nullable=False)
    pid: Mapped[int | None] = mapped_column(Integer)  # the training process, while it runs
    stage: Mapped[str] = mapped_column(String(64), nullable=False, default="starting")
    progress: Mapped[float] = mapped_column(Float, nullable=False, default=0.0)  # 0-1 within the whole run
    config_json: Mapped[str] = mapped_column(Text, nullable=False)
    artifacts_dir: Mapped[str] = mapped_column(String(512), nullable=False)  # relative to the storage root
    last_label_id: Mapped[int] = mapped_column(Integer, nullable=False, default=0)  # newest label it could see
    images: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    metrics_json: Mapped[str | None] = mapped_column(Text)  # per-fold, pooled and hold-out metrics
    error: Mapped[str | None] = mapped_column(Text)
    model_id: Mapped[int | None] = mapped_column(Integer)  # the model it registered (models.id)
    started_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow, nullable=False)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)


class ModelState(str, enum.Enum):
    """A registered classifier: candidate (trained, not used) -> champion (the one the workers use; exactly one)
    -> retired (replaced, or rolled back)."""

    CANDIDATE = "candidate"
    CHAMPION = "champion"
    RETIRED = "retired"


class RegisteredModel(Base):
    """One classifier file in the registry (``db.registry``)."""

    __tablename__ = "models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), nullable=False)
    version: Mapped[str] = mapped_column(String(64), nullable=False)
    state: Mapped[ModelState] = mapped_column(
        Enum(ModelState, name="model_state", values_callable=lambda e: [m.value for m in e], native_enum=False,
             length=16),
        nullable=False,
    )
    bundled: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)  # the demo shipped with the node
    path: Mapped[str] = mapped_column(String(512), nullable=False)  # relative to the storage root; bundled: absolute
    sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    card_path: Mapped[str | None] = mapped_column(String(512))
    run_id: Mapped[int | None] = mapped_column(ForeignKey("training_runs.id"))
    threshold: Mapped[float | None] = mapped_column(Float)
    holdout_auc: Mapped[float | None] = mapped_column(Float)
    holdout_json: Mapped[str | None] = mapped_column(Text)  # hold-out metrics of this model
    gate_passed: Mapped[bool | None] = mapped_column(Boolean)  # None: not evaluated
    gate_json: Mapped[str | None] = mapped_column(Text)  # the gate's comparison and its reasons
    replaced_model_id: Mapped[int | None] = mapped_column(Integer)  # the champion this one replaced (rollback)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, nullable=False)
    promoted_at: Mapped[datetime | None] = mapped_column(DateTime)
    retired_at: Mapped[datetime | None] = mapped_column(DateTime)
