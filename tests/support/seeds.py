"""Seeds for tests that pick something at random: fixed unless $PNEUMO_TEST_SEED says otherwise, always printed,
so that a failure can be replayed (``PNEUMO_TEST_SEED=<seed> pytest ...``)."""

from __future__ import annotations

import os
import random

SEED_ENV = "PNEUMO_TEST_SEED"
DEFAULT_SEED = 1456


def seed_from_env() -> int:
    value = os.environ.get(SEED_ENV, "").strip()
    return int(value) if value else DEFAULT_SEED


def seeded_random(what: str) -> tuple[random.Random, int]:
    """A random generator for ``what`` and its seed, printed (pytest shows it with a failing test's output)."""
    seed = seed_from_env()
    print(f"{what}: random seed {seed} (replay with {SEED_ENV}={seed})")
    return random.Random(seed), seed

