"""Database integrity against real ``dicom-node serve`` subprocesses and storescu: a database file removed or
replaced under the running node stops the intake with 0xA701; start-up (and ``dicom-node check``) reconcile the
archive with the database."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from db.models import Event, Instance, JobState
from dicom_node.archive import sha256_of

from .conftest import free_port, open_db, storescu
from .dicomgen import clone_instances, synthetic_dx

GUARD_ERROR = re.compile(r" ERROR db\.integrity: the database file .* was (removed|replaced by another file) while "
                         r"this process was running .*restart")
PATIENT_VALUES = ("Test^Synthetic", "SYN-0001")  # what dicomgen writes as Patient Name and ID


def _wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def _archived(node) -> list[Path]:
    return sorted((node.storage_root / "archive").rglob("*.dcm"))


def _sop_uid(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _remove_database(node) -> None:
    for suffix in ("", "-wal", "-shm"):
        (node.storage_root / f"node.sqlite{suffix}").unlink(missing_ok=True)


def test_the_commit_itself_is_refused_when_the_file_was_replaced_during_the_transaction(tmp_path):
    from sqlalchemy import func, insert

    from db.engine import init_schema, make_engine
    from db.integrity import DatabaseReplaced, guard_of

    path = tmp_path / "node.sqlite"
    engine = make_engine(f"sqlite:///{path}")
    init_schema(engine)
    with pytest.raises(DatabaseReplaced):
        with engine.begin() as conn:
            conn.execute(insert(Event).values(kind="test"))
            empty = tmp_path / "empty"
            empty.write_bytes(b"")
            os.replace(empty, path)
    assert guard_of(engine).tripped and path.stat().st_size == 0

    def read() -> None:
        with engine.connect() as conn:
            conn.execute(select(func.count()).select_from(Event))

    with pytest.raises(DatabaseReplaced):  # sticky: a pooled connection's next transaction
        read()
    engine.dispose()
    with pytest.raises(DatabaseReplaced):  # no new connection opens the file now at the path
        read()
    assert path.stat().st_size == 0
    path.unlink()
    with pytest.raises(DatabaseReplaced):
        read()
    assert not path.exists(), "a removed database file must not be recreated"

    restarted = make_engine(f"sqlite:///{path}")  # what a restart opens: a new, empty database
    init_schema(restarted)
    with Session(restarted) as session:
        assert session.scalar(select(func.count()).select_from(Event)) == 0


@pytest.mark.parametrize("how", ["removed", "replaced"])
def test_database_removed_or_replaced_under_a_running_node_refuses_with_a701(node_factory, tmp_path, how):
    files = clone_instances(synthetic_dx(64, 64), tmp_path / "in", 4)
    # "removed": the C-STORE right after the removal must find it (the check before BEGIN/COMMIT), with the
    # background check far away; "replaced": an idle node must notice it by itself within a few seconds.
    interval = "60" if how == "removed" else "0.5"
    node = node_factory(database__identity_check_seconds=interval).start()
    assert storescu(node.port, [files[0]]).statuses == [(str(files[0]), "Success")]

    db = node.storage_root / "node.sqlite"
    if how == "removed":
        db.unlink()
    else:
        empty = db.with_name("empty.sqlite")
        empty.write_bytes(b"")
        os.replace(empty, db)
        assert _wait_for(lambda: GUARD_ERROR.search(node.log()), 5), node.log()[-3000:]

    started = time.monotonic()
    refused = storescu(node.port, files[1:], "-d", "-nh")  # -nh: go on after a failure
    assert time.monotonic() - started < 10
    assert len(refused.statuses) == 3 and all(status != "Success" for _, status in refused.statuses), refused.output
    assert refused.output.lower().count("0xa701") >= 3, refused.output[-3000:]
    assert [p.name for p in _archived(node)] == [f"{_sop_uid(files[0])}.dcm"], "nothing new may stay archived"
    log = node.log()
    assert len(GUARD_ERROR.findall(log)) == 1, log[-3000:]  # logged once, when detected
    assert log.count("status=0xA701") == 3
    # The node never recreated or wrote the file now at the path.
    if how == "removed":
        assert not db.exists()
    else:
        assert db.stat().st_size == 0
    assert node.stop() == 0

    # The admin restarts it: reconciliation registers the archived file in the database it now opens.
    node.start()
    assert re.search(r"WARNING dicom_node: reconciliation: .* 1 re-registered", node.log()), node.log()[-3000:]
    assert storescu(node.port, [files[1]]).statuses == [(str(files[1]), "Success")]
    with Session(open_db(node)) as session:
        assert sorted(session.scalars(select(Instance.sop_instance_uid))) == sorted(map(_sop_uid, files[:2]))
    assert node.stop() == 0


def test_a_tripped_guard_tells_its_listeners_once(tmp_path):
    """``serve`` reacts to a trip at once (``on_trip``), whichever thread's transaction saw it."""
    from db.engine import init_schema, make_engine
    from db.integrity import DatabaseReplaced, guard_of

    path = tmp_path / "node.sqlite"
    engine = make_engine(f"sqlite:///{path}")
    init_schema(engine)
    guard = guard_of(engine)
    calls: list[str] = []
    guard.on_trip(lambda: calls.append("before"))
    guard.on_trip(lambda: 1 / 0)  # a broken listener neither stops the others nor hides the guard's own error
    guard.on_trip(lambda: calls.append("before, too"))
    assert guard.poll() and calls == []
    path.unlink()
    with pytest.raises(DatabaseReplaced):
        with engine.begin() as conn:
            conn.execute(select(Event.id))
    assert not guard.poll() and calls == ["before", "before, too"]
    guard.on_trip(lambda: calls.append("after"))  # already tripped: at once
    assert calls == ["before", "before, too", "after"]


