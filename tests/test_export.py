"""Export of result objects to PACS by C-STORE, with persisted retries: real peers (DCMTK storescp, a pynetdicom
SCP answering chosen statuses), real files, a real database (SQLite and PostgreSQL: ``db_backend``); no mocks."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, JPEGBaseline8Bit
from pynetdicom import AE, evt
from pynetdicom.presentation import StoragePresentationContexts
from sqlalchemy import select, update
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session

from db import exports as xq
from db.engine import init_schema, make_engine
from db.models import Event, Export, ExportState, Instance, Job, JobState, Result, utcnow
from dicom_node.archive import fsync_path
from dicom_node.config import load_config
from dicom_node.export import Exporter
from dicom_node.netsetup import configure_pynetdicom
from dicom_node.scheduler import NodeScheduler

from .conftest import CONFIG, PEER_ENV, REPO, SAMPLES, free_port, require_tool
from .support.dicom_files import dataset_bytes
from .support.page_cache import require_droppable_cache, resident_bytes
from .support.postgres import SQLITE_ONLY
from .support.sc_picture import red_ramp, write_sc

SR = SAMPLES / "reference-outputs" / "sr_document.dcm"
SEG = SAMPLES / "reference-outputs" / "seg_image_cr_binary.dcm"
J2KR = SAMPLES / "not-chest" / "RG3_J2KR.dcm"  # 0.8 MB JPEG 2000 lossless CR: a compressed object
SR2 = SAMPLES / "reference-outputs" / "sr_document_with_multiple_groups.dcm"
INITIAL = 0.2  # retry_initial_seconds in these tests


# -- peers ---------------------------------------------------------------------------------------------------------

def _listening(port: int) -> bool:
    needle = f":{port:04X} "
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        if any(line.split()[1].endswith(needle.strip()) and line.split()[3] == "0A" for line in lines):
            return True
    return False


@dataclass
class StoreSCP:
    """DCMTK storescp as the PACS; ``+B`` writes what it received bit for bit."""

    root: Path
    aet: str = "PACS"
    port: int = field(default_factory=free_port)
    accept_all: bool = True
    proc: subprocess.Popen | None = None

    @property
    def out(self) -> Path:
        return self.root / "in"

    @property
    def log_path(self) -> Path:
        return self.root / "storescp.log"

    def start(self) -> StoreSCP:
        require_tool("storescp")
        self.out.mkdir(parents=True, exist_ok=True)
        cmd = ["storescp", "-v", "-aet", self.aet, "-od", str(self.out), "+B", *(["+xa"] if self.accept_all else []),
               str(self.port)]
        self.proc = subprocess.Popen(cmd, stdout=self.log_path.open("ab"), stderr=subprocess.STDOUT, env=PEER_ENV)
        deadline = time.monotonic() + 10
        while not _listening(self.port):
            assert self.proc.poll() is None, self.log_path.read_text()
            assert time.monotonic() < deadline, "storescp did not listen"
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def files(self) -> list[Path]:
        return sorted(p for p in self.out.iterdir() if p.is_file())

    def associations(self) -> int:
        return self.log_path.read_text().count("Association Received")

    def destination(self, name: str = "pacs", **extra: object) -> dict:
        return {"name": name, "ae_title": self.aet, "host": "127.0.0.1", "port": self.port, **extra}


@pytest.fixture
def scp_factory(tmp_path):
    peers: list[StoreSCP] = []

    def make(**kwargs: object) -> StoreSCP:
        peer = StoreSCP(root=tmp_path / f"peer{len(peers)}", **kwargs)  # type: ignore[arg-type]
        peer.root.mkdir()
        peers.append(peer)
        return peer

    yield make
    for peer in peers:
        peer.stop()


class StatusSCP:
    """A pynetdicom Storage SCP that answers ``status`` to every C-STORE (and keeps what it accepted), or rejects
    every association when ``require_called_aet`` is set and we call it by another title; with ``abort_first`` it
    aborts the association under the first C-STORE it gets."""

    def __init__(self, aet: str = "PACS", status: int = 0x0000, require_called_aet: bool = False,
                 abort_first: bool = False) -> None:
        self.status = status
        self.abort_first = abort_first
        self.associations = 0
        self.received: list[str] = []
        self.in_store = threading.Event()  # set while a C-STORE is being answered
        self.release = threading.Event()  # cleared: C-STOREs wait for it
        self.release.set()
        self.port = free_port()
        ae = AE(ae_title=aet)
        ae.require_called_aet = require_called_aet
        ae.supported_contexts = StoragePresentationContexts
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._on_store),
                                                    (evt.EVT_ESTABLISHED, self._on_established)])

    def _on_established(self, _event: evt.Event) -> None:
        self.associations += 1

    def _on_store(self, event: evt.Event) -> int:
        if self.abort_first:
            self.abort_first = False
            event.assoc.abort()
            return 0xA700
        self.in_store.set()
        self.release.wait(10)
        self.in_store.clear()
        if self.status in (0x0000, 0xB000, 0xB006, 0xB007):
            self.received.append(str(event.request.AffectedSOPInstanceUID))
        return self.status

    def destination(self, name: str = "pacs", ae_title: str = "PACS") -> dict:
        return {"name": name, "ae_title": ae_title, "host": "127.0.0.1", "port": self.port}

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def status_scp():
    servers: list[StatusSCP] = []

    def make(**kwargs: object) -> StatusSCP:
        servers.append(StatusSCP(**kwargs))  # type: ignore[arg-type]
        return servers[-1]

    yield make
    for server in servers:
        server.stop()


def closed_destination(name: str = "pacs") -> dict:
    return {"name": name, "ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}


# -- the node's side: storage root, database, results --------------------------------------------------------------

@dataclass
class Site:
    root: Path
    engine: object
    database_url: str | None = None  # None: the SQLite file where the node finds it from storage_root
    counter: int = 0

    def settings(self) -> dict[str, str]:
        """Where the node's commands find this site: its storage root and, unless the default, its database."""
        return {"storage.storage_root": str(self.root),
                **({"database.url": self.database_url} if self.database_url else {})}

    def config(self, destinations: list[dict], **overrides: object):
        values = {**self.settings(), "export.destinations": json.dumps(destinations),
                  "export.retry_initial_seconds": str(INITIAL), "export.retry_max_seconds": "60",
                  "export.poll_seconds": "60", "export.timeout_seconds": "5", "network.ae_title": "PNEUMOCAD",
                  **{k.replace("__", "."): str(v) for k, v in overrides.items()}}
        return load_config(CONFIG, values, environ={})

    def exporter(self, destinations: list[dict], **overrides: object) -> Exporter:
        return Exporter(self.config(destinations, **overrides), self.engine, self.root)

    def add_result(self, sample: Path, kind: str, destinations: list[dict]) -> int:
        """A result file under the storage root with its instance, job and result rows; exports queued as the
        worker does (same transaction). Returns the result id."""
        self.counter += 1
        meta = dcmread(sample, stop_before_pixels=True)
        relative = f"results/{self.counter}/{sample.name}"
        (self.root / relative).parent.mkdir(parents=True)
        shutil.copyfile(sample, self.root / relative)
        with Session(self.engine) as session, session.begin():
            inst = Instance(sop_instance_uid=f"2.25.{self.counter}", sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
                            study_instance_uid="2.25.0", series_instance_uid="2.25.0.1", calling_aet="MODALITY",
                            archive_path=f"archive/{self.counter}.dcm", size_bytes=1, sha256="0" * 64,
                            transfer_syntax_uid=ExplicitVRLittleEndian, in_scope=True, scope_reason="in_scope")
            job = Job(instance=inst, state=JobState.DONE, attempts=1)
            result = Result(kind=kind, sop_instance_uid=str(meta.SOPInstanceUID), sop_class_uid=str(meta.SOPClassUID),
                            series_instance_uid=str(meta.SeriesInstanceUID),
                            transfer_syntax_uid=str(meta.file_meta.TransferSyntaxUID), archive_path=relative,
                            size_bytes=sample.stat().st_size, analysed=True, reason="analysed")
            session.add_all([inst, job])
            session.flush()
            result.job_id, result.instance_id = job.id, inst.id
            session.add(result)
            xq.queue_exports(session, result, self.config(destinations).export.routes)
            return result.id

    def exports(self) -> list[Export]:
        with Session(self.engine, expire_on_commit=False) as session:
            return list(session.scalars(select(Export).order_by(Export.id)).all())

    def make_due(self) -> None:
        """Let backoff time pass without sleeping through it."""
        with Session(self.engine) as session, session.begin():
            session.execute(update(Export).where(Export.state == ExportState.PENDING)
                            .values(next_attempt_at=utcnow() - timedelta(seconds=1)))


