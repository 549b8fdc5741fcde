"""Association admission: what happens to a TCP connection before and around pynetdicom's association code.

Why this module exists. pynetdicom 3's ``AssociationServer`` starts an ``Association`` thread for every accepted TCP
connection, at once, and its DICOM upper layer then reads each PDU with blocking ``recv`` calls on a socket without
a timeout: the 6-byte header, then exactly as many bytes as the header declares. That gives an attacker three
levers, none of which pynetdicom's configuration can remove:

- a connection that sends part of an A-ASSOCIATE-RQ and then nothing blocks its thread in ``recv`` for as long as
  the peer keeps the socket open: the ACSE and network timers are only checked between reads, so neither
  ``acse_timeout`` nor ``network_timeout`` ends it, and the thread (not a daemon) also keeps ``serve`` from exiting;
- ``maximum_associations`` counts every ``Association`` thread, negotiated or not, so ten such connections (or ten
  idle ones, until the ACSE timeout) take every slot and legitimate senders get "local limit exceeded";
- the declared PDU length is trusted: a header announcing 1 GB makes the node buffer 1 GB, for the A-ASSOCIATE-RQ
  (before any association or AE title check exists) as for any later PDU; ``maximum_pdu_size`` is only what the
  node advertises, never checked on receipt.

What the node does instead, without patching the library (``AdmissionServer`` is passed to ``AE.make_server`` as
``server_class``; pynetdicom's negotiation, state machine and handlers run unchanged):

1. **Admission gate** (one thread, ``AdmissionGate``). ``AdmissionServer.process_request`` (called by the accept
   loop for each new connection) does not start an association. Over the per-address cap
   (``network.max_connections_per_address``: pending connections plus live associations from that IP address) the
   connection is closed at once; otherwise the non-blocking socket goes to the gate, and when more than
   ``network.max_pending_connections`` are waiting there, the one that has waited longest is closed (a legitimate
   requestor sends its request right after connecting). The gate never reads from a pending socket: it peeks the
   6-byte PDU header (``MSG_PEEK``), refuses anything that is not an A-ASSOCIATE-RQ (type 0x01) or that declares
   more than ``network.max_association_request_size`` bytes (A-ABORT, then close), and sets ``SO_RCVLOWAT`` to the
   whole PDU so that the kernel wakes it only when the complete request is buffered (``FIONREAD`` confirms). A
   connection without a complete request after ``network.association_request_deadline`` seconds is closed. Only
   then is the socket, blocking, with ``network.network_timeout`` as its kernel read and write timeouts, handed to
   pynetdicom (``ThreadingMixIn.process_request``), which finds the whole request already buffered and negotiates
   at once. Pending connections are therefore never ``Association`` threads: they cannot take the slots of
   ``network.max_associations``, which keeps counting (and rejecting with "local limit exceeded") negotiated
   associations only.
2. **PDU size guard** (``GuardedAssociationSocket``, via ``GuardedRequestHandler``). The ``AssociationSocket``
   pynetdicom builds for the connection checks each PDU header it reads: a P-DATA-TF PDU declaring more than
   ``network.max_pdu_size`` (the size the node advertises; 0 = unchecked), or any other PDU declaring more than
   ``network.max_association_request_size``, gets an A-ABORT (service provider, invalid PDU parameter value) and the
   connection is shut down before its body is read. The socket's timeouts end a peer that stalls inside a PDU.
3. **Shutdown**: ``AdmissionServer.shutdown`` closes every pending connection at once (nothing was negotiated, so
   there is nothing to finish); ``force_close`` shuts down the sockets of associations still alive after the grace
   period, which wakes an upper-layer thread blocked in ``recv``.

4. **TLS** (the ``[tls]`` port; contexts from ``dicom_node.tls``). pynetdicom's own TLS (``ssl_context`` on its
   server) wraps each accepted socket with a *blocking* handshake in the accept loop: one client that connects and
   never finishes its handshake stops every other connection, plain and TLS. Here the accept loop only wraps the
   socket (``do_handshake_on_connect=False``, no I/O) after the same per-address cap; the gate drives the
   handshake, non-blocking, from its selector (``SSLWantReadError``/``SSLWantWriteError`` choose the event it waits
   for), and closes a connection whose handshake is not complete after ``tls.handshake_timeout`` seconds, or that
   fails (a WARNING with the peer's address and OpenSSL's reason, e.g. ``PEER_DID_NOT_RETURN_A_CERTIFICATE`` or
   ``CERTIFICATE_VERIFY_FAILED``). ``MSG_PEEK`` and ``SO_RCVLOWAT`` mean nothing on the encrypted stream, so the
   request stage *reads* the decrypted A-ASSOCIATE-RQ instead, non-blocking, with the same checks (type, declared
   size, ``network.association_request_deadline`` counted from the end of the handshake), into a buffer; the socket
   (a ``PrefixedSSLSocket``: its ``recv`` returns that buffer first and ``pending`` counts it, so pynetdicom's
   ``ready`` sees it) goes to pynetdicom only with the whole request. A TLS association is therefore admitted
   exactly like a plain one, and ``isinstance(assoc.dul.socket.socket, ssl.SSLSocket)`` tells it came over TLS.
   Its socket gets ``settimeout(network.network_timeout)`` rather than kernel timeouts: OpenSSL turns the kernel's
   timeout into "want read" and Python's blocking ``SSLSocket`` then retries the read, forever.

One gate can serve several servers (``AdmissionServer(..., gate=other.gate)``: the plain and the TLS port share the
pending budget and the per-address cap, which counts the AE's acceptor associations on both); both servers of one AE
share ``network.max_associations`` anyway (pynetdicom counts the AE's acceptors).

Linux only in practice (``SO_RCVLOWAT`` honoured by ``poll``/``epoll`` for TCP, ``FIONREAD``).
"""

