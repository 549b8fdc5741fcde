"""The frozen hold-out: which patients are kept out of training for good.

The first training draws a patient-level hold-out, stratified by each patient's label, and records every patient's
side in ``split_assignments``. Later trainings only assign the patients seen for the first time, in the same
proportion per stratum (the hold-out of a stratum is topped up to ``fraction`` of that stratum's patients, never
reduced), so a patient once in the hold-out never enters training and the champion and every candidate are
compared on the same images (plus the new hold-out patients, for both). MONAI Label re-draws its validation pool on
every retraining, which leaks earlier validation images into training; this table is the fix.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Mapping

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from .engine import readonly
from .models import SplitAssignment, SplitPart, utcnow


def _order(key: str, seed: int) -> str:
    """A seeded, reproducible order of patient keys, independent of insertion order and of Python's hash seed."""
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def assignments(engine: Engine) -> dict[str, tuple[SplitPart, str]]:
    """Every assigned patient: key -> (side, the stratum it was drawn in)."""
    with Session(readonly(engine)) as session:
        return {row.patient_key: (row.part, row.stratum) for row in session.scalars(select(SplitAssignment))}


def plan_assignments(existing: Mapping[str, tuple[SplitPart, str]], patients: Mapping[str, str], fraction: float,
                     seed: int) -> dict[str, SplitPart]:
    """The side of every patient of ``patients`` (patient key -> stratum): ``existing`` ones (key -> (part,
    stratum)) keep theirs; new ones are split so that each stratum's hold-out reaches ``round(fraction * its
    patients)`` (new ones only added, in the seeded order), the rest go to training."""
    if not 0 < fraction < 1:
        raise ValueError("the hold-out fraction must be between 0 and 1")
    result = {key: existing[key][0] for key in patients if key in existing}
    new_by_stratum: dict[str, list[str]] = defaultdict(list)
    for key, stratum in patients.items():
        if key not in existing:
            new_by_stratum[stratum].append(key)
    for stratum, new in new_by_stratum.items():
        known = [part for part, s in existing.values() if s == stratum]
        held = sum(part is SplitPart.HOLDOUT for part in known)
        target = round(fraction * (len(known) + len(new)))
        take = min(len(new), max(0, target - held))
        ordered = sorted(new, key=lambda k: _order(k, seed))
        for i, key in enumerate(ordered):
            result[key] = SplitPart.HOLDOUT if i < take else SplitPart.TRAINING
    return result


def assign(session: Session, patients: Mapping[str, str], fraction: float, seed: int, run_id: int | None
           ) -> dict[str, SplitPart]:
    """Record the sides of the new patients of ``patients`` (patient key -> stratum) in the caller's transaction
    and return every patient's side. Existing rows are never changed."""
    existing = {row.patient_key: (row.part, row.stratum) for row in session.scalars(select(SplitAssignment))}
    planned = plan_assignments(existing, patients, fraction, seed)
    now = utcnow()
    for key, part in planned.items():
        if key not in existing:
            session.add(SplitAssignment(patient_key=key, part=part, stratum=patients[key], run_id=run_id,
                                        assigned_at=now))
    return planned
