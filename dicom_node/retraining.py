"""Retraining as a node job: from the labelled archive to a registered candidate model.

``dicom-node retrain`` (and the serve process's schedule, which starts that same command) runs these steps:

1. mark failed the runs whose process died (``db.training.fail_dead_runs``) and fill patient keys missing from
   upgraded databases;
2. the data set: every in-scope image with at least one read, labelled by the configured consensus
   (``db.labels.training_labels``), grouped by the pseudonymous patient key;
3. the frozen hold-out (``db.holdout``): patients seen for the first time are assigned, stratified, in the same
   transaction that starts the run; hold-out patients never enter training;
4. a manifest for ``python -m train.retrain`` (the seed paper's protocol, ``train/``), started in its own process
   at low CPU priority (``training.nice``) with ``training.threads`` threads, dying with this process; its progress
   (``progress.jsonl``) is copied into the run's row for ``dicom-node status``;
5. when it succeeded (``result.json``, written last) and the weights' sha256 matches, the candidate is registered
   and the run marked succeeded in one transaction (``db.registry.register_candidate``); otherwise the run is
   marked failed with the reason.

The artifacts (reports, figures, the model and its card) live in ``<storage root>/training/run-<id>/`` and name
images by instance id and patient key only; the manifest with the archive paths is written beside that folder and
removed when the run ends.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from io import BufferedReader
from pathlib import Path
from typing import Any, cast

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from ai.safe_text import escape, exception_summary
from db import holdout, labels, registry, training
from db.models import Event, RunState, SplitPart

from .archive import sha256_of
from .config import NodeConfig

LOG = logging.getLogger("dicom_node.retraining")
MODEL_NAME = "pneumoconiosis-resnet34"
TRAINING_DIR = "training"
RESULT_FILE = "result.json"
PROGRESS_FILE = "progress.jsonl"
POLL_SECONDS = 1.0


class RetrainError(RuntimeError):
    """The data set cannot be trained on (too few images, one class only, ...); the message says what to do."""


@dataclass(frozen=True)
class RetrainOptions:
    """Command-line overrides of the ``training.*`` keys for one run."""

    folds: int | None = None
    epochs: int | None = None
    size: int | None = None
    trigger: str = "command"  # "command" or "schedule"
    show_progress: bool = True  # the training's progress bars on this terminal


@dataclass(frozen=True)
class Example:
    instance_id: int
    path: Path
    patient_key: str
    present: int
    category: int
    sources: tuple[str, ...]


@dataclass
class Plan:
    """What a run would train and test on; ``sides`` are every labelled patient's side after this run's draw."""

    training: list[Example]
    holdout: list[Example]
    new_patients: dict[str, str]  # patient key -> stratum, not yet assigned
    sides: dict[str, SplitPart]
    strata: dict[str, str] = field(default_factory=dict)  # every labelled patient's stratum
    last_label_id: int = 0

    def summary(self) -> str:
        def part(examples: list[Example]) -> str:
            present = sum(e.present for e in examples)
            patients = len({e.patient_key for e in examples})
            categories = Counter(e.category for e in examples if e.category >= 0)
            cats = ", ".join(f"{k}: {categories[k]}" for k in sorted(categories))
            return (f"{len(examples)} image(s) of {patients} patient(s), {present} present / "
                    f"{len(examples) - present} absent" + (f"; categories {cats}" if cats else ""))

        new_hold = sum(1 for k in self.new_patients if self.sides.get(k) is SplitPart.HOLDOUT)
        return (f"training : {part(self.training)}\nhold-out : {part(self.holdout)}\n"
                f"new patients: {len(self.new_patients)} ({new_hold} to the hold-out, "
                f"{len(self.new_patients) - new_hold} to training)")


def _stratum(present: int, category: int) -> str:
    return f"{present}/{category}"


def make_plan(engine: Engine, archive_root: Path, config: NodeConfig) -> Plan:
    """The data set and the hold-out sides this run would use (nothing written)."""
    consensus = labels.training_labels(engine, config.training.consensus)
    rows = training.labelled_instances(engine, list(consensus))
    missing_key = [r.instance_id for r in rows if not r.patient_key]
    if missing_key:
        raise RetrainError(f"{len(missing_key)} labelled image(s) have no patient key yet; run 'dicom-node check'")
    examples = []
    for row in rows:
        label = consensus[row.instance_id]
        examples.append(Example(row.instance_id, archive_root / row.archive_path, str(row.patient_key),
                                int(label.present), int(label.category), tuple(label.sources)))
    strata: dict[str, str] = {}
    for e in examples:  # a patient's stratum is their most severe label
        current = strata.get(e.patient_key)
        candidate = _stratum(e.present, e.category)
        strata[e.patient_key] = max(current, candidate) if current else candidate
    existing = holdout.assignments(engine)
    sides = holdout.plan_assignments(existing, strata, config.training.holdout_fraction, config.training.seed)
    new = {k: s for k, s in strata.items() if k not in existing}
    plan = Plan(training=[e for e in examples if sides[e.patient_key] is SplitPart.TRAINING],
                holdout=[e for e in examples if sides[e.patient_key] is SplitPart.HOLDOUT],
                new_patients=new, sides=sides, strata=strata, last_label_id=labels.newest_label_id(engine))
    return plan


def check_plan(plan: Plan, folds: int) -> None:
    """Refuse a data set the protocol cannot train or the gate cannot judge, saying what is missing."""
    for name, examples, needed in (("training", plan.training, folds), ("hold-out", plan.holdout, 1)):
        for present, what in ((1, "present"), (0, "absent")):
            patients = {e.patient_key for e in examples if e.present == present}
            if len(patients) < needed:
                raise RetrainError(f"the {name} set has {len(patients)} patient(s) labelled {what}; at least "
                                   f"{needed} are needed (label more images)")


def _settings(config: NodeConfig, options: RetrainOptions) -> dict[str, Any]:
    t, p = config.training, config.promotion
    return {"folds": options.folds or t.folds, "epochs": options.epochs or t.epochs, "size": options.size or t.size,
            "batch_size": t.batch_size, "seed": t.seed, "threads": t.threads, "nice": t.nice, "device": t.device,
            "imagenet_weights": str(t.imagenet_weights) if t.imagenet_weights else None,
            "threshold_rule": "youden", "alpha": p.alpha, "min_sensitivity": p.min_sensitivity,
            "min_specificity": p.min_specificity, "consensus": t.consensus, "holdout_fraction": t.holdout_fraction}


def _champion_for_manifest(engine: Engine, archive_root: Path, config: NodeConfig) -> dict[str, Any] | None:
    from ai.models import CLASSIFIER, model_path

    entry = registry.champion(engine)
    if entry is None:
        return None
    # a bundled champion is the installed classifier, as the workers use it (dicom_node.champion)
    path = model_path(CLASSIFIER, config.models.directory) if entry.bundled else entry.file_path(archive_root)
    if not path.is_file():
        return None
    return {"id": entry.id, "name": entry.name, "version": entry.version, "path": str(path)}


def _item(e: Example, read_dates: dict[int, Any]) -> dict[str, Any]:
    read = read_dates.get(e.instance_id)
    return {"instance_id": e.instance_id, "path": str(e.path), "patient_key": e.patient_key, "present": e.present,
            "category": e.category, "label_source": "+".join(e.sources),
            "read_date": read.isoformat() if read else None}


def _labels_note(plan: Plan, engine: Engine) -> str:
    low, high = training.read_date_range(engine, [e.instance_id for e in plan.training])
    sources = sorted({s for e in plan.training for s in e.sources})
    dates = f", read {low} to {high}" if low and high else ""
    return f"the site's own reads (sources: {', '.join(sources) or 'none'}{dates})"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_dead_runs(engine: Engine) -> list[int]:
    """Mark failed the runs of this host whose process is gone (kill -9, reboot); logged, returns their ids."""
    dead = training.fail_dead_runs(engine, socket.gethostname(), _pid_alive)
    for run_id in dead:
        LOG.warning("training run #%d was left running by a process that is gone: marked failed", run_id)
    return dead


def _child_setup(nice: int) -> Callable[[], None]:
    def setup() -> None:  # runs in the child between fork and exec
        os.nice(nice)
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
        except Exception:  # noqa: BLE001 - best effort: without it the child still ends when its work does
            pass

    return setup


class _StderrTee(threading.Thread):
    """Forwards the training's stderr (progress bars, its one-line error) to ours and keeps the last line."""

    def __init__(self, stream: BufferedReader, forward: bool) -> None:
        super().__init__(name="training-stderr", daemon=True)
        self.stream, self.forward, self.tail = stream, forward, b""

    def run(self) -> None:
        while chunk := self.stream.read1(4096):  # what is there now: progress bars are redrawn, not lines
            if self.forward:
                sys.stderr.buffer.write(chunk)
                sys.stderr.flush()
            self.tail = (self.tail + chunk)[-8192:]

    def last_line(self) -> str:
        lines = [line.strip() for line in self.tail.replace(b"\r", b"\n").split(b"\n") if line.strip()]
        return escape(lines[-1].decode("utf-8", "replace"), 500) if lines else ""


