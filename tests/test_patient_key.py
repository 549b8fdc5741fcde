"""The pseudonymous patient key: the keyed hash, the node's secret, the intake's rows and the upgrade of older rows."""

from __future__ import annotations

import hashlib
import io
import logging
import multiprocessing
import shutil
import stat
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlalchemy import inspect, select, text
from sqlalchemy.orm import Session

import dicom_node.patient_key as pk
from db.engine import init_schema, make_engine
from db.instances import record_new
from db.models import SCHEMA_VERSION, Instance
from dicom_node.archive import Archive, sha256_of
from dicom_node.intake import SUCCESS, Intake
from dicom_node.patient_key import (
    PatientKeySecretError,
    backfill_patient_keys,
    load_or_create_secret,
    patient_key,
    secret_path,
    study_key,
)
from dicom_node.received import received_instance

from .dicomgen import clone_instances
from .support.data import NOT_CHEST_TINY
from .support.dicom_tools import storescu
from .support.node import open_db

PLANTED_ID = "PLANTED-PID-4711"
SECRET = bytes(range(32))


def _images(out: Path, count: int = 1, **attributes: str | None) -> list[Path]:
    """``count`` real 16 x 16 CR images of one new study, with the patient attributes given (None: removed)."""
    ds = dcmread(NOT_CHEST_TINY)
    for keyword, value in attributes.items():
        if value is None:
            ds.pop(keyword, None)
        else:
            setattr(ds, keyword, value)
    return clone_instances(ds, out, count)


def _read(path: Path) -> Dataset:
    return dcmread(path, defer_size=1024)  # as the intake reads: values not converted yet


def _keys(engine) -> dict[str, str | None]:
    with Session(engine) as session:
        return {row.sop_instance_uid: row.patient_key for row in session.scalars(select(Instance))}


# --- the key -------------------------------------------------------------------------------------------------------


def test_one_patient_one_key_across_studies_and_instances(tmp_path):
    first = _images(tmp_path / "a", 2, PatientID=PLANTED_ID, IssuerOfPatientID="HOSP-A")
    second = _images(tmp_path / "b", 1, PatientID=PLANTED_ID, IssuerOfPatientID="HOSP-A")
    other_issuer = _images(tmp_path / "c", 1, PatientID=PLANTED_ID, IssuerOfPatientID="HOSP-B")
    no_issuer = _images(tmp_path / "d", 1, PatientID=PLANTED_ID, IssuerOfPatientID=None)
    other_patient = _images(tmp_path / "e", 1, PatientID=PLANTED_ID + "0", IssuerOfPatientID="HOSP-A")
    assert len({_read(p).StudyInstanceUID for p in first + second}) == 2
    keys = {p: patient_key(_read(p), SECRET) for p in first + second + other_issuer + no_issuer + other_patient}
    assert len({keys[p] for p in first + second}) == 1
    assert len(set(keys.values())) == 4  # the other issuer, no issuer and the other ID: each its own patient
    assert all(len(k) == 32 and int(k, 16) >= 0 for k in keys.values())
    # A converted (already read) element gives the key of the raw one.
    converted = dcmread(first[0])
    assert converted.PatientID == PLANTED_ID
    assert patient_key(converted, SECRET) == keys[first[0]]


def test_padding_and_character_sets_do_not_change_the_key(tmp_path):
    def written(charset: str | None, patient_id: bytes) -> Dataset:
        ds = dcmread(NOT_CHEST_TINY, stop_before_pixels=True)
        if charset is None:
            del ds.SpecificCharacterSet
        else:
            ds.SpecificCharacterSet = charset
        ds["PatientID"].value = patient_id  # bytes exactly as a modality wrote them
        buffer = io.BytesIO()
        ds.save_as(buffer)
        return dcmread(io.BytesIO(buffer.getvalue()))

    utf8 = written("ISO_IR 192", "MÜLLER-7 ".encode())
    latin1 = written("ISO_IR 100", "MÜLLER-7\x00".encode("latin-1"))
    assert patient_key(utf8, SECRET) == patient_key(latin1, SECRET)
    assert patient_key(written(None, b"AB12  "), SECRET) == patient_key(written("ISO_IR 100", b" AB12"), SECRET)
    assert patient_key(written(None, b"AB12"), SECRET) != patient_key(written(None, b"ab12"), SECRET)


