"""``dicom-node retrain``: one training run on the labelled archive (``dicom_node.retraining``), and the lines
``dicom-node status`` prints about training."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from db.training import TrainingBusy

from .retraining import RetrainError, RetrainOptions, check_plan, make_plan, recover_dead_runs, retrain, status_text
from .runtime import Runtime

COMMANDS = ("retrain",)


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    cmd = sub.add_parser("retrain", parents=[common],
                         help="train a candidate classifier on the labelled archive (docs/retraining.md)")
    cmd.add_argument("--folds", type=int, help="cross-validation folds (default: training.folds)")
    cmd.add_argument("--epochs", type=int, help="maximum epochs per fold (default: training.epochs)")
    cmd.add_argument("--size", type=int, help="classifier input side in pixels (default: training.size)")
    cmd.add_argument("--dry-run", action="store_true", help="show the data set and the hold-out; train nothing")
    cmd.add_argument("--trigger", choices=["command", "schedule"], default="command", help=argparse.SUPPRESS)


def _prepare(rt: Runtime, register: bool = True) -> None:
    """Before the data set is read: keys for rows of an upgraded database, and the installed demo classifier in
    the registry (the first champion, which the gate compares the candidate with)."""
    from .champion import register_installed
    from .patient_key import backfill_patient_keys, load_or_create_secret

    backfill_patient_keys(rt.engine, rt.archive.root, load_or_create_secret(rt.archive.root), rt.config.limits)
    warning = register_installed(rt.engine, rt.config.models.directory) if register else None
    if warning:
        print(f"dicom-node: {warning}", file=sys.stderr)


def run(rt: Runtime, args: argparse.Namespace) -> int:
    for name, value, low, high in (("--folds", args.folds, 2, 20), ("--epochs", args.epochs, 1, 1000),
                                   ("--size", args.size, 64, 1024)):
        if value is not None and not low <= value <= high:
            print(f"dicom-node: {name} must be between {low} and {high}", file=sys.stderr)
            return 2
    options = RetrainOptions(folds=args.folds, epochs=args.epochs, size=args.size, trigger=args.trigger,
                             show_progress=sys.stderr.isatty())
    try:
        if args.dry_run:
            recover_dead_runs(rt.engine)
            _prepare(rt, register=False)  # the patient keys are needed to plan; the registry is not
            plan = make_plan(rt.engine, rt.archive.root, rt.config)
            print(plan.summary())
            check_plan(plan, options.folds or rt.config.training.folds)
            print("dry run: nothing recorded, nothing trained")
            return 0
        run_id, model_id = retrain(rt.engine, rt.archive.root, rt.config, options,
                                   prepare=lambda: _prepare(rt))
    except (RetrainError, TrainingBusy) as exc:
        print(f"dicom-node: cannot retrain: {exc}", file=sys.stderr)
        return 1
    if model_id is None:
        print(f"training run #{run_id} failed; 'dicom-node status' and the audit events say why", file=sys.stderr)
        return 1
    print(f"training run #{run_id} registered candidate model #{model_id}; see 'dicom-node models show "
          f"{model_id}'")
    return 0


def status_lines(rt: Runtime) -> list[str]:
    return status_text(rt.engine)
