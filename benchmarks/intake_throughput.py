"""Intake throughput: ``dicom-node serve`` against DCMTK ``storescp``, same files, same sender, same run.

``storescu`` (DCMTK, ``TCP_NODELAY=1``) sends ``--count`` distinct ~2 MiB DX instances (1024 x 1024, 16-bit,
Explicit VR Little Endian) over one association on loopback, first to the node, then to ``storescp`` (alternating
which goes first on every repeat). The wall time of the ``storescu`` process is the measurement; the median over
``--repeats`` runs is reported as images/s and MB/s, with the ratio node / storescp.

Every run is checked: ``storescu`` exits 0, every C-STORE response is Success, and exactly ``--count`` files are
stored (node: ``archive/**/*.dcm`` with an empty ``tmp/``; storescp: files in its output directory).

The node acknowledges an instance only after fsync of the file and of the directories it touched, plus an SQLite
commit; ``storescp`` writes its file (decoded, re-encoded, no fsync) before it answers. Before every timed run the
previous run's output is deleted and ``sync`` is called, so that neither receiver pays for the other's writeback.

Usage (from the repository root)::

    .venv/bin/python benchmarks/intake_throughput.py [--count 200] [--repeats 3] [--keep] [--markdown-out FILE]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pynetdicom

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.conftest import free_port  # noqa: E402

CONFIG = REPO / "config.toml"
PEER_ENV = {**os.environ, "TCP_NODELAY": "1"}
CALLED_AET = "PNEUMOCAD"
CALLING_AET = "BENCHSCU"
NODE_LOG_RE = re.compile(r"C-STORE from \S+ sop=\S+ status=0x0000 .*\((\d+) ms\)")


# --------------------------------------------------------------------------------------------------------------------
# Test data


def write_instances(out_dir: Path, count: int, rows: int, cols: int) -> list[Path]:
    """``count`` DX instances of rows x cols 16-bit pixels with distinct UIDs (the tests' generator)."""
    from tests.dicomgen import clone_instances, synthetic_dx

    return clone_instances(synthetic_dx(rows, cols, seed=2), out_dir, count)


# --------------------------------------------------------------------------------------------------------------------
# Processes


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """Wait until the receiver answers a C-ECHO.

    Not a bare TCP connect: that proves only that the port is open, not that the receiver answers DICOM (storescp,
    and pynetdicom without the node's admission gate, also keep such a connection as an association until their
    ACSE timeout).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"receiver exited with status {proc.returncode} before listening on port {port}")
        echo = subprocess.run(["echoscu", "-to", "5", "-aet", CALLING_AET, "-aec", CALLED_AET, "127.0.0.1",
                               str(port)], capture_output=True, env=PEER_ENV, timeout=30)
        if echo.returncode == 0:
            return
        time.sleep(0.1)
    raise TimeoutError(f"no C-ECHO answer on port {port} after {timeout} s")


def stop_process(proc: subprocess.Popen, timeout: float = 60.0) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
            raise
    return proc.returncode


def tool_version(tool: str) -> str:
    try:
        out = subprocess.run([tool, "--version"], capture_output=True, text=True, timeout=10).stdout
    except OSError:
        return "not installed"
    match = re.search(r"v(\d+\.\d+\.\d+)", out)
    return match.group(1) if match else out.strip().splitlines()[0] if out.strip() else "?"


@dataclass
class Run:
    receiver: str
    seconds: float
    count: int
    total_bytes: int
    max_send_pdv: int = 0
    handler_ms: list[int] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return self.count / self.seconds

    @property
    def mb_per_s(self) -> float:
        return self.total_bytes / 1e6 / self.seconds


class BenchmarkError(RuntimeError):
    pass


def send(port: int, input_dir: Path, count: int, log_path: Path, storescu_args: list[str]) -> tuple[float, int]:
    """Time ``storescu`` sending every file in ``input_dir`` over one association; check every response.

    Returns the seconds and the largest PDV storescu was allowed to send (set by the receiver's max PDU).
    """
    cmd = ["storescu", "-v", "-aet", CALLING_AET, "-aec", CALLED_AET, *storescu_args, "+sd", "127.0.0.1",
           str(port), str(input_dir)]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=PEER_ENV, timeout=1800)
    seconds = time.perf_counter() - started
    output = proc.stdout + proc.stderr
    log_path.write_text(output)
    successes = len(re.findall(r"Received Store Response \(Success\)", output))
    if proc.returncode != 0 or successes != count:
        raise BenchmarkError(f"storescu exited {proc.returncode} with {successes}/{count} Success responses "
                             f"(see {log_path})")
    pdv = re.search(r"Max Send PDV: (\d+)", output)
    return seconds, int(pdv.group(1)) if pdv else 0


def settle() -> None:
    """Flush everything dirty so that the next timed run does not pay for the previous run's writeback."""
    os.sync()
    time.sleep(0.5)


def run_node(work: Path, input_dir: Path, count: int, total_bytes: int, tag: str, log_level: str,
             storescu_args: list[str]) -> Run:
    root = work / f"node-{tag}"
    port = free_port()
    log_path = work / f"node-{tag}.log"
    cmd = [sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(CONFIG),
           "--set", f"network.port={port}", "--set", f"storage.storage_root={root}",
           "--set", "storage.free_disk_reserve_mb=0", "--set", f"logging.level={log_level}"]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, proc)
        settle()
        seconds, pdv = send(port, input_dir, count, work / f"storescu-node-{tag}.log", storescu_args)
    finally:
        status = stop_process(proc)
    if status != 0:
        raise BenchmarkError(f"dicom-node exited with status {status} (see {log_path})")
    stored = list((root / "archive").rglob("*.dcm"))
    leftovers = list((root / "tmp").iterdir())
    if len(stored) != count or leftovers:
        raise BenchmarkError(f"dicom-node stored {len(stored)}/{count} files, {len(leftovers)} left in tmp/")
    handler_ms = [int(m.group(1)) for m in NODE_LOG_RE.finditer(log_path.read_text(errors="replace"))]
    return Run("dicom-node", seconds, count, total_bytes, pdv, handler_ms)


def run_storescp(work: Path, input_dir: Path, count: int, total_bytes: int, tag: str, storescp_args: list[str],
                 storescu_args: list[str]) -> Run:
    out_dir = work / f"storescp-{tag}"
    out_dir.mkdir()
    port = free_port()
    log_path = work / f"storescp-{tag}.log"
    cmd = ["storescp", "-aet", CALLED_AET, *storescp_args, "-od", str(out_dir), str(port)]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=PEER_ENV)
    try:
        wait_for_port(port, proc)
        settle()
        seconds, pdv = send(port, input_dir, count, work / f"storescu-storescp-{tag}.log", storescu_args)
    finally:
        stop_process(proc)  # storescp ends with a non-zero status on SIGTERM: not an error
    stored = [p for p in out_dir.iterdir() if p.is_file()]
    if len(stored) != count:
        raise BenchmarkError(f"storescp stored {len(stored)}/{count} files (see {log_path})")
    return Run("storescp", seconds, count, total_bytes, pdv)


