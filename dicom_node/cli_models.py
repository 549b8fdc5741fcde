"""``dicom-node models list | show ID | promote ID [--force --reason TEXT] | rollback [--reason TEXT]``: the model
registry (``db.registry``) from the command line.

Every command first registers the installed classifier as the champion of a new registry (the bundled demo model,
or the classifier of ``models.directory``) and keeps that entry up to date after a software update. Promotions and
rollbacks are audit events naming the OS user; workers switch at their next batch (``dicom_node.champion``).
``--json`` prints one JSON object per line.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from pathlib import Path
from typing import Any

from db.registry import (
    ModelEntry,
    RegistryError,
    champion,
    get_model,
    list_models,
    promote,
    rollback,
)

from .archive import sha256_of
from .champion import register_installed
from .runtime import Runtime

COMMANDS = ("models",)
EXIT_REFUSED = 1
EXIT_USAGE = 2


def add_commands(subparsers: Any, common: argparse.ArgumentParser) -> None:
    models = subparsers.add_parser("models", help="the model registry: list, show, promote, roll back",
                                   description="The classifier registry: candidates, the champion the workers use, "
                                               "retired models.")
    actions = models.add_subparsers(dest="models_command", required=True)
    listing = actions.add_parser("list", parents=[common], help="every registered model, oldest first")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    show = actions.add_parser("show", parents=[common],
                              help="one model: files, hold-out metrics, the champion gate's comparison and reasons")
    show.add_argument("id", type=int, metavar="ID")
    show.add_argument("--json", action="store_true", help="one JSON object")
    prom = actions.add_parser("promote", parents=[common],
                              help="make a candidate that passed the champion gate the champion")
    prom.add_argument("id", type=int, metavar="ID")
    prom.add_argument("--force", action="store_true",
                      help="promote a candidate whose gate failed or was not evaluated (needs --reason)")
    prom.add_argument("--reason", help="why (stored in the audit event)")
    back = actions.add_parser("rollback", parents=[common],
                              help="retire the champion; the model it replaced becomes the champion again")
    back.add_argument("--reason", help="why (stored in the audit event)")


def run(rt: Runtime, args: argparse.Namespace) -> int:
    if args.models_command == "promote" and args.force and not (args.reason or "").strip():
        return _usage("models promote: --force needs --reason TEXT (why the champion gate is overridden)")
    problem = register_installed(rt.engine, rt.config.models.directory)
    if problem:
        print(f"dicom-node: warning: {problem}", file=sys.stderr)
    if args.models_command == "list":
        return _list(rt, args.json)
    if args.models_command == "show":
        return _show(rt, args.id, args.json)
    try:
        if args.models_command == "promote":
            return _promote(rt, args.id, args.force, args.reason)
        return _rollback(rt, args.reason)
    except RegistryError as exc:  # our own message: says why, and what would be accepted
        print(f"dicom-node: models {args.models_command}: {exc}", file=sys.stderr)
        return EXIT_REFUSED


def _usage(message: str) -> int:
    print(f"dicom-node: {message}", file=sys.stderr)
    return EXIT_USAGE


def _auc(entry: ModelEntry) -> str:
    return "-" if entry.holdout_auc is None else f"{entry.holdout_auc:.3f}"


def _gate(entry: ModelEntry) -> str:
    return {True: "passed", False: "failed", None: "-"}[entry.gate_passed]


def _list(rt: Runtime, as_json: bool) -> int:
    entries = list_models(rt.engine)
    if as_json:
        for entry in entries:
            print(json.dumps(entry.to_json()))
        return 0
    print(f"{'id':>4}  {'state':<10}{'name':<28}{'version':<20}{'AUC':>6}  {'gate':<7}{'created (UTC)':<20}notes")
    for e in entries:
        notes = ", ".join(n for n in ("bundled demo" if e.bundled else "",
                                      f"replaced #{e.replaced_model_id}" if e.replaced_model_id else "") if n)
        print(f"{e.id:>4}  {e.state:<10}{e.name:<28}{e.version:<20}{_auc(e):>6}  {_gate(e):<7}"
              f"{e.created_at:%Y-%m-%d %H:%M:%S}  {notes}")
    if not entries:
        print("(no models registered)")
    return 0


def _show(rt: Runtime, model_id: int, as_json: bool) -> int:
    entry = get_model(rt.engine, model_id)
    if entry is None:
        print(f"dicom-node: models show: there is no model #{model_id} ('dicom-node models list' shows them)",
              file=sys.stderr)
        return EXIT_REFUSED
    if as_json:
        print(json.dumps(entry.to_json()))
        return 0
    file = entry.file_path(rt.archive.root)
    card = None if entry.card_path is None else _card_file(entry, rt.archive.root)
    rows: list[tuple[str, Any]] = [
        ("model", entry.label), ("state", entry.state + (" (the bundled demo model)" if entry.bundled else "")),
        ("file", f"{file}" + ("" if file.is_file() else "  (MISSING)")), ("sha256", entry.sha256),
        ("model card", "-" if card is None else f"{card}" + ("" if card.is_file() else "  (MISSING)")),
        ("training run", entry.run_id if entry.run_id is not None else "-"),
        ("threshold", "-" if entry.threshold is None else f"{entry.threshold:.4f}"),
        ("hold-out AUC", _auc(entry)), ("gate", _gate(entry)),
        ("replaced", f"#{entry.replaced_model_id}" if entry.replaced_model_id else "-"),
        ("created", f"{entry.created_at:%Y-%m-%d %H:%M:%S} UTC"),
        ("promoted", "-" if entry.promoted_at is None else f"{entry.promoted_at:%Y-%m-%d %H:%M:%S} UTC"),
        ("retired", "-" if entry.retired_at is None else f"{entry.retired_at:%Y-%m-%d %H:%M:%S} UTC"),
    ]
    for key, value in rows:
        print(f"{key:<13}: {value}")
    for title, section in (("hold-out metrics", entry.holdout), ("champion gate", entry.gate)):
        print(f"{title}:" + ("" if section else " none"))
        for line in _outline(section or {}, "  "):
            print(line)
    return 0


def _card_file(entry: ModelEntry, storage_root: Path) -> Path:
    card = Path(entry.card_path or "")
    return card if card.is_absolute() else storage_root / card


def _outline(value: Any, indent: str) -> list[str]:
    """A nested JSON value as indented ``key: value`` lines (lists of numbers on one line, reasons one a line)."""
    lines: list[str] = []
    items = value.items() if isinstance(value, dict) else enumerate(value, 1)
    for key, item in items:
        label = f"{key}" if isinstance(value, dict) else f"{key}."
        if isinstance(item, dict) or (isinstance(item, list) and any(isinstance(i, (dict, list, str))
                                                                     for i in item)):
            lines.append(f"{indent}{label}:" if isinstance(value, dict) else f"{indent}{label}")
            lines.extend(_outline(item, indent + "  "))
        elif isinstance(item, list):
            lines.append(f"{indent}{label}: " + ", ".join(_scalar(i) for i in item))
        else:
            lines.append(f"{indent}{label}: {_scalar(item)}" if isinstance(value, dict) else
                         f"{indent}{label} {_scalar(item)}")
    return lines


def _scalar(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def file_problem(entry: ModelEntry, storage_root: Path) -> str | None:
    """Why the model's file cannot serve as the champion (missing, or not the registered bytes), or None."""
    file = entry.file_path(storage_root)
    if not file.is_file():
        return f"its file {file} is missing"
    if not entry.bundled and sha256_of(file) != entry.sha256:
        return f"its file {file} does not match the registered sha256"
    return None


