"""Training runs: one row per retraining, from its start to its registered model or its failure.

One run at a time per database: ``start_run`` refuses while another is running. A run records the process that
runs it (host and pid); a run whose process is gone (killed, machine rebooted) is marked failed by the next
``fail_dead_runs`` (every ``serve`` start and every ``dicom-node retrain``), and since the model is registered in
the same transaction that marks the run succeeded, a dead run never leaves a half-registered model.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from sqlalchemy import Engine, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from .engine import readonly
from .models import RunState, TrainingRun, utcnow

ERROR_LIMIT = 2000


class TrainingBusy(RuntimeError):
    """Another training run is in progress."""


@dataclass(frozen=True)
class RunEntry:
    id: int
    state: RunState
    trigger: str
    started_by: str
    host: str
    pid: int | None
    stage: str
    progress: float
    config: dict[str, Any]
    artifacts_dir: str
    last_label_id: int
    images: int
    metrics: dict[str, Any] | None
    error: str | None
    model_id: int | None
    started_at: datetime
    finished_at: datetime | None

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "state": self.state.value, "trigger": self.trigger, "started_by": self.started_by,
                "stage": self.stage, "progress": round(self.progress, 4), "images": self.images,
                "model_id": self.model_id, "error": self.error, "started_at": self.started_at.isoformat(),
                "finished_at": self.finished_at.isoformat() if self.finished_at else None}


def _entry(row: TrainingRun) -> RunEntry:
    return RunEntry(id=row.id, state=row.state, trigger=row.trigger, started_by=row.started_by, host=row.host,
                    pid=row.pid, stage=row.stage, progress=row.progress, config=json.loads(row.config_json),
                    artifacts_dir=row.artifacts_dir, last_label_id=row.last_label_id, images=row.images,
                    metrics=json.loads(row.metrics_json) if row.metrics_json else None, error=row.error,
                    model_id=row.model_id, started_at=row.started_at, finished_at=row.finished_at)


def start_run(session: Session, *, trigger: str, started_by: str, host: str, pid: int, config: dict[str, Any],
              artifacts_dir: str, last_label_id: int, images: int) -> int:
    """A new running run, in the caller's transaction (which also records the hold-out of the run); raises
    TrainingBusy while another run is running."""
    busy = session.scalars(select(TrainingRun.id).where(TrainingRun.state == RunState.RUNNING).limit(1)).first()
    if busy is not None:
        raise TrainingBusy(f"training run #{busy} is still running")
    now = utcnow()
    row = TrainingRun(state=RunState.RUNNING, trigger=trigger, started_by=started_by, host=host, pid=pid,
                      stage="starting", progress=0.0, config_json=json.dumps(config, sort_keys=True),
                      artifacts_dir=artifacts_dir, last_label_id=last_label_id, images=images, started_at=now,
                      updated_at=now)
    session.add(row)
    try:
        with session.begin_nested():  # a savepoint: the caller's transaction survives a refusal
            session.flush()
    except IntegrityError:  # another run was inserted meanwhile (uq_training_runs_one_running)
        raise TrainingBusy("another training run started at the same time") from None
    return row.id


def set_artifacts_dir(session: Session, run_id: int, artifacts_dir: str) -> None:
    row = session.get(TrainingRun, run_id)
    if row is not None:
        row.artifacts_dir = artifacts_dir


def update_progress(engine: Engine, run_id: int, stage: str, progress: float) -> None:
    with Session(engine) as session, session.begin():
        row = session.get(TrainingRun, run_id)
        if row is not None and row.state is RunState.RUNNING:
            row.stage, row.progress = stage[:64], max(0.0, min(1.0, progress))


def finish_run(session: Session, run_id: int, *, model_id: int, metrics: dict[str, Any]) -> None:
    """Mark the run succeeded, in the caller's transaction (the one that registers its model)."""
    row = session.get(TrainingRun, run_id)
    if row is None or row.state is not RunState.RUNNING:
        raise RuntimeError(f"training run #{run_id} is not running any more")
    row.state, row.stage, row.progress = RunState.SUCCEEDED, "done", 1.0
    row.model_id, row.metrics_json, row.finished_at, row.pid = model_id, json.dumps(metrics), utcnow(), None


