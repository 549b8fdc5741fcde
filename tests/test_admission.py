"""Association admission against real traffic on loopback: half-open and idle connections, oversized PDUs, the
per-address cap, the called AE title and shutdown with such connections open (dicom_node/admission.py).

The attacker side is raw sockets (or pynetdicom, to bind 127.0.0.2 or to break an established association); the
legitimate modality is DCMTK's storescu/echoscu. Every loop here is bounded in count and time.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest

from .dicomgen import clone_instances, synthetic_dx
from .support.dicom_tools import PEER_ENV, require_tool, storescu

HOST = "127.0.0.1"
RQ_PREFIX = b"\x01\x00" + struct.pack(">L", 205) + b"\x00\x01\x00\x00" + b"PNEUMO"
"""The first 16 bytes of an A-ASSOCIATE-RQ that announces 205 bytes: header, protocol version, part of the
called AE title."""
assert len(RQ_PREFIX) == 16


@pytest.fixture
def small_file(tmp_path) -> Path:
    return clone_instances(synthetic_dx(64, 64), tmp_path / "in", 1)[0]


def connect(port: int, source: str = HOST, first_bytes: bytes = b"") -> socket.socket:
    sock = socket.create_connection((HOST, port), timeout=5, source_address=(source, 0))
    if first_bytes:
        sock.sendall(first_bytes)
    return sock


def closed_by_peer(sock: socket.socket, within: float) -> bool:
    """True when the node closes the connection (EOF, reset, or an A-ABORT followed by EOF) within ``within`` s."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            data = sock.recv(65536)
        except TimeoutError:
            return False
        except OSError:  # connection reset
            return True
        if not data:
            return True
    return False


def still_open(sock: socket.socket) -> bool:
    """Non-blocking check from our side: nothing received and no EOF yet."""
    sock.setblocking(False)
    try:
        return sock.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        sock.settimeout(5)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def echo(port: int, called: str = "PNEUMOCAD") -> subprocess.CompletedProcess:
    require_tool("echoscu")
    return subprocess.run(["echoscu", "-to", "10", "-aec", called, HOST, str(port)], env=PEER_ENV,
                          capture_output=True, text=True, timeout=30)


def pynetdicom_association(port: int, source: str = HOST):
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title="RAWPEER")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 10
    return ae.associate(HOST, port, ae_title="PNEUMOCAD", bind_address=(source, 0))


@pytest.mark.parametrize("first_bytes", [RQ_PREFIX, b""], ids=["half_open_request", "idle_socket"])
def test_ten_stalled_connections_do_not_lock_out_a_sender(node_factory, small_file, first_bytes):
    """Ten connections that stall before a complete A-ASSOCIATE-RQ are pending, not associations: storescu is served
    at once while they are open (max_associations is 10), and the node closes them at the admission deadline."""
    deadline = 4.0
    node = node_factory(network__association_request_deadline=str(deadline),
                        network__max_connections_per_address="0").start()  # this test is about pending ones
    stalled = [connect(node.port, first_bytes=first_bytes) for _ in range(10)]
    try:
        opened = time.monotonic()
        time.sleep(0.3)  # all ten accepted and pending
        sent = storescu(node.port, [small_file], timeout=30)
        assert sent.statuses == [(str(small_file), "Success")], sent.output
        assert time.monotonic() - opened < deadline
        assert all(still_open(s) for s in stalled), "the stalled connections were closed before the deadline"
        assert all(closed_by_peer(s, deadline + 3) for s in stalled), "the node kept a stalled connection open"
        assert time.monotonic() - opened < deadline + 3
    finally:
        for sock in stalled:
            sock.close()
    assert "no complete A-ASSOCIATE-RQ within 4.0 s" in node.log()
    assert echo(node.port).returncode == 0


def test_pending_connections_beyond_their_cap_close_the_oldest(node_factory, small_file):
    node = node_factory(network__max_pending_connections="4", network__max_connections_per_address="0",
                        network__association_request_deadline="30").start()
    idle = []
    try:
        for _ in range(4):
            idle.append(connect(node.port))
            time.sleep(0.05)  # accepted in this order
        time.sleep(0.2)
        assert all(still_open(s) for s in idle)
        idle.append(connect(node.port))  # a fifth: the first one goes
        assert closed_by_peer(idle[0], 3)
        assert all(still_open(s) for s in idle[1:])
        sent = storescu(node.port, [small_file], timeout=30)  # evicts the second, then is admitted at once
        assert sent.statuses == [(str(small_file), "Success")], sent.output
        assert closed_by_peer(idle[1], 3) and all(still_open(s) for s in idle[2:])
    finally:
        for sock in idle:
            sock.close()
    assert "(network.max_pending_connections); this one had waited longest" in node.log()


def test_sigterm_ends_stalled_connections_within_the_grace_period(node_factory):
    """Half-open and idle connections, plus an association stalled in the middle of a P-DATA PDU (its reader is
    blocked in recv): SIGTERM still stops the node, exit status 0, within the grace period (dimse_timeout)."""
    grace = 3.0
    node = node_factory(network__dimse_timeout=str(grace), network__max_connections_per_address="0").start()
    stalled = [connect(node.port, first_bytes=RQ_PREFIX) for _ in range(5)]
    stalled += [connect(node.port) for _ in range(5)]
    assoc = pynetdicom_association(node.port)
    try:
        assert assoc.is_established
        assoc.dul.socket.socket.sendall(b"\x04\x00" + struct.pack(">L", 1000) + b"\x00\x00")  # 8 of 1006 bytes
        time.sleep(0.3)
        started = time.monotonic()
        node.proc.send_signal(signal.SIGTERM)
        assert node.proc.wait(grace + 5) == 0, node.log()
        assert time.monotonic() - started < grace + 5
        assert all(closed_by_peer(s, 2) for s in stalled)
    finally:
        for sock in stalled:
            sock.close()
        with contextlib.suppress(Exception):
            assoc.abort()
    assert "SIGTERM received" in node.log() and "stopped (1 association(s) aborted" in node.log()