@pytest.fixture(autouse=True)
def pynetdicom_configured() -> None:
    """What ``serve`` does once at start-up: the exporter's StoreClient refuses to send without it."""
    configure_pynetdicom()


@contextlib.contextmanager
def scheduled(exporter: Exporter) -> Iterator[NodeScheduler]:
    """The exporter's rounds on a scheduler of their own, as ``serve`` runs them on its one scheduler; on exit the
    exporter stops (waiting for its rounds in progress), then the scheduler."""
    scheduler = NodeScheduler()
    exporter.start(scheduler)
    scheduler.start()
    try:
        yield scheduler
    finally:
        exporter.stop()
        scheduler.shutdown()


def make_site(root: Path, url: str) -> Site:
    root.mkdir()
    engine = make_engine(url)
    init_schema(engine)
    return Site(root, engine, None if url.startswith("sqlite:") else url)


@pytest.fixture
def site(tmp_path, databases) -> Site:
    root = tmp_path / "var"
    return make_site(root, databases.url(root / "node.sqlite"))  # SQLite: where the CLI finds it from storage_root


def received_by_uid(peer: StoreSCP) -> dict[str, Path]:
    return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in peer.files()}


# -- the queue on its own ------------------------------------------------------------------------------------------

def test_queue_exports_follows_types_and_is_idempotent(site):
    dests = [{"name": "all", "ae_title": "A", "host": "h", "port": 1},
             {"name": "sr-only", "ae_title": "B", "host": "h", "port": 2, "types": ["sr"]}]
    sr_id = site.add_result(SR, "sr", dests)
    seg_id = site.add_result(SEG, "seg", dests)
    assert [(e.result_id, e.destination, e.state, e.attempts) for e in site.exports()] == [
        (sr_id, "all", ExportState.PENDING, 0), (sr_id, "sr-only", ExportState.PENDING, 0),
        (seg_id, "all", ExportState.PENDING, 0)]
    # Queued again (the same input analysed again): existing rows are left alone, whatever their state.
    with Session(site.engine) as session, session.begin():
        session.execute(update(Export).where(Export.destination == "all").values(state=ExportState.SENT))
        result = session.get(Result, sr_id)
        assert xq.queue_exports(session, result, site.config(dests).export.routes) == []
        assert xq.queue_exports(session, result, {}) == []
    assert xq.export_counts(site.engine) == {"pending": 1, "sending": 0, "sent": 2, "dead": 0}
    assert [r.destination for r in xq.list_exports(site.engine, ExportState.PENDING)] == ["sr-only"]


