"""Shared fixtures: real DCMTK peers against a real ``dicom-node serve`` subprocess.

The public data lives beside the checkout (``../shared/data``) or wherever $PNEUMO_DATA_DIR points.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("PNEUMO_DATA_DIR", REPO.parent / "shared" / "data")).resolve()
SAMPLES = DATA_DIR / "dicom-samples"
CONFIG = REPO / "config.toml"

PEER_ENV = {**os.environ, "TCP_NODELAY": "1"}


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run the README's test command (it installs the Debian packages)")
    return path


def sample_files(*subdirs: str) -> list[Path]:
    files = sorted(p for d in subdirs for p in (SAMPLES / d).glob("*.dcm"))
    if not files:
        pytest.fail(f"no DICOM samples under {SAMPLES}: set PNEUMO_DATA_DIR to the shared data folder")
    return files


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Node:
    """A ``dicom-node serve`` subprocess with its own storage root, port and log file."""

    root: Path
    port: int
    overrides: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    log_path: Path | None = None

    def args(self, command: str) -> list[str]:
        # No analysis workers unless a test asks for them: intake tests must not pay for model loading.
        sets = {"network.port": str(self.port), "storage.storage_root": str(self.root / "var"),
                "storage.free_disk_reserve_mb": "0", "worker.processes": "0", **self.overrides}
        args = [sys.executable, "-m", "dicom_node.cli", command, "--config", str(CONFIG)]
        for key, value in sets.items():
            args += ["--set", f"{key}={value}"]
        return args

    @property
    def storage_root(self) -> Path:
        return self.root / "var"

    @property
    def db_url(self) -> str:
        return f"sqlite:///{self.storage_root / 'node.sqlite'}"

    def start(self, timeout: float = 60.0) -> "Node":
        self.log_path = self.root / f"node-{int(time.time() * 1000)}.log"
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(self.args("serve"), cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        # Wait for the log line rather than probing the port: a bare TCP probe would occupy an association slot
        # until the ACSE timeout.
        deadline = time.monotonic() + timeout
        while "listening on" not in self.log():
            if self.proc.poll() is not None:
                raise RuntimeError(f"dicom-node exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"dicom-node did not start in {timeout} s:\n{self.log()}")
            time.sleep(0.05)
        return self

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def cli(self, command: str, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(self.args(command) + list(extra), cwd=REPO, capture_output=True, text=True,
                              timeout=60)


@pytest.fixture
def node_factory(tmp_path):
    nodes: list[Node] = []

    def make(**overrides: str) -> Node:
        node = Node(root=tmp_path / f"node{len(nodes)}", port=free_port(),
                    overrides={k.replace("__", "."): v for k, v in overrides.items()})
        node.root.mkdir(parents=True)
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        node.kill()


@pytest.fixture
def node(node_factory) -> Node:
    return node_factory().start()


@dataclass
class StoreResult:
    returncode: int
    output: str
    statuses: list[tuple[str, str]]  # (file name, "Success" or the failure text), in sending order


STORE_RE = re.compile(r"Sending file: (?P<file>\S+)|Received Store Response \((?P<status>[^)]*)\)|"
                      r"DIMSE Status\s*: (?P<code>0x[0-9a-fA-F]{4}: .*)")


def parse_storescu(output: str) -> list[tuple[str, str]]:
    """Pair each 'Sending file' line of ``storescu -v`` with the response that follows it."""
    results: list[tuple[str, str]] = []
    current: str | None = None
    for match in STORE_RE.finditer(output):
        if match.group("file"):
            current = match.group("file")
        elif current is not None and (match.group("status") or match.group("code")):
            status = match.group("status") or match.group("code").strip()
            results.append((current, "Success" if status.startswith("0x0000") else status))
            current = None
    return results


def storescu(port: int, files: list[Path] | list[str], *flags: str, aet: str = "STORESCU",
             timeout: float = 300) -> StoreResult:
    require_tool("storescu")
    cmd = ["storescu", "-v", "-aet", aet, "-aec", "PNEUMOCAD", *flags, "127.0.0.1", str(port), *map(str, files)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=PEER_ENV, timeout=timeout)
    output = proc.stdout + proc.stderr
    return StoreResult(proc.returncode, output, parse_storescu(output))


STORESCU_FLAG = {
    "1.2.840.10008.1.2": "-xi",
    "1.2.840.10008.1.2.1": "-xe",
    "1.2.840.10008.1.2.1.99": "-xd",
    "1.2.840.10008.1.2.2": "-xb",
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx",
    # 1.2.840.10008.1.2.4.57 (JPEG lossless process 14, not SV1): no storescu flag proposes it; see the -xf
    # profile in test_transfer_syntaxes.py.
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.5": "-xr",
}
"""storescu proposes only uncompressed syntaxes unless told: the flag that proposes a file's own syntax."""


def file_transfer_syntax(path: Path) -> str:
    from pydicom import dcmread

    return str(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)


def open_db(node: Node):
    """A read/write engine on the node's SQLite database, with the node's own settings."""
    from db.engine import make_engine

    return make_engine(node.db_url)


def dcmtk_wire_encoding(path: Path, out: Path) -> Path:
    """The file as storescu puts it on the wire: DCMTK re-encodes sequences and items with explicit lengths and
    drops Data Set Trailing Padding, which is exactly what ``dcmconv -p`` writes. The node must store that
    byte for byte."""
    require_tool("dcmconv")
    subprocess.run(["dcmconv", "-p", str(path), str(out)], check=True, capture_output=True)
    return out
