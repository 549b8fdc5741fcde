"""The frozen hold-out: drawn once, stratified and patient-level; later draws only add new patients."""

from __future__ import annotations

from collections import Counter

import pytest

from db.holdout import plan_assignments
from db.models import SplitPart

HOLD, TRAIN = SplitPart.HOLDOUT, SplitPart.TRAINING


def _patients(prefix: str, counts: dict[str, int]) -> dict[str, str]:
    return {f"{prefix}-{stratum}-{i}": stratum for stratum, n in counts.items() for i in range(n)}


def test_first_draw_is_stratified_at_the_fraction():
    patients = _patients("a", {"0/0": 50, "1/1": 30, "1/3": 10})
    sides = plan_assignments({}, patients, 0.2, seed=7)
    held = Counter(patients[k] for k, side in sides.items() if side is HOLD)
    assert held == {"0/0": 10, "1/1": 6, "1/3": 2}
    assert set(sides) == set(patients)


def test_the_draw_is_reproducible_and_depends_on_the_seed():
    patients = _patients("a", {"0/0": 40, "1/1": 40})
    assert plan_assignments({}, patients, 0.25, seed=1) == plan_assignments({}, dict(reversed(patients.items())),
                                                                             0.25, seed=1)
    assert plan_assignments({}, patients, 0.25, seed=1) != plan_assignments({}, patients, 0.25, seed=2)


def test_later_draws_never_move_a_patient_and_keep_the_proportion():
    first_patients = _patients("a", {"0/0": 50, "1/1": 50})
    first = plan_assignments({}, first_patients, 0.2, seed=3)
    existing = {k: (side, first_patients[k]) for k, side in first.items()}
    # The next retraining: the same patients (one with a new, more severe label: its stratum stays the drawn one)
    # plus new ones.
    more = {**first_patients, **_patients("b", {"0/0": 25, "1/1": 25, "1/2": 10})}
    second = plan_assignments(existing, more, 0.2, seed=3)
    assert all(second[k] is side for k, side in first.items()), "a patient changed sides"
    new_held = Counter(more[k] for k, side in second.items() if k.startswith("b-") and side is HOLD)
    assert new_held == {"0/0": 5, "1/1": 5, "1/2": 2}
    # A stratum whose hold-out is already above the fraction gets no more hold-out patients, and none leaves it.
    crowded = {k: (HOLD, "0/0") for k in _patients("h", {"0/0": 10})}
    third = plan_assignments(crowded, {**{k: "0/0" for k in crowded}, **_patients("c", {"0/0": 5})}, 0.2, seed=3)
    assert all(third[k] is HOLD for k in crowded)
    assert all(third[k] is TRAIN for k in third if k.startswith("c-"))


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5])
def test_the_fraction_must_be_a_proper_fraction(fraction):
    with pytest.raises(ValueError):
        plan_assignments({}, {"x": "0/0"}, fraction, seed=1)
