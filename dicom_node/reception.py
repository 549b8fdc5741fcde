"""Disk hygiene while pynetdicom streams a C-STORE dataset into ``tmp/``.

pynetdicom (``STORE_RECV_CHUNKED_DATASET``) writes each received P-DATA fragment into a temporary file and calls
the C-STORE handler only once the whole dataset is in. Two things it does not do, done here from its event hooks
(no change to the library):

- **A reception that ends without a complete dataset** (association aborted, connection dropped, a message that
  does not decode) leaves its partial file behind until restart: ``on_connection_closed`` removes it at once.
- **The free-disk reserve is checked as the data streams in**, not only after the whole dataset is on disk:
  ``on_pdu_received`` looks at free space every ``check_every_bytes`` and, when the next fragment would take it
  below the reserve, closes and removes the partial file and lets the rest of the dataset go to a sink. The
  C-STORE is then answered 0xA700 (``Intake.store`` asks ``was_discarded``), so the modality retries later.

Both hooks run in the association's DUL thread, before the DIMSE layer writes the fragment they see.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from pynetdicom import evt
from pynetdicom.pdu import P_DATA_TF

from .archive import Archive

LOG = logging.getLogger("dicom_node.reception")
CHECK_EVERY_BYTES = 4 << 20


class _Sink:
    """Stands in for the temporary file once a reception is discarded: what pynetdicom writes goes nowhere."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.file = self
        self.bytes_discarded = 0

    def write(self, data: bytes) -> int:
        self.bytes_discarded += len(data)
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def _message_file(assoc: Any) -> Any | None:
    """The temporary file of the dataset being received on ``assoc``, if one is open."""
    message = getattr(getattr(assoc, "dimse", None), "message", None)
    return getattr(message, "_data_set_file", None) if message is not None else None


class ReceptionGuard:
    def __init__(self, archive: Archive, check_every_bytes: int = CHECK_EVERY_BYTES) -> None:
        self.archive = archive
        self.check_every_bytes = check_every_bytes
        self._discarded: set[str] = set()
        self._last_check: dict[int, int] = {}  # id(file) -> bytes written when free space was last looked at
        self._lock = threading.Lock()

    def handlers(self) -> list[tuple[Any, Any]]:
        return [(evt.EVT_PDU_RECV, self.on_pdu_received), (evt.EVT_CONN_CLOSE, self.on_connection_closed)]

    def was_discarded(self, path: Path) -> bool:
        """True (once) if the reception into ``path`` was cut short for lack of disk space."""
        with self._lock:
            if str(path) in self._discarded:
                self._discarded.discard(str(path))
                return True
            return False

    def on_pdu_received(self, event: evt.Event) -> None:
        pdu = event.pdu
        if not isinstance(pdu, P_DATA_TF):
            return
        fh = _message_file(event.assoc)
        if fh is None or isinstance(fh, _Sink):
            return
        written = fh.tell()
        incoming = sum(len(item.presentation_data_value or b"") for item in pdu.presentation_data_value_items)
        with self._lock:
            last = self._last_check.get(id(fh), -self.check_every_bytes)
            if written + incoming - last < self.check_every_bytes:
                return
            self._last_check[id(fh)] = written
        if self.archive.free_bytes() - incoming >= self.archive.reserve_bytes:
            return
        self._discard(event.assoc, fh, written)

    def _discard(self, assoc: Any, fh: Any, written: int) -> None:
        message = assoc.dimse.message
        message._data_set_file = _Sink(fh.name)
        fh.close()
        Path(fh.name).unlink(missing_ok=True)
        with self._lock:
            self._discarded.add(str(fh.name))
            self._last_check.pop(id(fh), None)
        LOG.warning("free disk below the reserve after %d MiB of a dataset: its reception is discarded and the "
                    "C-STORE will be answered 0xA700", written >> 20)

    def on_connection_closed(self, event: evt.Event) -> None:
        fh = _message_file(event.assoc)
        if fh is None:
            return
        with self._lock:
            self._last_check.pop(id(fh), None)
        if isinstance(fh, _Sink):
            with self._lock:
                self._discarded.discard(fh.name)
            return
        try:
            written = fh.tell() if not fh.closed else 0
            fh.close()
        except (OSError, ValueError):
            written = 0
        try:
            Path(fh.name).unlink()
        except FileNotFoundError:
            return
        LOG.warning("association ended in the middle of a dataset: its partial reception (%d KiB) was removed",
                    written >> 10)
