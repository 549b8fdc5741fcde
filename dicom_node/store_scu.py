"""A plain C-STORE client (Storage SCU): one association to a peer, several objects over it.

For each SOP class to send, the association proposes the objects' own transfer syntaxes and, in a separate
presentation context, the uncompressed fallback (Explicit VR Little Endian, Implicit VR Little Endian), so that a
peer that accepts the object's own syntax receives the file's bytes unchanged (streamed from disk), and a peer that
does not still receives the object, decoded (decompressed if need be) to an uncompressed syntax it accepted.

Nothing here knows about the database or the retry policy: see ``dicom_node.export``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.presentation import PresentationContext, build_context

LOG = logging.getLogger("dicom_node.store_scu")

UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
WARNING_STATUSES = frozenset({0xB000, 0xB006, 0xB007})
"""Storage warnings (coercion, elements discarded, data set does not match SOP class): the peer kept the object."""
MAX_CONTEXTS = 128  # PS3.8: presentation context IDs are odd numbers 1-255


def is_stored(status: int | None) -> bool:
    return status == 0x0000 or status in WARNING_STATUSES


@dataclass(frozen=True)
class Peer:
    ae_title: str
    host: str
    port: int

    @classmethod
    def from_config(cls, table: Mapping[str, Any]) -> "Peer":
        return cls(str(table["ae_title"]), str(table["host"]), int(table["port"]))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class StoreItem:
    path: Path
    sop_class_uid: str
    transfer_syntax_uid: str


@dataclass(frozen=True)
class StoreOutcome:
    """``stored``: the peer acknowledged it (success or warning). ``local``: the failure is on our side (file
    missing or undecodable) and sending again will not help."""

    stored: bool
    status: int | None = None
    error: str | None = None
    local: bool = False


class PeerUnreachable(ConnectionError):
    """No association could be established with any of the peers tried (refused, rejected, aborted, timed out)."""


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
    """Our Storage SCU: ``calling_ae_title`` and one ``timeout`` for the TCP connection, ACSE, DIMSE and network."""

    def __init__(self, calling_ae_title: str, timeout: float) -> None:
        # Send files as they are on disk (no decode, no re-encode) whenever the peer accepts their own syntax.
        _config.STORE_SEND_CHUNKED_DATASET = True
        self.ae = AE(ae_title=calling_ae_title)
        self.ae.connection_timeout = timeout
        self.ae.acse_timeout = timeout
        self.ae.dimse_timeout = timeout
        self.ae.network_timeout = timeout

    def open(self, peers: Sequence[Peer], items: Sequence[StoreItem]) -> "StoreAssociation":
        """Associate with the first peer of ``peers`` that accepts; raises PeerUnreachable naming every failure."""
        contexts = requested_contexts(items)
        problems = []
        for peer in peers:
            rejection: list[str] = []
            connected: list[bool] = []

            def _on_acse(event: evt.Event, rejection: list[str] = rejection) -> None:
                primitive = event.primitive  # type: ignore[attr-defined]
                if isinstance(primitive, A_ASSOCIATE) and primitive.result not in (None, 0x00):
                    rejection.append(f"{primitive.result_str}, {primitive.source_str}: {primitive.reason_str}")

            def _on_connect(_event: evt.Event, connected: list[bool] = connected) -> None:
                connected.append(True)

            assoc = self.ae.associate(peer.host, peer.port, contexts=contexts, ae_title=peer.ae_title,
                                      evt_handlers=[(evt.EVT_ACSE_RECV, _on_acse), (evt.EVT_CONN_OPEN, _on_connect)])
            if assoc.is_established:
                return StoreAssociation(assoc, peer)
            if not connected:
                problems.append(f"{peer} could not be reached (connection refused or timed out)")
            elif assoc.is_rejected:
                problems.append(f"{peer} rejected the association ({rejection[0] if rejection else 'no reason'})")
            else:
                problems.append(f"{peer} aborted or did not answer the association request")
        raise PeerUnreachable("; ".join(problems))


class StoreAssociation:
    """An established association; ``store`` one object after another, then ``release`` (or use ``with``)."""

    def __init__(self, assoc: Association, peer: Peer) -> None:
        self.assoc = assoc
        self.peer = peer
        self._message_id = 0

    def __enter__(self) -> "StoreAssociation":
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
            return StoreOutcome(False, error=f"association with {self.peer} was lost")
        accepted = self._accepted(item.sop_class_uid)
        if item.transfer_syntax_uid in accepted:
            payload: Path | Any = item.path  # streamed as is: the peer receives the file's bytes
            if not item.path.is_file():
                return StoreOutcome(False, error=f"file {item.path} is missing", local=True)
        elif any(ts in UNCOMPRESSED for ts in accepted):
            try:
                payload = dcmread(item.path)
                if payload.file_meta.TransferSyntaxUID.is_compressed:
                    # A change of transfer syntax keeps the instance: same SOP Instance UID.
                    payload.decompress(generate_instance_uid=False)
            except FileNotFoundError:
                return StoreOutcome(False, error=f"file {item.path} is missing", local=True)
            except Exception as exc:  # noqa: BLE001 - any decoder error: this object cannot go uncompressed
                return StoreOutcome(False, error=f"cannot decode {item.path.name} for an uncompressed syntax: "
                                                 f"{type(exc).__name__}: {exc}", local=True)
            LOG.debug("%s: %s not accepted by %s, sending it decoded", item.path.name,
                      UID(item.transfer_syntax_uid).name, self.peer)
        else:
            return StoreOutcome(False, error=f"{self.peer} accepted no presentation context for "
                                             f"{UID(item.sop_class_uid).name} in "
                                             f"{UID(item.transfer_syntax_uid).name} or uncompressed")
        self._message_id = self._message_id % 65535 + 1
        try:
            response = self.assoc.send_c_store(payload, msg_id=self._message_id)
        except (ValueError, AttributeError) as exc:  # no usable context, or the file lacks its meta information
            return StoreOutcome(False, error=f"cannot send {item.path.name}: {exc}")
        status = response.get("Status") if response else None
        if status is None:
            return StoreOutcome(False, error=f"no C-STORE response from {self.peer} (timeout, abort or connection "
                                             "closed)")
        status = int(status)
        if is_stored(status):
            return StoreOutcome(True, status=status)
        comment = response.get("ErrorComment")
        return StoreOutcome(False, status=status, error=f"{self.peer} answered status 0x{status:04X}"
                                                        + (f" ({comment})" if comment else ""))