def test_oversized_association_request_is_refused_without_buffering(node_factory):
    node = node_factory().start()
    assert echo(node.port).returncode == 0  # warm: first association's allocations are not counted below
    before = rss_kib(node.proc.pid)

    sock = connect(node.port, first_bytes=b"\x01\x00" + struct.pack(">L", 2**30))  # declares 1 GiB
    sent = 0
    with contextlib.suppress(OSError):
        chunk = b"\0" * 65536
        sock.settimeout(2)
        while sent < 3 * 2**20:  # at most 3 MiB
            sock.sendall(chunk)
            sent += len(chunk)
    assert closed_by_peer(sock, 5), "the oversized A-ASSOCIATE-RQ was not refused"
    sock.close()
    assert rss_kib(node.proc.pid) - before < 2048, "the node buffered the oversized request"

    other = connect(node.port, first_bytes=b"\x04\x00" + struct.pack(">L", 10) + b"\0" * 10)  # P-DATA first
    assert other.recv(10) == b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x02"  # A-ABORT: unexpected PDU
    assert closed_by_peer(other, 5)
    other.close()

    assert echo(node.port).returncode == 0
    log = node.log()
    assert "A-ASSOCIATE-RQ declares 1073741824 bytes, more than 262144" in log
    assert "first PDU has type 0x04" in log


def test_per_address_cap_refuses_one_address_and_serves_another(node_factory, small_file):
    cap = 3
    node = node_factory(network__max_connections_per_address=str(cap),
                        network__association_request_deadline="30").start()
    held = pynetdicom_association(node.port)  # associations count towards the cap too
    idle = [connect(node.port) for _ in range(cap - 1)]
    try:
        assert held.is_established
        time.sleep(0.3)
        over = connect(node.port)
        assert closed_by_peer(over, 3), "a connection beyond the per-address cap was kept"
        over.close()
        refused = storescu(node.port, [small_file], timeout=30)
        assert refused.returncode != 0 and not refused.statuses, refused.output

        other = pynetdicom_association(node.port, source="127.0.0.2")
        try:
            assert other.is_established
            assert other.send_c_echo().Status == 0x0000
        finally:
            other.release()
        assert all(still_open(s) for s in idle)
    finally:
        for sock in idle:
            sock.close()
        held.release()
    for _ in range(10):  # once the node has seen the closes (at most a few seconds), 127.0.0.1 is served again
        time.sleep(0.3)
        served = storescu(node.port, [small_file], timeout=30)
        if served.statuses:
            break
    assert served.statuses == [(str(small_file), "Success")], served.output
    assert "connection from 127.0.0.1 refused: 3 connections from this address are open" in node.log()


@pytest.mark.parametrize("accept_any", [False, True])
def test_called_ae_title_is_checked_unless_any_is_accepted(node_factory, small_file, accept_any):
    node = node_factory(network__accept_any_called_aet=str(accept_any).lower()).start()
    cmd = ["storescu", "-v", "-aec", "WRONG", HOST, str(node.port), str(small_file)]
    wrong = subprocess.run(cmd, env=PEER_ENV, capture_output=True, text=True, timeout=30)
    output = wrong.stdout + wrong.stderr
    if accept_any:
        assert wrong.returncode == 0 and "Received Store Response (Success)" in output, output
    else:
        assert wrong.returncode != 0 and "Called AE Title Not Recognized" in output, output
        assert "rejected" in node.log()
    right = storescu(node.port, [small_file])
    assert right.statuses == [(str(small_file), "Success")], right.output


def test_oversized_p_data_pdu_aborts_the_association(node_factory, tmp_path):
    node = node_factory().start()  # the default network.max_pdu_size
    assoc = pynetdicom_association(node.port)
    assert assoc.is_established and assoc.acceptor.maximum_length == 131072
    before = rss_kib(node.proc.pid)
    raw = assoc.dul.socket.socket
    with contextlib.suppress(OSError):
        raw.sendall(b"\x04\x00" + struct.pack(">L", 64 * 2**20))  # declares 64 MiB
        raw.settimeout(2)
        for _ in range(32):  # 2 MiB of it at most
            raw.sendall(b"\0" * 65536)
    deadline = time.monotonic() + 5
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.05)
    assert assoc.is_aborted, "the node did not abort the association"
    assert rss_kib(node.proc.pid) - before < 2048
    assert "PDU type 0x04 declares 67108864 bytes, more than 131072 (network.max_pdu_size)" in node.log()

    (large,) = clone_instances(synthetic_dx(1024, 1024), tmp_path / "large", 1)  # 2 MiB, 16 full PDUs
    sent = storescu(node.port, [large])
    assert sent.statuses == [(str(large), "Success")], sent.output
    assert "Max Send PDV: 131060" in sent.output, sent.output
