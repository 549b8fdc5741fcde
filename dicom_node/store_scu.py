"""A plain C-STORE client (Storage SCU): one association to a peer, several objects over it.

For each SOP class to send, the association proposes the objects' own transfer syntaxes and, in a separate
presentation context, the uncompressed fallback (Explicit VR Little Endian, Implicit VR Little Endian), so that a
peer that accepts the object's own syntax receives the file's bytes unchanged (streamed from disk), and a peer that
does not still receives the object, decoded (decompressed if need be) to an uncompressed syntax it accepted.

pynetdicom's timeouts bound each wait and each read, not a whole exchange, and its requestor sockets block without a
timeout: a peer that accepts the association and then trickles bytes (a PDU header, then one byte now and then) or
stops reading ours holds the association's DUL thread in ``recv``/``send`` for as long as it likes, and pynetdicom's
own abort then waits for that thread. So every step of an association, its setup and each C-STORE (request sent,
response received), runs under a watchdog (``Watchdog``, a ``threading.Timer``): past ``deadline`` seconds it aborts
the association (A-ABORT), wakes the waiting caller and shuts the socket down, so that the step ends within the
deadline plus ``ABORT_GRACE_SECONDS`` whatever the peer does.

With ``tls`` (a ``tls = true`` destination), each association is opened over TLS: pynetdicom wraps the socket
before it connects, with the context ``dicom_node.tls.client_context`` builds for that association (PACS certificate
and host name verified, the node's certificate presented); the handshake is part of the setup step, under the same
watchdog, and a failed one is reported with OpenSSL's reason (``CERTIFICATE_VERIFY_FAILED: ...``).

Streaming a file as it is needs pynetdicom's process-wide ``STORE_SEND_CHUNKED_DATASET``, set once at start-up
(``dicom_node.netsetup.configure_pynetdicom``; ``StoreClient`` refuses to work without it). Nothing here knows about
the database or the retry policy: see ``dicom_node.export``.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_ASSOCIATE, A_P_ABORT
from pynetdicom.presentation import PresentationContext, build_context

from ai.safe_text import escape, exception_summary

from .config import ConfigError, Peer
from .netsetup import require_configured
from .tls import RecordingContext, handshake_failure

LOG = logging.getLogger("dicom_node.store_scu")

UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
WARNING_STATUSES = frozenset({0xB000, 0xB006, 0xB007})
"""Storage warnings (coercion, elements discarded, data set does not match SOP class): the peer kept the object."""
MAX_CONTEXTS = 128  # PS3.8: presentation context IDs are odd numbers 1-255
ABORT_GRACE_SECONDS = 0.5
"""After a watchdog's A-ABORT: how long the DUL thread gets to send it before the socket is shut down under it."""


def is_stored(status: int | None) -> bool:
    return status == 0x0000 or status in WARNING_STATUSES


@dataclass(frozen=True)
class StoreItem:
    path: Path
    sop_class_uid: str
    transfer_syntax_uid: str


@dataclass(frozen=True)
class StoreOutcome:
    """``stored``: the peer acknowledged it (success or warning). ``local``: the failure is on our side (file
    missing or undecodable) and sending again will not help. ``stalled``: the peer did not answer in time (the
    watchdog's deadline, or one of pynetdicom's timeouts) and the association is gone: the peer is hung, not
    merely down."""

    stored: bool
    status: int | None = None
    error: str | None = None
    local: bool = False
    stalled: bool = False


class PeerUnreachable(ConnectionError):
    """No association could be established with any of the peers tried (refused, rejected, aborted, timed out)."""


