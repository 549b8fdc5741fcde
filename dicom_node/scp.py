"""The Storage SCP: association policy and two small handlers (C-ECHO, C-STORE) around ``Intake``.

Received datasets are streamed by pynetdicom straight into a temporary file (``STORE_RECV_CHUNKED_DATASET``)
under the archive's ``tmp/`` directory, so the C-STORE handler never holds, decodes or re-encodes the dataset. Both
are process-wide settings, made once at start-up by ``dicom_node.netsetup.configure_pynetdicom``; ``start`` refuses
to listen without them.

Connections reach pynetdicom only through the admission gate of ``dicom_node.admission`` (``AdmissionServer``,
passed to ``AE.make_server`` as its server class): pynetdicom's own server lets half-open connections take the
association slots and block shutdown, and trusts any declared PDU length; that module's docstring says how and why.
The called AE title must be ours (``network.ae_title``) unless ``network.accept_any_called_aet`` is set. The plain
port (``network.port``, 0 = off) and the TLS port (``tls.port``, 0 = off; ``docs/tls.md``) are two servers of one AE
sharing one admission gate: one intake, one ``network.max_associations`` budget, one per-address cap.

Every association requested is recorded in the database (``db.associations``: who, from where, over TLS or not,
accepted or why rejected, its C-STORE counts, released or aborted) for the console's associations page, by
``AssociationHistory`` on one background thread: a slow or unreachable database never delays an association and a
failed write never fails one. Each C-STORE's handling time and status go to ``dicom_node.store_metrics``.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # generated at import time
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from ai.safe_text import escape, exception_summary
from db.associations import close_association, count_store, open_association

from .admission import AdmissionPolicy, AdmissionServer, force_close
from .config import NodeConfig
from .intake import Intake
from .netsetup import require_configured
from .store_metrics import observe_store
from .store_scu import is_stored
from .tls import server_context

LOG = logging.getLogger("dicom_node.scp")

TRANSFER_SYNTAXES = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still sent by old modalities)
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51",  # JPEG Extended (Process 2 & 4)
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless (Process 14)
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1 (Process 14, selection value 1)
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE Lossless
)
"""Accepted for every storage SOP class; each one decodes with the installed non-GPL plugins (tests prove it)."""


def _handle_echo(event: evt.Event) -> int:
    return 0x0000


UNHANDLED_STATUS = 0xC211  # what pynetdicom answers when the handler raises


def _handle_store(event: evt.Event, intake: Intake, history: AssociationHistory) -> int | Dataset:
    request = cast(C_STORE, event.request)
    started = time.perf_counter()
    status = UNHANDLED_STATUS
    try:
        outcome = intake.store(
            tmp_file=Path(event.dataset_path),
            calling_aet=event.assoc.requestor.ae_title.strip(),
            request_sop_class=str(request.AffectedSOPClassUID),
            request_sop_instance=str(request.AffectedSOPInstanceUID),
            transfer_syntax=str(event.context.transfer_syntax),
        )
        status = outcome.status
    finally:
        observe_store(status, time.perf_counter() - started)
        history.count(event.assoc, is_stored(status))
    if status == 0x0000:
        return 0x0000
    response = Dataset()
    response.Status = status
    response.ErrorComment = outcome.comment[:64]
    return response


def _log_rejection(event: evt.Event) -> None:
    LOG.warning("association from %s (%s) rejected", escape(event.assoc.requestor.ae_title.strip()),
                escape(event.assoc.requestor.address))


REJECTION_REASONS = {  # (result source, diagnostic) of the A-ASSOCIATE-RJ -> the outcome recorded
    (1, 3): "rejected: calling AE",
    (1, 7): "rejected: called AE",
    (3, 2): "rejected: too many associations",
    (2, 1): "rejected: user identity",
}


def _uses_tls(assoc: Any) -> bool:
    try:
        return isinstance(assoc.dul.socket.socket, ssl.SSLSocket)
    except AttributeError:  # the socket already gone
        return False


def _rejection_outcome(assoc: Any) -> str:
    primitive = getattr(getattr(assoc, "acceptor", None), "primitive", None)
    key = (getattr(primitive, "result_source", 0), getattr(primitive, "diagnostic", 0))
    return REJECTION_REASONS.get((int(key[0] or 0), int(key[1] or 0)), "rejected")


class AssociationHistory:
    """Records each association in ``db.associations`` from pynetdicom's events.

    Every write runs on one background thread, in the order of the events (so an association's C-STORE counts
    land after its row and before its end); the id of the row is kept per association object until its end. A
    database error is logged once per outage as a WARNING (type only) and otherwise ignored: the history is for
    people, the association must not suffer from it.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="assoc-history")
        self._rows: dict[int, Future[int | None]] = {}  # id(association) -> its row's id, once written
        self._lock = threading.Lock()
        self._failing = False
        self.closed = False

    def handlers(self) -> list[tuple[Any, Callable[[evt.Event], None]]]:
        return [(evt.EVT_ACCEPTED, self.on_accepted), (evt.EVT_REJECTED, self.on_rejected),
                (evt.EVT_RELEASED, self.on_released), (evt.EVT_ABORTED, self.on_aborted),
                (evt.EVT_CONN_CLOSE, self.on_connection_closed)]

    def _write(self, action: Callable[[], int | None]) -> int | None:
        try:
            result = action()
        except SQLAlchemyError as exc:
            if not self._failing:
                LOG.warning("association history not recorded: %s", exception_summary(exc))
            self._failing = True
            return None
        if self._failing:
            LOG.info("association history recorded again")
        self._failing = False
        return result

    def _submit(self, action: Callable[[], int | None]) -> Future[int | None] | None:
        try:
            return self._pool.submit(self._write, action)
        except RuntimeError:  # shut down: the server is stopping
            return None

    def _open(self, assoc: Any, accepted: bool, outcome: str) -> Future[int | None] | None:
        requestor = assoc.requestor
        calling, address = str(requestor.ae_title).strip(), str(requestor.address)
        called = str(getattr(requestor.primitive, "called_ae_title", None) or assoc.acceptor.ae_title).strip()
        tls = _uses_tls(assoc)
        return self._submit(lambda: open_association(self.engine, calling, called, address, tls=tls,
                                                     accepted=accepted, outcome=outcome))

    def on_accepted(self, event: evt.Event) -> None:
        row = self._open(event.assoc, True, "open")
        if row is not None:
            with self._lock:
                self._rows[id(event.assoc)] = row

    def on_rejected(self, event: evt.Event) -> None:
        self._open(event.assoc, False, _rejection_outcome(event.assoc))

    def count(self, assoc: Any, ok: bool) -> None:
        with self._lock:
            row = self._rows.get(id(assoc))
        if row is not None:
            self._submit(lambda: self._with_row(row, lambda rid: count_store(self.engine, rid, ok)))

    def _end(self, assoc: Any, outcome: str) -> None:
        with self._lock:
            row = self._rows.pop(id(assoc), None)
        if row is not None:  # the first end event wins: released/aborted come before the connection closes
            self._submit(lambda: self._with_row(row, lambda rid: close_association(self.engine, rid, outcome)))

    @staticmethod
    def _with_row(row: Future[int | None], action: Callable[[int], None]) -> None:
        row_id = row.result()  # already done: written earlier on the same thread
        if row_id is not None:
            action(row_id)

    def on_released(self, event: evt.Event) -> None:
        self._end(event.assoc, "released")

    def on_aborted(self, event: evt.Event) -> None:
        self._end(event.assoc, "aborted")

    def on_connection_closed(self, event: evt.Event) -> None:
        self._end(event.assoc, "closed")  # neither released nor aborted (e.g. network timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Let the queued writes finish (up to ``timeout``), then accept no more."""
        done = self._submit(lambda: None)
        if done is not None:
            try:
                done.result(timeout=timeout)
            except TimeoutError:
                LOG.warning("association history: writes still pending at stop")
        self._pool.shutdown(wait=False)
        self.closed = True