def test_backoff_doubles_to_the_cap_then_dead_and_fencing(site):
    site.add_result(SR, "sr", [closed_destination()])
    delays, states = [], []
    for attempt in range(1, 6):
        site.make_due()
        (claim,) = xq.claim_due(site.engine, "ex1", lease_seconds=60, limit=10)
        assert claim.attempt == attempt and claim.lease_owner == "ex1"
        # Another exporter's outcome is fenced off.
        assert not xq.mark_sent(site.engine, claim.export_id, "ex2", "X@h:1", 0)
        assert xq.schedule_retry(site.engine, claim.export_id, "ex2", None, "x", 1, 5, 5) is None
        before = utcnow()
        states.append(xq.schedule_retry(site.engine, claim.export_id, "ex1", 0xA700, f"boom {attempt}",
                                        initial=1, cap=5, max_attempts=5))
        (row,) = site.exports()
        if row.state == ExportState.PENDING:
            delays.append(round((row.next_attempt_at - before).total_seconds()))
    assert delays == [1, 2, 4, 5]
    assert states == [ExportState.PENDING] * 4 + [ExportState.DEAD]
    (row,) = site.exports()
    assert (row.attempts, row.last_status, row.last_error, row.lease_owner) == (5, 0xA700, "boom 5", None)
    site.make_due()
    assert xq.claim_due(site.engine, "ex1", 60, 10) == []  # dead: never claimed

    # resend: back to pending, attempts 0, due now; only the states asked for.
    assert xq.resend(site.engine, export_ids=[row.id + 1]) == 0
    assert xq.resend(site.engine, states=(ExportState.PENDING,)) == 0
    assert xq.resend(site.engine) == 1
    (row,) = site.exports()
    assert (row.state, row.attempts, row.last_error) == (ExportState.PENDING, 0, "boom 5")
    with pytest.raises(ValueError):
        xq.resend(site.engine, states=(ExportState.SENDING,))

    # A crashed exporter's lease expires: the row is claimable again, as a new attempt.
    (claim,) = xq.claim_due(site.engine, "ex1", lease_seconds=60, limit=10)
    assert xq.claim_due(site.engine, "ex2", 60, 10) == []  # leased
    with Session(site.engine) as session, session.begin():
        session.execute(update(Export).values(lease_expires_at=utcnow() - timedelta(seconds=1)))
    (again,) = xq.claim_due(site.engine, "ex2", 60, 10, max_attempts=5)
    assert (again.export_id, again.attempt) == (claim.export_id, 2)
    assert not xq.mark_sent(site.engine, claim.export_id, "ex1", "X@h:1", 0)
    assert xq.mark_sent(site.engine, claim.export_id, "ex2", "X@h:1", 0)
    assert xq.backoff_seconds(3, 30, 3600) == 120 and xq.backoff_seconds(9, 30, 3600) == 3600


