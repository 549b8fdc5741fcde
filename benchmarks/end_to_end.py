"""Send to SR in PACS: modality -> node (intake, worker, export) -> Orthanc, on this machine.

    .venv/bin/python benchmarks/end_to_end.py [--idle 30] [--count 100] [--file PATH]
        [--workers N] [--batch-size N] [--threads N]      # default: the node's config.toml defaults
        [--postgres] [--external-workers N]               # scale-out: PostgreSQL, N ``dicom-node worker`` processes

Phases, with fresh copies of a chest radiograph (new SOP Instance UIDs):
0. cold start: from starting ``dicom-node serve`` to its first C-ECHO answer, and to the first analysed SR in
   Orthanc (one image sent as soon as the echo answers);
1. idle queue (``--idle``): one instance at a time, the next sent only when all three result objects of the
   previous one (SR, SEG, SC) are in Orthanc, so that the node has nothing else in flight; the time from the start
   of the send to the SR appearing in Orthanc, p50 and p95, and to the last of the three (the heat-map SC, which the
   node sends after the report);
2. sustained (``--count``): all instances in one association; images per second from the start of the send until
   the last SR is in Orthanc, and until the last result object is (the CPU per image is read then).
The modality is pynetdicom, timing each C-STORE from request to response: the intake's latency under load (phase
2, while the workers analyse the earlier instances) against the idle node's (phase 1). ``--stop-during-burst``
attributes the loaded latency: the named processes are stopped (SIGSTOP) while the burst is sent and continued
after it (``workers``: no analysis and no new results during the burst; ``pacs``: the workers analyse, but no
export gets through); the throughput of such a run means nothing.

Orthanc is watched through ``/changes`` once per interval (each new instance is then looked up once), so the
benchmark's own polling does not steal the CPU it measures. With ``--postgres`` the node and the workers share a
temporary PostgreSQL cluster (as the tests start it) and the run ends by checking that every job was claimed
exactly once. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.analysis_stages import cpu_model  # noqa: E402
from tests.conftest import free_port  # noqa: E402
from tests.dicomgen import clone_instances  # noqa: E402
from tests.pacs import Orthanc  # noqa: E402

DATA = Path(os.environ.get("PNEUMO_DATA_DIR", REPO.parent / "shared" / "data")) / "dicom-samples"
DEFAULT_FILE = DATA / "chest" / "RG1_UNCR.dcm"
GOAL_P95_S = 1.0
GOAL_RATE = 3.0
WATCH_INTERVAL_S = 0.05
AE = "PNEUMOCAD"


class OrthancWatch:
    """SOP Instance UID -> monotonic time first seen in Orthanc, from one ``/changes`` request per interval."""

    def __init__(self, pacs: Orthanc) -> None:
        self.pacs = pacs
        self.seen: dict[str, float] = {}
        self.since = int(pacs.get("/changes?last")["Last"])
        self.requests = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(WATCH_INTERVAL_S):
            done = False
            while not done:
                page = self.pacs.get(f"/changes?since={self.since}&limit=500")
                self.requests += 1
                now = time.monotonic()
                for change in page["Changes"]:
                    if change["ChangeType"] == "NewInstance":
                        uid = self.pacs.get(f"/instances/{change['ID']}")["MainDicomTags"]["SOPInstanceUID"]
                        self.requests += 1
                        with self._lock:
                            self.seen.setdefault(uid, now)
                self.since, done = int(page["Last"]), bool(page["Done"])

    def wait(self, uids: list[str], timeout: float) -> float:
        """The time the last of ``uids`` was first seen."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                missing = [u for u in uids if u not in self.seen]
                if not missing:
                    return max(self.seen[u] for u in uids)
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(missing)} SR(s) missing after {timeout} s")
            time.sleep(WATCH_INTERVAL_S / 2)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


