"""The analysis worker, called directly (no network, no subprocess): real models, a real queue (SQLite and PostgreSQL:
``db_backend``), real files.

Instances are queued the way the intake does it: the file placed at its archive path, its row built by the
intake's own builder (``dicom_node.received.received_instance``) and recorded with ``record_new``; ``Worker.run_once``
/ ``Worker.process`` then claim, analyse, write and record. The analysis function is injected (the real
``ai.analyse_batch`` unless a test passes another). Chest analyses cost about a second each on a CPU, so the
environments that analyse chests are module-scoped and shared where a test only reads.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from sqlalchemy import select, update
from sqlalchemy.orm import Session

import ai
from db.engine import init_schema, make_engine
from db.findings import finding_of_job
from db.instances import ReceivedInstance, record_new, record_replacement
from db.models import Export, Job, JobState, Result
from db.queue import claim
from dicom_node.archive import Archive, fsync_path, sha256_of
from dicom_node.config import load_config
from dicom_node.received import received_instance
from dicom_node.results import derive_device_uid
from dicom_node.worker import AnalyseBatch, ResultBuilders, Worker

from .dicomgen import clone_instances
from .support.data import CHEST_UNCOMPRESSED as CHEST  # uncompressed: the cheapest chest to decode
from .support.data import CONFIG, HAND
from .support.page_cache import require_droppable_cache, resident_bytes
from .support.postgres import SQLITE_ONLY, Databases
from .support.result_checks import assert_not_analysed_sr
from .support.sr_tree import sr_text

SOP_CLASS = {"seg": "1.2.840.10008.5.1.4.1.1.66.4", "sr": "1.2.840.10008.5.1.4.1.1.88.33",
             "sc": "1.2.840.10008.5.1.4.1.1.7"}
DESTINATIONS = [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 1},
                {"name": "reports", "ae_title": "RIS", "host": "127.0.0.1", "port": 2, "types": ["sr"]}]


# --- a node without network: config, archive, database ------------------------------------------------------------


@dataclass
class Env:
    root: Path
    config: Any
    archive: Archive
    engine: Any

    def worker(self, owner: str | None = None, analyse: AnalyseBatch = ai.analyse_batch,
               builders: ResultBuilders = ResultBuilders()) -> Worker:
        return Worker(self.config, self.engine, self.archive, owner, analyse=analyse, builders=builders)

    def receive(self, path: Path, calling_aet: str = "MODALITY") -> tuple[int, ReceivedInstance]:
        """What the intake does with a received file: its row (the intake's own builder: UIDs, header verdict),
        archive placement, instance + job row. The intake's refusals (a truncated Pixel Data, ...) are not applied:
        the tests feed the worker what a lowered limit or a damaged disk could leave in the archive."""
        ds = dcmread(path, defer_size=1024)
        rec = received_instance(ds, self.archive, calling_aet=calling_aet, size_bytes=path.stat().st_size,
                                sha256=sha256_of(path), transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID))
        target = self.archive.absolute(rec.archive_path)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        return record_new(self.engine, rec), rec

    def job(self, job_id: int) -> Job:
        with Session(self.engine, expire_on_commit=False) as session:
            return session.get(Job, job_id)

    def results(self, **where: Any) -> list[Result]:
        with Session(self.engine, expire_on_commit=False) as session:
            stmt = select(Result).order_by(Result.id)
            for column, value in where.items():
                stmt = stmt.where(getattr(Result, column) == value)
            return list(session.scalars(stmt).all())

    def exports(self) -> list[tuple[str, str, str]]:
        """(result SOP Instance UID, destination, state) of every export row."""
        with Session(self.engine) as session:
            rows = session.execute(select(Result.sop_instance_uid, Export.destination, Export.state)
                                   .join(Export, Export.result_id == Result.id).order_by(Export.id)).all()
        return [(uid, dest, state.value) for uid, dest, state in rows]


def make_env(root: Path, databases: Databases | None = None, **overrides: Any) -> Env:
    """A node's storage root and its database: the SQLite file under the root (also without ``databases``), or a
    new PostgreSQL database."""
    url = f"sqlite:///{root / 'node.sqlite'}" if databases is None else databases.url(root / "node.sqlite")
    sets = {"storage.storage_root": str(root), "storage.free_disk_reserve_mb": "0", "worker.processes": "0",
            "database.url": url,
            **{k.replace("__", "."): v if isinstance(v, str) else json.dumps(v) for k, v in overrides.items()}}
    config = load_config(CONFIG, sets, environ={})
    archive = Archive(root, 0)
    archive.prepare()
    engine = make_engine(config.database.url)
    init_schema(engine)
    return Env(root, config, archive, engine)


def chest_copies(out_dir: Path, count: int) -> list[Path]:
    """The chest samples share one SOP Instance UID: every copy gets its own."""
    return clone_instances(CHEST, out_dir, count)


def assert_no_tmp_leftovers(env: Env) -> None:
    assert list(env.archive.tmp_dir.iterdir()) == []


class CountingAnalyseBatch:
    """Calls the real ``ai.analyse_batch``, remembering the SOP Instance UIDs of each call."""

    def __init__(self, real, raise_for: str | None = None) -> None:
        self.real = real
        self.raise_for = raise_for
        self.calls: list[list[str]] = []

    def __call__(self, sources, device=None, **options):
        uids = [str(s.SOPInstanceUID) for s in sources]
        self.calls.append(uids)
        if self.raise_for in uids:
            raise RuntimeError("model exploded on this input")
        return self.real(sources, device=device, **options)


# --- 1. one chest: SEG + SR + SC, durable, recorded, exported per destination ---------------------------------------


@pytest.fixture(scope="module")
def analysed(tmp_path_factory, module_databases):
    tmp = tmp_path_factory.mktemp("analysed")
    env = make_env(tmp / "var", module_databases, export__destinations=DESTINATIONS)
    [source] = chest_copies(tmp / "in", 1)
    job_id, rec = env.receive(source)
    assert env.worker().run_once() == 1
    return env, job_id, rec, source


def test_a_chest_gets_seg_sr_sc_durably_recorded_with_one_export_per_matching_destination(analysed):
    env, job_id, rec, source = analysed
    job = env.job(job_id)
    assert (job.state, job.attempts, job.reason, job.lease_owner) == (JobState.DONE, 1, None, None)
    rows = env.results()
    assert sorted(r.kind for r in rows) == ["sc", "seg", "sr"]
    uids = set()
    for row in rows:
        assert (row.job_id, row.instance_id, row.analysed) == (job_id, job.instance_id, True)
        path = env.root / row.archive_path
        assert path == (env.root / "results" / rec.study_instance_uid / row.series_instance_uid
                        / f"{row.sop_instance_uid}.dcm")
        assert path.is_file() and path.stat().st_size == row.size_bytes
        ds = dcmread(path)  # a whole DICOM file, with its meta header
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID == row.sop_instance_uid
        assert ds.SOPClassUID == row.sop_class_uid == SOP_CLASS[row.kind]
        assert ds.StudyInstanceUID == rec.study_instance_uid
        assert ds.SeriesInstanceUID == row.series_instance_uid != rec.series_instance_uid
        assert row.sop_instance_uid != rec.sop_instance_uid
        uids.add(row.sop_instance_uid)
    assert len(uids) == 3 and len({r.series_instance_uid for r in rows}) == 3  # each kind in its own series
    assert_no_tmp_leftovers(env)
    by_kind = {r.kind: r.sop_instance_uid for r in rows}
    assert sorted(env.exports()) == sorted(
        [(by_kind[k], "pacs", "pending") for k in ("seg", "sr", "sc")] + [(by_kind["sr"], "reports", "pending")])
    finding = finding_of_job(env.engine, job_id)  # the SR's answer, queryable for the console and the metrics
    sr = dcmread(env.root / next(r.archive_path for r in rows if r.kind == "sr"))
    assert finding is not None and finding.instance_id == job.instance_id and finding.analysis_seconds > 0
    assert 0 <= finding.probability <= 1 and finding.present == (finding.probability >= finding.threshold)
    assert 0 <= finding.category <= 3 and len(finding.category_probabilities) == 4
    assert finding.model_version in str(sr.ContentSequence) or finding.model_version in str(sr)


# --- 2. batching, and 3. idempotence --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def batched(tmp_path_factory, module_databases):
    tmp = tmp_path_factory.mktemp("batched")
    env = make_env(tmp / "var", module_databases, worker__batch_size="4")  # and no destination
    sources = chest_copies(tmp / "in", 3)
    received = [env.receive(p) for p in sources]
    counter = CountingAnalyseBatch(ai.analyse_batch)
    claimed = env.worker(analyse=counter).run_once()
    return env, received, sources, claimed, list(counter.calls)


def test_one_run_claims_every_waiting_job_up_to_the_batch_size_and_analyses_them_in_one_call(batched):
    env, received, _, claimed, calls = batched
    assert claimed == 3
    assert calls == [[rec.sop_instance_uid for _, rec in received]]
    for job_id, _ in received:
        job = env.job(job_id)
        assert (job.state, job.attempts) == (JobState.DONE, 1)
        assert sorted(r.kind for r in env.results(job_id=job_id)) == ["sc", "seg", "sr"]
    assert len(env.results()) == 9
    assert env.exports() == []  # no destination configured: results stay under the storage root
    assert_no_tmp_leftovers(env)


def test_the_same_instance_analysed_again_gives_the_same_results_and_no_second_row(batched):
    env, received, sources, _, _ = batched
    first_job, rec = received[0]
    before = {(r.kind, r.sop_instance_uid, r.archive_path) for r in env.results(job_id=first_job)}
    total = len(env.results())
    new_job = record_replacement(env.engine, rec, "-")  # the same content once more (policy "always")
    assert new_job is not None and new_job != first_job
    assert env.worker().run_once() == 1
    assert env.job(new_job).state == JobState.DONE
    again = env.results(instance_id=env.job(new_job).instance_id)
    assert {(r.kind, r.sop_instance_uid, r.archive_path) for r in again} == before
    assert {r.job_id for r in again} == {new_job}  # the rows now name the job that wrote the files last
    assert len(env.results()) == total
    for row in again:
        assert dcmread(env.root / row.archive_path).SOPInstanceUID == row.sop_instance_uid
    assert_no_tmp_leftovers(env)


# --- 4. refused, 5. corrupted, 6. own result ------------------------------------------------------------------------


def test_a_refused_image_ends_not_analysed_with_its_reason_and_one_not_analysed_sr(tmp_path, databases):
    env = make_env(tmp_path / "var", databases)
    [hand] = clone_instances(HAND, tmp_path / "in", 1)
    job_id, rec = env.receive(hand)
    assert not rec.in_scope and rec.scope_reason == "body_part_not_chest"
    assert env.worker().run_once() == 1
    job = env.job(job_id)
    assert (job.state, job.reason, job.attempts) == (JobState.NOT_ANALYSED, "body_part_not_chest", 1)
    [row] = env.results()
    assert row.job_id == job_id
    assert finding_of_job(env.engine, job_id) is None  # nothing was classified
    assert_not_analysed_sr(env.root / row.archive_path, hand, "body_part_not_chest", row=row)
    assert_no_tmp_leftovers(env)


def test_corrupted_pixel_data_fails_at_once_with_a_not_analysed_sr(tmp_path, databases):
    """Pixels that cannot be decoded will never decode: a permanent failure, not retried (attempts stay 1 of 2)."""
    env = make_env(tmp_path / "var", databases, queue__max_attempts="2")
    [good] = chest_copies(tmp_path / "in", 1)
    ds = dcmread(good)
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3 // 2 * 2]
    bad = tmp_path / "cut.dcm"
    ds.save_as(bad, enforce_file_format=True)
    job_id, _ = env.receive(bad)

    assert env.worker().run_once() == 1
    job = env.job(job_id)
    assert (job.state, job.attempts, job.reason, job.lease_owner) == (JobState.FAILED, 1, "undecodable_pixels", None)
    assert job.last_error
    [row] = env.results()
    assert row.job_id == job_id
    assert_not_analysed_sr(env.root / row.archive_path, bad, "undecodable_pixels", row=row)
    assert env.worker().run_once() == 0  # failed for good
    assert_no_tmp_leftovers(env)


def test_an_archived_file_that_vanished_fails_its_job_with_an_sr_from_the_recorded_uids(tmp_path, databases):
    env = make_env(tmp_path / "var", databases, queue__max_attempts="1")
    [source] = chest_copies(tmp_path / "in", 1)
    job_id, rec = env.receive(source)
    env.archive.absolute(rec.archive_path).unlink()
    assert env.worker().run_once() == 1
    job = env.job(job_id)
    assert (job.state, job.attempts, job.reason) == (JobState.FAILED, 1, "unreadable_file")
    assert job.last_error.startswith("FileNotFoundError")
    [row] = env.results()  # no header left: the SR is written from the UIDs the intake recorded
    assert_not_analysed_sr(env.root / row.archive_path, source, "unreadable_file", row=row,
                           from_recorded_uids=True)
    sr = dcmread(env.root / row.archive_path)
    assert (sr.StudyInstanceUID, sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
            .ReferencedSOPSequence[0].ReferencedSOPInstanceUID) == (rec.study_instance_uid, rec.sop_instance_uid)
    assert_no_tmp_leftovers(env)


def test_the_archived_source_is_read_whole_then_its_pages_leave_the_page_cache(tmp_path):
    env = make_env(tmp_path / "var", queue__max_attempts="1")
    require_droppable_cache(env.root)
    [source] = chest_copies(tmp_path / "in", 1)
    _, rec = env.receive(source)
    archived = env.archive.absolute(rec.archive_path)
    fsync_path(archived)  # the intake fsyncs every received file before it answers
    assert resident_bytes(archived) >= archived.stat().st_size  # whole pages
    read: list[bytes] = []

    def analyse(sources, device=None, **options):
        read.extend(bytes(s.PixelData) for s in sources)  # what the read step handed over, in memory
        raise RuntimeError("the test stops after the read step")

    assert env.worker(analyse=analyse).run_once() == 1
    assert read == [dcmread(source).PixelData] * 2  # the batch, then the job alone: both from the one read
    assert resident_bytes(archived) == 0


def test_an_own_result_sent_back_is_never_reported_on(analysed, tmp_path):
    env, _, _, _ = analysed
    [sc_row] = [r for r in env.results() if r.kind == "sc"]
    sc = dcmread(env.root / sc_row.archive_path, stop_before_pixels=True)
    assert derive_device_uid(env.config.network.ae_title) in [
        item.get("DeviceUID") for item in sc.ContributingEquipmentSequence]
    before = len(env.results()), len(env.exports())
    job_id, rec = env.receive(env.root / sc_row.archive_path, calling_aet="PACS")
    assert env.job(job_id).state == JobState.QUEUED  # the header alone does not tell: the worker must
    assert env.worker().run_once() == 1
    job = env.job(job_id)
    assert (job.state, job.reason) == (JobState.NOT_ANALYSED, "own_result")
    assert env.results(job_id=job_id) == []
    assert (len(env.results()), len(env.exports())) == before


# --- 7. lease lost, 8. one bad input in a batch -------------------------------------------------------------------


def test_a_worker_that_lost_its_lease_records_nothing(tmp_path, databases):
    env = make_env(tmp_path / "var", databases, export__destinations=DESTINATIONS)
    [source] = chest_copies(tmp_path / "in", 1)
    job_id, _ = env.receive(source)
    worker = env.worker()
    claimed = claim(env.engine, worker.owner, 300, 3)
    assert claimed is not None and claimed.job_id == job_id
    with Session(env.engine) as session, session.begin():
        session.execute(update(Job).where(Job.id == job_id).values(lease_owner="another-worker"))
    worker.process([claimed])
    job = env.job(job_id)
    assert (job.state, job.lease_owner, job.attempts, job.reason) == (JobState.RUNNING, "another-worker", 1, None)
    assert env.results() == [] and env.exports() == []


def test_one_input_that_breaks_the_analysis_does_not_fail_its_batch_mates(tmp_path, databases):
    env = make_env(tmp_path / "var", databases, worker__batch_size="3", queue__max_attempts="1")
    sources = chest_copies(tmp_path / "in", 3)
    received = [env.receive(p) for p in sources]
    bad_job, bad = received[1]
    counter = CountingAnalyseBatch(ai.analyse_batch, raise_for=bad.sop_instance_uid)
    assert env.worker(analyse=counter).run_once() == 3
    assert counter.calls[0] == [rec.sop_instance_uid for _, rec in received]
    assert sorted(map(tuple, counter.calls[1:])) == sorted((rec.sop_instance_uid,) for _, rec in received)
    for job_id, _ in (received[0], received[2]):
        assert env.job(job_id).state == JobState.DONE
        assert sorted(r.kind for r in env.results(job_id=job_id)) == ["sc", "seg", "sr"]
    job = env.job(bad_job)
    assert (job.state, job.reason) == (JobState.FAILED, "analysis_error")
    # the exception's type and a fixed text: exception texts may quote dataset values and are never stored raw
    assert job.last_error == "RuntimeError: the analysis raised an error"
    [row] = env.results(job_id=bad_job)
    assert_not_analysed_sr(env.root / row.archive_path, sources[1], "analysis_error", row=row)
    assert_no_tmp_leftovers(env)


@SQLITE_ONLY  # which model analyses: nothing of the database beyond the tests above
def test_the_site_models_of_models_directory_make_the_results(tmp_path, databases):
    """A site's own classifier in ``models.directory`` (here: the bundled weights saved with another notice) is the
    one the worker analyses with, and its notice is the one every result carries."""
    from ai import checkpoint
    from ai.models import BUNDLED_DIR, CLASSIFIER

    bundled = checkpoint.load(BUNDLED_DIR / CLASSIFIER)
    site = tmp_path / "site-models"
    checkpoint.save(site / CLASSIFIER, bundled.state_dict,
                    {**bundled.fields, "version": "site-test-1", "model_card": "site-classifier.md",
                     "notice": "SITE TEST model, not validated for clinical use."})
    env = make_env(tmp_path / "var", databases, models__directory=str(site))
    [source] = chest_copies(tmp_path / "in", 1)
    job_id, _ = env.receive(source)
    assert env.worker().run_once() == 1
    assert env.job(job_id).state == JobState.DONE
    [sr_row] = env.results(job_id=job_id, kind="sr")
    sr = dcmread(env.root / sr_row.archive_path)
    notices = sr_text(sr, "NOTICE")
    assert "SITE TEST model, not validated for clinical use." in notices
    assert not any("synthetic" in n for n in notices), "the bundled demo classifier's notice is not there"
