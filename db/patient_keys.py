"""The database side of the pseudonymous patient key (``dicom_node.patient_key`` computes it): rows without one,
and setting it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from sqlalchemy import Engine, bindparam, select, update

from .engine import readonly
from .models import Instance


@dataclass(frozen=True)
class KeylessInstance:
    instance_id: int
    archive_path: str
    study_instance_uid: str


def instances_without_patient_key(engine: Engine, after_id: int, limit: int) -> list[KeylessInstance]:
    """Up to ``limit`` rows without a patient key whose id is above ``after_id``, by id."""
    with readonly(engine).connect() as conn:
        rows = conn.execute(
            select(Instance.id, Instance.archive_path, Instance.study_instance_uid)
            .where(Instance.patient_key.is_(None), Instance.id > after_id).order_by(Instance.id).limit(limit)
        ).all()
    return [KeylessInstance(int(row.id), row.archive_path, row.study_instance_uid) for row in rows]


def set_patient_keys(engine: Engine, keys: Mapping[int, str]) -> int:
    """Set instance id -> key in one transaction, only where a row has no key yet (one written meanwhile by a
    newer intake stays); returns the number of rows set."""
    if not keys:
        return 0
    statement = (update(Instance).where(Instance.id == bindparam("instance_id"), Instance.patient_key.is_(None))
                 .values(patient_key=bindparam("key")))
    with engine.begin() as conn:
        result = conn.execute(statement, [{"instance_id": i, "key": k} for i, k in keys.items()])
    return int(result.rowcount)
