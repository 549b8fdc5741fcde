"""Orthanc (Debian package) as the PACS of the end-to-end tests: own ports, own storage, REST API helpers."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from .support.dicom_tools import PEER_ENV, require_tool
from .support.net import free_port


@dataclass
class Orthanc:
    root: Path
    aet: str = "ORTHANC"
    dicom_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def config_path(self) -> Path:
        return self.root / "orthanc.json"

    def write_config(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps({
            "Name": "pneumo-test-pacs", "StorageDirectory": str(self.root / "storage"),
            "IndexDirectory": str(self.root / "storage"), "DicomAet": self.aet, "DicomPort": self.dicom_port,
            "HttpPort": self.http_port, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False, "Plugins": [], "StorageCompression": False, "HttpCompressionEnabled": False,
        }))

    def start(self, timeout: float = 30.0) -> Orthanc:
        require_tool("Orthanc")
        self.write_config()
        log = (self.root / "orthanc.log").open("ab")
        self.proc = subprocess.Popen(["Orthanc", str(self.config_path)], stdout=log, stderr=subprocess.STDOUT,
                                     env=PEER_ENV)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.get("/system")
                return self
            except (urllib.error.URLError, ConnectionError):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("Orthanc did not start:\n" + (self.root / "orthanc.log").read_text()) from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)

    def get(self, path: str):  # type: ignore[no-untyped-def]
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as resp:
            body = resp.read()
        return json.loads(body) if resp.headers.get_content_type() == "application/json" else body

    def instances(self) -> list[dict]:
        """Every stored instance with its main DICOM tags (SOPClassUID, SOPInstanceUID, Series/Study UIDs)."""
        out = []
        for orthanc_id in self.get("/instances"):
            tags = self.get(f"/instances/{orthanc_id}/simplified-tags")
            out.append({"id": orthanc_id, **tags})
        return out

    def file(self, orthanc_id: str) -> bytes:
        return self.get(f"/instances/{orthanc_id}/file")

    def destination(self, name: str = "pacs", types: list[str] | None = None) -> dict:
        dest = {"name": name, "ae_title": self.aet, "host": "127.0.0.1", "port": self.dicom_port}
        if types:
            dest["types"] = types
        return dest
