"""DICOM TLS with DCMTK as the peer (dicom_node/tls.py, the gate's handshake stage in dicom_node/admission.py, the
exporter's TLS destinations): storescu +tls into a real node's TLS port, certificates from a wrong CA or none refused,
a client that never finishes its handshake neither blocks others nor stays, storescp +tls as the PACS.

Certificates are made per module by ``tests/support/certs.py``; one node serves every intake test (plain and TLS
port, client certificates required, a 2 s handshake timeout).
"""

from __future__ import annotations

import re
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import select
from sqlalchemy.orm import Session

from db.engine import init_schema, make_engine
from db.models import AssociationRecord, ExportState, Instance
from dicom_node.config import ConfigError, load_config
from dicom_node.netsetup import configure_pynetdicom
from dicom_node.tls import check_files

from .dicomgen import clone_instances, synthetic_dx
from .support.certs import TestCertificates, make_certificates
from .support.data import CONFIG
from .support.dicom_tools import PEER_ENV, require_tool, storescu
from .support.logs import node_log_output
from .support.net import free_port
from .support.node import Node, open_db
from .test_export import SR, Site, _listening

HANDSHAKE_TIMEOUT = 2.0
NETWORK_TIMEOUT = 1.0
PARTIAL_CLIENT_HELLO = bytes.fromhex("16030100c8010000c40303") + b"\x00" * 8
"""A TLS record header announcing a 200-byte ClientHello, and the first 13 bytes of it: then nothing."""


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> TestCertificates:
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def tls_node(tmp_path_factory, certs):
    node = Node(root=tmp_path_factory.mktemp("tls-node"), port=free_port(), overrides={
        "tls.port": str(free_port()), "tls.certificate": str(certs.node.cert), "tls.private_key": str(certs.node.key),
        "tls.ca_bundle": str(certs.ca.cert), "tls.require_client_certificate": "true",
        "tls.handshake_timeout": str(HANDSHAKE_TIMEOUT), "network.network_timeout": str(NETWORK_TIMEOUT)})
    node.start()
    yield node
    node.kill()


@pytest.fixture(scope="module")
def small_files(tmp_path_factory) -> list[Path]:
    return clone_instances(synthetic_dx(64, 64), tmp_path_factory.mktemp("in"), 4)


def tls_port(node: Node) -> int:
    return int(node.overrides["tls.port"])


def tls_flags(certs: TestCertificates, pair=None) -> list[str]:
    pair = pair or certs.modality
    return ["+tls", str(pair.key), str(pair.cert), "+cf", str(certs.ca.cert)]


def s_client(node: Node, certs: TestCertificates, *flags: str) -> subprocess.CompletedProcess:
    """openssl s_client with the modality's certificate: the handshake, then EOF (no association request)."""
    return subprocess.run(
        [require_tool("openssl"), "s_client", "-connect", f"127.0.0.1:{tls_port(node)}", "-CAfile", str(certs.ca.cert),
         "-cert", str(certs.modality.cert), "-key", str(certs.modality.key), "-verify_return_error", *flags],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)


def wait_for(predicate, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())


def closed_by_peer(sock: socket.socket, within: float) -> bool:
    sock.settimeout(within)
    try:
        return sock.recv(4096) == b""
    except TimeoutError:
        return False
    except OSError:  # reset
        return True


def still_open(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        sock.recv(4096)
        return False  # EOF or data: the node answered or closed it
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        sock.setblocking(True)


# -- the Storage SCP's TLS port ---------------------------------------------------------------------------------------

def test_storescu_over_tls_is_stored_and_recorded_as_tls(tls_node, certs, small_files):
    assert f"TLS Storage SCP on 0.0.0.0:{tls_port(tls_node)} (TLS 1.2 or later, client certificate required" \
        in tls_node.log()
    assert f"listening on 0.0.0.0:{tls_node.port} and {tls_port(tls_node)} (TLS);" in tls_node.log()
    result = storescu(tls_port(tls_node), small_files[:1], *tls_flags(certs), aet="TLSMOD", timeout=30)
    assert result.statuses == [(str(small_files[0]), "Success")], result.output
    tls12 = s_client(tls_node, certs, "-tls1_2")  # BCP 195's TLS 1.2 suites: forward secrecy, AEAD
    assert tls12.returncode == 0 and "Protocol  : TLSv1.2" in tls12.stdout, tls12.stdout + tls12.stderr
    assert "Cipher    : ECDHE-" in tls12.stdout and "GCM" in tls12.stdout, tls12.stdout
    assert s_client(tls_node, certs, "-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-SHA256").returncode != 0  # CBC
    plain = storescu(tls_node.port, small_files[1:2], aet="PLAINMOD", timeout=30)  # the plain port beside it
    assert plain.statuses == [(str(small_files[1]), "Success")], plain.output

    engine = open_db(tls_node)
    uids = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in small_files[:2]}
    with Session(engine) as session:
        assert set(session.scalars(select(Instance.sop_instance_uid))) >= uids

    def recorded() -> dict[str, bool]:
        with Session(engine) as session:
            return {r.calling_aet: r.tls for r in session.scalars(select(AssociationRecord))}

    assert wait_for(lambda: {"TLSMOD", "PLAINMOD"} <= set(recorded()), 5), recorded()
    assert recorded()["TLSMOD"] is True and recorded()["PLAINMOD"] is False