def cut(assoc: Association) -> None:
    """End ``assoc`` now, from any thread, whatever state its peer left it in; returns within about twice
    ``ABORT_GRACE_SECONDS``.

    An A-ABORT is queued (``abort(block=False)``: pynetdicom's blocking abort waits for a DUL thread that may be
    stuck), the caller waiting for the A-ASSOCIATE answer or for a DIMSE response is woken (pynetdicom does that
    itself only when the *peer* ends the association, in its AA-2/3/4 actions), and after a grace period for the
    A-ABORT to go out the socket is shut down, which ends a ``recv``/``send`` the DUL thread is blocked in."""
    try:
        assoc.abort(block=False)
    except Exception as exc:  # noqa: BLE001 - best effort: the socket shutdown below ends it anyway
        LOG.debug("A-ABORT could not be queued (%s)", exception_summary(exc))
    # An association request waiting for its answer gets an abort; the association's reactor thread (running
    # again since the abort) sees it too and ends itself.
    assoc.dul.to_user_queue.put(A_P_ABORT())
    # A send_c_store waiting for its response gets None: twice, as that reactor may take one off the queue first.
    assoc.dimse.msg_queue.put((None, None))
    assoc.dimse.msg_queue.put((None, None))
    deadline = time.monotonic() + ABORT_GRACE_SECONDS
    while time.monotonic() < deadline and assoc.dul.state_machine.current_state != "Sta1":
        time.sleep(0.01)
    transport = assoc.dul.socket
    raw = getattr(transport, "socket", None)
    if raw is not None:
        try:
            raw.shutdown(socket.SHUT_RDWR)  # the DUL thread's blocked recv returns b"", its send fails: Evt17
        except OSError as exc:
            LOG.debug("socket already closed (%s)", exception_summary(exc))
    deadline = time.monotonic() + ABORT_GRACE_SECONDS
    while time.monotonic() < deadline and assoc.dul.is_alive() and assoc.dul.state_machine.current_state != "Sta1":
        time.sleep(0.01)


class Watchdog:
    """Cuts an association whose current step (setup, or one C-STORE) runs past ``deadline`` seconds.

    ``with Watchdog(deadline, assoc) as dog: ...``; for the setup, where pynetdicom creates the association inside
    ``AE.associate``, pass it later to ``watch`` (from the connection-open event): a deadline that passed before
    then cuts it as soon as it is known. ``fired`` tells afterwards whether the watchdog cut the step."""

    def __init__(self, deadline: float, assoc: Association | None = None) -> None:
        self.deadline = deadline
        self.fired = False
        self._assoc = assoc
        self._lock = threading.Lock()
        self._finished = False
        self._cutter: threading.Thread | None = None
        self._timer = threading.Timer(deadline, self._fire)
        self._timer.daemon = True
        self._timer.name = "store-scu-watchdog"

    def __enter__(self) -> Watchdog:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._finished = True
        self._timer.cancel()
        cutter = self._cutter
        if cutter is not None:
            cutter.join(4 * ABORT_GRACE_SECONDS)  # the association is down before the caller goes on
        if self._timer.is_alive():
            self._timer.join(4 * ABORT_GRACE_SECONDS)

    def watch(self, assoc: Association) -> None:
        with self._lock:
            self._assoc = assoc
            late = self.fired and not self._finished
        if late:  # called from a pynetdicom event handler: cut in another thread, never in the DUL's own
            self._start_cutter(assoc)

    def _fire(self) -> None:
        with self._lock:
            if self._finished:
                return
            self.fired = True
            assoc = self._assoc
        if assoc is not None:
            cut(assoc)

    def _start_cutter(self, assoc: Association) -> None:
        self._cutter = threading.Thread(target=cut, args=(assoc,), name="store-scu-watchdog-late", daemon=True)
        self._cutter.start()


