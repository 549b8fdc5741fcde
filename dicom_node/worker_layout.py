"""``worker.processes`` and ``worker.threads`` = "auto": the layout measured best for this host's CPU.

Why two layouts: a worker process runs its models on one thread and builds its result objects (highdicom, pure
Python) on another, and the two share one interpreter lock. With one process of two model threads the model
thread sets the pace and a fifth of two cores stays idle under load; two processes of one thread each keep both
cores busy (docs/benchmarks.md, 2026-12-06: 3.4-3.8 against 2.8-3.3 images/s on an Intel Xeon with AMX, 3.2
against 2.6-2.9 with its classifier forced to float32). A single thread per model costs the idle node latency,
though, which only a fast classifier can afford: its bfloat16 pass gains nothing from a second thread (42.5 against
43.9 ms with AMX), while a float32 pass on a CPU without bfloat16 instructions takes 1.9x as long on one thread (the
AMD EPYC Zen 3 sections: 280 against 150 ms, and an idle p95 already at 0.73-0.87 s of the 1.0 s goal with two).

So "auto" is two processes of one thread where the classifier runs in bfloat16 on AMX tiles (where that was
measured), and one process of two threads elsewhere, never more of either than the cores. CPUs with AVX-512 BF16
but no AMX (AMD EPYC Zen 4 and Zen 5) also run the classifier in bfloat16, but nobody has measured one thread
there: on Zen 4 the two-thread pass took 75-101 ms, twice AMX's, so they keep the layout that protects the idle
latency until someone does. More cores or a GPU: set the numbers (the README's "Sizing the workers"). The CPU is
read from /proc/cpuinfo, because ``serve`` decides the processes before any model (or torch) loads;
``ai.precision`` asks torch about the same CPUID bits.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

AUTO = "auto"
AMX_FLAGS = ("amx_tile", "amx_bf16")  # /proc/cpuinfo names of AMX tiles and their bfloat16 products


@dataclass(frozen=True)
class WorkerLayout:
    processes: int
    threads: int
    reason: str  # one line for the log: why "auto" chose these


@lru_cache(maxsize=4)
def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The first processor's feature flags; empty where /proc/cpuinfo cannot be read (not Linux). Read once per
    process: every configuration load resolves the layout, and ``serve`` asks again for its log line."""
    try:
        with cpuinfo.open(encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def resolve_layout(processes: int | str, threads: int | str, precision: str, device: str,
                   cores: int | None = None, flags: frozenset[str] | None = None) -> WorkerLayout:
    """The numbers to run: the configured ones, each "auto" replaced as the module docstring says."""
    cores = max(1, cores if cores is not None else (os.cpu_count() or 1))
    flags = cpu_flags() if flags is None else flags
    fast = device != "cuda" and precision != "fp32" and all(f in flags for f in AMX_FLAGS)
    if fast:
        auto_processes, auto_threads = min(2, cores), 1
        reason = "the classifier runs in bfloat16 on this CPU's AMX tiles"
    else:
        auto_processes, auto_threads = 1, min(2, cores)
        reason = ("the models run on a GPU" if device == "cuda" else
                  "worker.precision = fp32: the classifier runs in float32" if precision == "fp32" else
                  "no AMX on this CPU")
    return WorkerLayout(processes=auto_processes if processes == AUTO else int(processes),
                        threads=auto_threads if threads == AUTO else int(threads), reason=reason)