def test_wrong_or_missing_client_certificate_is_refused(tls_node, certs, small_files):
    wrong = storescu(tls_port(tls_node), small_files[2:3], *tls_flags(certs, certs.wrong_modality), aet="WRONGCA",
                     timeout=30)
    anonymous = storescu(tls_port(tls_node), small_files[2:3], "+tla", "+cf", str(certs.ca.cert), aet="NOCERT",
                         timeout=30)
    for result in (wrong, anonymous):
        assert result.returncode != 0 and not result.statuses, result.output
    # TLS 1.1, with the client's own security level lowered so that it offers it
    old_protocol = s_client(tls_node, certs, "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0")
    assert old_protocol.returncode != 0, old_protocol.stdout
    assert wait_for(lambda: "TLS handshake failed (CERTIFICATE_VERIFY_FAILED" in tls_node.log()
                    and "TLS handshake failed (PEER_DID_NOT_RETURN_A_CERTIFICATE" in tls_node.log()
                    and "TLS handshake failed (UNSUPPORTED_PROTOCOL" in tls_node.log(), 5), \
        tls_node.log()[-3000:]
    line = next(x for x in tls_node.log().splitlines() if "CERTIFICATE_VERIFY_FAILED" in x)
    assert " WARNING dicom_node.admission: connection from 127.0.0.1 closed: TLS handshake failed" in line
    engine = open_db(tls_node)
    with Session(engine) as session:  # refused before any association existed
        assert not set(session.scalars(select(AssociationRecord.calling_aet))) & {"WRONGCA", "NOCERT"}


def test_stalled_handshake_blocks_nobody_and_is_closed_after_the_timeout(tls_node, certs, small_files):
    silent = socket.create_connection(("127.0.0.1", tls_port(tls_node)), timeout=5)
    partial = socket.create_connection(("127.0.0.1", tls_port(tls_node)), timeout=5)
    partial.sendall(PARTIAL_CLIENT_HELLO)
    opened = time.monotonic()
    try:
        result = storescu(tls_port(tls_node), small_files[3:4], *tls_flags(certs), aet="CONCURRENT", timeout=30)
        took = time.monotonic() - opened
        assert result.statuses == [(str(small_files[3]), "Success")], result.output
        # Done while both stalled handshakes are still pending: nothing waited for them to be dropped.
        assert took < HANDSHAKE_TIMEOUT - 0.2, f"storescu took {took:.2f} s"
        assert still_open(silent) and still_open(partial), "stalled handshakes were closed to let storescu in"
        for sock in (silent, partial):
            assert closed_by_peer(sock, max(0.1, opened + HANDSHAKE_TIMEOUT + 2.0 - time.monotonic()))
        assert time.monotonic() - opened >= HANDSHAKE_TIMEOUT - 0.1
    finally:
        silent.close()
        partial.close()
    assert wait_for(lambda: f"TLS handshake not complete within {HANDSHAKE_TIMEOUT:.1f} s (tls.handshake_timeout)"
                    in tls_node.log(), 3)


def test_tls_only_node_without_client_certificates(tmp_path, certs, small_files):
    port = free_port()
    node = Node(root=tmp_path, port=port, overrides={
        "network.port": "0", "tls.port": str(port), "tls.certificate": str(certs.node.cert),
        "tls.private_key": str(certs.node.key)}).start()  # no ca_bundle: clients are not asked for a certificate
    try:
        assert f"listening on 0.0.0.0:{port} (TLS);" in node.log()
        result = storescu(port, small_files[:1], "+tla", "+cf", str(certs.ca.cert), aet="ANONTLS", timeout=30)
        assert result.statuses == [(str(small_files[0]), "Success")], result.output
        assert node.stop() == 0  # a clean shutdown with the TLS server
    finally:
        node.kill()


def test_tls_association_stalled_inside_a_pdu_ends_after_the_network_timeout(tls_node, certs):
    """The associated TLS socket's timeout is its own (settimeout): the kernel's SO_RCVTIMEO would be retried by
    OpenSSL and the blocked read would last as long as the peer keeps the connection."""
    context = ssl.create_default_context(cafile=str(certs.ca.cert))
    context.load_cert_chain(str(certs.modality.cert), str(certs.modality.key))
    ae = AE(ae_title="STALLER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", tls_port(tls_node), ae_title="PNEUMOCAD", tls_args=(context, "localhost"))
    assert assoc.is_established
    try:
        started = time.monotonic()
        assoc.dul.socket.socket.sendall(b"\x04\x00\x00\x00\x00\x10\x00\x00")  # a P-DATA-TF of 16 bytes: 2 sent
        assert wait_for(lambda: not assoc.is_established, NETWORK_TIMEOUT + 3), "the node kept the stalled association"
        assert time.monotonic() - started >= NETWORK_TIMEOUT - 0.2
    finally:
        if assoc.is_established:
            assoc.abort()