def test_the_lease_reclaim_sweep_takes_back_only_dead_exporters_rows(site):
    """``serve``'s ``lease-reclaim`` job: a row whose exporter died while sending it goes back to pending (its
    attempt counted), or dead when that was its last attempt; rows of a live exporter, whose lease runs, stay."""
    dests = [closed_destination()]
    for sample, kind in ((SR, "sr"), (SEG, "seg"), (J2KR, "sc")):
        site.add_result(sample, kind, dests)
    first, last, live = xq.claim_due(site.engine, "dead-exporter", lease_seconds=60, limit=3)
    with Session(site.engine) as session, session.begin():
        session.execute(update(Export).where(Export.id == last.export_id).values(attempts=3))
        session.execute(update(Export).where(Export.id.in_([first.export_id, last.export_id]))
                        .values(lease_expires_at=utcnow() - timedelta(seconds=1)))
    assert xq.reclaim_expired(site.engine, max_attempts=3) == 2
    rows = {r.id: r for r in site.exports()}
    assert (rows[first.export_id].state, rows[first.export_id].attempts, rows[first.export_id].lease_owner) == (
        ExportState.PENDING, 1, None)
    assert (rows[last.export_id].state, rows[last.export_id].lease_owner) == (ExportState.DEAD, None)
    assert "lost its lease on attempt 3" in rows[last.export_id].last_error
    assert (rows[live.export_id].state, rows[live.export_id].lease_owner) == (ExportState.SENDING, "dead-exporter")
    assert xq.reclaim_expired(site.engine, max_attempts=3) == 0
    assert not xq.mark_sent(site.engine, first.export_id, "dead-exporter", "X@h:1", 0)  # fenced off
    (again,) = xq.claim_due(site.engine, "ex2", 60, 10, max_attempts=3)
    assert (again.export_id, again.attempt) == (first.export_id, 2)
    with Session(site.engine) as session:
        kinds = [e.kind for e in session.scalars(select(Event).order_by(Event.id))]
    assert kinds.count("export_taken_back") == 1 and kinds.count("export_dead") == 1
    # PostgreSQL: concurrent exporters skip each other's rows instead of waiting.
    claim_sql = str(xq.claim_statement(utcnow(), 5, ["pacs"]).compile(dialect=postgresql.dialect()))
    assert "FOR UPDATE OF exports SKIP LOCKED" in claim_sql


@pytest.mark.postgresql
def test_postgresql_exporters_skip_the_rows_another_exporter_is_claiming(tmp_path, postgres_url):
    """While one exporter's claim transaction holds a row lock, another exporter's claim takes the other due rows
    at once, never the locked one."""
    site = make_site(tmp_path / "var", postgres_url)
    dests = [closed_destination()]
    for sample, kind in ((SR, "sr"), (SEG, "seg"), (J2KR, "sc")):
        site.add_result(sample, kind, dests)
    with Session(site.engine) as first, first.begin():
        ((export, _),) = first.execute(xq.claim_statement(utcnow(), 1)).all()
        locked = export.id
        started = time.monotonic()
        others = xq.claim_due(site.engine, "ex2", lease_seconds=60, limit=10)
        assert time.monotonic() - started < 5
        assert len(others) == 2 and locked not in {c.export_id for c in others}
    (mine,) = xq.claim_due(site.engine, "ex1", lease_seconds=60, limit=10)
    assert mine.export_id == locked


# -- sending to real peers -----------------------------------------------------------------------------------------

def test_sent_once_over_one_association_and_byte_equal_at_the_peer(site, scp_factory):
    pacs = scp_factory().start()
    dests = [pacs.destination()]
    samples = {SR: "sr", SEG: "seg", J2KR: "sc"}
    for sample, kind in samples.items():
        site.add_result(sample, kind, dests)
    exporter = site.exporter(dests)
    assert exporter.run_once() == 3
    assert exporter.run_once() == 0
    pacs.stop()

    received = received_by_uid(pacs)
    assert len(pacs.files()) == 3 and pacs.associations() == 1
    for sample in samples:
        original = dcmread(sample)
        copy = received[str(original.SOPInstanceUID)]
        # The compressed object travelled in its own syntax, and every object arrived bit for bit.
        assert dcmread(copy).file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
        assert dataset_bytes(copy) == dataset_bytes(sample)
    assert dcmread(received[str(dcmread(J2KR).SOPInstanceUID)]).file_meta.TransferSyntaxUID == JPEG2000Lossless
    for row in site.exports():
        assert (row.state, row.attempts, row.sent_to, row.last_status) == (
            ExportState.SENT, 1, f"PACS@127.0.0.1:{pacs.port}", 0)
        assert row.sent_at is not None and row.lease_owner is None


def test_compressed_object_goes_uncompressed_to_a_peer_without_its_syntax(site, scp_factory):
    pacs = scp_factory(accept_all=False).start()  # storescp's default: uncompressed syntaxes only
    site.add_result(J2KR, "sc", [pacs.destination()])
    assert site.exporter([pacs.destination()]).run_once() == 1
    pacs.stop()
    (copy,) = pacs.files()
    received, original = dcmread(copy), dcmread(J2KR)
    assert received.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert received.SOPInstanceUID == original.SOPInstanceUID
    assert (received.pixel_array == original.pixel_array).all()  # lossless: the same pixels


