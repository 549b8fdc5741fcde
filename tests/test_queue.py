"""The queue contract on a real database, SQLite and PostgreSQL (``db_url``): atomic claims across processes, leases,
retries, fencing; SQLite's own settings (WAL, lock-free lookups) on SQLite alone.

A job is ended the way the worker ends it: ``db.results.finish_job`` with its result objects (``_finish``)."""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.synchronize
import time

import pytest
from sqlalchemy import select
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session

from db import queue
from db.engine import SchemaError, init_schema, make_engine
from db.instances import ReceivedInstance, record_new
from db.leases import JOBS
from db.models import Event, Job, JobState, SchemaInfo, utcnow
from db.results import ResultFile, finish_job

MAX_ATTEMPTS = 3


def _record(i: int, in_scope: bool = True, reason: str = "sop_class_not_radiograph") -> ReceivedInstance:
    return ReceivedInstance(
        sop_instance_uid=f"1.2.3.{i}", sop_class_uid="1.2.840.10008.5.1.4.1.1.1", study_instance_uid="1.2.3",
        series_instance_uid="1.2.3.0", accession_number=None, modality="CR", calling_aet="TEST",
        archive_path=f"archive/1.2.3/1.2.3.0/1.2.3.{i}.dcm", size_bytes=1, sha256="0" * 64,
        transfer_syntax_uid="1.2.840.10008.1.2.1", in_scope=in_scope,
        scope_reason="in_scope" if in_scope else reason,
    )


def _finish(engine, job: queue.ClaimedJob) -> bool:
    """End ``job`` done with one result object, as the worker does; False when its lease was lost."""
    sr = ResultFile(kind="sr", sop_instance_uid=f"2.25.{job.job_id}", sop_class_uid="1.2.840.10008.5.1.4.1.1.88.33",
                    series_instance_uid="2.25.0", transfer_syntax_uid="1.2.840.10008.1.2.1",
                    archive_path=f"results/2.25.{job.job_id}.dcm", size_bytes=1, analysed=True, reason="analysed")
    return finish_job(engine, job, JobState.DONE, None, None, [sr], {})


@pytest.fixture
def engine(db_url):
    engine = make_engine(db_url)
    init_schema(engine)
    return engine


@pytest.fixture
def sqlite_engine(tmp_path):
    """For what only SQLite has (its journal mode, its write lock)."""
    engine = make_engine(f"sqlite:///{tmp_path / 'q.sqlite'}")
    init_schema(engine)
    return engine


def expire_leases(engine) -> None:
    """Let lease time pass deterministically (sleeping would make the tests depend on the machine's load)."""
    from datetime import timedelta

    from sqlalchemy import update

    with Session(engine) as session, session.begin():
        session.execute(update(Job).where(Job.state == JobState.RUNNING)
                        .values(lease_expires_at=utcnow() - timedelta(seconds=1)))


def test_claim_complete_and_empty_queue(engine):
    record_new(engine, _record(1))
    record_new(engine, _record(2, in_scope=False))  # not an image: straight to not_analysed, never claimable
    job = queue.claim(engine, "w1", lease_seconds=60, max_attempts=MAX_ATTEMPTS)
    assert job is not None and job.sop_instance_uid == "1.2.3.1" and job.attempt == 1
    assert queue.claim(engine, "w2", 60, MAX_ATTEMPTS) is None
    assert _finish(engine, job)
    assert queue.counts_by_state(engine) == {"queued": 0, "running": 0, "done": 1, "failed": 0,
                                             "not_analysed": 1}


def test_failures_are_retried_then_final(engine):
    record_new(engine, _record(1))
    states = []
    for _ in range(MAX_ATTEMPTS):
        job = queue.claim(engine, "w1", 60, MAX_ATTEMPTS)
        states.append(queue.fail(engine, job, "decode_error", "broken JPEG stream", MAX_ATTEMPTS))
    assert states == [JobState.QUEUED, JobState.QUEUED, JobState.FAILED]
    assert queue.claim(engine, "w1", 60, MAX_ATTEMPTS) is None
    with Session(engine) as session:
        job_row = session.scalars(select(Job)).one()
        assert (job_row.attempts, job_row.reason, job_row.last_error) == (3, "decode_error", "broken JPEG stream")