# -- the exporter with storescp +tls as the PACS ----------------------------------------------------------------------

class TlsStoreSCP:
    """DCMTK storescp +tls: requires and verifies our certificate against the site CA (``-rc``, its default)."""

    def __init__(self, root: Path, certs: TestCertificates, pair) -> None:
        self.root, self.port = root, free_port()
        self.out = root / "in"
        self.out.mkdir(parents=True)
        self.log = root / "storescp.log"
        require_tool("storescp")
        cmd = ["storescp", "-v", "-aet", "PACS", "-od", str(self.out), "+xa", "+tls", str(pair.key), str(pair.cert),
               "+cf", str(certs.ca.cert), str(self.port)]
        self.proc = subprocess.Popen(cmd, stdout=self.log.open("ab"), stderr=subprocess.STDOUT, env=PEER_ENV)
        assert wait_for(lambda: _listening(self.port) or self.proc.poll() is not None, 10), "storescp did not listen"
        assert self.proc.poll() is None, self.log.read_text()

    def destination(self, name: str) -> dict:
        return {"name": name, "ae_title": "PACS", "host": "127.0.0.1", "port": self.port, "tls": True}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@dataclass
class TlsSite(Site):
    """test_export's site, every configuration it loads with the node's TLS files."""

    tls: dict = field(default_factory=dict)

    def config(self, destinations: list[dict], **overrides: object):
        return super().config(destinations, **{**self.tls, **overrides})


def test_export_to_tls_pacs_and_refusal_of_a_pacs_from_another_ca(tmp_path, certs):
    configure_pynetdicom()
    good = TlsStoreSCP(tmp_path / "good", certs, certs.pacs)
    wrong = TlsStoreSCP(tmp_path / "wrong", certs, certs.wrong_pacs)  # its certificate: signed by the wrong CA
    try:
        (tmp_path / "var").mkdir()
        engine = make_engine(f"sqlite:///{tmp_path / 'var' / 'node.sqlite'}")
        init_schema(engine)
        site = TlsSite(tmp_path / "var", engine, tls={"tls__certificate": certs.node.cert,
                                                       "tls__private_key": certs.node.key,
                                                       "tls__ca_bundle": certs.ca.cert})
        destinations = [good.destination("tls-pacs"), wrong.destination("impostor")]
        site.add_result(SR, "sr", destinations)
        exporter = site.exporter(destinations)
        with node_log_output("INFO") as log:
            assert exporter.run_once() == 1
        received = list(good.out.iterdir())
        assert len(received) == 1 and dcmread(received[0]).SOPInstanceUID == dcmread(SR).SOPInstanceUID
        by_destination = {e.destination: e for e in site.exports()}
        assert by_destination["tls-pacs"].state == ExportState.SENT
        failed = by_destination["impostor"]
        assert failed.state == ExportState.PENDING and failed.attempts == 1, failed.last_error
        assert "TLS handshake failed (CERTIFICATE_VERIFY_FAILED" in (failed.last_error or ""), failed.last_error
        assert "impostor: attempt 1 failed" in log.getvalue() and "will retry" in log.getvalue()
        assert not list(wrong.out.iterdir())
    finally:
        good.stop()
        wrong.stop()


def test_tls_files_that_do_not_load_are_a_configuration_error(tmp_path, certs):
    bad = tmp_path / "not-a-cert.pem"
    bad.write_text("not a certificate\n")
    cases = {"tls.certificate": bad, "tls.private_key": certs.pacs.key, "tls.ca_bundle": tmp_path / "missing.pem"}

    def settings(key: str, value: Path) -> dict[str, str]:
        return {"network.port": str(free_port()), "tls.port": str(free_port()), "storage.storage_root": str(tmp_path),
                "tls.certificate": str(certs.node.cert), "tls.private_key": str(certs.node.key),
                "tls.ca_bundle": str(certs.ca.cert), key: str(value)}

    for key, value in cases.items():  # the check serve runs before it listens (dicom_node.runtime)
        with pytest.raises(ConfigError, match=f"^{re.escape(key)}: "):
            check_files(load_config(CONFIG, settings(key, value), environ={}).tls, server=True, client=True)
    overrides = settings("tls.certificate", bad)
    proc = Node(root=tmp_path / "cli", port=int(overrides["network.port"]), overrides=overrides).cli("serve")
    assert proc.returncode != 0 and "configuration error: tls.certificate: " in proc.stderr, proc.stderr
