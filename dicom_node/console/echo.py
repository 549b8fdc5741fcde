"""The destinations page's C-ECHO test: one Verification association from our AE title to each peer of a
destination (the peer, then its alternate), TLS for a ``tls = true`` destination, each step bounded.

pynetdicom's timeouts (``export.timeout_seconds``) bound each wait; the exporter's ``Watchdog`` bounds the whole
setup and the echo, so a peer that accepts and then trickles cannot hold the console's thread. The outcome is a
short, log-safe sentence (success and status, or refused, timed out, rejected with its reason, aborted, TLS
failure), never a library's exception text.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from pynetdicom import AE, evt
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from ai.safe_text import escape, exception_summary

from ..config import ConfigError, Destination, NodeConfig, Peer
from ..store_scu import Watchdog, cut
from ..tls import RecordingContext, client_context, handshake_failure


@dataclass(frozen=True)
class EchoOutcome:
    peer: str  # "AE@host:port", escaped
    role: str  # "peer" or "alternate"
    ok: bool
    outcome: str  # "success", "refused", "timeout", "rejected", "aborted", "failed", "tls"
    detail: str  # the sentence shown on the page
    milliseconds: int


def _tls_args(config: NodeConfig, peer: Peer) -> tuple[RecordingContext, str] | str:
    """(context, server host name) for pynetdicom, or why TLS cannot be used."""
    try:
        return client_context(config.tls), peer.host
    except ConfigError as exc:
        return f"TLS is not usable: {escape(str(exc), 300)}"


def echo_peer(config: NodeConfig, peer: Peer, *, use_tls: bool, role: str = "peer") -> EchoOutcome:
    """One C-ECHO to ``peer``; never raises for what the network or the peer does."""
    timeout = float(config.export.timeout_seconds)
    started = time.monotonic()

    def done(ok: bool, outcome: str, detail: str) -> EchoOutcome:
        return EchoOutcome(peer.safe, role, ok, outcome, detail, int((time.monotonic() - started) * 1000))

    tls_args = None
    if use_tls:
        made = _tls_args(config, peer)
        if isinstance(made, str):
            return done(False, "tls", made)
        tls_args = made
    ae = AE(ae_title=config.network.ae_title)
    ae.add_requested_context(Verification)
    ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    rejection: list[str] = []
    connected: list[bool] = []

    def on_acse(event: evt.Event) -> None:
        primitive = event.primitive  # type: ignore[attr-defined]
        if isinstance(primitive, A_ASSOCIATE) and primitive.result not in (None, 0x00):
            rejection.append(f"{primitive.result_str}, {primitive.source_str}: {primitive.reason_str}")

    try:
        with Watchdog(timeout) as dog:
            def on_connect(event: evt.Event) -> None:
                connected.append(True)
                dog.watch(event.assoc)

            assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, tls_args=tls_args,
                                 evt_handlers=[(evt.EVT_ACSE_RECV, on_acse), (evt.EVT_CONN_OPEN, on_connect)])
            if assoc.is_established and not dog.fired:
                status = assoc.send_c_echo()
                value = getattr(status, "Status", None) if status is not None else None
                if assoc.is_established:
                    assoc.release()
                if value is None:
                    why = "timed out" if dog.fired else "aborted"
                    return done(False, "timeout" if dog.fired else "aborted",
                                f"no C-ECHO response ({why} after {time.monotonic() - started:.1f} s)")
                if int(value) == 0x0000:
                    return done(True, "success", "success (status 0x0000)")
                return done(False, "failed", f"C-ECHO answered with status 0x{int(value):04X}")
            if assoc.is_established:
                cut(assoc)
    except Exception as exc:  # noqa: BLE001 - a broken peer or socket must give an answer, not a 500
        return done(False, "failed", f"the test failed ({exception_summary(exc)})")
    handshake = tls_args[0].handshake_error if tls_args else None
    if handshake is not None:
        return done(False, "tls", f"TLS handshake failed ({handshake_failure(handshake)})")
    if dog.fired:
        return done(False, "timeout", f"no answer within {timeout:g} s (export.timeout_seconds): timed out")
    if not connected:
        elapsed = time.monotonic() - started
        if elapsed >= timeout * 0.9:
            return done(False, "timeout", f"the connection timed out after {elapsed:.1f} s")
        return done(False, "refused", "connection refused (nothing listens there, or a firewall refused it)")
    if assoc.is_rejected:
        reason = escape(rejection[0], 200) if rejection else "no reason given"
        return done(False, "rejected", f"association rejected ({reason})")
    return done(False, "aborted", "the peer aborted or did not answer the association request")


def echo_destination(config: NodeConfig, destination: Destination) -> list[EchoOutcome]:
    """A C-ECHO to the destination's peer and, when it has one, to its alternate."""
    roles = ("peer", "alternate")
    return [echo_peer(config, peer, use_tls=destination.tls, role=roles[i])
            for i, peer in enumerate(destination.peers)]
