"""What every part of the console is given: the node's configuration, its database and its archive, and whether
it runs inside ``dicom-node serve`` (then the in-process C-STORE metrics of the Storage SCP are there too)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import Engine

from ..archive import Archive
from ..config import NodeConfig


@dataclass
class ConsoleContext:
    config: NodeConfig
    engine: Engine
    archive: Archive
    in_serve: bool = False  # True inside "dicom-node serve": the Storage SCP's in-process metrics are real
    config_path: Path | None = None
    overrides: list[str] = field(default_factory=list)

    @property
    def requires_login(self) -> bool:
        """Bound to anything but a loopback address, or told so (a reverse proxy on this host makes a loopback
        binding reachable from the network): every page needs the admin's login."""
        return self.config.console.require_login or not self.config.console.is_local