def test_a_replaced_database_stops_the_export_rounds_and_the_database_jobs(node_factory):
    """The scheduler's identity check notices it on an idle node; the exporter and the database jobs then stop
    instead of failing every poll until the restart, and the node still stops cleanly."""
    destination = {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}
    node = node_factory(database__identity_check_seconds="0.5",
                        export__destinations=json.dumps([destination])).start()
    scheduled = re.search(r"INFO dicom_node\.scheduler: scheduler: (.*)", node.log())
    assert scheduled and "database-identity every 0.5 s" in scheduled.group(1), node.log()[-3000:]
    db = node.storage_root / "node.sqlite"
    empty = db.with_name("empty.sqlite")
    empty.write_bytes(b"")
    os.replace(empty, db)
    assert _wait_for(lambda: "exporter stopped: the database file was removed or replaced" in node.log(), 5), \
        node.log()[-3000:]
    time.sleep(1.0)  # a round that was in progress at the trip has ended by now
    settled = len(node.log())
    time.sleep(2.0)  # four export polls and identity checks later
    later = node.log()[settled:]
    assert "export round" not in later and "scheduled job" not in later, later[-3000:]
    assert len(GUARD_ERROR.findall(node.log())) == 1
    assert node.stop() == 0


def _scope_samples(tmp_path: Path) -> list[Path]:
    """Three in-scope DX, a knee (queued for its 'not analysed' SR) and a CT (not an image for the CAD)."""
    files = clone_instances(synthetic_dx(64, 64), tmp_path / "in", 5)
    knee = dcmread(files[3])
    knee.BodyPartExamined = "KNEE"
    knee.save_as(files[3], enforce_file_format=True)
    ct = dcmread(files[4])
    ct.SOPClassUID = ct.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ct.Modality = "CT"
    ct.save_as(files[4], enforce_file_format=True)
    return files


def _rows(node) -> dict[str, Instance]:
    with Session(open_db(node)) as session:
        return {i.sop_instance_uid: i for i in
                session.scalars(select(Instance).options(selectinload(Instance.jobs)))}


def _age(paths: list[Path], seconds: float = 3600) -> None:
    past = time.time() - seconds
    for path in paths:
        os.utime(path, (past, past))