from __future__ import annotations

import array
import fcntl
import logging
import queue
import selectors
import socket
import ssl
import struct
import termios
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from socketserver import ThreadingMixIn
from typing import Any

from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from ai.safe_text import escape

from .config import NetworkSettings, TlsSettings
from .tls import handshake_failure

LOG = logging.getLogger("dicom_node.admission")

A_ASSOCIATE_RQ = 0x01
P_DATA_TF = 0x04
KNOWN_PDU_TYPES = frozenset(range(0x01, 0x08))
# A-ABORT source 2 (service provider) reasons, PS3.8 9.3.8
ABORT_UNRECOGNIZED_PDU = 0x01
ABORT_UNEXPECTED_PDU = 0x02
ABORT_INVALID_PARAMETER = 0x06


def a_abort_pdu(reason: int) -> bytes:
    """An A-ABORT PDU from the service provider (source 2) with ``reason``."""
    return struct.pack(">BBLBBBB", 0x07, 0, 4, 0, 0, 0x02, reason)


@dataclass(frozen=True)
class AdmissionPolicy:
    """The limits of the admission gate and the PDU guard (see the module docstring)."""

    request_deadline: float = 10.0
    max_request_size: int = 262144
    max_pending: int = 32
    max_per_address: int = 8  # 0 = no cap
    max_pdu_size: int = 131072  # 0 = P-DATA unchecked
    network_timeout: float = 60.0
    handshake_timeout: float = 10.0  # TLS connections: seconds from accept to a completed handshake

    @classmethod
    def from_settings(cls, network: NetworkSettings, tls: TlsSettings | None = None) -> AdmissionPolicy:
        return cls(
            request_deadline=network.association_request_deadline,
            max_request_size=network.max_association_request_size,
            max_pending=network.max_pending_connections,
            max_per_address=network.max_connections_per_address,
            max_pdu_size=network.max_pdu_size,
            network_timeout=network.network_timeout,
            **({"handshake_timeout": tls.handshake_timeout} if tls is not None else {}),
        )

    def pdu_limit(self, pdu_type: int) -> int | None:
        """The largest length a PDU of ``pdu_type`` may declare once associated (None: unchecked)."""
        if pdu_type == P_DATA_TF:
            return self.max_pdu_size or None
        return self.max_request_size


