"""``dicom-node labels``: import reads from a CSV file or from archived SRs, list and export them, add a reader's
verdict on one analysed image, and show where the readers disagree with the models (docs/labels.md).

Exit status: 0 done; 1 bad rows (listed as ``line N: reason``; nothing imported unless ``--skip-bad``); 2 the file
as a whole is unusable (the message names the line or column), or ``labels add`` was given a bad value (the message
names the option).
"""

from __future__ import annotations

import argparse
import csv
import getpass
import json
import sys
from datetime import date
from pathlib import Path
from typing import IO, Any

from db.feedback import (
    FeedbackError,
    Reading,
    add_feedback,
    agreement_by_model,
    describe,
    disagreements,
    job_of_instance,
    model_answer,
    recorded,
)
from db.findings import finding_of_job
from db.labels import LabelRow, label_counts, list_labels

from .runtime import Runtime

COMMANDS = ("labels",)
EXIT_BAD_ROWS = 1
EXIT_BAD_FILE = 2
EXIT_BAD_VALUE = 2
OPTIONS = {"job": "--job", "action": "--accept/--reject/--present", "reader": "--reader", "present": "--present",
           "category": "--category", "subcategory": "--subcategory", "shape": "--shape",
           "large_opacities": "--large-opacities", "read_date": "--read-date"}
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
    _add_add_command(sub, common)
    dis = sub.add_parser("disagreements", parents=[common],
                         help="the agreement of the reads with each model, and the reads that disagree")
    dis.add_argument("--model", help="one model's disagreements: 'name version'")
    dis.add_argument("--limit", type=int, default=50)
    dis.add_argument("--json", action="store_true", help="one JSON object per line")


def _add_add_command(sub: Any, common: argparse.ArgumentParser) -> None:
    add = sub.add_parser("add", parents=[common], help="a reader's verdict on one analysed image (source console)",
                         description="Accept or reject the classifier's result of a job, or record your own "
                                     "reading; stored as a label of source console for the next retraining.")
    which = add.add_mutually_exclusive_group(required=True)
    which.add_argument("--job", type=int, metavar="N", help="the analysis job")
    which.add_argument("--sop-instance-uid", metavar="UID",
                       help="the image (its latest analysed job)")
    add.add_argument("--reader", required=True, metavar="NAME", help="who read it (at most 64 characters)")
    verdict = add.add_mutually_exclusive_group(required=True)
    verdict.add_argument("--accept", action="store_const", dest="action", const="accept",
                         help="the model's result is right")
    verdict.add_argument("--reject", action="store_const", dest="action", const="reject",
                         help="the model's result is wrong (a rejected negative needs --category 1-3)")
    verdict.add_argument("--present", choices=("yes", "no"), help="your own reading (with --category)")
    add.add_argument("--category", type=int, metavar="N", help="ILO major profusion category 0-3")
    add.add_argument("--subcategory", metavar="S", help="ILO 12-point scale, e.g. 2/1")
    add.add_argument("--shape", metavar="S", help="small opacities: p q r s t u, or primary/secondary e.g. q/t")
    add.add_argument("--large-opacities", metavar="X", help="0 A B C")
    add.add_argument("--read-date", type=_read_date, metavar="YYYY-MM-DD", help="default: today (UTC)")


def run(rt: Runtime, args: argparse.Namespace) -> int:
    command = args.labels_command
    if command == "import":
        return _import(rt, args.file, args.dry_run, args.skip_bad)
    if command == "import-sr":
        return _import_sr(rt)
    if command == "list":
        return _list(rt, args.json, args.limit)
    if command == "add":
        return _add(rt, args)
    if command == "disagreements":
        return _disagreements(rt, args.model, args.limit, args.json)
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


# --- labels add, labels disagreements --------------------------------------------------------------------------------


def _read_date(text: str) -> date:
    try:
        if len(text) != 10:
            raise ValueError
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError("not a date in the form YYYY-MM-DD") from None


def _os_user() -> str | None:
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no login name and no passwd entry (a bare container)
        return None