def cleanup(work: Path, tag: str) -> None:
    for name in (f"node-{tag}", f"storescp-{tag}"):
        shutil.rmtree(work / name, ignore_errors=True)


# --------------------------------------------------------------------------------------------------------------------
# Report


def machine_description(storage_dir: Path) -> list[tuple[str, str]]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 2**20:.1f} GiB"
                break
    except OSError:
        pass
    fs = "?"
    try:
        out = subprocess.run(["df", "-T", str(storage_dir)], capture_output=True, text=True, timeout=10).stdout
        fields = out.splitlines()[1].split()
        fs = f"{fields[1]} on {fields[0]} (mounted at {fields[-1]})"
    except (OSError, IndexError, subprocess.SubprocessError):
        pass
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    return [
        ("CPU", f"{cpu}, {os.cpu_count()} logical cores"),
        ("memory", mem),
        ("kernel", f"{platform.system()} {platform.release()}"),
        ("storage file system", fs),
        ("Python", platform.python_version()),
        ("pynetdicom / pydicom", f"{pynetdicom.__version__} / {pydicom.__version__}"),
        ("DCMTK (storescu / storescp)", f"{tool_version('storescu')} / {tool_version('storescp')}"),
        ("load average (1/5/15 min) at start", load),
    ]


def markdown(runs: list[Run], args: argparse.Namespace, file_mb: float, machine: list[tuple[str, str]],
             command: str, load_end: str) -> str:
    node = [r for r in runs if r.receiver == "dicom-node"]
    scp = [r for r in runs if r.receiver == "storescp"]
    node_ips = statistics.median(r.images_per_s for r in node)
    scp_ips = statistics.median(r.images_per_s for r in scp)
    ratio = node_ips / scp_ips
    goal = "met" if ratio >= 0.5 else "NOT met"
    handler = sorted(ms for r in node for ms in r.handler_ms)

    def row(name: str, rs: list[Run], note: str) -> str:
        ips = statistics.median(r.images_per_s for r in rs)
        mbs = statistics.median(r.mb_per_s for r in rs)
        secs = statistics.median(r.seconds for r in rs)
        each = ", ".join(f"{r.images_per_s:.1f}" for r in rs)
        pdv = "/".join(sorted({str(r.max_send_pdv) for r in rs}))
        return f"| {name} | {ips:.1f} | {mbs:.1f} | {secs:.2f} | {each} | {pdv} | {note} |"

    lines = [
        f"{args.count} instances of {file_mb:.2f} MB (DX, {args.rows}x{args.cols} 16-bit, Explicit VR LE), "
        f"one association, loopback, `storescu` with TCP_NODELAY=1; median of {args.repeats} runs each, alternating.",
        "",
        "| receiver | images/s | MB/s | seconds | images/s per run | max PDV sent² | durability |",
        "|---|---:|---:|---:|---|---:|---|",
        row("dicom-node", node, "fsync file + dirs, SQLite commit, then Success"),
        row("DCMTK storescp" + (f" `{' '.join(args.storescp_args)}`" if args.storescp_args else ""), scp,
            "written, no fsync¹"),
        f"| **ratio node / storescp** | **{ratio:.2f}** | | | | | goal >= 0.5: {goal} |",
        "",
        "¹ storescp (default options) receives the whole dataset into memory, then decodes/re-encodes it to a file; "
        "it never calls fsync, so its Success means \"in the page cache\", not \"on disk\".",
        "² largest PDV storescu could send, from its \"Association Accepted (Max Send PDV: N)\" line: the node "
        "offers network.max_pdu_size (131072 by default, DCMTK's own maximum, so DCMTK sends 128 kB PDUs); storescp "
        "offers its default 16 kB unless given -pdu.",
    ]
    if handler:
        lines += ["", f"Node C-STORE handler time (from its log, after the last byte arrived): median "
                      f"{statistics.median(handler):.0f} ms, p90 {handler[int(0.9 * (len(handler) - 1))]} ms, "
                      f"max {handler[-1]} ms over {len(handler)} instances."]
    lines += ["", "| machine | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in machine]
    lines += [f"| load average (1/5/15 min) at end | {load_end} |", "",
              f"Command: `{command}`"]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=200, help="instances per run (default 200)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per receiver, alternating (default 3)")
    parser.add_argument("--rows", type=int, default=1024, help="image rows (default 1024: 2 MiB of pixels)")
    parser.add_argument("--cols", type=int, default=1024, help="image columns (default 1024)")
    parser.add_argument("--keep", action="store_true", help="keep the working directory (inputs, outputs, logs)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="parent of the temporary working directory (default: the system temp dir); it must "
                             "be on the disk you want to measure")
    parser.add_argument("--node-log-level", default="WARNING", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                        help="node logging.level (INFO adds per-instance handler times to the report)")
    parser.add_argument("--storescp-arg", dest="storescp_args", action="append", default=[], metavar="ARG",
                        help="extra storescp argument, repeatable (e.g. --storescp-arg=-pdu "
                             "--storescp-arg=131072)")
    parser.add_argument("--storescu-arg", dest="storescu_args", action="append", default=[], metavar="ARG",
                        help="extra storescu argument for both receivers, repeatable")
    parser.add_argument("--markdown-out", type=Path, default=None, help="append the Markdown report to this file")
    args = parser.parse_args(argv)
    if args.count < 1 or args.repeats < 1:
        parser.error("--count and --repeats must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for tool in ("storescu", "storescp", "echoscu"):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed (DCMTK); install the dcmtk package", file=sys.stderr)
            return 2
    command = " ".join([".venv/bin/python", "benchmarks/intake_throughput.py", *(argv if argv is not None
                                                                                 else sys.argv[1:])])
    work = Path(tempfile.mkdtemp(prefix="intake-bench-", dir=args.workdir))
    machine = machine_description(work)
    runs: list[Run] = []
    try:
        input_dir = work / "input"
        t0 = time.perf_counter()
        paths = write_instances(input_dir, args.count, args.rows, args.cols)
        total_bytes = sum(p.stat().st_size for p in paths)
        file_mb = total_bytes / len(paths) / 1e6
        print(f"generated {len(paths)} files, {total_bytes / 1e6:.0f} MB, in {time.perf_counter() - t0:.1f} s "
              f"under {work}", file=sys.stderr)
        for rep in range(args.repeats):
            order = ("node", "storescp") if rep % 2 == 0 else ("storescp", "node")
            for receiver in order:
                tag = f"{rep}"
                if receiver == "node":
                    run = run_node(work, input_dir, args.count, total_bytes, tag, args.node_log_level,
                                   args.storescu_args)
                else:
                    run = run_storescp(work, input_dir, args.count, total_bytes, tag, args.storescp_args,
                                       args.storescu_args)
                runs.append(run)
                print(f"run {rep + 1}/{args.repeats} {run.receiver:<10}: {run.seconds:6.2f} s, "
                      f"{run.images_per_s:6.1f} images/s, {run.mb_per_s:6.1f} MB/s", file=sys.stderr)
            if not args.keep:
                cleanup(work, f"{rep}")
    except BenchmarkError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        print(f"working directory kept: {work}", file=sys.stderr)
        return 1
    except BaseException:
        print(f"working directory kept: {work}", file=sys.stderr)
        raise
    load_end = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    report = (f"Run {dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}\n\n"
              + markdown(runs, args, file_mb, machine, command, load_end))
    print(report)
    if args.markdown_out:
        with args.markdown_out.open("a") as fh:
            fh.write("\n" + report)
    if args.keep:
        print(f"working directory kept: {work}", file=sys.stderr)
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
