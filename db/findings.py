"""The classifier's finding per analysed job: written with the job's results (``db.results.finish_job``), read by
the console (probability histograms per model, agreement with the readers) and the metrics."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from .engine import readonly
from .models import Finding


@dataclass(frozen=True)
class FindingValues:
    """One classification as the worker hands it over (no pixel data, no patient data)."""

    model_name: str
    model_version: str
    model_sha256: str
    probability: float
    present: bool
    threshold: float
    category: int
    category_probabilities: Sequence[float]
    analysis_seconds: float


@dataclass(frozen=True)
class FindingRow:
    job_id: int
    instance_id: int
    model_name: str
    model_version: str
    probability: float
    present: bool
    threshold: float
    category: int
    category_probabilities: tuple[float, ...]
    analysis_seconds: float
    created_at: datetime

    @property
    def model(self) -> str:
        return f"{self.model_name} {self.model_version}"


def add_finding(session: Session, job_id: int, instance_id: int, values: FindingValues) -> None:
    """Record (or, for a job analysed again, replace) the finding of ``job_id`` in the caller's transaction."""
    row = session.scalars(select(Finding).where(Finding.job_id == job_id)).first()
    if row is None:
        row = Finding(job_id=job_id, instance_id=instance_id)
        session.add(row)
    row.model_name, row.model_version, row.model_sha256 = (values.model_name[:64], values.model_version[:64],
                                                           values.model_sha256[:64])
    row.probability, row.present, row.threshold = float(values.probability), bool(values.present), \
        float(values.threshold)
    row.category = int(values.category)
    row.category_probabilities = json.dumps([round(float(p), 6) for p in values.category_probabilities])
    row.analysis_seconds = float(values.analysis_seconds)


def _row(f: Finding) -> FindingRow:
    return FindingRow(f.job_id, f.instance_id, f.model_name, f.model_version, f.probability, f.present, f.threshold,
                      f.category, tuple(json.loads(f.category_probabilities)), f.analysis_seconds, f.created_at)


def finding_of_job(engine: Engine, job_id: int) -> FindingRow | None:
    with Session(readonly(engine)) as session:
        f = session.scalars(select(Finding).where(Finding.job_id == job_id)).first()
        return None if f is None else _row(f)