def _reading(rt: Runtime, args: argparse.Namespace, job_id: int) -> Reading | None:
    """The ``Reading`` the options give (None: the verdict alone); raises ``FeedbackError``."""
    details = {"subcategory": args.subcategory, "shape": args.shape, "large_opacities": args.large_opacities}
    if args.present is not None:
        if args.category is None:
            raise FeedbackError("category: a reading needs --category with --present", "category")
        return Reading(args.present == "yes", args.category, **details)
    if args.action == "accept":
        if args.category is not None:
            raise FeedbackError("category: --accept records the model's category; give --present and --category "
                                "for a reading of your own", "category")
        finding = finding_of_job(rt.engine, job_id)
        if finding is None or not any(details.values()):
            return None  # add_feedback says what is missing, if anything
        present, category = model_answer(finding.present, finding.category)
        return Reading(present, category, **details)
    if args.category is None:
        for name, value in details.items():
            if value:
                raise FeedbackError(f"{name}: give --category with it", name)
        return None
    return Reading(args.category >= 1, args.category, **details)


def _add(rt: Runtime, args: argparse.Namespace) -> int:
    action = args.action or "reading"
    try:
        job_id = args.job if args.job is not None else job_of_instance(rt.engine, args.sop_instance_uid)
        reading = _reading(rt, args, job_id)
        label_id = add_feedback(rt.engine, job_id=job_id, reader=args.reader, action=action, reading=reading,
                                read_date=args.read_date, actor=_os_user())
    except FeedbackError as exc:
        option = OPTIONS.get(exc.field or "", "")
        if exc.field == "job" and args.job is None:
            option = "--sop-instance-uid"
        message = str(exc)
        if option and message.startswith(f"{exc.field}: "):  # the option's name stands for the field's
            message = message[len(f"{exc.field}: "):]
        print(f"dicom-node: labels add: {option + ': ' if option else ''}{message}", file=sys.stderr)
        return EXIT_BAD_VALUE
    stored = recorded(rt.engine, label_id)
    assert stored is not None  # just committed; labels are never removed
    values, reader, read_date = stored
    print(f"label {label_id} recorded for job {job_id} ({action}): {describe(values)}; reader {reader}, "
          f"read {read_date.isoformat() if read_date else '-'}, source console")
    return 0


def _disagreements(rt: Runtime, model: str | None, limit: int, as_json: bool) -> int:
    agreement = agreement_by_model(rt.engine)
    rows = disagreements(rt.engine, limit=max(limit, 0), model=model)
    if as_json:
        for a in agreement:
            print(json.dumps({"model": a.model, "reads": a.reads, "agree_binary": a.agree_binary,
                              "agree_category": a.agree_category, "rate": round(a.rate, 4),
                              "category_rate": round(a.category_rate, 4)}))
        for d in rows:
            print(json.dumps({"label_id": d.label_id, "job_id": d.job_id, "sop_instance_uid": d.sop_instance_uid,
                              "reader": d.reader, "read_date": d.read_date.isoformat() if d.read_date else None,
                              "source": d.source, "model": d.model, "model_present": d.model_present,
                              "model_category": d.model_category,
                              "model_probability": round(d.model_probability, 4),
                              "reader_present": d.reader_present, "reader_category": d.reader_category}))
        return 0
    print(f"{'model':<40}{'reads':>7}{'agree':>8}{'rate':>8}{'category':>10}")
    for a in agreement:
        print(f"{a.model[:39]:<40}{a.reads:>7}{a.agree_binary:>8}{a.rate:>8.1%}{a.category_rate:>10.1%}")
    if not agreement:
        print("(no reads of analysed images)")
    print()
    print(f"{'label':>6}{'job':>7}  {'model says':<13}{'reader says':<13}{'source':<8}{'read':<11}{'reader':<20}"
          f"{'model':<24}SOP Instance UID")
    for d in rows:
        print(f"{d.label_id:>6}{d.job_id:>7}  {_answer(d.model_present, d.model_category):<13}"
              f"{_answer(d.reader_present, d.reader_category):<13}{d.source:<8}"
              f"{d.read_date.isoformat() if d.read_date else '-':<11}{(d.reader or '-')[:19]:<20}{d.model[:23]:<24}"
              f"{d.sop_instance_uid}")
    if not rows:
        print("(no disagreements)")
    return 0


def _answer(present: bool, category: int) -> str:
    return f"{'yes' if present else 'no'}, cat {category}"
