"""What a result file's write costs with and without dropping the node's finished files from the page cache.

    .venv/bin/python benchmarks/page_cache.py [--count 60] [--size-mb 11.4] [--pause 0.3] [--rounds 2] [--dir DIR]

The node writes every received instance and result object once, fsyncs it and reads it once soon after (the worker
reads the received file, the exporter sends the result). This writes ``--count`` files of ``--size-mb`` (the
Philips CR's SC is 11.4 MB) one after another, each fsynced and kept, ``--pause`` seconds apart as the worker
writes them, in alternating rounds: "kept cached" leaves each file's pages in the page cache (the node before
``dicom_node.archive.drop_cached``), "dropped" calls ``drop_cached`` on each file once it is durable, so that the
next write can reuse the pages. Per write it reports the median wall and CPU time (this process, user + system) of
write + fsync. The first round of "kept cached" grows the page cache into memory the machine may never have touched
(on a VM whose memory the host backs lazily, each such page costs a fault); the rounds after it may find the pages
the previous round's files left when they were deleted. Prints a Markdown table and the machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.analysis_stages import cpu_model  # noqa: E402
from dicom_node.archive import drop_cached  # noqa: E402


def one_round(directory: Path, data: bytes, count: int, pause: float, drop: bool) -> tuple[float, float]:
    """Median wall and CPU milliseconds of write + fsync per file."""
    walls, cpus = [], []
    for i in range(count):
        path = directory / f"file{i:04d}.dcm"
        started, cpu = time.perf_counter(), time.process_time()
        with path.open("wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        walls.append(time.perf_counter() - started)
        cpus.append(time.process_time() - cpu)
        if drop:
            drop_cached(path)
        time.sleep(pause)
    return statistics.median(walls) * 1000, statistics.median(cpus) * 1000


def meminfo(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) // 1024
    return -1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=60, help="files per round")
    parser.add_argument("--size-mb", type=float, default=11.4, help="size of each file (the Philips CR's SC)")
    parser.add_argument("--pause", type=float, default=0.3, help="seconds between two writes")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of each mode, alternating")
    parser.add_argument("--dir", type=Path, default=REPO, help="where the files go (the disk to measure)")
    args = parser.parse_args()
    data = os.urandom(int(args.size_mb * (1 << 20)))
    free_at_start = meminfo("MemFree")
    rows = []
    for k in range(args.rounds):
        for drop in (False, True):
            directory = Path(tempfile.mkdtemp(prefix="pneumo-page-cache-", dir=args.dir))
            try:
                wall, cpu = one_round(directory, data, args.count, args.pause, drop)
            finally:
                shutil.rmtree(directory)
            rows.append((k + 1, "dropped (drop_cached)" if drop else "kept cached", wall, cpu))
    print(f"Page cache: {args.count} files of {args.size_mb:g} MB per round, fsynced, {args.pause:g} s apart, "
          f"in {args.dir}")
    print(f"{cpu_model()}, {os.cpu_count()} cores visible, kernel {platform.release()}, "
          f"{meminfo('MemTotal')} MiB memory ({free_at_start} MiB free at start), Python {platform.python_version()}, "
          f"{time.strftime('%Y-%m-%d')}\n")
    print("| round | the files' pages | write + fsync, median ms | CPU of it, median ms |")
    print("| ---: | --- | ---: | ---: |")
    for k, mode, wall, cpu in rows:
        print(f"| {k} | {mode} | {wall:.1f} | {cpu:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
