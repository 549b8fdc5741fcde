"""A site's retraining rehearsal, end to end, on the 704 public films (not a test: it takes tens of minutes).

    .venv/bin/python benchmarks/rehearsal.py [--folds 5] [--epochs 3] [--size 160] [--threads 2] [--limit N]

It plays a site:

1. converts the Montgomery/Shenzhen radiographs of ``../shared/data/cxr-lung-masks`` into CR chest PA DICOM files,
   one synthetic patient each (``tests/support/cxr_dicom.py``);
2. starts a node (``dicom-node serve``, no analysis workers: the rehearsal is about training, and analysing 704
   films first would only add CPU time) and sends every file with DCMTK ``storescu`` over one association;
3. imports the films' **tuberculosis** labels as the "pneumoconiosis present" field (a stand-in: no pneumoconiosis
   radiographs are public; a tuberculosis film gets ILO category 1, a normal one 0) with ``dicom-node labels
   import``;
4. retrains with ``dicom-node retrain`` (the frozen hold-out is drawn on this first run), and prints the candidate's
   hold-out metrics, the gate's verdict against the bundled demo champion, and the time of every step, as a
   Markdown table (``--json-out`` also writes them as JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.cxr_dicom import labels_csv, lung_mask_films  # noqa: E402
from tests.support.data import DATA_DIR  # noqa: E402
from tests.support.net import free_port  # noqa: E402


def _cli(config: Path, *args: str, capture: bool = True) -> subprocess.CompletedProcess[str]:
    words = 2 if args[0] in ("labels", "models") else 1  # a sub-subcommand comes before --config
    cmd = [sys.executable, "-m", "dicom_node.cli", *args[:words], "--config", str(config), *args[words:]]
    return subprocess.run(cmd, cwd=REPO, text=True, capture_output=capture, check=False)


def _wait_for_echo(port: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        echo = subprocess.run(["echoscu", "-aec", "PNEUMOCAD", "127.0.0.1", str(port)], capture_output=True)
        if echo.returncode == 0:
            return
        time.sleep(0.5)
    raise SystemExit("the node did not answer C-ECHO")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "rehearsal")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit", type=int, default=None, help="only the first N films (a quick check)")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}

    started = time.monotonic()
    films = lung_mask_films(DATA_DIR / "cxr-lung-masks", work / "films", limit=args.limit)
    times["convert"] = time.monotonic() - started

    port = free_port()
    config = work / "config.toml"
    config.write_text(
        f"[network]\nport = {port}\n[storage]\nstorage_root = \"{work / 'var'}\"\nfree_disk_reserve_mb = 0\n"
        f"[worker]\nprocesses = 0\n[training]\nfolds = {args.folds}\nepochs = {args.epochs}\nsize = {args.size}\n"
        f"threads = {args.threads}\nbatch_size = 16\n", encoding="utf-8")
    node = subprocess.Popen([sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(config)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=open(work / "serve.log", "wb"))  # noqa: SIM115
    try:
        _wait_for_echo(port, time.monotonic() + 120)
        started = time.monotonic()
        sent = subprocess.run(["storescu", "-aet", "REHEARSAL", "-aec", "PNEUMOCAD", "127.0.0.1", str(port),
                               "+sd", str(work / "films")], env={**os.environ, "TCP_NODELAY": "1"},
                              capture_output=True, text=True)
        times["send"] = time.monotonic() - started
        if sent.returncode != 0:
            raise SystemExit(f"storescu failed: {sent.stderr[-2000:]}")
    finally:
        node.send_signal(signal.SIGTERM)
        node.wait(timeout=120)

    started = time.monotonic()
    imported = _cli(config, "labels", "import", str(labels_csv(films, work / "labels.csv")))
    times["labels import"] = time.monotonic() - started
    if imported.returncode != 0:
        raise SystemExit(f"labels import failed:\n{imported.stdout}\n{imported.stderr}")

    started = time.monotonic()
    trained = _cli(config, "retrain", capture=False)
    times["retrain"] = time.monotonic() - started
    if trained.returncode != 0:
        raise SystemExit("retrain failed: see 'dicom-node status' and the audit events")
    models = [json.loads(line) for line in _cli(config, "models", "list", "--json").stdout.splitlines() if line]
    candidate = max((m for m in models if m["state"] == "candidate"), key=lambda m: m["id"])
    shown = json.loads(_cli(config, "models", "show", str(candidate["id"]), "--json").stdout.splitlines()[0])

    summary = {"films": len(films), "tuberculosis": sum(f.present for f in films), "folds": args.folds,
               "epochs": args.epochs, "size": args.size, "threads": args.threads, "seconds": times,
               "candidate": shown, "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"}
    print("| step | seconds |\n| --- | ---: |")
    for step, seconds in times.items():
        print(f"| {step} | {seconds:.0f} |")
    holdout = shown.get("holdout", {}) or {}
    print(f"\ncandidate #{shown['id']} {shown['version']}: hold-out AUC {shown.get('holdout_auc')}; gate "
          f"{'passed' if shown.get('gate_passed') else 'failed'}")
    print(json.dumps(holdout, indent=1)[:4000])
    if args.json_out:
        args.json_out.write_text(json.dumps(summary, indent=1, default=str), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