def test_without_a_patient_id_each_study_is_its_own_patient(tmp_path):
    absent = _images(tmp_path / "a", 2, PatientID=None)
    empty = _images(tmp_path / "b", 1, PatientID="")
    keys_a = {patient_key(_read(p), SECRET) for p in absent}
    key_b = patient_key(_read(empty[0]), SECRET)
    assert keys_a == {study_key(_read(absent[0]).StudyInstanceUID, SECRET)}
    assert key_b == study_key(_read(empty[0]).StudyInstanceUID, SECRET) and key_b not in keys_a
    # A Patient ID that happens to equal a Study Instance UID is still a patient, not that study.
    study = _read(absent[0]).StudyInstanceUID
    named = _images(tmp_path / "c", 1, PatientID=study)
    assert patient_key(_read(named[0]), SECRET) != study_key(study, SECRET)


def test_the_key_reveals_neither_the_id_nor_its_hash(tmp_path):
    path = _images(tmp_path / "a", PatientID=PLANTED_ID, IssuerOfPatientID="HOSP-A")[0]
    key = patient_key(_read(path), SECRET)
    assert PLANTED_ID not in key and PLANTED_ID.lower() not in key
    for material in (PLANTED_ID, f"HOSP-A{PLANTED_ID}", f"HOSP-A^{PLANTED_ID}", f'["patient", "HOSP-A", '
                                                                                 f'"{PLANTED_ID}"]'):
        for algorithm in ("md5", "sha1", "sha256", "sha512"):
            digest = hashlib.new(algorithm, material.encode()).hexdigest()
            assert key not in digest and digest[:32] != key
    assert patient_key(_read(path), bytes(32)) != key  # another node's secret: another key


# --- the secret ----------------------------------------------------------------------------------------------------


def test_secret_is_made_once_kept_0600_and_read_back(tmp_path):
    root = tmp_path / "var"
    secret = load_or_create_secret(root)
    path = secret_path(root)
    assert len(secret) == 32 and path.is_file()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left
    assert load_or_create_secret(root) == secret  # a restart reads it back
    assert load_or_create_secret(tmp_path / "other") != secret


def test_a_malformed_or_unreadable_secret_is_a_clear_error(tmp_path):
    root = tmp_path / "var"
    load_or_create_secret(root)
    path = secret_path(root)
    path.write_text("not hex at all\n")
    with pytest.raises(PatientKeySecretError, match=r"patient-key secret .*patient-key is malformed .*backup"):
        load_or_create_secret(root)
    path.write_text("ab" * 16 + "\n")  # 16 bytes: too short
    with pytest.raises(PatientKeySecretError, match="malformed"):
        load_or_create_secret(root)
    path.unlink()
    path.mkdir()  # unreadable as a file (a chmod would not stop root)
    with pytest.raises(PatientKeySecretError, match=r"exists but cannot be read \(IsADirectoryError\)"):
        load_or_create_secret(root)


def _create_in_child(root: str, barrier, results) -> None:  # type: ignore[no-untyped-def]
    barrier.wait()
    results.put(load_or_create_secret(Path(root)).hex())