def _read_progress(path: Path, offset: int) -> tuple[int, tuple[str, float] | None]:
    if not path.is_file():
        return offset, None
    with path.open("rb") as fh:
        fh.seek(offset)
        data = fh.read()
    complete, _, _rest = data.rpartition(b"\n")
    if not complete:
        return offset, None
    latest = None
    for line in complete.split(b"\n"):
        try:
            item = json.loads(line)
            latest = (str(item.get("stage", "")), float(item.get("progress", 0.0)))
        except (ValueError, TypeError, AttributeError):
            continue
    return offset + len(complete) + 1, latest


def _start(engine: Engine, archive_root: Path, config: NodeConfig, options: RetrainOptions, plan: Plan
           ) -> tuple[int, Path, Path, dict[str, Any]]:
    """Start the run: the new patients' sides and the run row in one transaction; then the manifest."""
    settings = _settings(config, options)
    with Session(engine) as session, session.begin():
        run_id = training.start_run(session, trigger=options.trigger, started_by=getpass.getuser(),
                                    host=socket.gethostname(), pid=os.getpid(), config=settings,
                                    artifacts_dir="", last_label_id=plan.last_label_id,
                                    images=len(plan.training) + len(plan.holdout))
        holdout.assign(session, plan.strata, config.training.holdout_fraction, config.training.seed, run_id)
        relative = f"{TRAINING_DIR}/run-{run_id}"
        training.set_artifacts_dir(session, run_id, relative)
        session.add(Event(kind="training_started", detail=f"run {run_id} ({options.trigger}) by "
                                                           f"{getpass.getuser()}: {len(plan.training)} training, "
                                                           f"{len(plan.holdout)} hold-out image(s)"))
    out_dir = archive_root / relative
    out_dir.mkdir(parents=True, exist_ok=True)
    read_dates = training.latest_read_dates(engine, [e.instance_id for e in plan.training + plan.holdout])
    manifest = {
        "run_id": run_id, "name": MODEL_NAME, "version": f"site-{run_id}", "site": config.network.ae_title,
        "segmenter": str(_segmenter_path(config)), "champion": _champion_for_manifest(engine, archive_root, config),
        "settings": settings, "training": [_item(e, read_dates) for e in plan.training],
        "holdout": [_item(e, read_dates) for e in plan.holdout], "labels_note": _labels_note(plan, engine),
    }
    manifest_path = archive_root / TRAINING_DIR / f"run-{run_id}.manifest.json"
    tmp = manifest_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest), encoding="utf-8")
    os.replace(tmp, manifest_path)
    return run_id, out_dir, manifest_path, settings