def test_non_retryable_failure_is_final_at_once(engine):
    record_new(engine, _record(1))
    job = queue.claim(engine, "w1", 60, MAX_ATTEMPTS)
    assert queue.fail(engine, job, "corrupt_pixels", "x", MAX_ATTEMPTS, retryable=False) == JobState.FAILED


def test_expired_lease_is_taken_back_and_the_old_owner_is_fenced_off(engine):
    record_new(engine, _record(1))
    crashed = queue.claim(engine, "crashed-worker", lease_seconds=60, max_attempts=MAX_ATTEMPTS)
    assert queue.claim(engine, "w2", 60, MAX_ATTEMPTS) is None  # lease still valid
    expire_leases(engine)
    taken = queue.claim(engine, "w2", 60, MAX_ATTEMPTS)
    assert taken is not None and taken.job_id == crashed.job_id and taken.attempt == 2
    assert not _finish(engine, crashed), "a worker that lost its lease must not write a result"
    assert JOBS.extend(engine, [crashed.job_id], crashed.lease_owner, 60) == 0
    assert queue.fail(engine, crashed, "decode_error", "x", MAX_ATTEMPTS) is None
    assert JOBS.extend(engine, [taken.job_id], taken.lease_owner, 60) == 1
    assert _finish(engine, taken)
    with Session(engine) as session:
        kinds = [e.kind for e in session.scalars(select(Event).order_by(Event.id))]
    assert "job_taken_back" in kinds and kinds[-1] == "job_done"


def test_lease_expiry_counts_as_an_attempt(engine):
    record_new(engine, _record(1))
    for _ in range(MAX_ATTEMPTS):
        assert queue.claim(engine, "dying", 60, MAX_ATTEMPTS) is not None
        expire_leases(engine)
    # Out of attempts: handed out once more, for its "not analysed" SR only (the pixels are not touched again).
    reporting = queue.claim(engine, "w", 60, MAX_ATTEMPTS)
    assert reporting is not None and reporting.report_only and reporting.taken_back
    expire_leases(engine)  # even the reporting attempt died
    assert queue.claim(engine, "w", 60, MAX_ATTEMPTS) is None  # a poison job does not crash workers forever
    assert queue.counts_by_state(engine)["failed"] == 1
    with Session(engine) as session:
        kinds = [e.kind for e in session.scalars(select(Event).order_by(Event.id))]
    assert kinds[-1] == queue.NO_RESULT_EVENT


def test_a_fresh_claim_is_neither_taken_back_nor_report_only(engine):
    record_new(engine, _record(1))
    job = queue.claim(engine, "w", 60, MAX_ATTEMPTS)
    assert not job.taken_back and not job.report_only


def test_expired_leases_are_taken_back_by_the_next_claims(engine):
    """No sweep re-queues a job whose worker died (a slow worker does not renew its lease): the next claim takes
    each back, to be processed alone."""
    for i in range(3):
        record_new(engine, _record(i))
    for _ in range(3):
        queue.claim(engine, "dying", 60, MAX_ATTEMPTS)
    expire_leases(engine)
    taken = [queue.claim(engine, "w", 60, MAX_ATTEMPTS) for _ in range(3)]
    assert [(j.taken_back, j.report_only, j.attempt) for j in taken] == [(True, False, 2)] * 3
    assert sorted(j.job_id for j in taken) == [1, 2, 3]
    assert queue.counts_by_state(engine)["running"] == 3
    with Session(engine) as session:
        kinds = [e.kind for e in session.scalars(select(Event).order_by(Event.id))]
    assert kinds.count("job_taken_back") == 3


def test_a_job_out_of_attempts_is_handed_out_for_its_report(engine):
    record_new(engine, _record(1))
    for _ in range(MAX_ATTEMPTS):
        queue.claim(engine, "dying", 60, MAX_ATTEMPTS)
        expire_leases(engine)
    reporting = queue.claim(engine, "w", 60, MAX_ATTEMPTS)
    assert reporting is not None and reporting.report_only