def requested_contexts(items: Iterable[StoreItem]) -> list[PresentationContext]:
    """Per SOP class: one context per own non-uncompressed syntax, and one with the uncompressed fallback."""
    syntaxes: dict[str, list[str]] = {}
    for item in items:
        own = syntaxes.setdefault(item.sop_class_uid, [])
        if item.transfer_syntax_uid not in own and item.transfer_syntax_uid not in UNCOMPRESSED:
            own.append(item.transfer_syntax_uid)
    contexts = []
    for sop_class, own in syntaxes.items():
        contexts += [build_context(sop_class, [ts]) for ts in own]
        contexts.append(build_context(sop_class, list(UNCOMPRESSED)))
    if len(contexts) > MAX_CONTEXTS:
        raise ValueError(f"{len(contexts)} presentation contexts needed, at most {MAX_CONTEXTS} fit one association")
    return contexts


class StoreClient:
    """Our Storage SCU: ``calling_ae_title``, one ``timeout`` for each of pynetdicom's waits (TCP connection, ACSE,
    DIMSE, network idle) and a ``deadline`` (default: ``timeout``) for each whole step, enforced by a watchdog:
    one association setup, one C-STORE."""

    def __init__(self, calling_ae_title: str, timeout: float, deadline: float | None = None) -> None:
        # Files go as they are on disk (no decode, no re-encode) whenever the peer accepts their own syntax: a
        # process-wide pynetdicom setting, made at start-up.
        require_configured()
        self.timeout = timeout
        self.deadline = timeout if deadline is None else deadline
        self.ae = AE(ae_title=calling_ae_title)
        self.ae.connection_timeout = timeout
        self.ae.acse_timeout = timeout
        self.ae.dimse_timeout = timeout
        self.ae.network_timeout = timeout

    def open(self, peers: Sequence[Peer], items: Sequence[StoreItem],
             tls: Callable[[], ssl.SSLContext] | None = None) -> StoreAssociation:
        """Associate with the first peer of ``peers`` that accepts; raises PeerUnreachable naming every failure.
        ``tls``: over TLS, with a context from this factory for each peer tried."""
        contexts = requested_contexts(items)
        problems = []
        for peer in peers:
            rejection: list[str] = []
            connected: list[bool] = []
            try:
                tls_context = tls() if tls is not None else None
            except ConfigError as exc:  # a certificate file removed or replaced by a bad one since start-up
                problems.append(f"{peer.safe}: no TLS context ({exc})")
                continue

            def _on_acse(event: evt.Event, rejection: list[str] = rejection) -> None:
                primitive = event.primitive  # type: ignore[attr-defined]
                if isinstance(primitive, A_ASSOCIATE) and primitive.result not in (None, 0x00):
                    rejection.append(f"{primitive.result_str}, {primitive.source_str}: {primitive.reason_str}")

            with Watchdog(self.deadline) as dog:
                def _on_connect(event: evt.Event, connected: list[bool] = connected, dog: Watchdog = dog) -> None:
                    connected.append(True)
                    dog.watch(event.assoc)

                assoc = self.ae.associate(peer.host, peer.port, contexts=contexts, ae_title=peer.ae_title,
                                          evt_handlers=[(evt.EVT_ACSE_RECV, _on_acse),
                                                        (evt.EVT_CONN_OPEN, _on_connect)],
                                          tls_args=(tls_context, peer.host) if tls_context is not None else None)
                established = bool(assoc.is_established) and not dog.fired
            if established:
                return StoreAssociation(assoc, peer, self.deadline, self.timeout)
            if assoc.is_established:  # the deadline passed just as the peer accepted: not worth keeping
                cut(assoc)
            if dog.fired:
                problems.append(f"{peer.safe} did not complete the association within {self.deadline:g} s "
                                "(export.deadline_seconds): aborted")
            elif isinstance(tls_context, RecordingContext) and tls_context.handshake_error is not None:
                problems.append(f"{peer.safe}: TLS handshake failed "
                                f"({handshake_failure(tls_context.handshake_error)})")
            elif not connected:
                problems.append(f"{peer.safe} could not be reached (connection refused or timed out)")
            elif assoc.is_rejected:
                reason = escape(rejection[0]) if rejection else "no reason"
                problems.append(f"{peer.safe} rejected the association ({reason})")
            else:
                problems.append(f"{peer.safe} aborted or did not answer the association request")
        raise PeerUnreachable("; ".join(problems))