def _segmenter_path(config: NodeConfig) -> Path:
    from ai.models import LUNG_UNET, model_path

    return model_path(LUNG_UNET, config.models.directory)


def _run_child(engine: Engine, run_id: int, manifest_path: Path, out_dir: Path, settings: dict[str, Any],
               show_progress: bool) -> tuple[int, str]:
    env = dict(os.environ)
    threads = str(settings["threads"])
    env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, OPENBLAS_NUM_THREADS=threads)
    cmd = [sys.executable, "-m", "train.retrain", "--manifest", str(manifest_path), "--out", str(out_dir)]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=None if show_progress else subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=env, close_fds=True,
                            preexec_fn=_child_setup(int(settings["nice"])))
    tee = _StderrTee(cast(BufferedReader, proc.stderr), show_progress)
    tee.start()
    offset, last = 0, None
    while True:
        try:
            code = proc.wait(timeout=POLL_SECONDS)
        except subprocess.TimeoutExpired:
            code = None
        offset, latest = _read_progress(out_dir / PROGRESS_FILE, offset)
        if latest is not None and latest != last:
            last = latest
            training.update_progress(engine, run_id, *latest)
        if code is not None:
            break
    tee.join(timeout=5)
    return code, tee.last_line()


def _register(engine: Engine, archive_root: Path, run_id: int, out_dir: Path) -> int:
    """The candidate and the run's success, in one transaction; raises ValueError on an inconsistent result."""
    result = json.loads((out_dir / RESULT_FILE).read_text(encoding="utf-8"))
    model_file = out_dir / str(result["model_file"])
    if not model_file.is_file() or sha256_of(model_file) != result["sha256"]:
        raise ValueError("the model file is missing or does not match the sha256 of result.json")
    card = out_dir / "classifier.md"
    holdout_metrics = result.get("holdout", {}).get("candidate", {})
    gate = result.get("gate", {})
    with Session(engine) as session, session.begin():
        model_id = registry.register_candidate(
            session, name=str(result.get("name", MODEL_NAME)), version=str(result["version"]),
            path=str(model_file.relative_to(archive_root)), sha256=str(result["sha256"]),
            card_path=str(card.relative_to(archive_root)) if card.is_file() else None, run_id=run_id,
            threshold=float(result["threshold"]), holdout_auc=holdout_metrics.get("auc"),
            holdout=result.get("holdout", {}), gate_passed=bool(gate.get("passed")), gate=gate)
        training.finish_run(session, run_id, model_id=model_id, metrics={
            k: result.get(k) for k in ("per_fold", "pooled", "holdout", "gate", "counts")})
        session.add(Event(kind="training_succeeded",
                          detail=f"run {run_id}: candidate model {model_id} {result['version']}, hold-out AUC "
                                 f"{holdout_metrics.get('auc')}, gate {'passed' if gate.get('passed') else 'failed'}"))
    return model_id