def _drain(url: str, worker_id: str, start: mp.synchronize.Barrier, out: mp.Queue[list[int]]) -> None:
    engine = make_engine(url)
    with engine.connect():  # connected (and imported) before the race starts
        pass
    start.wait(60)
    claimed = []
    while (job := queue.claim(engine, worker_id, 60, MAX_ATTEMPTS)) is not None:
        claimed.append(job.job_id)
        assert _finish(engine, job)
    out.put(claimed)


def test_four_worker_processes_claim_each_job_exactly_once(db_url):
    """Four processes start claiming at the same moment. On SQLite BEGIN IMMEDIATE serialises the claims; on
    PostgreSQL they run at once, each skipping the rows the others have locked."""
    engine = make_engine(db_url)
    init_schema(engine)
    for i in range(200):
        record_new(engine, _record(i))
    ctx = mp.get_context("spawn")
    results: mp.Queue = ctx.Queue()
    start = ctx.Barrier(4)
    procs = [ctx.Process(target=_drain, args=(db_url, f"w{i}", start, results)) for i in range(4)]
    for p in procs:
        p.start()
    per_worker = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    claimed = [job_id for jobs in per_worker for job_id in jobs]
    assert sorted(claimed) == list(range(1, 201)), "a job was claimed twice or never"
    assert sum(1 for jobs in per_worker if jobs) > 1, f"one worker drained the queue alone: {per_worker}"
    assert queue.counts_by_state(engine)["done"] == 200


def test_postgresql_claim_skips_locked_rows():
    """The same claim statement renders FOR UPDATE SKIP LOCKED on PostgreSQL (SQLite ignores it)."""
    sql = str(queue.claim_statement(utcnow()).compile(dialect=postgresql.dialect()))
    assert "FOR UPDATE SKIP LOCKED" in sql
    from sqlalchemy.dialects import sqlite

    assert "FOR UPDATE" not in str(queue.claim_statement(utcnow()).compile(dialect=sqlite.dialect()))


@pytest.mark.postgresql
def test_postgresql_claims_skip_a_job_another_worker_is_claiming(postgres_url):
    """While one worker's claim transaction holds the oldest job's row lock, another worker's claim neither waits for
    it nor takes it: it gets the next job at once."""
    engine = make_engine(postgres_url)
    init_schema(engine)
    for i in range(2):
        record_new(engine, _record(i))
    with Session(engine) as first, first.begin():
        locked = first.scalars(queue.claim_statement(utcnow())).one().id
        started = time.monotonic()
        other = queue.claim(engine, "w2", 60, MAX_ATTEMPTS)
        assert other is not None and other.job_id != locked and time.monotonic() - started < 5
        assert queue.claim(engine, "w3", 60, MAX_ATTEMPTS) is None  # the only other job is locked
    mine = queue.claim(engine, "w1", 60, MAX_ATTEMPTS)
    assert mine is not None and mine.job_id == locked


def test_schema_version_mismatch_is_refused(engine):
    with Session(engine) as session, session.begin():
        session.scalars(select(SchemaInfo)).one().version = 999
    with pytest.raises(SchemaError, match="999"):
        init_schema(engine)


def test_sqlite_runs_in_wal_mode_with_full_sync(sqlite_engine):
    with sqlite_engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL


def test_lookups_do_not_wait_for_the_write_lock(sqlite_engine, tmp_path):
    """A worker holding a write transaction must not stall the intake's duplicate lookup."""
    import sqlite3

    from db.instances import find_instance

    engine = sqlite_engine
    record_new(engine, _record(1))
    writer = sqlite3.connect(tmp_path / "q.sqlite", isolation_level=None, timeout=1)
    writer.execute("BEGIN IMMEDIATE")
    try:
        started = time.monotonic()
        found = find_instance(engine, "1.2.3.1")
        assert found is not None and time.monotonic() - started < 1.0
        assert queue.counts_by_state(engine)["queued"] == 1
    finally:
        writer.execute("ROLLBACK")
        writer.close()


def test_refused_images_are_queued_so_the_worker_reports_them(engine):
    record_new(engine, _record(3, in_scope=False, reason="body_part_not_chest"))
    job = queue.claim(engine, "w1", lease_seconds=60, max_attempts=MAX_ATTEMPTS)
    assert job is not None and job.sop_instance_uid == "1.2.3.3"
