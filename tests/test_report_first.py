"""The report goes out before the picture: an analysed job's SR and SEG are recorded, queued for export and the
exporter rung before the heat-map SC is built; and once the report is out, no fault of the picture makes the job
end with a second, contradicting "not analysed" SR.

Real models, a real queue (SQLite, and PostgreSQL where the database's fencing is the subject: ``databases``) and
real files (``tests/test_worker.py``'s environment); the doorbells are the real pipes ``serve`` hands its workers
(``dicom_node.doorbell``), both ends in this process.
"""

from __future__ import annotations

import threading
from dataclasses import replace

from pydicom import dcmread
from sqlalchemy import select
from sqlalchemy.orm import Session

from db.findings import finding_of_job
from db.models import Event, JobState
from db.results import count_without_result
from dicom_node.doorbell import ServeBells, WorkerBells
from dicom_node.results import build_picture
from dicom_node.worker import ResultBuilders, Worker

from .dicomgen import clone_instances
from .support.dicom_tools import dciodvfy_errors
from .support.sr_tree import sr_text
from .test_worker import CHEST, DESTINATIONS, Env, make_env
from .test_worker_robustness import _expire


def _events(env: Env, kind: str) -> list[str]:
    with Session(env.engine) as session:
        return [e.detail for e in session.scalars(select(Event).where(Event.kind == kind).order_by(Event.id))]


def _analysed_srs(env: Env, job_id: int) -> list[bool]:
    return [r.analysed for r in env.results(job_id=job_id) if r.kind == "sr"]


def _failing_sc_writes(worker: Worker, error: OSError) -> Worker:
    """``worker`` with a result store whose SC writes raise ``error`` (the report's writes still succeed)."""
    store_write = worker.store.write

    def write(kind, ds, analysed, reason):  # type: ignore[no-untyped-def]
        if kind == "sc":
            raise error
        return store_write(kind, ds, analysed, reason)

    worker.store.write = write  # type: ignore[method-assign]
    return worker


def test_the_report_is_recorded_queued_and_rung_for_before_the_picture_is_built(tmp_path, databases):
    env = make_env(tmp_path / "var", databases, export__destinations=DESTINATIONS)
    [source] = clone_instances(CHEST, tmp_path / "in", 1)
    job_id, _ = env.receive(source)
    serve = ServeBells()
    rung = threading.Event()
    serve.on_results(rung.set)
    seen: dict[str, object] = {}

    def picture(header, record, identity):  # type: ignore[no-untyped-def]
        seen["rung"] = rung.wait(10)
        seen["state"] = env.job(job_id).state
        seen["kinds"] = sorted(r.kind for r in env.results(job_id=job_id))
        seen["exports"] = sorted((dest, state) for _uid, dest, state in env.exports())
        seen["finding"] = finding_of_job(env.engine, job_id) is not None
        return build_picture(header, record, identity)

    try:
        worker = Worker(env.config, env.engine, env.archive, analyse=env.worker().analyse,
                        builders=ResultBuilders(picture=picture), bells=WorkerBells(*serve.child_fds()))
        assert worker.run_once() == 1
    finally:
        serve.close()
    assert seen["rung"], "the exporter was not rung for the report before the picture was built"
    assert seen["state"] == JobState.RUNNING and seen["kinds"] == ["seg", "sr"] and seen["finding"]
    # the SR to both destinations, the SEG to the one that takes every kind
    assert seen["exports"] == [("pacs", "pending"), ("pacs", "pending"), ("reports", "pending")]
    job = env.job(job_id)
    assert job.state == JobState.DONE and job.lease_owner is None
    assert sorted(r.kind for r in env.results(job_id=job_id)) == ["sc", "seg", "sr"]
    assert len(env.exports()) == 4, "the report's exports were queued once, the SC's added"
    assert _events(env, "heat_map_missing") == []


def test_a_picture_that_cannot_be_encoded_leaves_the_job_done_with_its_report(tmp_path):
    def broken(header, record, identity):  # type: ignore[no-untyped-def]
        raise ValueError("a value quoted from the header: SMITH^JOHN")

    env = make_env(tmp_path / "var")
    [source] = clone_instances(CHEST, tmp_path / "in", 1)
    job_id, _ = env.receive(source)
    assert env.worker(builders=ResultBuilders(picture=broken)).run_once() == 1
    job = env.job(job_id)
    assert (job.state, job.attempts) == (JobState.DONE, 1)
    rows = env.results(job_id=job_id)
    assert sorted(r.kind for r in rows) == ["seg", "sr"] and _analysed_srs(env, job_id) == [True]
    [note] = _events(env, "heat_map_missing")
    assert "could not be encoded (ValueError" in note and "SMITH" not in note
    assert count_without_result(env.engine) == 0
    sr_row = next(r for r in rows if r.kind == "sr")
    assert sr_text(dcmread(env.root / sr_row.archive_path), "REASON") == []
    assert dciodvfy_errors(env.root / sr_row.archive_path) == []