def _promote(rt: Runtime, model_id: int, force: bool, reason: str | None) -> int:
    entry = get_model(rt.engine, model_id)
    if entry is not None and entry.state == "candidate":
        problem = file_problem(entry, rt.archive.root)
        if problem:
            raise RegistryError(f"model #{model_id} cannot be the champion: {problem}")
    new = promote(rt.engine, model_id, user=getpass.getuser(), reason=reason, force=force)
    replaced = "" if new.replaced_model_id is None else f", replacing #{new.replaced_model_id}"
    print(f"{new.label} is the champion{replaced}{' (forced past the gate)' if force else ''}; "
          "workers switch to it at their next batch")
    return 0


def _rollback(rt: Runtime, reason: str | None) -> int:
    current = champion(rt.engine)
    if current is not None and current.replaced_model_id is not None:
        previous = get_model(rt.engine, current.replaced_model_id)
        problem = None if previous is None else file_problem(previous, rt.archive.root)
        if previous is not None and problem:
            raise RegistryError(f"model #{previous.id} cannot be the champion again: {problem}")
    new = rollback(rt.engine, user=getpass.getuser(), reason=reason)
    print(f"{new.label} is the champion again ({current.label if current else 'the champion'} retired); "
          "workers switch to it at their next batch")
    return 0


def status_lines(rt: Runtime) -> list[str]:
    """The champion and the number of candidates, for ``dicom-node status`` (reads only)."""
    entries = list_models(rt.engine)
    current = next((e for e in entries if e.state == "champion"), None)
    if current is None:
        line = "none registered: the installed classifier ('dicom-node models list' registers it)"
    else:
        auc = f"hold-out AUC {current.holdout_auc:.3f}" if current.holdout_auc is not None else "no hold-out AUC"
        line = f"{current.label} ({'bundled demo model, ' if current.bundled else ''}{auc})"
    candidates = sum(e.state == "candidate" for e in entries)
    return [f"champion     : {line}", f"candidates   : {candidates}"]