class Modality:
    """The sending modality: pynetdicom, so that each C-STORE's round trip is timed (storescu does not say)."""

    def __init__(self, port: int) -> None:
        from pynetdicom import AE as Entity

        self.port = port
        self.entity = Entity(ae_title="MODALITY")
        self.latencies: list[float] = []

    def send(self, files: list[Path]) -> None:
        """All ``files`` in one association; each C-STORE's time from request to response in ``latencies``.

        Each file is streamed as it is stored (pynetdicom sends a path's bytes without decoding them), as a modality
        sends what it has written: re-encoding a 7 MB dataset per C-STORE would charge the benchmark's own CPU to the
        two cores it measures."""
        from pydicom import dcmread

        headers = [dcmread(f, stop_before_pixels=True) for f in files]
        self.entity.requested_contexts = []
        for sop_class, syntax in sorted({(str(d.SOPClassUID), str(d.file_meta.TransferSyntaxUID)) for d in headers}):
            self.entity.add_requested_context(sop_class, syntax)
        assoc = self.entity.associate("127.0.0.1", self.port, ae_title=AE)
        if not assoc.is_established:
            raise RuntimeError("association refused")
        try:
            for path in files:
                started = time.monotonic()
                status = assoc.send_c_store(path)
                self.latencies.append(time.monotonic() - started)
                if getattr(status, "Status", None) != 0:
                    raise RuntimeError(f"C-STORE answered {status!r}")
        finally:
            assoc.release()