def test_a_worker_that_dies_drawing_the_picture_on_its_last_attempt_leaves_one_report(tmp_path, databases):
    """The report was sent; drawing the picture killed the worker (simulated: the builder never returns, as after
    kill -9) on every attempt. The last claim only reports, and the report already exists: the job ends done
    with it and an audit note, not with a "not analysed" SR beside the analysed one."""

    class Died(BaseException):
        """Leaves the worker like kill -9 would: nothing after the report is recorded."""

    def dies(header, record, identity):  # type: ignore[no-untyped-def]
        raise Died

    env = make_env(tmp_path / "var", databases, queue__max_attempts="2", export__destinations=DESTINATIONS)
    [source] = clone_instances(CHEST, tmp_path / "in", 1)
    job_id, _ = env.receive(source)
    for attempt in range(2):
        try:
            env.worker(owner=f"doomed-{attempt}", builders=ResultBuilders(picture=dies)).run_once()
        except Died:
            pass
        assert env.job(job_id).state == JobState.RUNNING
        _expire(env, job_id)
    exports_before = env.exports()
    assert _analysed_srs(env, job_id) == [True], "the second attempt recorded the same report, not another"
    assert len(exports_before) == 3

    analysed = []
    worker = env.worker(analyse=lambda sources, device=None, **_: analysed.append(sources) or [])
    assert worker.run_once() == 1
    assert analysed == [], "the pixels that killed two workers are not touched again"
    job = env.job(job_id)
    assert (job.state, job.attempts) == (JobState.DONE, 3)
    assert _analysed_srs(env, job_id) == [True], "no second SR"
    assert sorted(r.kind for r in env.results(job_id=job_id)) == ["seg", "sr"]
    assert env.exports() == exports_before, "nothing queued twice"
    [note] = _events(env, "heat_map_missing")
    assert "lease_expired" in note and "interrupted 2 time(s)" in note
    assert count_without_result(env.engine) == 0


def test_a_picture_write_failure_is_retried_and_after_the_last_attempt_the_job_keeps_its_report(tmp_path):
    env = make_env(tmp_path / "var", queue__max_attempts="2", export__destinations=DESTINATIONS)
    [source] = clone_instances(CHEST, tmp_path / "in", 1)
    job_id, _ = env.receive(source)
    worker = _failing_sc_writes(env.worker(), OSError(28, "No space left on device"))  # the disk filled up
    assert worker.run_once() == 1
    job = env.job(job_id)
    assert (job.state, job.reason) == (JobState.QUEUED, "result_write_error"), "a transient failure: retried"
    exports_before = env.exports()
    assert worker.run_once() == 1
    job = env.job(job_id)
    assert (job.state, job.attempts) == (JobState.DONE, 2)
    assert _analysed_srs(env, job_id) == [True] and env.exports() == exports_before
    [note] = _events(env, "heat_map_missing")
    assert "result_write_error" in note
    assert list(env.archive.tmp_dir.iterdir()) == []


def test_a_report_of_an_earlier_attempt_is_kept_when_the_last_attempt_fails_otherwise(tmp_path):
    """Attempt 1 sent its report, then could not store its picture; attempt 2's analysis fails. Out of attempts,
    the job ends done with attempt 1's report, not failed with a "not analysed" SR beside it."""
    env = make_env(tmp_path / "var", queue__max_attempts="2")
    [source] = clone_instances(CHEST, tmp_path / "in", 1)
    job_id, _ = env.receive(source)
    first = _failing_sc_writes(env.worker(), OSError(5, "Input/output error"))
    assert first.run_once() == 1 and env.job(job_id).state == JobState.QUEUED

    def broken(sources, device=None, **_):  # type: ignore[no-untyped-def]
        raise RuntimeError("the model file went bad")

    assert env.worker(analyse=broken).run_once() == 1
    job = env.job(job_id)
    assert (job.state, job.attempts) == (JobState.DONE, 2)
    assert _analysed_srs(env, job_id) == [True], "no 'not analysed' SR beside the analysed one"
    [note] = _events(env, "heat_map_missing")
    assert "analysis_error" in note


def test_a_retry_under_another_champion_keeps_the_report_already_sent(tmp_path, databases):
    """Attempt 1 sent its report, then could not store its picture; before the retry a retrained classifier was
    promoted (other model versions, so the retry's report would have other UIDs). PACS must not get a second SR
    of the image from another model, nor a heat map that is not the report's: the job ends done with attempt 1's
    report, and nothing of the retry is written or queued."""
    env = make_env(tmp_path / "var", databases, queue__max_attempts="3", export__destinations=DESTINATIONS)
    [source] = clone_instances(CHEST, tmp_path / "in", 1)
    job_id, _ = env.receive(source)
    first = _failing_sc_writes(env.worker(), OSError(5, "Input/output error"))
    assert first.run_once() == 1 and env.job(job_id).state == JobState.QUEUED
    rows_before, exports_before = env.results(job_id=job_id), env.exports()
    files_before = sorted(p for p in env.root.rglob("*") if p.is_file())
    promoted = env.worker().analyse

    def under_a_new_champion(sources, device=None, **options):  # type: ignore[no-untyped-def]
        records = promoted(sources, device=device, **options)
        for record in records:
            record.classifier = replace(record.classifier, version="0.2.0-site")
        return records

    assert env.worker(analyse=under_a_new_champion).run_once() == 1
    job = env.job(job_id)
    assert (job.state, job.attempts) == (JobState.DONE, 2)
    assert [r.sop_instance_uid for r in env.results(job_id=job_id)] == [r.sop_instance_uid for r in rows_before]
    assert _analysed_srs(env, job_id) == [True], "one SR of the image in PACS, the one already sent"
    assert env.exports() == exports_before, "nothing of the retry queued"
    assert sorted(p for p in env.root.rglob("*") if p.is_file() and p not in files_before
                  and p.suffix == ".dcm") == [], "nothing of the retry written"
    [note] = _events(env, "heat_map_missing")
    assert "models_changed" in note and "0.2.0-site" in note
