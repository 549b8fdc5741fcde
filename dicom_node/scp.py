"""The Storage SCP: association policy and two small handlers (C-ECHO, C-STORE) around ``Intake``.

Received datasets are streamed by pynetdicom straight into a temporary file (``STORE_RECV_CHUNKED_DATASET``)
under the archive's ``tmp/`` directory, so the C-STORE handler never holds, decodes or re-encodes the dataset. Both
are process-wide settings, made once at start-up by ``dicom_node.netsetup.configure_pynetdicom``; ``start`` refuses
to listen without them.

Connections reach pynetdicom only through the admission gate of ``dicom_node.admission`` (``AdmissionServer``,
passed to ``AE.make_server`` as its server class): pynetdicom's own server lets half-open connections take the
association slots and block shutdown, and trusts any declared PDU length; that module's docstring says how and why.
The called AE title must be ours (``network.ae_title``) unless ``network.accept_any_called_aet`` is set.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import cast

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # generated at import time

from ai.safe_text import escape

from .admission import AdmissionPolicy, AdmissionServer, force_close
from .config import NodeConfig
from .intake import Intake
from .netsetup import require_configured

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


def _handle_store(event: evt.Event, intake: Intake) -> int | Dataset:
    request = cast(C_STORE, event.request)
    outcome = intake.store(
        tmp_file=Path(event.dataset_path),
        calling_aet=event.assoc.requestor.ae_title.strip(),
        request_sop_class=str(request.AffectedSOPClassUID),
        request_sop_instance=str(request.AffectedSOPInstanceUID),
        transfer_syntax=str(event.context.transfer_syntax),
    )
    if outcome.status == 0x0000:
        return 0x0000
    status = Dataset()
    status.Status = outcome.status
    status.ErrorComment = outcome.comment[:64]
    return status


def _log_rejection(event: evt.Event) -> None:
    LOG.warning("association from %s (%s) rejected", escape(event.assoc.requestor.ae_title.strip()),
                escape(event.assoc.requestor.address))


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
        self._server: AdmissionServer | None = None

    def start(self) -> None:
        # Datasets stream to files in the archive's tmp/ (same file system, so placing them is a rename).
        require_configured(self.intake.archive.tmp_dir)
        handlers = [
            (evt.EVT_C_ECHO, _handle_echo),
            (evt.EVT_C_STORE, _handle_store, [self.intake]),
            (evt.EVT_REJECTED, _log_rejection),
            *self.intake.reception.handlers(),  # partial receptions removed at once, reserve checked mid-transfer
        ]
        address = (self.config.network.bind_address, self.config.network.port)
        # What AE.start_server(block=False) does, with the admission gate as the server class.
        server = cast(AdmissionServer, self.ae.make_server(
            address, evt_handlers=handlers, server_class=AdmissionServer,
            policy=AdmissionPolicy.from_settings(self.config.network)))
        threading.Thread(target=server.serve_forever, name="AcceptorServer", daemon=True).start()
        self.ae._servers.append(server)  # AssociationServer.shutdown removes it from there
        self._server = server

    @property
    def pending_connections(self) -> int:
        """Connections still waiting for their complete A-ASSOCIATE-RQ (not associations)."""
        return self._server.gate.pending_count if self._server else 0

    def stop(self, grace_seconds: float) -> int:
        """Close the listening socket and every connection that has not associated yet, wait up to
        ``grace_seconds`` for open associations, abort the rest.

        Aborting is safe for the sender: nothing is acknowledged before it is durable. An association whose peer
        stalls inside a PDU cannot even process the abort (its thread is blocked reading), so after one more second
        its socket is shut down. Returns how many were aborted.
        """
        if self._server is None:
            return 0
        server, self._server = self._server, None
        server.shutdown()
        active = server.active_associations
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
        return len(aborted)