def _fail(engine: Engine, run_id: int, error: str) -> None:
    training.fail_run(engine, run_id, error)
    with Session(engine) as session, session.begin():
        session.add(Event(kind="training_failed", detail=f"run {run_id}: {error}"[:2000]))
    LOG.error("training run #%d failed: %s", run_id, error)


def retrain(engine: Engine, archive_root: Path, config: NodeConfig, options: RetrainOptions,
            prepare: Callable[[], None] = lambda: None) -> tuple[int, int | None]:
    """One run, start to end; returns (run id, registered model id or None when it failed).

    ``prepare`` runs first (the command line fills missing patient keys there). Raises RetrainError, before any
    run is recorded, for a data set that cannot be trained on, and TrainingBusy while another run runs."""
    recover_dead_runs(engine)
    prepare()
    plan = make_plan(engine, archive_root, config)
    check_plan(plan, options.folds or config.training.folds)
    run_id, out_dir, manifest_path, settings = _start(engine, archive_root, config, options, plan)
    LOG.info("training run #%d started: %d training and %d hold-out image(s)", run_id, len(plan.training),
             len(plan.holdout))
    try:
        code, last_line = _run_child(engine, run_id, manifest_path, out_dir, settings, options.show_progress)
        if code != 0 or not (out_dir / RESULT_FILE).is_file():
            _fail(engine, run_id, f"the training process exited with status {code}"
                                  + (f": {last_line}" if last_line else ""))
            return run_id, None
        model_id = _register(engine, archive_root, run_id, out_dir)
        LOG.info("training run #%d succeeded: candidate model #%d", run_id, model_id)
        return run_id, model_id
    except Exception as exc:  # the run must end failed, never stay running
        _fail(engine, run_id, f"registering the model failed ({exception_summary(exc)})")
        return run_id, None
    finally:
        manifest_path.unlink(missing_ok=True)


def new_labels_since_last_run(engine: Engine) -> int:
    return labels.labels_since(engine, training.last_succeeded_label_id(engine))


def status_text(engine: Engine) -> list[str]:
    """Lines for ``dicom-node status``: the running run's stage and progress, else the last run."""
    runs = training.list_runs(engine, limit=1)
    lines = []
    if not runs:
        lines.append("training     : never run ('dicom-node retrain')")
    else:
        run = runs[0]
        if run.state is RunState.RUNNING:
            lines.append(f"training     : run #{run.id} running since {run.started_at:%Y-%m-%d %H:%M} UTC "
                         f"({run.trigger}), {run.stage}, {run.progress * 100:.0f} %")
        else:
            when = f"{run.finished_at:%Y-%m-%d %H:%M} UTC" if run.finished_at else "?"
            outcome = f"model #{run.model_id}" if run.model_id else (run.error or "failed")
            lines.append(f"training     : last run #{run.id} {run.state.value} at {when}: {escape(outcome, 200)}")
    lines.append(f"new labels   : {new_labels_since_last_run(engine)} since the last successful training")
    return lines


_scheduled: list[subprocess.Popen[bytes]] = []  # runs started by the schedule, reaped at the next tick


def scheduled_retrain(engine: Engine, archive_root: Path, config_path: Path | None, overrides: list[str],
                      min_new_labels: int) -> bool:
    """The serve process's ``training`` job: start ``dicom-node retrain`` as a process of its own (so a training
    never shares the intake's process, and outlives a restart of serve) when no run is running and enough labels
    came since the last successful run. Returns whether it started one."""
    _scheduled[:] = [proc for proc in _scheduled if proc.poll() is None]
    recover_dead_runs(engine)
    if any(run.state is RunState.RUNNING for run in training.list_runs(engine, limit=1)) or _scheduled:
        LOG.info("scheduled training skipped: a training run is in progress")
        return False
    new = new_labels_since_last_run(engine)
    if new < min_new_labels:
        LOG.info("scheduled training skipped: %d new label(s) since the last run, training.min_new_labels is %d",
                 new, min_new_labels)
        return False
    cmd = [sys.executable, "-m", "dicom_node.cli", "retrain", "--trigger", "schedule"]
    if config_path is not None:
        cmd += ["--config", str(config_path)]
    for item in overrides:
        cmd += ["--set", item]
    log_path = archive_root / TRAINING_DIR / "scheduled.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        _scheduled.append(subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                           start_new_session=True, close_fds=True))
    LOG.info("scheduled training started (%d new label(s)); its output goes to %s", new, log_path)
    return True
