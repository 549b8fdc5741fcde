"""When the classifier may run in bfloat16, and when its answer must come from float32 after all.

Why: on CPUs with AMX (Intel Xeon since Sapphire Rapids), the classifier's ResNet-34 runs 2.9x faster in bfloat16
(oneDNN's bfloat16 kernels) than in float32 ONNX Runtime on one thread, 1.6x on two, in less than half the CPU time
(``benchmarks/inference_engines.py``, docs/benchmarks.md). bfloat16 keeps 8 bits of mantissa, so the outputs move a
little: on the classifier card's held-out images the probability moved by at most 0.0103 and a category probability
by at most 0.0154, which flipped 2 of 144 binary decisions and 1 category when used as it is. So an answer is taken
from bfloat16 only when no decision can depend on that error: the probability farther than ``PROBABILITY_GUARD``
from the threshold and the most likely category ahead of the next by more than ``CATEGORY_GUARD``. Otherwise the
same input goes through the float32 engine, and that answer is the result. The decisions are then those of float32
whenever the bfloat16 error stays under the guards (5x and 3x the largest error measured).

"auto" uses bfloat16 only where it was measured to pay: on a CPU whose instructions compute bfloat16 products, AMX
tiles or AVX-512 BF16. On an AMD EPYC VM with AVX-512 BF16 and no AMX (2026-12-03) the crop took 75-106 ms against
118-126 ms in float32 ONNX Runtime on two threads, with 30 % less CPU, and bfloat16 moved the held-out probabilities
by at most 0.0099. Elsewhere (CPUs without those instructions, where bfloat16 is emulated and up to 4.7x slower than
float32, and CUDA) the classifier runs in float32. ``worker.precision = "fp32"`` gives float32 everywhere, the same
numbers on every machine.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TypeVar

import torch

PRECISIONS = ("auto", "fp32", "bf16")
PROBABILITY_GUARD = 0.05
"""bfloat16's answer stands only when the probability lies farther than this from the threshold (largest error
measured: 0.0103)."""
CATEGORY_GUARD = 0.10
"""... and when the most likely category's probability exceeds the next one's by more than this (a category
probability moved by at most 0.0154, so the gap by at most 0.031)."""


def bfloat16_hardware() -> str | None:
    """The CPU's instructions that oneDNN uses for bfloat16 convolutions ("AMX" or "AVX-512 BF16"), or None where
    bfloat16 would be emulated."""
    def probe(name: str) -> bool:
        try:
            return bool(getattr(torch.cpu, name)())
        except (AttributeError, RuntimeError):  # a torch without the probe: take the instructions as absent
            return False

    if probe("_is_amx_tile_supported"):
        return "AMX"
    if probe("_is_avx512_bf16_supported"):
        return "AVX-512 BF16"
    return None


Module = TypeVar("Module", bound=torch.nn.Module)


def bfloat16_copy(model: Module) -> Module:
    """A copy of ``model`` with its weights converted to bfloat16 once. It gives bit for bit what ``torch.autocast``
    to bfloat16 gives for ``model``, which converts all the weights again at every call (tests/test_precision.py;
    3-36 % of the classifier's pass: docs/benchmarks.md)."""
    return copy.deepcopy(model).to(torch.bfloat16)


def resolve_precision(precision: str, device: torch.device) -> str:
    """"bf16" or "fp32" for a classifier on ``device``: "auto" is bf16 on a CPU with bfloat16 instructions (AMX or
    AVX-512 BF16), fp32 otherwise."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if device.type == "cpu" and bfloat16_hardware() is not None else "fp32"
    return precision


def near_decision(probability: float, threshold: float, categories: Sequence[float],
                  probability_guard: float = PROBABILITY_GUARD, category_guard: float = CATEGORY_GUARD) -> bool:
    """Whether a bfloat16 answer is too close to a decision to stand: the probability within
    ``probability_guard`` of the threshold, or the two most likely categories within ``category_guard``. Other
    guards size the same rule for another arithmetic's error (benchmarks/int8_classifier.py)."""
    if abs(probability - threshold) < probability_guard:
        return True
    ranked = sorted(categories, reverse=True)
    return len(ranked) > 1 and ranked[0] - ranked[1] < category_guard