def test_start_up_reconciles_archive_and_database_and_check_reports(node_factory, tmp_path):
    files = _scope_samples(tmp_path)
    node = node_factory().start()
    result = storescu(node.port, files)
    assert [status for _, status in result.statuses] == ["Success"] * 5, result.output
    assert re.search(r"INFO dicom_node: reconciliation: archive and database agree: 0 archived file", node.log())
    assert node.stop() == 0
    before = {uid: (row.sha256, row.size_bytes, row.in_scope, row.scope_reason, row.jobs[0].state)
              for uid, row in _rows(node).items()}
    assert sorted(state for *_, state in before.values()) == sorted([JobState.QUEUED] * 4 + [JobState.NOT_ANALYSED])
    # Not received instances: copies under conflicts/ and results/ must never be registered.
    archived = _archived(node)
    for other in ("conflicts", "results/1.2/3.4"):
        (node.storage_root / other).mkdir(parents=True, exist_ok=True)
        shutil.copy(archived[0], node.storage_root / other / "1.2.3.4.5.dcm")

    # 1. The database file is deleted while the node is stopped: start-up re-registers and queues every file.
    _remove_database(node)
    node.start()
    assert re.search(r"WARNING dicom_node: reconciliation: archive and database disagreed: 5 archived file\(s\), "
                     r"0 instance row\(s\): 5 re-registered \(4 queued for analysis\), 0 row\(s\) whose file is "
                     r"missing", node.log()), node.log()[-3000:]
    rows = _rows(node)
    assert set(rows) == set(before)
    for uid, row in rows.items():
        path = node.storage_root / row.archive_path
        assert row.sha256 == sha256_of(path) == before[uid][0]
        assert (row.size_bytes, row.in_scope, row.scope_reason, row.jobs[0].state) == before[uid][1:]
        assert row.calling_aet == "(reconciled)" and len(row.jobs) == 1
    status = node.cli("status")
    assert status.returncode == 0 and "(serve): 5 re-registered, 0 missing file(s), 0 not registrable, of 5 " \
                                      "archived file(s)" in status.stdout, status.stdout
    # The node works on: an identical copy is a duplicate of the re-registered row, a new instance is stored.
    extra = clone_instances(synthetic_dx(64, 64, seed=3), tmp_path / "extra", 1)
    again = storescu(node.port, [files[0], *extra])
    assert [status for _, status in again.statuses] == ["Success", "Success"], again.output
    with Session(open_db(node)) as session:
        kinds = [e.kind for e in session.scalars(select(Event))]
    assert kinds.count("reregistered") == 5 and kinds.count("duplicate_identical") == 1
    assert node.stop() == 0

    # 2. One archived file is deleted: reported at start-up, by status and by check; its row stays.
    lost_uid = _sop_uid(files[1])
    lost = node.storage_root / _rows(node)[lost_uid].archive_path
    kept = tmp_path / "kept.dcm"
    shutil.move(lost, kept)
    node.start()
    assert re.search(r"WARNING dicom_node: reconciliation: .*: 0 re-registered \(0 queued for analysis\), 1 row\(s\) "
                     r"whose file is missing.*'dicom-node check' lists", node.log()), node.log()[-3000:]
    assert lost_uid in _rows(node)
    status = node.cli("status")
    assert "(serve): 0 re-registered, 1 missing file(s)" in status.stdout, status.stdout
    assert "WARNING: at the last reconciliation 1 instance row(s) had no archived file" in status.stdout
    check = node.cli("check")  # while the node is serving
    assert check.returncode == 1, check.stdout + check.stderr
    assert re.search(r"missing files\s+1", check.stdout)
    assert f"  {lost_uid}  {lost.relative_to(node.storage_root).as_posix()}" in check.stdout, check.stdout
    assert not any(value in check.stdout + check.stderr for value in PATIENT_VALUES)
    assert lost_uid in _rows(node), "a row whose file is missing is never deleted"
    shutil.move(kept, lost)
    check = node.cli("check")
    assert check.returncode == 0 and "consistent" in check.stdout, check.stdout
    assert "(check): 0 re-registered, 0 missing file(s)" in node.cli("status").stdout
    assert node.stop() == 0

    # 3. check re-registers too (the node stopped); a file written in the last minutes is left to the intake,
    #    and a file that is not DICOM is listed and left in place.
    _remove_database(node)
    recent, *older = _archived(node)
    _age(older)
    junk = node.storage_root / "archive" / "1.2" / "3.4" / "5.6.dcm"
    junk.parent.mkdir(parents=True)
    junk.write_bytes(b"not DICOM")
    _age([junk])
    check = node.cli("check")
    assert check.returncode == 1, check.stdout + check.stderr
    assert re.search(r"re-registered\s+5\b", check.stdout) and re.search(r"recent, left alone\s+1\b", check.stdout)
    assert "archive/1.2/3.4/5.6.dcm: " in check.stdout and junk.exists()
    _age([recent])
    check = node.cli("check")
    assert check.returncode == 1 and re.search(r"re-registered\s+1\b", check.stdout), check.stdout
    junk.unlink()
    check = node.cli("check")
    assert check.returncode == 0 and re.search(r"re-registered\s+0\b", check.stdout), check.stdout
    assert len(_rows(node)) == 6
    assert node.cli("check", "--set", "network.port=0").returncode == 2