def test_the_jpeg_heat_map_goes_as_jpeg_or_decoded_to_rgb_still_marked_lossy(site, scp_factory, tmp_path):
    """The node's default SC (JPEG Baseline, YBR_FULL_422): a peer that takes JPEG gets the file's bytes, one that
    takes only uncompressed syntaxes gets RGB pixels (decoded once, not left in YBR) and the lossy marking."""
    picture = tmp_path / "sc_jpeg.dcm"
    write_sc(picture, red_ramp(120, 300))
    stored = dcmread(picture)
    with_jpeg, without = scp_factory(accept_all=True).start(), scp_factory(accept_all=False).start()
    destinations = [with_jpeg.destination("jpeg"), without.destination("plain")]
    site.add_result(picture, "sc", destinations)
    assert site.exporter(destinations).run_once() == 2
    for pacs, accept_all, syntax in ((with_jpeg, True, JPEGBaseline8Bit), (without, False, ExplicitVRLittleEndian)):
        pacs.stop()
        (copy,) = pacs.files()
        received = dcmread(copy)
        assert received.file_meta.TransferSyntaxUID == syntax and received.SOPInstanceUID == stored.SOPInstanceUID
        if accept_all:
            assert dataset_bytes(copy) == dataset_bytes(picture), "the stored JPEG, bit for bit"
        assert received.PhotometricInterpretation == ("YBR_FULL_422" if accept_all else "RGB")
        assert received.LossyImageCompression == "01" and received.LossyImageCompressionMethod == "ISO_10918_1"
        assert (received.pixel_array == stored.pixel_array).all()  # both RGB as pydicom returns them
        red, green, blue = received.pixel_array[60, 299]
        assert red > 240 and green < 15 and blue < 15


def test_peer_down_is_retried_with_backoff_and_delivered_exactly_once(site, scp_factory):
    pacs = scp_factory()  # not started: connection refused
    dests = [pacs.destination()]
    site.add_result(SR, "sr", dests)
    exporter = site.exporter(dests)
    before = utcnow()
    assert exporter.run_once() == 0
    after = utcnow()
    (row,) = site.exports()
    assert (row.state, row.attempts, row.sent_to) == (ExportState.PENDING, 1, None)
    assert before + timedelta(seconds=INITIAL) <= row.next_attempt_at <= after + timedelta(seconds=INITIAL)
    assert "could not be reached" in row.last_error and f"PACS@127.0.0.1:{pacs.port}" in row.last_error
    assert exporter.run_once() == 0  # not due yet: not tried
    assert site.exports()[0].attempts == 1

    pacs.start()
    time.sleep(INITIAL)
    assert exporter.run_once() == 1
    assert exporter.run_once() == 0
    pacs.stop()
    assert len(pacs.files()) == 1
    (row,) = site.exports()
    assert (row.state, row.attempts, row.last_error) == (ExportState.SENT, 2, None)


