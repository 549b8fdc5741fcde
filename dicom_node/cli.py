"""``dicom-node``: serve, worker, status, check, jobs, resend, analyse, train.

``serve`` runs the node (Storage SCP, supervised worker processes, exporter, and the one scheduler of its periodic
jobs, ``dicom_node.scheduler``); ``worker`` one analysis worker alone; ``status``, ``check``, ``jobs`` and ``resend``
look at or repair the database and the archive; ``analyse`` runs the analysis on files offline; ``train`` hands over
to ``python -m train.<model>``. Every subcommand but ``train`` takes ``--config`` and ``--set section.key=value`` so
that any configuration key can be changed from the command line; a bad value stops the command with exit status 2
and a message naming the key.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from ai.limits import ImageLimits
from ai.safe_text import exception_summary
from db.engine import SchemaError
from db.exports import export_counts, reclaim_expired, resend
from db.integrity import guard_of
from db.models import ExportState, JobState
from db.queue import NO_RESULT_EVENT, counts_by_state, list_jobs
from db.reconciliation import last_reconciliation
from db.results import count_without_result, results_of_jobs

from . import __version__
from .config import ConfigError, NodeConfig, default_config_path, load_config, parse_set_options
from .log_safety import setup_logging
from .netsetup import configure_pynetdicom
from .patient_key import PatientKeySecretError, backfill_patient_keys, load_or_create_secret
from .runtime import Runtime, open_runtime

LOG = logging.getLogger("dicom_node")
# dicom_node/<name>.py: _command_modules
COMMAND_MODULES: list[str] = ["cli_retrain", "cli_models", "cli_labels", "cli_console"]
EXIT_CONFIG = 2
EXIT_INCONSISTENT = 1  # dicom-node check: something was missing from the archive or the database


def _layout_note(cfg: NodeConfig) -> str:
    """Why ``worker.processes``/``worker.threads`` = "auto" chose what they did ("" when both were numbers)."""
    from .worker_layout import AUTO, resolve_layout

    given = (cfg.values["worker.processes"], cfg.values["worker.threads"])
    if AUTO not in given:
        return ""
    return "; auto: " + resolve_layout(*given, cfg.worker.precision, cfg.worker.device).reason


def _stop_on_signals(what_happens: str) -> threading.Event:
    """An event set by SIGTERM or SIGINT, which are logged with ``what_happens`` next."""
    stop = threading.Event()

    def _request_stop(signum: int, _frame: object) -> None:
        LOG.info("%s received: %s", signal.Signals(signum).name, what_happens)
        stop.set()

    signal.signal(signal.SIGTERM, _request_stop)
    signal.signal(signal.SIGINT, _request_stop)
    return stop


def _cmd_serve(rt: Runtime) -> int:
    from .doorbell import ServeBells
    from .export import export_lease_seconds
    from .intake import Intake
    from .labels_sr import import_new_sr_labels
    from .retraining import recover_dead_runs, scheduled_retrain
    from .scheduler import DATABASE_IDENTITY_JOB, LABELS_SR_JOB, LEASE_RECLAIM_JOB, TRAINING_JOB, NodeScheduler
    from .scp import StorageServer

    cfg = rt.config
    console = None
    if cfg.console.enabled:
        from .console.app import ConsoleConfigError, check_startup
        from .console.context import ConsoleContext
        from .console.server import ConsoleServer

        try:
            check_startup(cfg)
        except ConsoleConfigError as exc:
            print(f"dicom-node: configuration error: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        console = ConsoleServer(ConsoleContext(cfg, rt.engine, rt.archive, in_serve=True,
                                               config_path=rt.config_path, overrides=rt.overrides))
    configure_pynetdicom(rt.archive.tmp_dir)  # process-wide, once: received datasets stream into tmp/
    if not cfg.network.allowed_calling_aets:
        LOG.warning("network.allowed_calling_aets is empty: every calling AE title is accepted")
    secret = _patient_key_secret(rt)
    if secret is None or not _reconcile_at_start_up(rt, secret) or not _backfill_patient_keys(rt, secret):
        return 1
    scheduler = NodeScheduler()  # every periodic task of this process is one of its jobs
    # serve and its workers wake each other instead of waiting for their polls (dicom_node.doorbell)
    bells = ServeBells() if cfg.worker.processes > 0 else None
    intake = Intake(rt.archive, rt.engine, cfg.storage.duplicate_policy, cfg.limits, patient_key_secret=secret,
                    on_queued=bells.ring_workers if bells is not None else None)
    server = StorageServer(cfg, intake)
    if console is not None:
        console.start()  # a port in use raises OSError here, before the DICOM port listens
    try:
        server.start()
    except BaseException:
        if console is not None:
            console.stop()
        raise
    supervisor = None
    if cfg.worker.processes > 0:
        from .supervisor import WorkerSupervisor

        LOG.info("workers: %d process(es) of %d model thread(s)%s", cfg.worker.processes, cfg.worker.threads,
                 _layout_note(cfg))
        supervisor = WorkerSupervisor(cfg.worker.processes, rt.config_path, rt.overrides, bells)
        supervisor.start(scheduler)
    else:
        LOG.info("worker.processes = 0: no analysis here; run 'dicom-node worker' on a host sharing the database")
    exporter = None
    if cfg.export.destinations:
        from .export import Exporter

        exporter = Exporter(cfg, rt.engine, rt.archive.root)
        exporter.start(scheduler)
        if bells is not None:
            bells.on_results(exporter.wake)
        LOG.info("exporting results to %s", ", ".join(
            f"{d.name} ({d.peer})" for d in cfg.export.destinations))
    else:
        LOG.info("no export destinations configured: results stay under %s", rt.archive.root / "results")
    if cfg.labels.sr_import_seconds:
        scheduler.every(LABELS_SR_JOB, cfg.labels.sr_import_seconds, import_new_sr_labels,
                        args=(rt.engine, rt.archive.root, set()), run_now=True)
    recover_dead_runs(rt.engine)  # a training run killed with the last serve is marked failed
    if cfg.training.schedule:
        scheduler.cron(TRAINING_JOB, cfg.training.schedule, scheduled_retrain,
                       args=(rt.engine, rt.archive.root, rt.config_path, rt.overrides, cfg.training.min_new_labels))
    scheduler.every(LEASE_RECLAIM_JOB, export_lease_seconds(cfg.export.deadline_seconds) / 4,
                    _reclaim_expired_leases, args=(rt.engine, cfg.export.max_attempts))
    guard = guard_of(rt.engine)
    if guard is not None:
        scheduler.every(DATABASE_IDENTITY_JOB, cfg.database.identity_check_seconds, guard.poll)

        def database_lost() -> None:  # called by the thread that saw it: hands nothing to the database
            scheduler.remove(DATABASE_IDENTITY_JOB)
            scheduler.remove(LEASE_RECLAIM_JOB)
            scheduler.remove(LABELS_SR_JOB)
            scheduler.remove(TRAINING_JOB)
            if exporter is not None:
                exporter.stop(wait=False)  # every round would fail on the replaced database until the restart
                LOG.error("exporter stopped: the database file was removed or replaced; restart the node")

        guard.on_trip(database_lost)
    scheduler.start()
    ports = [str(cfg.network.port)] if cfg.network.port else []
    ports += [f"{cfg.tls.port} (TLS)"] if cfg.tls.enabled else []
    LOG.info("dicom-node %s: AE %s listening on %s:%s; archive %s; database %s; free %.1f GiB (reserve %.0f MiB)",
             __version__, cfg.network.ae_title, cfg.network.bind_address, " and ".join(ports),
             rt.archive.archive_dir, rt.engine.url.render_as_string(hide_password=True),
             rt.archive.free_bytes() / 2**30, cfg.storage.free_disk_reserve_mb)

    stop = _stop_on_signals("refusing new associations, finishing open ones")
    while not stop.wait(1.0):  # only waits for the signal (with a timeout, so that its handler runs promptly)
        pass
    aborted = server.stop(grace_seconds=cfg.network.dimse_timeout)
    if console is not None:
        console.stop()
    if supervisor is not None:
        supervisor.stop(grace_seconds=cfg.network.dimse_timeout)
    if exporter is not None:
        exporter.stop()
    if bells is not None:
        bells.close()
    scheduler.shutdown()
    LOG.info("stopped (%d association(s) aborted after the grace period)", aborted)
    return 0


def _reclaim_expired_leases(engine: Engine, max_attempts: int) -> None:
    """The scheduler's ``lease-reclaim`` job: exports whose exporter died while sending them go back to pending
    (analysis jobs are taken back by the next worker's claim: a slow worker does not renew its lease)."""
    count = reclaim_expired(engine, max_attempts)
    if count:
        LOG.warning("%d export(s) whose exporter stopped while sending them (lease expired) taken back", count)


def _patient_key_secret(rt: Runtime) -> bytes | None:
    """The node's patient-key secret (made at first start); None, with an ERROR line, when it is unusable."""
    try:
        return load_or_create_secret(rt.archive.root)
    except PatientKeySecretError as exc:
        LOG.error("%s", exc)
        return None


def _backfill_patient_keys(rt: Runtime, secret: bytes) -> bool:
    """Patient keys for rows from before schema version 3, from their archived files (once: later rows have one)."""
    try:
        count = backfill_patient_keys(rt.engine, rt.archive.root, secret, rt.config.limits)
    except (SQLAlchemyError, OSError) as exc:
        LOG.error("patient keys of older instance rows could not be set (%s)", exception_summary(exc))
        return False
    if count:
        LOG.info("patient keys: %d instance row(s) from before schema version 3 keyed from their files", count)
    return True


def _reconcile_at_start_up(rt: Runtime, secret: bytes) -> bool:
    """Archive/database reconciliation before listening: one INFO line, WARNING when something did not agree."""
    from .reconcile import reconcile

    try:
        report = reconcile(rt.archive, rt.engine, trigger="serve", limits=rt.config.limits,
                           patient_key_secret=secret)
    except (SQLAlchemyError, OSError) as exc:
        LOG.error("start-up reconciliation of the archive with the database failed (%s); not listening",
                  exception_summary(exc))
        return False
    if report.consistent:
        LOG.info("reconciliation: archive and database agree: %s", report.summary())
    else:
        LOG.warning("reconciliation: archive and database disagreed: %s%s", report.summary(),
                    "; 'dicom-node check' lists the missing and unregistrable files"
                    if report.missing or report.unregistered else "")
    return True


def _cmd_check(rt: Runtime) -> int:
    """Reconcile now (as start-up does) and list what did not agree; exit 1 if anything did not."""
    from .reconcile import SETTLE_SECONDS_WHILE_SERVING, reconcile

    secret = _patient_key_secret(rt)
    if secret is None:
        return EXIT_CONFIG
    report = reconcile(rt.archive, rt.engine, settle_seconds=SETTLE_SECONDS_WHILE_SERVING, trigger="check",
                       limits=rt.config.limits, patient_key_secret=secret)
    if not _backfill_patient_keys(rt, secret):
        return EXIT_CONFIG
    print(f"storage root : {rt.archive.root}")
    print(f"database     : {rt.engine.url.render_as_string(hide_password=True)}")
    print(f"archived files        {report.files:>8}")
    print(f"instance rows         {report.rows:>8}")
    print(f"re-registered         {len(report.reregistered):>8}"
          + ("  (files the database did not know: registered and queued again)" if report.reregistered else ""))
    print(f"missing files         {len(report.missing):>8}"
          + ("  (rows whose archived file is gone: reported, not deleted)" if report.missing else ""))
    print(f"not registrable       {len(report.unregistered):>8}")
    if report.recent:
        print(f"recent, left alone    {report.recent:>8}  (written in the last {SETTLE_SECONDS_WHILE_SERVING:.0f} s:"
              " the intake may be committing them)")
    print(f"took                  {report.seconds:>8.2f} s")
    if report.missing:
        print("\nmissing files (SOP Instance UID, archive path):")
        for missing in report.missing:
            print(f"  {missing.sop_instance_uid}  {missing.archive_path}")
    if report.unregistered:
        print("\nfiles that could not be registered (archive path: reason):")
        for item in report.unregistered:
            print(f"  {item.archive_path}: {item.reason}")
    print("\nconsistent" if report.consistent else "\nNOT consistent before this check")
    return 0 if report.consistent else EXIT_INCONSISTENT


def _cmd_worker(rt: Runtime) -> int:
    """One analysis worker in the foreground until SIGTERM/SIGINT (it finishes the batch in hand)."""
    # Idle OpenMP threads sleep rather than spin: libgomp (torch's thread pool) otherwise spins for a while after
    # each parallel region, and on a shared 2-core node that took CPU the results thread, the intake and the export
    # needed (docs/benchmarks.md). Read when torch loads, just below; an OMP_WAIT_POLICY set by the site is kept.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from ai import analyse_batch  # torch loads here: only a worker process needs it

    from .doorbell import WorkerBells
    from .supervisor import stop_when_supervisor_exits
    from .worker import Worker

    configure_pynetdicom()  # process-wide, once (a worker sends nothing itself today)
    if rt.config.worker.nice:
        os.nice(rt.config.worker.nice)  # the intake keeps answering while the workers are busy (docs/benchmarks.md)
    stop = _stop_on_signals("finishing the batch in hand")
    stop_when_supervisor_exits(stop)
    Worker(rt.config, rt.engine, rt.archive, analyse=analyse_batch, bells=WorkerBells.from_environment()).run(stop)
    return 0


def _cmd_status(rt: Runtime) -> int:
    counts = counts_by_state(rt.engine)
    free = rt.archive.free_bytes()
    reserve = rt.config.storage.free_disk_reserve_bytes
    print(f"storage root : {rt.archive.root}")
    print(f"database     : {rt.engine.url.render_as_string(hide_password=True)}")
    print(f"disk free    : {free / 2**30:.2f} GiB (reserve {reserve / 2**20:.0f} MiB"
          f"{', BELOW RESERVE: C-STOREs refused' if free < reserve else ''})")
    last = last_reconciliation(rt.engine)
    if last is None:
        print("reconciled   : never (serve start-up and 'dicom-node check' reconcile archive and database)")
    else:
        at, rec = last
        print(f"reconciled   : {at:%Y-%m-%d %H:%M:%S} UTC ({rec.get('trigger', '?')}): "
              f"{rec.get('reregistered', 0)} re-registered, {rec.get('missing', 0)} missing file(s), "
              f"{rec.get('unregistered', 0)} not registrable, of {rec.get('files', 0)} archived file(s)")
        if rec.get("missing") or rec.get("unregistered"):
            print(f"WARNING: at the last reconciliation {rec.get('missing', 0)} instance row(s) had no archived "
                  f"file and {rec.get('unregistered', 0)} file(s) could not be registered; "
                  "'dicom-node check' lists them")
    print("jobs:")
    for state in JobState:
        print(f"  {state.value:<13}{counts.get(state.value, 0):>8}")
    print(f"  {'total':<13}{sum(counts.values()):>8}")
    silent = count_without_result(rt.engine)
    if silent:  # a line of its own: a radiologist reads a missing result as "nothing found"
        print(f"WARNING: {silent} image(s) have no result object (not even a 'not analysed' SR); "
              f"see the '{NO_RESULT_EVENT}' audit events")
    exports = export_counts(rt.engine)
    destinations = ", ".join(d.name for d in rt.config.export.destinations) or "none configured"
    print(f"exports ({destinations}):")
    for export_state in ExportState:
        print(f"  {export_state.value:<13}{exports.get(export_state.value, 0):>8}")
    print(f"  {'total':<13}{sum(exports.values()):>8}")
    for module in _command_modules():
        for line in module.status_lines(rt):
            print(line)
    return 0


def _cmd_resend(rt: Runtime, all_failed: bool, ids: list[int] | None) -> int:
    """Dead exports (with --all-failed also those waiting for a retry) back to pending, due now."""
    states = (ExportState.DEAD, ExportState.PENDING) if all_failed else (ExportState.DEAD,)
    count = resend(rt.engine, export_ids=ids, states=states)
    print(f"{count} export(s) queued again" + ("" if rt.config.export.destinations else
                                               " (no export destinations configured: nothing will send them)"))
    return 0


def _cmd_jobs(rt: Runtime, state: str | None, limit: int) -> int:
    rows = list_jobs(rt.engine, JobState(state) if state else None, limit)
    header = (f"{'job':>6}  {'state':<13}{'tries':>5}  {'reason':<26}{'modality':<9}{'from AE':<17}"
              f"{'received (UTC)':<20}")
    print(header + "SOP Instance UID")
    for r in rows:
        print(f"{r.job_id:>6}  {r.state:<13}{r.attempts:>5}  {(r.reason or '-'):<26}{(r.modality or '-'):<9}"
              f"{r.calling_aet:<17}{r.received_at:%Y-%m-%d %H:%M:%S}  {r.sop_instance_uid}")
    if not rows:
        print("(no jobs)")
    results = results_of_jobs(rt.engine, [r.job_id for r in rows])
    if results:
        print(f"\nresult objects (under {rt.archive.root}):")
        for job_id in sorted(results, reverse=True):
            for res in results[job_id]:
                exports = ", ".join(f"{d}: {s}" for d, s in res.exports) or "not exported (no destination)"
                print(f"{job_id:>6}  {res.kind.upper():<4}{res.archive_path}  [{exports}]")
    return 0


def _cmd_analyse(files: list[Path], as_json: bool, mask_out: Path | None, device: str | None,
                 limits: ImageLimits, model_dir: Path | None = None) -> int:
    """Run the analysis on files without the network: one result per file, in input order, errors included."""
    import json

    import numpy as np
    from PIL import Image

    from ai import analyse

    if mask_out is not None:
        mask_out.mkdir(parents=True, exist_ok=True)
    failures = 0
    for path in files:
        record = analyse(path, device=device, limits=limits, model_dir=model_dir)
        record_json = record.to_json()
        failures += record_json["error"] is not None
        if record.labels is not None and mask_out is not None:
            Image.fromarray(record.labels.astype(np.uint8), mode="L").save(mask_out / f"{path.stem}.png")
        if as_json:
            print(json.dumps(record_json), flush=True)
        else:
            verdict = "analysed" if record_json["analysed"] else f"not analysed: {record_json['reason']}"
            areas = record_json.get("lung_area_px")
            extra = f"  lungs R {areas['right']} px, L {areas['left']} px" if areas else ""
            print(f"{path}: {verdict} ({record_json['explanation']}){extra}", flush=True)
    return 0 if failures == 0 else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dicom-node", description="Pneumoconiosis CAD DICOM node")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, default=None,
                        help="TOML configuration file (default: $DICOM_NODE_CONFIG, else ./config.toml if present)")
    common.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                        help="override one configuration key; repeatable")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", parents=[common], help="run the Storage SCP until SIGINT/SIGTERM")
    sub.add_parser("worker", parents=[common], help="run one analysis worker (serve starts worker.processes itself)")
    sub.add_parser("status", parents=[common], help="job counts per state and free disk space")
    sub.add_parser("check", parents=[common],
                   help="reconcile archive and database now: re-register unknown files, list missing ones "
                        "(exit 1 if anything did not agree)")
    resend_cmd = sub.add_parser("resend", parents=[common],
                                help="queue dead-lettered exports again (default: every dead one)")
    resend_cmd.add_argument("--all-failed", action="store_true",
                            help="also exports waiting for a retry after failed attempts: try them now")
    resend_cmd.add_argument("--id", type=int, nargs="+", action="extend", dest="ids", metavar="N",
                            help="only these export ids")
    jobs = sub.add_parser("jobs", parents=[common], help="list analysis jobs, newest first")
    jobs.add_argument("--state", choices=[s.value for s in JobState])
    jobs.add_argument("--limit", type=int, default=100)
    analyse = sub.add_parser("analyse", parents=[common],
                             help="analyse DICOM, PNG or JPEG files without the network (limits.* apply)")
    analyse.add_argument("files", nargs="+", type=Path)
    analyse.add_argument("--json", action="store_true", help="one JSON object per line, one line per file")
    analyse.add_argument("--mask-out", type=Path, help="write <file stem>.png label masks (0 bg, 1 right, 2 left)")
    analyse.add_argument("--device", help="cpu or cuda (default: CUDA when present)")
    train = sub.add_parser("train", help="train a model (see docs): segmenter or classifier",
                           description="Arguments after the model name go to python -m train.<model>; "
                                       "use 'dicom-node train classifier --help' for them.")
    train.add_argument("model", choices=["segmenter", "classifier"])
    train.add_argument("args", nargs=argparse.REMAINDER)
    for module in _command_modules():
        module.add_commands(sub, common)
    return parser