def test_processes_starting_together_agree_on_one_secret(tmp_path):
    ctx = multiprocessing.get_context("fork")
    for attempt in range(5):
        root = tmp_path / f"var{attempt}"
        barrier, results = ctx.Barrier(8), ctx.Queue()
        children = [ctx.Process(target=_create_in_child, args=(str(root), barrier, results)) for _ in range(8)]
        for child in children:
            child.start()
        secrets = [results.get(timeout=30) for _ in children]
        for child in children:
            child.join(30)
            assert child.exitcode == 0
        assert len(set(secrets)) == 1
        assert secrets[0] == load_or_create_secret(root).hex()
        assert [p.name for p in secret_path(root).parent.iterdir()] == ["patient-key"]


# --- received instances --------------------------------------------------------------------------------------------


def test_the_intake_stores_the_key_of_a_received_file(tmp_path):
    archive = Archive(tmp_path / "var", 0)
    archive.prepare()
    engine = make_engine(f"sqlite:///{tmp_path / 'var' / 'node.sqlite'}")
    init_schema(engine)
    secret = load_or_create_secret(archive.root)
    intake = Intake(archive, engine, "reject", patient_key_secret=secret)
    files = _images(tmp_path / "in", 2, PatientID=PLANTED_ID)
    for path in files:
        ds = _read(path)
        received = archive.tmp_dir / "received.dcm"
        shutil.copy(path, received)
        outcome = intake.store(received, "MODALITY", ds.SOPClassUID, ds.SOPInstanceUID, ds.file_meta.TransferSyntaxUID)
        assert outcome.status == SUCCESS, outcome
    expected = patient_key(_read(files[0]), secret)
    assert _keys(engine) == {_read(p).SOPInstanceUID: expected for p in files}


def test_a_node_keys_what_it_receives_and_keeps_its_secret(node_factory, tmp_path):
    alice = _images(tmp_path / "alice1", 1, PatientID=PLANTED_ID) + _images(tmp_path / "alice2", 1,
                                                                              PatientID=PLANTED_ID)
    bob = _images(tmp_path / "bob", 1, PatientID="BOB-1")
    node = node_factory().start()
    result = storescu(node.port, alice + bob)
    assert [status for _, status in result.statuses] == ["Success"] * 3, result.output
    secret = load_or_create_secret(node.storage_root)
    path = secret_path(node.storage_root)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    expected = {_read(p).SOPInstanceUID: patient_key(_read(p), secret) for p in alice + bob}
    assert _keys(open_db(node)) == expected and len(set(expected.values())) == 2
    assert node.stop() == 0

    # The database is lost: the restart re-registers the archive with the same keys (the secret stayed).
    for suffix in ("", "-wal", "-shm"):
        (node.storage_root / f"node.sqlite{suffix}").unlink(missing_ok=True)
    node.start()
    assert path.read_bytes().strip() == secret.hex().encode()
    assert _keys(open_db(node)) == expected
    assert node.stop() == 0
    assert PLANTED_ID not in node.log()


# --- databases from before schema version 3 ------------------------------------------------------------------------


def _version_2_database(root: Path, files: list[Path]) -> tuple[Archive, str, dict[str, Path]]:
    """A storage root whose database is as a version-2 node left it: rows (without patient keys) for ``files``,
    archived at their paths."""
    archive = Archive(root, 0)
    archive.prepare()
    url = f"sqlite:///{root / 'node.sqlite'}"
    engine = make_engine(url)
    init_schema(engine)
    archived: dict[str, Path] = {}
    for path in files:
        ds = _read(path)
        rec = received_instance(ds, archive, calling_aet="MODALITY", size_bytes=path.stat().st_size,
                                sha256=sha256_of(path), transfer_syntax_uid=ds.file_meta.TransferSyntaxUID)
        target = archive.absolute(rec.archive_path)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
        record_new(engine, rec)
        archived[rec.sop_instance_uid] = target
    index = next(i["name"] for i in inspect(engine).get_indexes("instances") if i["column_names"] == ["patient_key"])
    with engine.begin() as conn:
        conn.execute(text(f"DROP INDEX {index}"))
        conn.execute(text("ALTER TABLE instances DROP COLUMN patient_key"))
        conn.execute(text("UPDATE schema_info SET version = 2"))
    engine.dispose()
    return archive, url, archived