class StoreAssociation:
    """An established association; ``store`` one object after another, then ``release`` (or use ``with``)."""

    def __init__(self, assoc: Association, peer: Peer, deadline: float, timeout: float) -> None:
        self.assoc = assoc
        self.peer = peer
        self.deadline = deadline
        self.timeout = timeout
        self._message_id = 0

    def __enter__(self) -> StoreAssociation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    @property
    def is_established(self) -> bool:
        return bool(self.assoc.is_established)

    def release(self) -> None:
        if self.assoc.is_established:
            self.assoc.release()

    def _accepted(self, sop_class: str) -> list[UID]:
        return [cx.transfer_syntax[0] for cx in self.assoc.accepted_contexts
                if cx.abstract_syntax == sop_class and cx.as_scu]

    def store(self, item: StoreItem) -> StoreOutcome:
        if not self.is_established:
            return StoreOutcome(False, error=f"association with {self.peer.safe} was lost")
        accepted = self._accepted(item.sop_class_uid)
        if item.transfer_syntax_uid in accepted:
            payload: Path | Any = item.path  # streamed as is: the peer receives the file's bytes
            if not item.path.is_file():
                return StoreOutcome(False, error=f"file {escape(str(item.path))} is missing", local=True)
        elif any(ts in UNCOMPRESSED for ts in accepted):
            try:
                payload = dcmread(item.path)
                if payload.file_meta.TransferSyntaxUID.is_compressed:
                    # A change of transfer syntax keeps the instance: same SOP Instance UID.
                    payload.decompress(generate_instance_uid=False)
            except FileNotFoundError:
                return StoreOutcome(False, error=f"file {escape(str(item.path))} is missing", local=True)
            except Exception as exc:  # noqa: BLE001 - any decoder error: this object cannot go uncompressed
                return StoreOutcome(False, error=f"cannot decode {escape(item.path.name)} for an uncompressed "
                                                 f"syntax: {exception_summary(exc)}", local=True)
            LOG.debug("%s: %s not accepted by %s, sending it decoded", escape(item.path.name),
                      UID(item.transfer_syntax_uid).name, self.peer.safe)
        else:
            return StoreOutcome(False, error=f"{self.peer.safe} accepted no presentation context for "
                                             f"{UID(item.sop_class_uid).name} in "
                                             f"{UID(item.transfer_syntax_uid).name} or uncompressed")
        self._message_id = self._message_id % 65535 + 1
        started = time.monotonic()
        try:
            with Watchdog(self.deadline, self.assoc) as dog:
                response = self.assoc.send_c_store(payload, msg_id=self._message_id)
        except (ValueError, AttributeError) as exc:  # no usable context, or the file lacks its meta information
            return StoreOutcome(False, error=f"cannot send {escape(item.path.name)}: {exception_summary(exc)}")
        status = response.get("Status") if response else None
        if status is None:
            if dog.fired:
                return StoreOutcome(False, stalled=True,
                                    error=f"no C-STORE response from {self.peer.safe} within {self.deadline:g} s "
                                          "(export.deadline_seconds): association aborted")
            stalled = time.monotonic() - started >= 0.95 * self.timeout  # one of pynetdicom's timeouts
            what = "timeout (export.timeout_seconds)" if stalled else "the association was aborted or closed"
            return StoreOutcome(False, stalled=stalled, error=f"no C-STORE response from {self.peer.safe}: {what}")
        status = int(status)
        if is_stored(status):
            return StoreOutcome(True, status=status)
        comment = response.get("ErrorComment")
        return StoreOutcome(False, status=status, error=f"{self.peer.safe} answered status 0x{status:04X}"
                                                        + (f" ({escape(comment)})" if comment else ""))
