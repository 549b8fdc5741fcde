"""The worker on real-world input and real-world faults: never silent, no patient data in logs or the database.

- The header-variant corpus (``tests/header_variants.py``: the issue's values, invalid and overlong values of the
  attributes that SEG and SC copy, veterinary sources, character-set files) through the real worker, real files and
  a real SQLite queue: exactly one SR per image, SEG and SC where analysed, dciodvfy without errors on every object,
  and no planted patient value in the log output (the node's own formatter, at DEBUG) or anywhere in the database.
- A JPEG 2000 stream that makes gdcm abort, in a batch with three valid chests.
- A job whose worker died on every attempt (lease expired) still gets its "not analysed" SR.
- A job that ends with no object at all is counted by ``dicom-node status`` and named by an audit event.
- A worker outlives a 40-second exclusive lock of its database.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import timedelta

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select, update
from sqlalchemy.orm import Session

import ai
import db.engine
from db.models import Event, Job, JobState, utcnow
from db.queue import NO_RESULT_EVENT, claim
from db.results import count_without_result
from dicom_node.worker import ResultBuilders

from .conftest import CONFIG, REPO, SAMPLES
from .dicomgen import UID_ROOT, aborting_j2k, clone_instances
from .header_variants import variant
from .support.dicom_tools import dciodvfy_errors
from .support.logs import node_log_output
from .support.sr_tree import sr_text
from .test_coerce import FULL
from .test_worker import CHEST, Env, assert_no_tmp_leftovers, make_env

ANALYSIS_INPUTS = ("SOPClassUID", "BodyPartExamined", "ViewPosition", "ImageType", "NumberOfFrames",
                   "PhotometricInterpretation", "SamplesPerPixel", "Rows", "Columns", "BitsAllocated", "BitsStored",
                   "HighBit", "PixelRepresentation", "RescaleSlope", "RescaleIntercept", "WindowCenter",
                   "WindowWidth", "VOILUTFunction", "PresentationLUTShape", "PixelSpacing", "ImagerPixelSpacing",
                   "PixelPaddingValue", "ModalityLUTSequence", "VOILUTSequence")
"""Everything ``ai.analyse`` reads of a header: variants that differ only elsewhere analyse alike."""


class CachedAnalysis:
    """The real ``ai.analyse_batch``, run once per distinct analysis input (pixels plus the attributes above):
    the corpus varies patient and study attributes of one chest, which the analysis never reads."""

    def __init__(self) -> None:
        self.cache: dict[str, object] = {}
        self.calls = 0

    @staticmethod
    def key(ds) -> str:  # type: ignore[no-untyped-def]
        digest = hashlib.sha256(bytes(ds.PixelData) if "PixelData" in ds else b"")
        for keyword in ANALYSIS_INPUTS:
            digest.update(f"{keyword}={ds[keyword].value!r};".encode() if keyword in ds else b"-")
        return digest.hexdigest()

    def __call__(self, sources, device=None, **options):  # type: ignore[no-untyped-def]
        self.calls += 1
        records = []
        for source in sources:
            key = self.key(source)
            if key not in self.cache:
                self.cache[key] = ai.analyse_batch([source], device=device, **options)[0]
            record = copy.copy(self.cache[key])
            record.source = record.sop_instance_uid = str(source.SOPInstanceUID)
            records.append(record)
        return records


@pytest.fixture
def node_log():
    """The root logger as ``dicom-node`` sets it up, at DEBUG, writing into a buffer."""
    with node_log_output() as buffer:
        yield buffer


def database_text(env: Env) -> str:
    """Every row of every table, as SQL text."""
    with sqlite3.connect(env.root / "node.sqlite") as conn:
        return "\n".join(conn.iterdump())


CORPUS = sorted(FULL)


def test_header_variants_through_the_worker_are_never_silent_and_never_leak(tmp_path, node_log, caplog):
    caplog.set_level(logging.DEBUG)
    env = make_env(tmp_path / "var", worker__batch_size="4")
    jobs: dict[int, object] = {}
    for name in CORPUS:
        v = variant(name)
        path = v.write(tmp_path / f"{name}.dcm")
        ds = dcmread(path)  # the corpus shares the chest's SOP Instance UID: one each, nothing else touched
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(UID_ROOT)
        ds.save_as(path, enforce_file_format=True)
        job_id, _ = env.receive(path)
        jobs[job_id] = v
    analysis = CachedAnalysis()
    worker = env.worker(analyse=analysis)
    while worker.run_once():
        pass
    planted = {p for v in jobs.values() for p in v.planted}
    assert planted, "the corpus plants values"
    log_text = node_log.getvalue()
    own_messages = "\n".join(r.getMessage() for r in caplog.records
                             if not r.name.startswith(("pydicom", "highdicom", "py.warnings")))
    db_text = database_text(env)
    # the database keeps valid accession numbers on purpose (labels are matched by them): not a leak there
    accessions = {a for v in jobs.values() if len(a := str(v.dataset.get("AccessionNumber", "") or "")) <= 16}
    problems = []
    for job_id, v in jobs.items():
        job = env.job(job_id)
        results = env.results(job_id=job_id)
        kinds = sorted(r.kind for r in results)
        if job.state == JobState.DONE:
            expected = ["sc", "seg", "sr"]
        else:
            expected = ["sr"]
            problems += [f"{v.name}: {job.state.value} ({job.reason})"] if job.reason != "result_encoding_error" \
                else []
        if kinds != expected:
            problems.append(f"{v.name}: {job.state.value} with {kinds}")
        for row in results:
            errors = dciodvfy_errors(env.root / row.archive_path, allow_off_root_uids=v.uids_off_root)
            if errors:
                problems.append(f"{v.name} {row.kind}: {errors[:3]}")
            ds = dcmread(env.root / row.archive_path, stop_before_pixels=True)
            if ds.SpecificCharacterSet != "ISO_IR 192":
                problems.append(f"{v.name} {row.kind}: written in {ds.SpecificCharacterSet}")
        for value in v.planted:
            for where, text in (("log", log_text), ("log message", own_messages), ("database", db_text)):
                # the database keeps a valid accession number on purpose (labels are matched by it): not a leak
                if value in text and not (where == "database" and value in accessions):
                    problems.append(f"{v.name}: planted value {value!r} in the {where}")
    assert not problems, "\n".join(problems)
    assert all(env.job(j).state == JobState.DONE for j in jobs), "every variant is the same analysable chest"
    assert analysis.calls >= 1 and len(analysis.cache) < len(jobs)
    with Session(env.engine) as session:
        coerced = [e.detail for e in session.scalars(select(Event).where(Event.kind == "header_coerced"))]
    assert len(coerced) >= len(CORPUS) // 2  # repairs are audited, by keyword
    assert any("PatientBirthDate emptied_invalid" in d for d in coerced)
    assert count_without_result(env.engine) == 0
    assert_no_tmp_leftovers(env)


def test_an_aborting_jpeg2000_stream_costs_only_its_own_image(tmp_path):
    env = make_env(tmp_path / "var", worker__batch_size="4", queue__max_attempts="3")
    good = clone_instances(SAMPLES / "chest" / "RG1_J2KI.dcm", tmp_path / "good", 3)
    bad = tmp_path / "bad.dcm"
    aborting_j2k(SAMPLES / "chest" / "RG1_J2KI.dcm").save_as(bad, enforce_file_format=True)
    ids = [env.receive(p)[0] for p in (good[0], bad, good[1], good[2])]
    started = time.monotonic()
    assert env.worker().run_once() == 4
    elapsed = time.monotonic() - started
    states = {i: env.job(i) for i in ids}
    for i in (ids[0], ids[2], ids[3]):
        assert states[i].state == JobState.DONE, (states[i].state, states[i].reason)
        assert sorted(r.kind for r in env.results(job_id=i)) == ["sc", "seg", "sr"]
    failed = states[ids[1]]
    assert failed.state == JobState.FAILED and failed.attempts == 1, "a decoder crash is not retried"
    assert failed.reason in ("decoder_crashed", "undecodable_pixels"), failed.reason
    [row] = env.results(job_id=ids[1])
    sr = dcmread(env.root / row.archive_path)
    assert (row.kind, row.analysed) == ("sr", False) and sr_text(sr, "REASON") == [failed.reason]
    assert not any(j.state == JobState.RUNNING for j in states.values()), "no job waits for a lease to expire"
    assert elapsed < 120
    assert_no_tmp_leftovers(env)


def _expire(env: Env, job_id: int) -> None:
    with Session(env.engine) as session, session.begin():
        session.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=utcnow() - timedelta(hours=1)))


def test_a_job_whose_worker_died_on_every_attempt_gets_its_sr_without_being_analysed(tmp_path):
    env = make_env(tmp_path / "var", queue__max_attempts="2")
    [source] = clone_instances(SAMPLES / "chest" / "RG1_UNCR.dcm", tmp_path / "in", 1)
    job_id, _ = env.receive(source)
    for _ in range(2):  # two workers claim it and die (kill -9, OOM, a hung decoder)
        assert claim(env.engine, "dead-worker", 60, 2) is not None
        _expire(env, job_id)

    calls = []
    worker = env.worker(analyse=lambda sources, device=None, **_: calls.append(sources) or [])
    assert worker.run_once() == 1
    assert calls == [], "the pixels that killed two workers are not touched again"
    job = env.job(job_id)
    assert (job.state, job.reason, job.attempts) == (JobState.FAILED, "lease_expired", 3)
    [row] = env.results(job_id=job_id)
    sr = dcmread(env.root / row.archive_path)
    assert sr_text(sr, "REASON") == ["lease_expired"]
    assert any("interrupted 2 time(s)" in t for t in sr_text(sr, "EXPLANATION"))
    assert dciodvfy_errors(env.root / row.archive_path) == []


def test_a_job_taken_back_is_processed_alone_after_the_fresh_ones(tmp_path):
    env = make_env(tmp_path / "var", worker__batch_size="4", queue__max_attempts="3")
    hands = clone_instances(SAMPLES / "not-chest" / "Kodak_CR500_hand_J2KR.dcm", tmp_path / "in", 3)
    first, *_ = [env.receive(p)[0] for p in hands]
    assert claim(env.engine, "dead-worker", 60, 3).job_id == first
    _expire(env, first)
    batches = []
    worker = env.worker(analyse=lambda sources, device=None, **_: batches.append(len(sources))
                        or ai.analyse_batch(sources, device=device))
    assert worker.run_once() == 3
    assert batches == [2, 1], "the fresh jobs together, the taken-back one alone and last"
    assert all(env.job(i).state == JobState.NOT_ANALYSED for i in range(first, first + 3))


def test_a_job_with_no_result_object_is_counted_and_audited(tmp_path):
    def broken(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("no SR can be built")

    env = make_env(tmp_path / "var")
    job_id, rec = env.receive(SAMPLES / "not-chest" / "Kodak_CR500_hand_J2KR.dcm")
    no_builder_works = ResultBuilders(report=broken, last_resort=broken)
    assert env.worker(builders=no_builder_works).run_once() == 1
    assert env.job(job_id).state == JobState.FAILED and env.results(job_id=job_id) == []
    assert count_without_result(env.engine) == 1
    with Session(env.engine) as session:
        [event] = session.scalars(select(Event).where(Event.kind == NO_RESULT_EVENT)).all()
    assert f"job {job_id}" in event.detail and event.sop_instance_uid == rec.sop_instance_uid
    status = subprocess.run([sys.executable, "-m", "dicom_node.cli", "status", "--config", str(CONFIG),
                             "--set", f"storage.storage_root={env.root}"], capture_output=True, text=True,
                            timeout=60, cwd=REPO)
    assert status.returncode == 0, status.stderr
    assert "1 image(s) have no result object" in status.stdout


def test_a_worker_outlives_an_exclusive_lock_longer_than_the_busy_timeout(tmp_path, node_log, monkeypatch):
    # The node waits SQLITE_BUSY_TIMEOUT_S (30 s) for a lock; scaled down here so that a lock held 4x as long
    # (what a 2-minute backup or a stuck admin shell would be in production) costs seconds, not minutes.
    monkeypatch.setattr(db.engine, "SQLITE_BUSY_TIMEOUT_S", 1.5)
    env = make_env(tmp_path / "var", worker__poll_seconds="0.1")
    lock = sqlite3.connect(env.root / "node.sqlite", timeout=1, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    stop = threading.Event()
    worker = env.worker()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    try:
        time.sleep(4 * db.engine.SQLITE_BUSY_TIMEOUT_S)
        assert thread.is_alive(), "the worker died on the locked database"
    finally:
        lock.execute("COMMIT")
        lock.close()
    job_id, _ = env.receive(SAMPLES / "not-chest" / "Kodak_CR500_hand_J2KR.dcm")
    deadline = time.monotonic() + 60
    while env.job(job_id).state != JobState.NOT_ANALYSED and time.monotonic() < deadline:
        time.sleep(0.2)
    stop.set()
    thread.join(30)
    assert env.job(job_id).state == JobState.NOT_ANALYSED
    assert "database unavailable (OperationalError" in node_log.getvalue()


def test_results_are_built_off_the_model_thread_while_the_next_job_is_analysed(tmp_path):
    """``run``'s results lane: job 1's objects are built while job 2 is in the models; stopping drains the lane."""
    from dicom_node.results import build_report

    env = make_env(tmp_path / "var", worker__batch_size="1", worker__poll_seconds="0.05")
    events: list[tuple[str, str, float]] = []

    def analyse(sources, device=None, **options):  # type: ignore[no-untyped-def]
        events.append(("analyse", threading.current_thread().name, time.monotonic()))
        return ai.analyse_batch(sources, device=device, **options)

    def slow_build(header, record, identity):  # type: ignore[no-untyped-def]
        events.append(("build", threading.current_thread().name, time.monotonic()))
        time.sleep(1.5)  # longer than one analysis: the next one must start meanwhile
        return build_report(header, record, identity)

    job_ids = [env.receive(p)[0] for p in clone_instances(CHEST, tmp_path / "in", 3)]
    stop = threading.Event()
    thread = threading.Thread(target=env.worker(analyse=analyse, builders=ResultBuilders(report=slow_build)).run,
                              args=(stop,), daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while sum(e[0] == "build" for e in events) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()  # the third build is still sleeping: the lane must finish it before run returns
    thread.join(60)
    assert not thread.is_alive()
    assert [env.job(i).state for i in job_ids] == [JobState.DONE] * 3
    builds = [e for e in events if e[0] == "build"]
    analyses = [e for e in events if e[0] == "analyse"]
    assert {e[1] for e in builds} == {"results-lane"} and "results-lane" not in {e[1] for e in analyses}
    assert analyses[1][2] < builds[0][2] + 1.5, "the second analysis waited for the first job's results"
    assert len(env.results(job_id=job_ids[2])) == 3  # SEG + SR + SC of the job in hand at the stop
