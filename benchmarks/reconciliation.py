"""Archive/database reconciliation time (``dicom_node.reconcile``) on an archive of many small files.

Writes ``--count`` distinct small DX instances straight into a fresh storage root's ``archive/`` (the layout the
intake uses), then times, on a fresh SQLite database with the node's settings:

1. every file unknown (the database was deleted): header and sha256 read again, rows and jobs inserted;
2. every file known (the usual start-up): walk only, median of ``--repeats`` runs;
3. ``--missing`` files deleted: walk only, the missing rows reported;

and the database guard's identity check (one ``stat``) per call. Prints a Markdown table and the machine.

    .venv/bin/python benchmarks/reconciliation.py --count 2000
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.analysis_stages import cpu_model  # noqa: E402
from tests.dicomgen import clone_instances, synthetic_dx  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--missing", type=int, default=10)
    parser.add_argument("--workdir", type=Path, default=None, help="parent of the temporary storage root")
    args = parser.parse_args()

    from pydicom import dcmread

    from db.engine import init_schema, make_engine
    from db.integrity import guard_of
    from dicom_node.archive import Archive
    from dicom_node.reconcile import reconcile

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp) / "var"
        archive = Archive(root, 0)
        archive.prepare()
        made = clone_instances(synthetic_dx(64, 64), Path(tmp) / "in", args.count, per_series=100)
        paths = []
        for path in made:
            ds = dcmread(path, stop_before_pixels=True)
            target = archive.path_for(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
            paths.append(target)
        size = statistics.median(p.stat().st_size for p in paths)
        engine = make_engine(f"sqlite:///{root / 'node.sqlite'}")
        init_schema(engine)
        os.sync()

        rows = []
        started = time.perf_counter()
        first = reconcile(archive, engine)
        rows.append(("all unknown (database deleted): re-register", time.perf_counter() - started, first))
        assert len(first.reregistered) == args.count and first.files == args.count, first.summary()

        runs = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            known = reconcile(archive, engine)
            runs.append(time.perf_counter() - started)
            assert known.consistent and known.known == args.count, known.summary()
        rows.append((f"all known: walk only (median of {args.repeats})", statistics.median(runs), known))

        for path in paths[: args.missing]:
            path.unlink()
        started = time.perf_counter()
        missing = reconcile(archive, engine)
        rows.append((f"{args.missing} files deleted: walk, report", time.perf_counter() - started, missing))
        assert len(missing.missing) == args.missing, missing.summary()

        guard = guard_of(engine)
        assert guard is not None
        n = 100_000
        started = time.perf_counter()
        for _ in range(n):
            guard.check()
        check_us = (time.perf_counter() - started) / n * 1e6

    print(f"{args.count} files of {size / 1024:.1f} KiB (DX 64 x 64 16-bit, Explicit VR LE), 100 per series\n")
    print("| run | seconds | files | re-registered | missing |")
    print("|---|---:|---:|---:|---:|")
    for name, seconds, report in rows:
        print(f"| {name} | {seconds:.3f} | {report.files} | {len(report.reregistered)} | {len(report.missing)} |")
    print(f"\ndatabase identity check (one stat): {check_us:.2f} us per call")
    load = os.getloadavg()
    print(f"\nMachine: {cpu_model()}, {os.cpu_count()} logical cores, {platform.system()} {platform.release()}, "
          f"Python {platform.python_version()}, load average {load[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