def test_an_upgraded_database_gets_every_key_from_the_archive(tmp_path, monkeypatch, caplog):
    alice = _images(tmp_path / "alice1", 2, PatientID=PLANTED_ID) + _images(tmp_path / "alice2", 1,
                                                                              PatientID=PLANTED_ID)
    nobody = _images(tmp_path / "nobody", 1, PatientID=None)
    lost = _images(tmp_path / "lost", 1, PatientID=PLANTED_ID)
    broken = _images(tmp_path / "broken", 1, PatientID=PLANTED_ID)
    archive, url, archived = _version_2_database(tmp_path / "var", alice + nobody + lost + broken)
    lost_uid, broken_uid = _read(lost[0]).SOPInstanceUID, _read(broken[0]).SOPInstanceUID
    archived[lost_uid].unlink()
    archived[broken_uid].write_bytes(b"no longer DICOM")

    engine = make_engine(url)
    assert "patient_key" not in {c["name"] for c in inspect(engine).get_columns("instances")}
    assert init_schema(engine) == SCHEMA_VERSION
    assert set(_keys(engine).values()) == {None}
    secret = load_or_create_secret(archive.root)
    monkeypatch.setattr(pk, "BACKFILL_BATCH", 2)  # several batches
    with caplog.at_level(logging.WARNING, logger="dicom_node.patient_key"):
        assert backfill_patient_keys(engine, archive.root, secret) == 6

    alice_key = patient_key(_read(alice[0]), secret)
    with Session(engine) as session:
        study_of = {row.sop_instance_uid: row.study_instance_uid for row in session.scalars(select(Instance))}
    expected = {_read(p).SOPInstanceUID: alice_key for p in alice}
    expected[_read(nobody[0]).SOPInstanceUID] = study_key(_read(nobody[0]).StudyInstanceUID, secret)
    for uid in (lost_uid, broken_uid):  # unreadable: each its study's key
        expected[uid] = study_key(study_of[uid], secret)
    assert _keys(engine) == expected
    assert len(set(expected.values())) == 4
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2 and all("archived file cannot be read" in w for w in warnings), warnings
    assert not any(PLANTED_ID in w for w in warnings)
    assert backfill_patient_keys(engine, archive.root, secret) == 0  # done once


@pytest.mark.parametrize("command", ["serve", "check"])
def test_serve_and_check_key_the_rows_of_an_upgraded_database(node_factory, tmp_path, command):
    files = _images(tmp_path / "a", 2, PatientID=PLANTED_ID) + _images(tmp_path / "b", 1, PatientID="OTHER")
    node = node_factory()
    _version_2_database(node.storage_root, files)
    if command == "serve":
        node.start()
        assert "patient keys: 3 instance row(s) from before schema version 3 keyed from their files" in node.log()
        assert node.stop() == 0
        output = node.log()
    else:
        check = node.cli("check")
        assert check.returncode == 0, check.stdout + check.stderr
        output = check.stdout + check.stderr
        assert "patient keys: 3 instance row(s)" in output
    assert PLANTED_ID not in output
    secret = load_or_create_secret(node.storage_root)
    assert _keys(open_db(node)) == {_read(p).SOPInstanceUID: patient_key(_read(p), secret) for p in files}


def test_serve_refuses_to_start_with_a_malformed_secret(node_factory):
    node = node_factory()
    path = secret_path(node.storage_root)
    path.parent.mkdir(parents=True)
    path.write_text("garbage\n")
    with pytest.raises(RuntimeError, match="exited with 1"):
        node.start()
    assert "patient-key secret" in node.log() and "is malformed" in node.log()
    assert "Traceback" not in node.log()
    check = node.cli("check")
    assert check.returncode == 2 and "is malformed" in check.stderr and "Traceback" not in check.stderr