def expected_result_uids(files: list[Path], model_dir: str | None) -> dict[Path, dict[str, str]]:
    """The SR, SEG and SC UIDs each source will get: derived from the source UID and the installed models'
    versions."""
    from pydicom import dcmread

    from ai.models import lung_segmenter, pneumoconiosis_classifier
    from dicom_node.results import model_versions, result_uid

    models = [lung_segmenter("cpu", model_dir).info]
    classifier = pneumoconiosis_classifier("cpu", model_dir)
    if classifier is not None:
        models.append(classifier.info)
    versions = model_versions(models)
    uids = {f: str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    return {f: {kind: result_uid(uid, kind, versions) for kind in ("sr", "seg", "sc")} for f, uid in uids.items()}


def echo_answers(port: int) -> bool:
    done = subprocess.run(["echoscu", "-to", "1", "-aec", AE, "127.0.0.1", str(port)], capture_output=True,
                          env={**os.environ, "TCP_NODELAY": "1"})
    return done.returncode == 0


def cpu_seconds(pid: int, descendants: bool = True) -> float:
    """User + system CPU seconds of ``pid`` and, with ``descendants``, of its descendants (serve's workers, their
    decoder processes), the children already reaped included, from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    if not descendants:  # utime, stime (fields 14-15 of proc(5), counted after the command name)
        return sum(int(fields[k]) for k in (11, 12)) / tick
    # and cutime, cstime (fields 16-17): the children already reaped
    own = sum(int(fields[k]) for k in (11, 12, 13, 14)) / tick
    return own + sum(cpu_seconds(c) for c in child_pids(pid))


def child_pids(pid: int) -> set[int]:
    """The live children of ``pid``, from /proc (a child belongs to the thread that forked it). A thread that ends
    while it is read is skipped: it once made a whole reading 0, and serve's share of the CPU negative."""
    children: set[int] = set()
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return children
    for task in tasks:
        try:
            children.update(int(c) for c in (task / "children").read_text().split())
        except OSError:
            continue
    return children


def cpu_snapshot(node_pids: list[int], orthanc_pid: int) -> dict[str, float]:
    return {"node": sum(cpu_seconds(p) for p in node_pids), "serve": cpu_seconds(node_pids[0], descendants=False),
            "orthanc": cpu_seconds(orthanc_pid),
            "benchmark": sum(os.times()[:2])}


def paused_during_burst(which: list[str], node: list[subprocess.Popen], orthanc_pid: int) -> list[int]:
    """Stop (SIGSTOP) serve's worker processes and the external workers ("workers") and/or Orthanc ("pacs");
    the pids to continue afterwards."""
    pids = []
    if "workers" in which:
        pids += sorted(child_pids(node[0].pid)) + [p.pid for p in node[1:]]
    if "pacs" in which:
        pids.append(orthanc_pid)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    return pids


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def claims_per_job(url: str) -> dict[int, int]:
    """Job id -> how many times a worker claimed it (attempts; 1 everywhere = claimed exactly once)."""
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from db.engine import make_engine
    from db.models import Job

    engine = make_engine(url)
    with Session(engine) as session:
        return {job_id: attempts for job_id, attempts in session.execute(select(Job.id, Job.attempts))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--idle", type=int, default=30, help="instances of the idle-queue phase")
    parser.add_argument("--count", type=int, default=100, help="instances of the sustained phase")
    parser.add_argument("--workers", type=int, default=None, help="worker.processes (default: config.toml)")
    parser.add_argument("--batch-size", type=int, default=None, help="worker.batch_size (default: config.toml)")
    parser.add_argument("--threads", type=int, default=None, help="worker.threads (default: config.toml)")
    parser.add_argument("--postgres", action="store_true", help="share a temporary PostgreSQL cluster")
    parser.add_argument("--external-workers", type=int, default=0,
                        help="also run this many 'dicom-node worker' processes beside serve")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any other configuration override (e.g. worker.nice=10), as 'dicom-node --set' takes it")
    parser.add_argument("--stop-during-burst", choices=("workers", "pacs"), action="append", default=[],
                        help="diagnostic: stop these processes while the burst is sent (see the module docstring)")
    parser.add_argument("--file", type=Path, default=DEFAULT_FILE)
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()

    from dicom_node.config import load_config

    work = Path(tempfile.mkdtemp(prefix="pneumo-e2e-bench-"))
    defaults = load_config(REPO / "config.toml")
    cluster = None
    if args.postgres:
        from tests.support import postgres

        # durable, as a site runs it (the tests' throwaway clusters turn fsync off)
        postgres.SERVER_SETTINGS.update(fsync="on", synchronous_commit="on", full_page_writes="on")
        cluster = postgres.start_cluster()
        db_url = cluster.create_database()
    else:
        db_url = f"sqlite:///{work / 'var' / 'node.sqlite'}"
    pacs = Orthanc(work / "orthanc").start()
    orthanc_version = pacs.get("/system")["Version"]
    port = free_port()
    sets: dict[str, object] = {"network.port": port, "storage.storage_root": work / "var",
                               "storage.free_disk_reserve_mb": 0, "database.url": db_url,
                               "export.destinations": json.dumps([pacs.destination()])}
    for key, value in (("worker.processes", args.workers), ("worker.batch_size", args.batch_size),
                       ("worker.threads", args.threads)):
        if value is not None:
            sets[key] = value
    config_args = ["--config", str(REPO / "config.toml")]
    for key, value in sets.items():
        config_args += ["--set", f"{key}={value}"]
    for item in args.set:
        config_args += ["--set", item]
    worker_count = (defaults.worker.processes if args.workers is None else args.workers) + args.external_workers
    log_path = work / "node.log"
    watch = OrthancWatch(pacs)
    processes: list[subprocess.Popen] = []
    idle_files = clone_instances(args.file, work / "idle", args.idle + 1)
    burst_files = clone_instances(args.file, work / "burst", args.count)
    result_uids = expected_result_uids(idle_files + burst_files, defaults.models.directory)
    sr_uid = {f: uids["sr"] for f, uids in result_uids.items()}
    try:
        started = time.monotonic()
        processes.append(subprocess.Popen([sys.executable, "-m", "dicom_node.cli", "serve", *config_args], cwd=REPO,
                                          stdout=log_path.open("wb"), stderr=subprocess.STDOUT))
        for i in range(args.external_workers):
            processes.append(subprocess.Popen([sys.executable, "-m", "dicom_node.cli", "worker", *config_args],
                                              cwd=REPO, stdout=(work / f"worker{i}.log").open("wb"),
                                              stderr=subprocess.STDOUT))
        deadline = started + 180
        while not echo_answers(port):
            if processes[0].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("node did not start:\n" + log_path.read_text(errors="replace"))
            time.sleep(0.05)
        first_echo = time.monotonic() - started
        Modality(port).send([idle_files[0]])
        first_sr = watch.wait([sr_uid[idle_files[0]]], 300) - started
        while sum(p.read_text(errors="replace").count(" ready (") for p in work.glob("*.log")) < worker_count:
            time.sleep(0.2)  # every worker up before anything is timed

        idle = Modality(port)
        latencies, latencies_all = [], []
        for f in idle_files[1:]:
            sent = time.monotonic()
            idle.send([f])
            latencies.append(watch.wait([sr_uid[f]], 120) - sent)
            # idle: nothing of this one still in flight; the SC follows the SR
            latencies_all.append(watch.wait(list(result_uids[f].values()), 120) - sent)

        burst = Modality(port)
        assert pacs.proc is not None
        cpu_before = cpu_snapshot([p.pid for p in processes], pacs.proc.pid)
        stopped = paused_during_burst(args.stop_during_burst, processes, pacs.proc.pid)
        burst_started = time.monotonic()
        try:
            burst.send(burst_files)
        finally:  # a stopped process would not see the SIGTERM that ends the run
            for pid in stopped:
                os.kill(pid, signal.SIGCONT)
        burst_sent = time.monotonic()
        finished = watch.wait([sr_uid[f] for f in burst_files], 60 + 30 * args.count)
        # the SC of the last images follows their SR (the report is sent first): an image is done when all three are
        everything = watch.wait([u for f in burst_files for u in result_uids[f].values()], 120)
        cpu_after = cpu_snapshot([p.pid for p in processes], pacs.proc.pid)
        rate = args.count / (finished - burst_started)
        rate_all = args.count / (everything - burst_started)
        claims = claims_per_job(db_url)
    finally:
        watch.stop()
        for proc in processes:
            proc.terminate()
        for proc in processes:
            proc.wait(120)
        pacs.stop()
        if cluster is not None:
            cluster.stop()

    import torch

    lat = latencies
    idle_store, busy_store = idle.latencies, burst.latencies
    p95, idle_p95, busy_p95 = percentile(lat, 0.95), percentile(idle_store, 0.95), percentile(busy_store, 0.95)
    workers = f"{defaults.worker.processes if args.workers is None else args.workers} worker process(es) of serve"
    if args.external_workers:
        workers += f" + {args.external_workers} 'dicom-node worker'"
    threads = args.threads or defaults.worker.threads or "all"
    print(f"End to end, {args.file.name}: {args.idle} idle + {args.count} sustained; {workers}, batch "
          f"{args.batch_size or defaults.worker.batch_size}, threads {threads}; "
          f"database {'PostgreSQL' if args.postgres else 'SQLite'}; Orthanc {orthanc_version}"
          + (f"; --set {' '.join(args.set)}" if args.set else "")
          + (f"; stopped during the burst: {', '.join(args.stop_during_burst)} (diagnostic: the throughput "
             "means nothing)" if args.stop_during_burst else ""))
    print(f"{cpu_model()}, {os.cpu_count()} cores visible, torch {torch.__version__}, "
          f"CUDA {'yes' if torch.cuda.is_available() else 'no'}, Python {platform.python_version()}, "
          f"{time.strftime('%Y-%m-%d')}; {watch.requests} Orthanc requests in all")
    print()
    print("| measure | value | goal |")
    print("| --- | ---: | ---: |")
    print(f"| cold start: serve to first C-ECHO answer | {first_echo:.2f} s | |")
    print(f"| cold start: serve to first analysed SR in PACS | {first_sr:.2f} s | |")
    print(f"| idle queue: send to SR in PACS, p50 | {statistics.median(lat):.2f} s | |")
    print(f"| idle queue: send to SR in PACS, p95 | {p95:.2f} s | <= {GOAL_P95_S:.1f} s "
          f"({'met' if p95 <= GOAL_P95_S else 'NOT met'}) |")
    print(f"| idle queue: send to all three results (SR, SEG, SC) in PACS, p50 / p95 | "
          f"{statistics.median(latencies_all):.2f} / {percentile(latencies_all, 0.95):.2f} s | |")
    print(f"| sustained: {args.count} in one association, sending done after | {burst_sent - burst_started:.1f} s | |")
    print(f"| sustained: images per second to SR in PACS | {rate:.2f} | >= {GOAL_RATE:.0f} "
          f"({'met' if rate >= GOAL_RATE else 'NOT met'}) |")
    print(f"| sustained: images per second to all three results (SR, SEG, SC) in PACS | {rate_all:.2f} | "
          f">= {GOAL_RATE:.0f} ({'met' if rate_all >= GOAL_RATE else 'NOT met'}) |")
    print(f"| intake C-STORE latency, idle node, p50 / p95 ({len(idle_store)}) | "
          f"{statistics.median(idle_store) * 1000:.0f} / {idle_p95 * 1000:.0f} ms | |")
    print(f"| intake C-STORE latency during the sustained run, p50 / p95 ({len(busy_store)}) | "
          f"{statistics.median(busy_store) * 1000:.0f} / {busy_p95 * 1000:.0f} ms | <= 2x idle p95 "
          f"({'met' if busy_p95 <= 2 * idle_p95 else 'NOT met'}) |")
    per_image = {k: (cpu_after[k] - cpu_before[k]) / args.count for k in cpu_after}
    print(f"| sustained: CPU per image, node (serve + workers) / Orthanc / this benchmark | "
          f"{per_image['node']:.2f} ({per_image['serve']:.2f} + {per_image['node'] - per_image['serve']:.2f}) / "
          f"{per_image['orthanc']:.2f} / {per_image['benchmark']:.2f} core-s | "
          f"{2 / GOAL_RATE:.2f} core-s in all on 2 cores at the goal |")
    once = sum(1 for n in claims.values() if n == 1)
    print(f"| jobs claimed exactly once | {once} / {len(claims)} | all |")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"\nkept {work}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