def test_dead_after_max_attempts_then_cli_status_and_resend(site, scp_factory):
    pacs = scp_factory()
    dests = [pacs.destination()]
    site.add_result(SR, "sr", dests)
    exporter = site.exporter(dests, export__max_attempts=2)
    assert exporter.run_once() == 0
    site.make_due()
    assert exporter.run_once() == 0
    (row,) = site.exports()
    assert (row.state, row.attempts) == (ExportState.DEAD, 2) and "could not be reached" in row.last_error
    site.make_due()
    assert exporter.run_once() == 0 and site.exports()[0].attempts == 2  # dead stays dead

    def cli(*args: str) -> str:
        sets = [arg for key, value in {**site.settings(), "export.destinations": json.dumps(dests)}.items()
                for arg in ("--set", f"{key}={value}")]
        proc = subprocess.run([sys.executable, "-m", "dicom_node.cli", *args, "--config", str(CONFIG), *sets],
                              cwd=REPO, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    status = cli("status")
    assert "exports (pacs):" in status and any(line.split() == ["dead", "1"] for line in status.splitlines())
    assert cli("resend", "--id", str(row.id + 99)).strip().startswith("0 export(s)")
    assert cli("resend").strip().startswith("1 export(s) queued again")
    (row,) = site.exports()
    assert (row.state, row.attempts) == (ExportState.PENDING, 0)

    pacs.start()
    assert exporter.run_once() == 1
    pacs.stop()
    assert len(pacs.files()) == 1 and site.exports()[0].state == ExportState.SENT


@pytest.mark.parametrize("primary_problem", ["port_closed", "association_rejected"])
def test_alternate_is_used_when_the_destination_cannot_be_reached(site, scp_factory, status_scp, primary_problem):
    backup = scp_factory(aet="BACKUP").start()
    if primary_problem == "port_closed":
        dest = closed_destination()
    else:  # an SCP that checks the called AE title and we call it by another one
        dest = status_scp(aet="PACS", require_called_aet=True).destination(ae_title="WRONGAE")
    dest["alternate"] = {"ae_title": "BACKUP", "host": "127.0.0.1", "port": backup.port}
    site.add_result(SR, "sr", [dest])
    site.add_result(SEG, "seg", [dest])
    assert site.exporter([dest]).run_once() == 2
    backup.stop()
    assert len(backup.files()) == 2 and backup.associations() == 1
    assert {(r.state, r.attempts, r.sent_to) for r in site.exports()} == {
        (ExportState.SENT, 1, f"BACKUP@127.0.0.1:{backup.port}")}


def test_rejected_association_without_alternate_is_retried(site, status_scp):
    dest = status_scp(aet="PACS", require_called_aet=True).destination(ae_title="WRONGAE")
    site.add_result(SR, "sr", [dest])
    assert site.exporter([dest]).run_once() == 0
    (row,) = site.exports()
    assert (row.state, row.attempts) == (ExportState.PENDING, 1) and "rejected the association" in row.last_error


def test_failure_status_is_retried_and_a_warning_counts_as_sent(site, status_scp):
    peer = status_scp(status=0xA700)  # out of resources
    dests = [peer.destination()]
    sr_id = site.add_result(SR, "sr", dests)
    exporter = site.exporter(dests)
    assert exporter.run_once() == 0
    (row,) = site.exports()
    assert (row.state, row.attempts, row.last_status) == (ExportState.PENDING, 1, 0xA700)
    assert "0xA700" in row.last_error and peer.received == []

    peer.status = 0xB000  # coercion of data elements: stored
    site.make_due()
    assert exporter.run_once() == 1
    (row,) = site.exports()
    assert (row.state, row.attempts, row.last_status, row.last_error) == (ExportState.SENT, 2, 0xB000, None)
    with Session(site.engine) as session:
        assert peer.received == [session.get(Result, sr_id).sop_instance_uid]


def test_a_sent_result_file_leaves_the_page_cache_and_one_still_to_send_stays(site, status_scp):
    require_droppable_cache(site.root)
    peer = status_scp(status=0xA700)  # out of resources: not stored
    dests = [peer.destination()]
    site.add_result(SR, "sr", dests)
    (path,) = (site.root / "results").rglob("*.dcm")
    fsync_path(path)  # the worker fsyncs every result file before recording it
    exporter = site.exporter(dests)
    assert exporter.run_once() == 0
    assert resident_bytes(path) >= path.stat().st_size  # the retry reads it again: it stays cached
    peer.status = 0x0000
    site.make_due()
    assert exporter.run_once() == 1
    assert resident_bytes(path) == 0
    assert dcmread(path).SOPInstanceUID == dcmread(SR).SOPInstanceUID  # the file itself is untouched


def test_missing_result_file_is_dead_at_once(site, status_scp):
    peer = status_scp()
    site.add_result(SR, "sr", [peer.destination()])
    shutil.rmtree(site.root / "results")
    assert site.exporter([peer.destination()]).run_once() == 0
    (row,) = site.exports()
    assert (row.state, row.attempts) == (ExportState.DEAD, 1) and "missing" in row.last_error


def test_no_destinations_queue_nothing_and_exporter_is_idle(site):
    site.add_result(SR, "sr", [])
    assert site.exports() == []
    assert site.exporter([]).run_once() == 0


def test_scheduler_delivers_without_run_once_and_wake_brings_the_next_round_forward(site, scp_factory):
    pacs = scp_factory().start()
    dests = [pacs.destination()]
    site.add_result(SR, "sr", dests)
    exporter = site.exporter(dests, export__poll_seconds=3600)  # only the start and wake() can run a round
    with scheduled(exporter) as scheduler:
        assert scheduler.job_ids() == ["export:pacs"]  # a job of the process's one scheduler, none of its own
        wait_for(lambda: xq.export_counts(site.engine)["sent"] == 1)
        site.add_result(SEG, "seg", dests)
        exporter.wake()
        wait_for(lambda: xq.export_counts(site.engine)["sent"] == 2)
    pacs.stop()
    assert len(pacs.files()) == 2


def test_wake_during_a_round_runs_another_round_right_after_it(site, status_scp):
    peer = status_scp()
    dests = [peer.destination()]
    site.add_result(SR, "sr", dests)
    exporter = site.exporter(dests, export__poll_seconds=3600)
    peer.release.clear()
    with scheduled(exporter):
        assert peer.in_store.wait(10)  # the first round is in the middle of its C-STORE
        site.add_result(SEG, "seg", dests)
        exporter.wake()
        peer.release.set()
        wait_for(lambda: xq.export_counts(site.engine)["sent"] == 2)
    assert len(peer.received) == 2


def wait_for(condition, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_concurrent_rounds_never_send_twice(site, scp_factory):
    """Two exporters (two owners) and a round in a second thread: the leases keep each object to one sender."""
    pacs = scp_factory().start()
    dests = [pacs.destination()]
    for sample, kind in ((SR, "sr"), (SEG, "seg"), (J2KR, "sc")):
        site.add_result(sample, kind, dests)
    first, second = site.exporter(dests), site.exporter(dests)
    counts: list[int] = []
    threads = [threading.Thread(target=lambda ex=ex: counts.append(ex.run_once())) for ex in (first, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    pacs.stop()
    assert sum(counts) == 3 and len(pacs.files()) == 3


# -- no head-of-line blocking: a hung destination delays only itself ---------------------------------------------

DEADLINE = 3.0  # export.deadline_seconds in these tests; export.timeout_seconds (each pynetdicom wait) stays 30 s
PER_READ_TIMEOUT = 30.0
SLACK = 2.0  # the watchdog's abort (at most 2 x store_scu.ABORT_GRACE_SECONDS) and a loaded machine


class HungSCP(StatusSCP):
    """A Storage SCP that accepts every association and never answers a C-STORE until the test ends:
    ``mode="silent"`` just waits; ``mode="trickle"`` first writes a P-DATA-TF header announcing 100 kB, then one
    byte every 0.2 s, which keeps the connection busy and holds the caller's pynetdicom DUL thread in ``recv``."""

    def __init__(self, mode: str = "silent", aet: str = "HUNG") -> None:
        self.mode = mode
        self.stores = 0
        self.done = threading.Event()
        super().__init__(aet=aet)

    def _on_store(self, event: evt.Event) -> int:
        self.stores += 1
        self.in_store.set()
        if self.mode == "trickle":
            raw = event.assoc.dul.socket.socket
            try:
                raw.sendall(b"\x04\x00" + (100_000).to_bytes(4, "big"))
                while not self.done.wait(0.2):
                    raw.sendall(b"\x00")
            except OSError:  # the node cut the connection
                pass
        self.done.wait(120)
        return 0x0000

    def destination(self, name: str = "hung", **extra: object) -> dict:  # type: ignore[override]
        return {"name": name, "ae_title": "HUNG", "host": "127.0.0.1", "port": self.port, **extra}

    def stop(self) -> None:
        self.done.set()
        super().stop()


class TricklingAcceptor:
    """A bare TCP server that reads the A-ASSOCIATE-RQ, answers with an A-ASSOCIATE-AC header announcing 100 kB and
    then trickles one byte every 0.2 s: the association is never complete, the connection never idle."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self.done.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            with conn:
                try:
                    conn.recv(65536)
                    conn.sendall(b"\x02\x00" + (100_000).to_bytes(4, "big"))
                    while not self.done.wait(0.2):
                        conn.sendall(b"\x00")
                except OSError:  # the node cut the connection
                    pass

    def destination(self, name: str = "hung", **extra: object) -> dict:
        return {"name": name, "ae_title": "HUNG", "host": "127.0.0.1", "port": self.port, **extra}

    def stop(self) -> None:
        self.done.set()
        self.thread.join(5)
        self.sock.close()


@pytest.fixture
def hung_peers():
    peers: list = []

    def make(kind: str = "silent"):  # type: ignore[no-untyped-def]
        peers.append(TricklingAcceptor() if kind == "association" else HungSCP(kind))
        return peers[-1]

    yield make
    for peer in peers:
        peer.stop()


def our_association_threads() -> list[threading.Thread]:
    """The node's side of any association still alive: requestor associations, their DUL threads, watchdogs."""
    from pynetdicom.association import Association
    from pynetdicom.dul import DULServiceProvider

    def ours(t: threading.Thread) -> bool:
        if isinstance(t, Association):
            return t.is_requestor
        if isinstance(t, DULServiceProvider):
            return t.assoc.is_requestor
        return t.name.startswith("store-scu-watchdog")

    return [t for t in threading.enumerate() if t.is_alive() and ours(t)]


@SQLITE_ONLY  # the network's timing; the lanes' claims and retries run on PostgreSQL in the tests above
def test_a_hung_destination_delays_only_itself(site, scp_factory, hung_peers):
    pacs, hung = scp_factory().start(), hung_peers("silent")
    dests = [hung.destination(), pacs.destination()]  # the hung one first, as the old exporter served them
    for sample, kind in ((SR, "sr"), (SEG, "seg"), (J2KR, "sc")):
        site.add_result(sample, kind, dests)
    exporter = site.exporter(dests, export__deadline_seconds=DEADLINE, export__timeout_seconds=PER_READ_TIMEOUT,
                             export__retry_initial_seconds=30)
    counts: list[int] = []
    started = time.monotonic()
    round_thread = threading.Thread(target=lambda: counts.append(exporter.run_once()))
    round_thread.start()

    def sent_to_pacs() -> int:
        return sum(1 for r in site.exports() if r.destination == "pacs" and r.state == ExportState.SENT)

    wait_for(lambda: sent_to_pacs() == 3, timeout=DEADLINE + SLACK + 5)
    healthy_after = time.monotonic() - started
    # The healthy PACS has everything while the hung one still holds its first C-STORE: far below its deadline,
    # let alone its 30 s per-read timeout.
    assert round_thread.is_alive() and hung.in_store.is_set()
    assert healthy_after < DEADLINE - 0.5 and len(pacs.files()) == 3
    round_thread.join(60)
    elapsed = time.monotonic() - started
    # run_once returns when every destination's round is done: the hung one's after one deadline, not 3 x 30 s.
    assert counts == [3]
    assert DEADLINE - 0.1 <= elapsed < DEADLINE + SLACK
    assert (hung.associations, hung.stores) == (1, 1)  # one association; the batch's other objects never went

    rows = [r for r in site.exports() if r.destination == "hung"]
    assert all(r.state == ExportState.PENDING and r.lease_owner is None for r in rows)
    (cut,) = [r for r in rows if r.attempts == 1]
    assert "within 3 s" in cut.last_error and "deadline" in cut.last_error and "HUNG@127.0.0.1" in cut.last_error
    # Retried with backoff (30 s here) from the cut, the batch's untried exports with it, no attempt spent on them.
    assert utcnow() + timedelta(seconds=25) < cut.next_attempt_at < utcnow() + timedelta(seconds=31)
    untried = [r for r in rows if r is not cut]
    assert len(untried) == 2 and all(r.attempts == 0 and "not tried" in r.last_error for r in untried)
    assert all(abs((r.next_attempt_at - cut.next_attempt_at).total_seconds()) < 2 for r in untried)
    time.sleep(2 * 0.5)
    assert our_association_threads() == []

    # Under the scheduler too: while the hung destination's lane sits in its next C-STORE, a new result reaches
    # the healthy PACS at once, and stop() waits for the hung lane no longer than its deadline.
    site.make_due()
    hung.in_store.clear()
    exporter = site.exporter(dests, export__deadline_seconds=DEADLINE, export__timeout_seconds=PER_READ_TIMEOUT,
                             export__retry_initial_seconds=30, export__poll_seconds=3600)
    scheduler = NodeScheduler()
    exporter.start(scheduler)
    scheduler.start()
    try:
        assert hung.in_store.wait(DEADLINE)
        stalled_since = time.monotonic()
        site.add_result(SR2, "sr", [pacs.destination()])
        exporter.wake()
        wait_for(lambda: sent_to_pacs() == 4, timeout=DEADLINE + SLACK + 5)
        assert time.monotonic() - stalled_since < DEADLINE - 0.5 and hung.stores == 2
    finally:
        stopping = time.monotonic()
        exporter.stop()
        scheduler.shutdown()
    assert time.monotonic() - stopping < DEADLINE + SLACK
    assert {(r.state, r.lease_owner) for r in site.exports() if r.destination == "hung"} == {
        (ExportState.PENDING, None)}
    pacs.stop()


@SQLITE_ONLY  # the network's timing; cut attempts and alternates run on PostgreSQL in the tests above
@pytest.mark.parametrize("stall", ["c_store", "association"])
def test_a_stalled_association_is_cut_by_the_deadline_however_the_peer_keeps_it_alive(site, scp_factory,
                                                                                      hung_peers, stall):
    """The peer trickles bytes, so neither pynetdicom's per-read timeouts (30 s here) nor its idle timeout ever
    fire, and pynetdicom alone would wait for as long as the peer likes: the watchdog ends the attempt at the
    deadline. A C-STORE cut is retried; an association setup cut counts as unreachable, so the alternate is used."""
    hung = hung_peers("trickle" if stall == "c_store" else "association")
    dest = hung.destination()
    backup = None
    if stall == "association":
        backup = scp_factory(aet="BACKUP").start()
        dest["alternate"] = {"ae_title": "BACKUP", "host": "127.0.0.1", "port": backup.port}
    site.add_result(SR, "sr", [dest])
    site.add_result(SEG, "seg", [dest])
    exporter = site.exporter([dest], export__deadline_seconds=DEADLINE, export__timeout_seconds=PER_READ_TIMEOUT)
    started = time.monotonic()
    sent = exporter.run_once()
    elapsed = time.monotonic() - started
    assert DEADLINE - 0.1 <= elapsed < DEADLINE + SLACK
    rows = site.exports()
    if stall == "c_store":
        assert sent == 0 and hung.stores == 1
        assert [(r.state, r.attempts) for r in rows] == [(ExportState.PENDING, 1), (ExportState.PENDING, 0)]
        assert "no C-STORE response" in rows[0].last_error and "within 3 s" in rows[0].last_error
    else:
        assert sent == 2 and hung.connections == 1
        backup.stop()
        assert len(backup.files()) == 2 and backup.associations() == 1
        assert {(r.state, r.attempts, r.sent_to) for r in rows} == {
            (ExportState.SENT, 1, f"BACKUP@127.0.0.1:{backup.port}")}
    time.sleep(2 * 0.5)
    assert our_association_threads() == []


def test_a_dropped_association_gives_the_batch_back_for_the_next_round(site, status_scp):
    """A peer that aborts the association under the first C-STORE: that export is retried with backoff, the
    others were never tried and go in the next round, over a new association, without losing an attempt."""
    peer = status_scp(abort_first=True)
    dests = [peer.destination()]
    for sample, kind in ((SR, "sr"), (SEG, "seg"), (J2KR, "sc")):
        site.add_result(sample, kind, dests)
    exporter = site.exporter(dests, export__retry_initial_seconds=30)
    assert exporter.run_once() == 0
    rows = site.exports()
    assert [(r.state, r.attempts) for r in rows] == [(ExportState.PENDING, 1)] + [(ExportState.PENDING, 0)] * 2
    assert rows[0].next_attempt_at > utcnow() + timedelta(seconds=25)
    assert all(r.next_attempt_at <= utcnow() for r in rows[1:])
    assert exporter.run_once() == 2  # the next round: a new association
    assert peer.associations == 2
    assert [(r.state, r.attempts) for r in site.exports()] == [(ExportState.PENDING, 1)] + [(ExportState.SENT, 1)] * 2
