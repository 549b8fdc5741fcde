"""``dicom-node labels``: import reads from a CSV file or from archived SRs, list and export them (docs/labels.md).

Exit status: 0 done; 1 bad rows (listed as ``line N: reason``; nothing imported unless ``--skip-bad``); 2 the file
as a whole is unusable (the message names the line or column).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import IO, Any

from db.labels import LabelRow, label_counts, list_labels

from .runtime import Runtime

COMMANDS = ("labels",)
EXIT_BAD_ROWS = 1
EXIT_BAD_FILE = 2
EXPORT_COLUMNS = ("sop_instance_uid", "present", "category", "subcategory", "shape", "large_opacities", "reader",
                  "read_date")


def add_commands(subparsers: Any, common: argparse.ArgumentParser) -> None:
    labels = subparsers.add_parser("labels", help="reads of archived images for retraining",
                                   description="--config and --set follow the labels command: labels list --set ...")
    sub = labels.add_subparsers(dest="labels_command", required=True)
    imp = sub.add_parser("import", parents=[common], help="import reads from a CSV file (one transaction)")
    imp.add_argument("file", type=Path)
    imp.add_argument("--dry-run", action="store_true", help="check everything, write nothing")
    imp.add_argument("--skip-bad", action="store_true", help="import the good rows even if some are bad")
    sub.add_parser("import-sr", parents=[common],
                   help="import the reads of archived SRs (ILO category reads, reviews of our SRs)")
    lst = sub.add_parser("list", parents=[common], help="stored reads, newest first")
    lst.add_argument("--json", action="store_true", help="one JSON object per line")
    lst.add_argument("--limit", type=int, default=100)
    exp = sub.add_parser("export", parents=[common], help="every stored read as CSV in the import format")
    exp.add_argument("--out", type=Path, help="write to this file (default: standard output)")


def run(rt: Runtime, args: argparse.Namespace) -> int:
    command = args.labels_command
    if command == "import":
        return _import(rt, args.file, args.dry_run, args.skip_bad)
    if command == "import-sr":
        return _import_sr(rt)
    if command == "list":
        return _list(rt, args.json, args.limit)
    return _export(rt, args.out)


def status_lines(rt: Runtime) -> list[str]:
    labelled, unlabelled = label_counts(rt.engine)
    return [f"labels       : {labelled} labelled, {unlabelled} unlabelled in-scope image(s)"]


def _import(rt: Runtime, path: Path, dry_run: bool, skip_bad: bool) -> int:
    from .labels_csv import LabelsFileError, import_csv

    try:
        report = import_csv(rt.engine, path, dry_run=dry_run, skip_bad=skip_bad)
    except LabelsFileError as exc:
        print(f"dicom-node: {path.name}: {exc}", file=sys.stderr)
        return EXIT_BAD_FILE
    for bad in report.bad:
        print(f"line {bad.line}: {bad.reason}", file=sys.stderr)
    counts = f"{report.data_rows} row(s): {report.valid} good, {len(report.bad)} bad"
    if dry_run:
        would = report.valid if (skip_bad or not report.bad) else 0
        print(f"dry run, nothing written: {counts}; {would} read(s) would be imported")
    elif report.bad and not skip_bad:
        print(f"{counts}; nothing imported (fix the bad rows, or import the good ones with --skip-bad)")
    else:
        print(f"{counts}; {report.imported} read(s) imported" + (", the bad rows skipped" if report.bad else ""))
    return EXIT_BAD_ROWS if report.bad and not skip_bad else 0


def _import_sr(rt: Runtime) -> int:
    from .labels_sr import import_sr_labels

    report = import_sr_labels(rt.engine, rt.archive.root)
    print(f"{report.scanned} archived SR(s) not imported before: {report.imported} read(s) imported, "
          f"{len(report.not_imported)} not importable")
    for item in report.not_imported:
        print(f"  {item.sop_instance_uid}: {item.reason}")
    return 0


def _as_json(row: LabelRow) -> dict[str, Any]:
    return {"id": row.id, "instance_id": row.instance_id, "sop_instance_uid": row.sop_instance_uid,
            "present": row.present, "category": row.category, "subcategory": row.subcategory, "shape": row.shape,
            "large_opacities": row.large_opacities, "reader": row.reader,
            "read_date": row.read_date.isoformat() if row.read_date else None, "source": row.source,
            "source_uid": row.source_uid, "imported_at": row.imported_at.isoformat(timespec="seconds")}


def _list(rt: Runtime, as_json: bool, limit: int) -> int:
    rows = list_labels(rt.engine, max(limit, 0))
    if as_json:
        for row in rows:
            print(json.dumps(_as_json(row)))
        return 0
    print(f"{'id':>6}  {'present':<8}{'cat':>3}  {'sub':<4}{'shape':<6}{'large':<6}{'source':<8}{'read':<11}"
          f"{'imported (UTC)':<20}{'reader':<20}SOP Instance UID")
    for r in rows:
        print(f"{r.id:>6}  {'yes' if r.present else 'no':<8}{r.category:>3}  {r.subcategory or '-':<4}"
              f"{r.shape or '-':<6}{r.large_opacities or '-':<6}{r.source:<8}"
              f"{r.read_date.isoformat() if r.read_date else '-':<11}{r.imported_at:%Y-%m-%d %H:%M:%S} "
              f"{(r.reader or '-')[:19]:<20}{r.sop_instance_uid}")
    if not rows:
        print("(no labels)")
    return 0


def write_export(rows: list[LabelRow], out: IO[str]) -> None:
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(EXPORT_COLUMNS)
    for r in rows:
        writer.writerow([r.sop_instance_uid, "yes" if r.present else "no", r.category, r.subcategory or "",
                         r.shape or "", r.large_opacities or "", r.reader or "",
                         r.read_date.isoformat() if r.read_date else ""])


def _export(rt: Runtime, out: Path | None) -> int:
    rows = list_labels(rt.engine, None, oldest_first=True)
    if out is None:
        write_export(rows, sys.stdout)
        return 0
    try:
        with out.open("w", encoding="utf-8", newline="") as fh:
            write_export(rows, fh)
    except OSError as exc:
        print(f"dicom-node: cannot write {out}: {exc.strerror or type(exc).__name__}", file=sys.stderr)
        return EXIT_BAD_FILE
    print(f"{len(rows)} read(s) written to {out}", file=sys.stderr)
    return 0