def build_ae(config: NodeConfig) -> AE:
    """An AE configured from ``config``: contexts, allow-lists, association limit, timeouts, PDU size."""
    ae = AE(ae_title=config.network.ae_title)
    ae.add_supported_context(Verification)
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(str(context.abstract_syntax), list(TRANSFER_SYNTAXES))
    allowed = config.network.allowed_calling_aets
    if allowed:
        ae.require_calling_aet = list(allowed)
    ae.require_called_aet = not config.network.accept_any_called_aet
    ae.maximum_associations = config.network.max_associations
    ae.network_timeout = config.network.network_timeout
    ae.acse_timeout = config.network.acse_timeout
    ae.dimse_timeout = config.network.dimse_timeout
    ae.maximum_pdu_size = config.network.max_pdu_size
    return ae


class StorageServer:
    """Owns the listening socket; ``stop`` refuses new associations and lets in-flight ones finish."""

    def __init__(self, config: NodeConfig, intake: Intake) -> None:
        self.config = config
        self.intake = intake
        self.ae = build_ae(config)
        self.history = AssociationHistory(intake.engine)
        self._servers: list[AdmissionServer] = []  # the plain port's and/or the TLS port's

    def start(self) -> None:
        # Datasets stream to files in the archive's tmp/ (same file system, so placing them is a rename).
        require_configured(self.intake.archive.tmp_dir)
        if self.history.closed:  # started again after a stop
            self.history = AssociationHistory(self.intake.engine)
        handlers = [
            (evt.EVT_C_ECHO, _handle_echo),
            (evt.EVT_C_STORE, _handle_store, [self.intake, self.history]),
            (evt.EVT_REJECTED, _log_rejection),
            *self.history.handlers(),  # association history for the console
            *self.intake.reception.handlers(),  # partial receptions removed at once, reserve checked mid-transfer
        ]
        tls = self.config.tls
        listeners: list[tuple[int, ssl.SSLContext | None]] = []
        if self.config.network.port:
            listeners.append((self.config.network.port, None))
        if tls.enabled:
            listeners.append((tls.port, server_context(tls)))  # ConfigError (naming the key) before listening
        policy = AdmissionPolicy.from_settings(self.config.network, tls)
        gate = None
        for port, context in listeners:
            # What AE.start_server(block=False) does, with the admission gate as the server class.
            server = cast(AdmissionServer, self.ae.make_server(
                (self.config.network.bind_address, port), evt_handlers=handlers, server_class=AdmissionServer,
                policy=policy, tls_context=context, gate=gate))
            gate = server.gate
            threading.Thread(target=server.serve_forever, name="AcceptorServer", daemon=True).start()
            self.ae._servers.append(server)  # AssociationServer.shutdown removes it from there
            self._servers.append(server)
            if context is not None:
                clients = ("client certificate required" if tls.require_client_certificate else
                           "client certificate verified when presented" if tls.ca_bundle else
                           "no client certificate asked for")
                LOG.info("TLS Storage SCP on %s:%d (TLS 1.2 or later, %s, handshake timeout %g s)",
                         self.config.network.bind_address, port, clients, tls.handshake_timeout)

    @property
    def pending_connections(self) -> int:
        """Connections still waiting for their TLS handshake or complete A-ASSOCIATE-RQ (not associations)."""
        return self._servers[0].gate.pending_count if self._servers else 0

    def stop(self, grace_seconds: float) -> int:
        """Close the listening socket and every connection that has not associated yet, wait up to
        ``grace_seconds`` for open associations, abort the rest.

        Aborting is safe for the sender: nothing is acknowledged before it is durable. An association whose peer
        stalls inside a PDU cannot even process the abort (its thread is blocked reading), so after one more second
        its socket is shut down. Returns how many were aborted.
        """
        if not self._servers:
            return 0
        servers, self._servers = self._servers, []
        for server in servers:
            server.shutdown()
        active = [assoc for server in servers for assoc in server.active_associations]
        deadline = time.monotonic() + grace_seconds
        while time.monotonic() < deadline and any(a.is_alive() for a in active):
            time.sleep(0.05)
        aborted = [assoc for assoc in active if assoc.is_alive()]
        for assoc in aborted:
            assoc.abort(block=False)  # the A-ABORT is sent by the association's own upper-layer thread
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline and any(a.is_alive() for a in aborted):
            time.sleep(0.05)
        for assoc in aborted:
            force_close(assoc)
        for assoc in active:
            assoc.join(timeout=5)
            assoc.dul.join(timeout=5)
        self.history.close()
        return len(aborted)