class ThrottledLog:
    """Warnings about refused connections, at most one line per kind every ``interval`` seconds: an attacker
    opening thousands of connections must not flood the log. Suppressed lines are counted in the next one."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0) -> None:
        self._logger = logger
        self._interval = interval
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._suppressed: Counter[str] = Counter()

    def warning(self, kind: str, message: str, *args: Any) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(kind, -self._interval) < self._interval:
                self._suppressed[kind] += 1
                return
            self._last[kind] = now
            suppressed, self._suppressed[kind] = self._suppressed[kind], 0
        if suppressed:
            message += " (%d more like this since the last such message)"
            args = (*args, suppressed)
        self._logger.warning(message, *args)


REFUSALS = ThrottledLog(LOG)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    """Best effort, never blocks: the peer may not be reading."""
    if isinstance(sock, ssl.SSLSocket):  # no flags on an SSLSocket: non-blocking for this one send
        timeout = sock.gettimeout()
        try:
            sock.settimeout(0)
            sock.send(data)
        except (OSError, ValueError):
            pass
        finally:
            try:
                sock.settimeout(timeout)
            except OSError:
                pass
        return
    try:
        sock.send(data, socket.MSG_DONTWAIT)
    except OSError:
        pass


class PrefixedSSLSocket(ssl.SSLSocket):
    """A server-side ``SSLSocket`` whose ``recv`` first returns the bytes the gate already read (the decrypted
    A-ASSOCIATE-RQ), and whose ``pending`` counts them (pynetdicom's ``ready`` asks it before waiting)."""

    _prefix: bytes = b""

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        if self._prefix:
            data, self._prefix = self._prefix[:buflen], self._prefix[buflen:]
            return data
        return super().recv(buflen, flags)

    def recv_into(self, buffer: Any, nbytes: int | None = None, flags: int = 0) -> int:
        if self._prefix:
            view = memoryview(buffer).cast("B")
            size = min(len(view) if not nbytes else nbytes, len(self._prefix))
            view[:size] = self._prefix[:size]
            self._prefix = self._prefix[size:]
            return size
        return super().recv_into(buffer, nbytes, flags)

    def pending(self) -> int:
        return len(self._prefix) + (super().pending() if getattr(self, "_sslobj", None) is not None else 0)


def _header_problem(head: bytes, policy: AdmissionPolicy) -> tuple[str, str, tuple[Any, ...], int] | None:
    """Why the first bytes of a connection are refused (kind, message, args, A-ABORT reason), or None."""
    if head and head[0] != A_ASSOCIATE_RQ:
        reason = ABORT_UNEXPECTED_PDU if head[0] in KNOWN_PDU_TYPES else ABORT_UNRECOGNIZED_PDU
        return "type", "first PDU has type 0x%02X, not an A-ASSOCIATE-RQ", (head[0],), reason
    if len(head) >= 6:
        (length,) = struct.unpack(">L", head[2:6])
        if length > policy.max_request_size:
            return ("size", "A-ASSOCIATE-RQ declares %d bytes, more than %d (network.max_association_request_size)",
                    (length, policy.max_request_size), ABORT_INVALID_PARAMETER)
    return None


def _bytes_available(sock: socket.socket) -> int:
    buf = array.array("i", [0])
    fcntl.ioctl(sock.fileno(), termios.FIONREAD, buf)
    return buf[0]


@dataclass
class _Pending:
    sock: socket.socket
    host: str
    address: Any
    deadline: float
    hand_off: Callable[[socket.socket, Any], None]
    lowat: int = 1
    tls: bool = False
    handshaken: bool = False
    request: bytearray = field(default_factory=bytearray)  # TLS: the decrypted A-ASSOCIATE-RQ read so far
    events: int = selectors.EVENT_READ


@dataclass
class _Counts:
    """Connections per remote host between accept and the start of their ``Association`` thread."""

    pending: Counter[str] = field(default_factory=Counter)
    handing_off: Counter[str] = field(default_factory=Counter)

    def total(self) -> int:
        return sum(self.pending.values())


class AdmissionGate(threading.Thread):
    """Holds connections until their complete A-ASSOCIATE-RQ is buffered, then hands them on (module docstring)."""

    def __init__(self, policy: AdmissionPolicy, hand_off: Callable[[socket.socket, Any], None],
                 associations_from: Callable[[str], int]) -> None:
        super().__init__(name="AdmissionGate", daemon=True)
        self.policy = policy
        self._hand_off = hand_off
        self._associations_from = associations_from
        self._lock = threading.Lock()
        self._counts = _Counts()
        self._incoming: queue.SimpleQueue[_Pending] = queue.SimpleQueue()
        self._pending: dict[int, _Pending] = {}  # by fileno; touched by the gate thread only
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._stopping = False

    # ---------------------------------------------------------------------------------------------- accept thread

    def admit(self, sock: socket.socket, address: Any, hand_off: Callable[[socket.socket, Any], None] | None = None,
              tls_context: ssl.SSLContext | None = None) -> None:
        """A newly accepted connection: refused at once over a cap, else held until its request is complete (with
        ``tls_context``: until its TLS handshake, then its request, are complete). ``hand_off``: where it then
        goes (default: the gate's own)."""
        host = str(address[0])
        with self._lock:
            if self._stopping:
                refusal = "the node is stopping"
            elif self.policy.max_per_address and (
                    self._counts.pending[host] + self._counts.handing_off[host] + self._associations_from(host)
                    >= self.policy.max_per_address):
                refusal = f"{self.policy.max_per_address} connections from this address are open " \
                          f"(network.max_connections_per_address)"
            else:
                refusal = None
                self._counts.pending[host] += 1
        if refusal:
            REFUSALS.warning("cap", "connection from %s refused: %s", escape(host), refusal)
            _close(sock)
            return
        sock.setblocking(False)
        if tls_context is not None:
            try:  # no I/O here: the gate drives the handshake
                sock = tls_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            except (OSError, ValueError) as exc:
                with self._lock:
                    self._release(self._counts.pending, host)
                LOG.debug("connection from %s closed before TLS could start (%s)", escape(host),
                          handshake_failure(exc))
                _close(sock)
                return
            sock.__class__ = PrefixedSSLSocket
        wait = self.policy.handshake_timeout if tls_context is not None else self.policy.request_deadline
        self._incoming.put(_Pending(sock, host, address, time.monotonic() + wait, hand_off or self._hand_off,
                                    tls=tls_context is not None))
        _send_quietly(self._wake_w, b"\0")

    @staticmethod
    def _release(counter: Counter[str], host: str) -> None:
        counter[host] -= 1
        if counter[host] <= 0:
            del counter[host]

    def handed_off_done(self, host: str) -> None:
        """The connection's ``Association`` thread runs (or it failed): it now counts as a live association."""
        with self._lock:
            self._release(self._counts.handing_off, host)

    def stop(self) -> None:
        """Close every pending connection and end the gate thread (again: nothing more happens)."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
        _send_quietly(self._wake_w, b"\0")
        self.join(timeout=5)

    @property
    def pending_count(self) -> int:
        with self._lock:
            return self._counts.total()

    # ------------------------------------------------------------------------------------------------ gate thread

    def run(self) -> None:
        try:
            while not self._stopping:
                now = time.monotonic()
                timeout = min((p.deadline for p in self._pending.values()), default=now + 1.0) - now
                for key, _ in self._selector.select(max(0.0, min(timeout, 1.0))):
                    if key.fileobj is self._wake_r:
                        self._take_incoming()
                    else:
                        pending = self._pending.get(key.fd)
                        if pending is not None:
                            self._check_safely(pending)
                now = time.monotonic()
                for pending in [p for p in self._pending.values() if p.deadline <= now]:
                    if pending.tls and not pending.handshaken:
                        self._drop(pending, "tls-deadline", "TLS handshake not complete within %.1f s "
                                   "(tls.handshake_timeout)", self.policy.handshake_timeout)
                    else:
                        self._drop(pending, "deadline",
                                   "no complete A-ASSOCIATE-RQ within %.1f s (network.association_request_deadline)",
                                   self.policy.request_deadline)
        finally:
            self._take_incoming()
            for pending in list(self._pending.values()):
                self._forget(pending)
                _close(pending.sock)
            self._selector.close()
            self._wake_r.close()
            self._wake_w.close()

    def _take_incoming(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass
        while True:
            try:
                pending = self._incoming.get_nowait()
            except queue.Empty:
                return
            self._pending[pending.sock.fileno()] = pending
            self._selector.register(pending.sock, selectors.EVENT_READ)
            if self._stopping:
                continue
            if len(self._pending) > self.policy.max_pending:
                # Make room by closing the one that has waited longest: a legitimate requestor sends its request
                # right after connecting, so it is admitted long before it would be the oldest.
                oldest = min(self._pending.values(), key=lambda p: p.deadline)
                self._drop(oldest, "evicted", "%d connections were waiting for their association request "
                           "(network.max_pending_connections); this one had waited longest",
                           self.policy.max_pending + 1)
            if pending.sock.fileno() in self._pending:
                self._check_safely(pending)

    def _check_safely(self, pending: _Pending) -> None:
        """``_check``; an unexpected error closes that connection only, never the gate (the node would go deaf)."""
        try:
            self._check(pending)
        except Exception:
            LOG.exception("admission of the connection from %s failed; closing it", escape(pending.host))
            if pending.sock.fileno() in self._pending:
                self._drop(pending, None, "")

    def _check(self, pending: _Pending) -> None:
        if pending.tls:
            if pending.handshaken or self._handshake(pending):
                self._read_tls_request(pending)
            return
        sock = pending.sock
        try:
            head = sock.recv(6, socket.MSG_PEEK)
        except BlockingIOError:
            return
        except OSError:
            self._drop(pending, None, "")
            return
        if not head:
            LOG.debug("connection from %s closed before an association request", escape(pending.host))
            self._drop(pending, None, "")
            return
        problem = _header_problem(head, self.policy)
        if problem is not None:
            kind, message, args, reason = problem
            self._drop(pending, kind, message, *args, abort=reason)
            return
        if len(head) < 6:
            self._set_lowat(pending, 6)
            return
        (length,) = struct.unpack(">L", head[2:6])
        need = 6 + length
        if _bytes_available(sock) >= need:
            self._admit(pending)
        elif not self._set_lowat(pending, need):
            self._drop(pending, "size", "A-ASSOCIATE-RQ of %d bytes is more than this host's TCP receive buffer "
                       "can hold", length, abort=ABORT_INVALID_PARAMETER)

    def _want(self, pending: _Pending, events: int) -> None:
        """Wait for ``events`` on a TLS connection (OpenSSL may need to write while reading, and the reverse)."""
        if pending.events != events:
            self._selector.modify(pending.sock, events)
            pending.events = events

    def _handshake(self, pending: _Pending) -> bool:
        """One step of a TLS handshake; True once it is complete (the request stage starts, with its deadline)."""
        sock = pending.sock
        assert isinstance(sock, ssl.SSLSocket)
        try:
            sock.do_handshake()
        except ssl.SSLWantReadError:
            self._want(pending, selectors.EVENT_READ)
            return False
        except ssl.SSLWantWriteError:
            self._want(pending, selectors.EVENT_WRITE)
            return False
        except (ssl.SSLError, OSError) as exc:  # refused certificate, wrong protocol, EOF, reset
            reason = handshake_failure(exc)
            kind = str(getattr(exc, "reason", None) or type(exc).__name__)
            self._drop(pending, f"tls-{kind[:60]}", "TLS handshake failed (%s)", reason)
            return False
        pending.handshaken = True
        pending.deadline = time.monotonic() + self.policy.request_deadline
        LOG.debug("TLS handshake with %s: %s, %s", escape(pending.host), sock.version(),
                  escape((sock.cipher() or ("?",))[0]))
        return True

    def _read_tls_request(self, pending: _Pending) -> None:
        """Read (no peeking on TLS) the decrypted A-ASSOCIATE-RQ into ``pending.request``, with the plain path's
        checks; hand the connection on once the whole request is there."""
        sock = pending.sock
        buf = pending.request
        while True:
            problem = _header_problem(bytes(buf[:6]), self.policy)
            if problem is not None:
                kind, message, args, reason = problem
                self._drop(pending, kind, message, *args, abort=reason)
                return
            need = 6 + struct.unpack(">L", buf[2:6])[0] if len(buf) >= 6 else 6
            if len(buf) >= 6 and len(buf) >= need:
                break
            try:
                chunk = sock.recv(min(need - len(buf), 65536))
            except ssl.SSLWantReadError:
                self._want(pending, selectors.EVENT_READ)
                return
            except ssl.SSLWantWriteError:
                self._want(pending, selectors.EVENT_WRITE)
                return
            except (ssl.SSLError, OSError) as exc:
                LOG.debug("TLS connection from %s failed before an association request (%s)", escape(pending.host),
                          handshake_failure(exc))
                self._drop(pending, None, "")
                return
            if not chunk:
                LOG.debug("TLS connection from %s closed before an association request", escape(pending.host))
                self._drop(pending, None, "")
                return
            buf += chunk
        assert isinstance(sock, PrefixedSSLSocket)
        sock._prefix = bytes(buf)
        self._admit(pending)

    def _set_lowat(self, pending: _Pending, need: int) -> bool:
        """Wake the gate only when ``need`` bytes are buffered; False if the kernel cannot buffer that many."""
        if pending.lowat != need:
            pending.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, need)
            pending.lowat = pending.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT)
        return pending.lowat >= need

    def _forget(self, pending: _Pending) -> None:
        self._pending.pop(pending.sock.fileno(), None)
        try:
            self._selector.unregister(pending.sock)
        except (KeyError, ValueError):
            pass
        with self._lock:
            self._release(self._counts.pending, pending.host)

    def _drop(self, pending: _Pending, kind: str | None, message: str, *args: Any, abort: int | None = None) -> None:
        self._forget(pending)
        if abort is not None:
            _send_quietly(pending.sock, a_abort_pdu(abort))
        _close(pending.sock)
        if kind is not None:
            REFUSALS.warning(kind, "connection from %s closed: " + message, escape(pending.host), *args)

    def _admit(self, pending: _Pending) -> None:
        self._forget(pending)
        sock = pending.sock
        with self._lock:
            self._counts.handing_off[pending.host] += 1
        try:
            if pending.lowat != 1:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
            if pending.tls:
                # OpenSSL would turn a kernel timeout into "want read", which a blocking SSLSocket retries forever.
                sock.settimeout(self.policy.network_timeout)
            else:
                # Blocking, as pynetdicom expects, but a peer that stalls inside a PDU (or stops reading) ends the
                # read or write after network_timeout. Kernel timeouts rather than settimeout(): those would add a
                # poll() before every 4 KiB recv of pynetdicom's read loop.
                sock.setblocking(True)
                seconds = self.policy.network_timeout
                timeval = struct.pack("ll", int(seconds), int((seconds % 1) * 1_000_000))
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
            pending.hand_off(sock, pending.address)
        except Exception:
            LOG.exception("could not start the association from %s", escape(pending.host))
            self.handed_off_done(pending.host)
            _close(sock)


class GuardedAssociationSocket(AssociationSocket):
    """pynetdicom's ``AssociationSocket``, refusing PDUs that declare more than ``policy.pdu_limit(type)`` bytes.

    pynetdicom's upper layer reads each PDU with two ``recv`` calls: the 6-byte header, then (for the seven known
    PDU types) exactly the declared length. This class sees the header, and on a length over the limit sends an
    A-ABORT, shuts the socket down and returns nothing, which pynetdicom treats as a closed connection (its
    association ends as aborted). One extra Python call per PDU, not per 4 KiB read.

    ``GuardedRequestHandler`` turns the ``AssociationSocket`` that pynetdicom builds for each connection into one of
    these (``__class__`` assignment: the constructor, which queues the state machine's first event, runs once and
    unchanged).
    """

    guard_host = "?"
    guard_policy = AdmissionPolicy()
    _guard_in_body = False  # the next recv reads the body of the PDU whose header was just read
    _guard_refused = False

    def recv(self, nr_bytes: int) -> bytearray:
        if self._guard_refused:
            return bytearray()
        if self._guard_in_body:
            self._guard_in_body = False
            return super().recv(nr_bytes)
        data = super().recv(nr_bytes)
        if nr_bytes == 6 and len(data) == 6:
            pdu_type, _, length = struct.unpack(">BBL", data)
            if pdu_type in KNOWN_PDU_TYPES:  # pynetdicom reads the body of these only
                limit = self.guard_policy.pdu_limit(pdu_type)
                if limit is not None and length > limit:
                    self._guard_refuse(pdu_type, length, limit)
                    return bytearray()
                self._guard_in_body = True
        return data

    def _guard_refuse(self, pdu_type: int, length: int, limit: int) -> None:
        self._guard_refused = True
        key = "network.max_pdu_size" if pdu_type == P_DATA_TF else "network.max_association_request_size"
        REFUSALS.warning("pdu", "association from %s aborted: PDU type 0x%02X declares %d bytes, more than %d (%s)",
                         escape(self.guard_host), pdu_type, length, limit, key)
        if self.socket is not None:
            _send_quietly(self.socket, a_abort_pdu(ABORT_INVALID_PARAMETER))
            try:
                self.socket.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class GuardedRequestHandler(RequestHandler):
    """pynetdicom's request handler; the association's socket gets the PDU size guard."""

    server: AdmissionServer

    def _create_association(self) -> Any:
        assoc = super()._create_association()
        sock: Any = assoc.dul.socket  # given the guard's class, and its two attributes, in place
        sock.__class__ = GuardedAssociationSocket
        sock.guard_host = str(self.client_address[0])
        sock.guard_policy = self.server.policy
        return assoc


class AdmissionServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the admission gate in front (module docstring).

    Built by ``AE.make_server(..., server_class=AdmissionServer, policy=...)``; ``tls_context``: a TLS port (the
    gate does the handshake; never pynetdicom's own ``ssl_context``, whose handshake blocks the accept loop);
    ``gate``: share another server's gate (one pending budget and per-address cap for both ports).
    """

    daemon_threads = True  # the short-lived threads that start each Association

    def __init__(self, *args: Any, policy: AdmissionPolicy, tls_context: ssl.SSLContext | None = None,
                 gate: AdmissionGate | None = None, **kwargs: Any) -> None:
        self.policy = policy
        self.tls_context = tls_context
        kwargs.setdefault("request_handler", GuardedRequestHandler)
        super().__init__(*args, **kwargs)
        if gate is None:
            gate = AdmissionGate(policy, self._hand_off, self._associations_from)
            gate.start()
        self.gate = gate

    def process_request(self, request: Any, client_address: Any) -> None:  # the accept loop, per connection
        self.gate.admit(request, client_address, self._hand_off, self.tls_context)

    def _hand_off(self, sock: socket.socket, client_address: Any) -> None:  # the gate thread
        ThreadingMixIn.process_request(self, sock, client_address)

    def finish_request(self, request: Any, client_address: Any) -> None:  # the hand-off thread
        try:
            super().finish_request(request, client_address)  # creates and starts the Association thread
        finally:
            self.gate.handed_off_done(str(client_address[0]))

    def _associations_from(self, host: str) -> int:
        """Live acceptor associations of this server's AE (every port it listens on) from ``host``."""
        count = 0
        for assoc in self.ae.active_associations:
            try:
                if assoc.is_acceptor and assoc.is_alive() and str(assoc.requestor.address) == host:
                    count += 1
            except Exception:  # an Association being torn down
                continue
        return count

    def shutdown(self) -> None:
        """Stop accepting, close the listening socket and every connection that has not yet associated."""
        super().shutdown()
        self.gate.stop()


def force_close(assoc: Any) -> None:
    """Shut down an association's socket: wakes its upper-layer thread even when it is blocked in ``recv``."""
    sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
