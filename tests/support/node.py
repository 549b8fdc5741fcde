"""A real ``dicom-node serve`` subprocess with its own storage root, port and log file, and its database."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .data import CONFIG, REPO


@dataclass
class Node:
    """A ``dicom-node serve`` subprocess with its own storage root, port and log file."""

    root: Path
    port: int
    overrides: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    log_path: Path | None = None

    def args(self, command: str) -> list[str]:
        # No analysis workers unless a test asks for them: intake tests must not pay for model loading. No console
        # unless asked (nodes of several tests run at once and would all want its port 11180).
        sets = {"network.port": str(self.port), "storage.storage_root": str(self.root / "var"),
                "storage.free_disk_reserve_mb": "0", "worker.processes": "0", "console.enabled": "false",
                **self.overrides}
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

    def start(self, timeout: float = 60.0) -> Node:
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


def open_db(node: Node):  # type: ignore[no-untyped-def]
    """A read/write engine on the node's SQLite database, with the node's own settings."""
    from db.engine import make_engine

    return make_engine(node.db_url)