def fail_run(engine: Engine, run_id: int, error: str) -> None:
    with Session(engine) as session, session.begin():
        row = session.get(TrainingRun, run_id)
        if row is not None and row.state is RunState.RUNNING:
            row.state, row.error, row.finished_at, row.pid = RunState.FAILED, error[:ERROR_LIMIT], utcnow(), None


def fail_dead_runs(engine: Engine, host: str, is_alive: Callable[[int], bool]) -> list[int]:
    """Mark failed the running runs of ``host`` whose process is gone; returns their ids."""
    failed = []
    with Session(engine) as session, session.begin():
        for row in session.scalars(select(TrainingRun).where(TrainingRun.state == RunState.RUNNING,
                                                             TrainingRun.host == host)):
            if row.pid is None or not is_alive(row.pid):
                row.state, row.finished_at = RunState.FAILED, utcnow()
                row.error = f"the training process (pid {row.pid}) ended without finishing the run"
                row.pid = None
                failed.append(row.id)
    return failed


def get_run(engine: Engine, run_id: int) -> RunEntry | None:
    with Session(readonly(engine)) as session:
        row = session.get(TrainingRun, run_id)
        return _entry(row) if row is not None else None


def list_runs(engine: Engine, limit: int = 20) -> list[RunEntry]:
    with Session(readonly(engine)) as session:
        rows = session.scalars(select(TrainingRun).order_by(TrainingRun.id.desc()).limit(limit))
        return [_entry(row) for row in rows]


def last_succeeded_label_id(engine: Engine) -> int:
    """The newest label id the last successful run could see (0 before the first): the schedule's "new labels"
    are counted from there."""
    with Session(readonly(engine)) as session:
        value = session.scalars(select(TrainingRun.last_label_id).where(TrainingRun.state == RunState.SUCCEEDED)
                                .order_by(TrainingRun.id.desc()).limit(1)).first()
        return int(value or 0)


@dataclass(frozen=True)
class LabelledInstance:
    """What a training run needs of one labelled in-scope instance (no patient data: the key stands for the patient)."""

    instance_id: int
    archive_path: str
    patient_key: str | None


def labelled_instances(engine: Engine, instance_ids: Collection[int]) -> list[LabelledInstance]:
    from .models import Instance

    with Session(readonly(engine)) as session:
        rows = session.execute(select(Instance.id, Instance.archive_path, Instance.patient_key)
                               .where(Instance.id.in_(list(instance_ids)), Instance.in_scope.is_(True))
                               .order_by(Instance.id)).all()
        return [LabelledInstance(int(i), str(path), key) for i, path, key in rows]


def latest_read_dates(engine: Engine, instance_ids: Collection[int]) -> dict[int, date]:
    """Each instance's latest read date (instances whose reads carry no date are left out)."""
    from .models import Label

    with Session(readonly(engine)) as session:
        rows = session.execute(select(Label.instance_id, func.max(Label.read_date))
                               .where(Label.instance_id.in_(list(instance_ids)), Label.read_date.is_not(None))
                               .group_by(Label.instance_id)).all()
        return {int(i): d for i, d in rows if d is not None}


def read_date_range(engine: Engine, instance_ids: Collection[int]) -> tuple[date | None, date | None]:
    """The earliest and latest read date among the labels of these instances (for the model card)."""
    from .models import Label

    with Session(readonly(engine)) as session:
        low, high = session.execute(select(func.min(Label.read_date), func.max(Label.read_date))
                                    .where(Label.instance_id.in_(list(instance_ids)))).one()
        return low, high
