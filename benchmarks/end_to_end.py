"""Send to SR in PACS: storescu -> node (intake, worker, export) -> Orthanc, on this machine.

    .venv/bin/python benchmarks/end_to_end.py [--count 50] [--workers 1] [--file PATH]

Two phases with ``--count`` fresh copies each of a chest radiograph (new SOP Instance UIDs):
1. idle queue: one instance at a time, the next sent only when the previous one's SR is in Orthanc; the time from
   the start of the send to the SR being visible in Orthanc's REST API, p50 and p95;
2. sustained: all instances in one storescu association; images per second from the start of the send until the
   last SR is in Orthanc.
Prints a Markdown table. Goals of the results issue: p95 <= 2 s with an idle queue, >= 3 images/s sustained.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.analysis_stages import cpu_model  # noqa: E402
from tests.conftest import free_port  # noqa: E402
from tests.dicomgen import clone_instances  # noqa: E402
from tests.pacs import Orthanc  # noqa: E402

DEFAULT_FILE = Path(os.environ.get("PNEUMO_DATA_DIR", REPO.parent / "shared" / "data")) / \
    "dicom-samples" / "chest" / "RG1_UNCR.dcm"
GOAL_P95_S = 2.0
GOAL_RATE = 3.0


def expected_sr_uids(files: list[Path]) -> dict[Path, str]:
    """The SR UID each source will get: derived from the source UID and the installed models' versions."""
    from pydicom import dcmread

    from ai.models import lung_segmenter, pneumoconiosis_classifier
    from dicom_node.config import load_config
    from dicom_node.results import model_versions, result_uid

    model_dir = load_config(REPO / "config.toml").models.directory  # the node below is started with this config
    models = [lung_segmenter("cpu", model_dir).info]
    classifier = pneumoconiosis_classifier("cpu", model_dir)
    if classifier is not None:
        models.append(classifier.info)
    versions = model_versions(models)
    return {f: result_uid(str(dcmread(f, stop_before_pixels=True).SOPInstanceUID), "sr", versions) for f in files}


def in_orthanc(pacs: Orthanc, sop_uid: str) -> bool:
    body = json.dumps({"Level": "Instance", "Query": {"SOPInstanceUID": sop_uid}}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{pacs.http_port}/tools/find", data=body, method="POST")
    with urllib.request.urlopen(req, timeout=10) as resp:
        return bool(json.loads(resp.read()))


def storescu(port: int, files: list[Path]) -> None:
    subprocess.run(["storescu", "-aec", "PNEUMOCAD", "127.0.0.1", str(port), *map(str, files)], check=True,
                   env={**os.environ, "TCP_NODELAY": "1"}, capture_output=True)


def wait_all(pacs: Orthanc, uids: list[str], timeout: float) -> float:
    pending = list(uids)
    deadline = time.monotonic() + timeout
    while pending:
        pending = [u for u in pending if not in_orthanc(pacs, u)]
        if pending and time.monotonic() > deadline:
            raise TimeoutError(f"{len(pending)} SR(s) missing after {timeout} s")
        if pending:
            time.sleep(0.05)
    return time.monotonic()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=50)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--file", type=Path, default=DEFAULT_FILE)
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="pneumo-e2e-bench-"))
    pacs = Orthanc(work / "orthanc").start()
    orthanc_version = pacs.get("/system")["Version"]
    port = free_port()
    destination = json.dumps([pacs.destination()])
    sets = {"network.port": port, "storage.storage_root": work / "var", "storage.free_disk_reserve_mb": 0,
            "worker.processes": args.workers, "worker.batch_size": args.batch_size, "worker.poll_seconds": 0.2,
            "export.destinations": destination, "export.poll_seconds": 0.2}
    cmd = [sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(REPO / "config.toml")]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={value}"]
    log_path = work / "node.log"
    node = subprocess.Popen(cmd, cwd=REPO, stdout=log_path.open("wb"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while log_path.read_text(errors="replace").count(" ready (") < args.workers:
            if node.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("node did not start:\n" + log_path.read_text(errors="replace"))
            time.sleep(0.2)

        idle_files = clone_instances(args.file, work / "idle", args.count)
        burst_files = clone_instances(args.file, work / "burst", args.count)
        sr_uid = expected_sr_uids(idle_files + burst_files)

        latencies = []
        for f in idle_files:
            started = time.monotonic()
            storescu(port, [f])
            latencies.append(wait_all(pacs, [sr_uid[f]], 120) - started)

        started = time.monotonic()
        storescu(port, burst_files)
        sent = time.monotonic()
        finished = wait_all(pacs, [sr_uid[f] for f in burst_files], 60 + 30 * args.count)
        rate = args.count / (finished - started)
    finally:
        node.terminate()
        node.wait(120)
        pacs.stop()

    lat = sorted(latencies)
    p95 = lat[min(len(lat) - 1, int(round(0.95 * (len(lat) - 1))))]
    import torch

    print(f"End to end, {args.file.name} x {args.count} per phase, {args.workers} worker process(es), batch "
          f"{args.batch_size}; Orthanc {orthanc_version}")
    print(f"{cpu_model()}, {os.cpu_count()} cores visible, torch {torch.__version__}, "
          f"CUDA {'yes' if torch.cuda.is_available() else 'no'}, Python {platform.python_version()}, "
          f"{time.strftime('%Y-%m-%d')}")
    print()
    print("| measure | value | goal |")
    print("| --- | ---: | ---: |")
    print(f"| idle queue: send to SR in PACS, p50 | {statistics.median(lat):.2f} s | |")
    print(f"| idle queue: send to SR in PACS, p95 | {p95:.2f} s | <= {GOAL_P95_S:.0f} s "
          f"({'met' if p95 <= GOAL_P95_S else 'NOT met'}) |")
    print(f"| sustained: {args.count} in one association, storescu done after | {sent - started:.1f} s | |")
    print(f"| sustained: images per second to SR in PACS | {rate:.2f} | >= {GOAL_RATE:.0f} "
          f"({'met' if rate >= GOAL_RATE else 'NOT met'}) |")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"\nkept {work}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