def _command_modules() -> list[Any]:
    """The subcommand groups that live in their own modules: each has ``COMMANDS`` (the top-level command names it
    adds), ``add_commands(subparsers, common)``, ``run(rt, args) -> int`` and ``status_lines(rt) -> list[str]``
    (lines for ``dicom-node status``)."""
    import importlib

    return [importlib.import_module(f"dicom_node.{name}") for name in COMMAND_MODULES]


def main(argv: list[str] | None = None) -> int:
    args, extra = build_parser().parse_known_args(argv)
    if args.command == "train":
        import importlib

        return importlib.import_module(f"train.{args.model}").main(args.args + extra)
    if extra:
        build_parser().error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "analyse":
        setup_logging("WARNING")
        try:
            config_path = args.config if args.config is not None else default_config_path()
            config = load_config(config_path, parse_set_options(args.set))
        except ConfigError as exc:
            print(f"dicom-node: configuration error: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        return _cmd_analyse(args.files, args.json, args.mask_out, args.device or config.worker.device,
                            config.limits, config.models.directory)
    for module in _command_modules():  # commands that need neither configuration nor database
        early = getattr(module, "run_early", None)
        if args.command in module.COMMANDS and early is not None and (code := early(args)) is not None:
            return int(code)
    try:
        rt = open_runtime(args.config, args.set, serve=args.command == 'serve')
    except ConfigError as exc:
        print(f"dicom-node: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except SchemaError as exc:
        print(f"dicom-node: database error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:
        print(f"dicom-node: cannot open the storage: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "serve":
        try:
            return _cmd_serve(rt)
        except OSError as exc:  # e.g. port already in use: the OS's own text, which quotes no dataset
            LOG.error("cannot serve: %s", exception_summary(exc, message=exc.strerror or None))
            return 1
    if args.command == "worker":
        return _cmd_worker(rt)
    if args.command == "status":
        return _cmd_status(rt)
    if args.command == "check":
        return _cmd_check(rt)
    if args.command == "resend":
        return _cmd_resend(rt, args.all_failed, args.ids)
    for module in _command_modules():
        if args.command in module.COMMANDS:
            return int(module.run(rt, args))
    return _cmd_jobs(rt, args.state, args.limit)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
