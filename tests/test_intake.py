"""The Storage SCP against real DCMTK peers: storage, scope verdicts, association control, failures, duplicates."""

from __future__ import annotations

import os
import sqlite3
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from db.models import Event, Instance, Job, JobState
from dicom_node.archive import sha256_of

from .conftest import (
    PEER_ENV,
    SAMPLES,
    STORESCU_FLAG,
    dcmtk_wire_encoding,
    file_transfer_syntax,
    open_db,
    require_tool,
    sample_files,
    storescu,
)
from .dicomgen import clone_instances, dataset_bytes, synthetic_dx

EXPECTED_SCOPE = {
    "chest": "in_scope",
    "not-chest/Kodak_CR500_hand_J2KR.dcm": "body_part_not_chest",
    "not-chest/RG3_J2KR.dcm": "body_part_not_chest",
    "not-chest/CR1_6154_Agfa_16x16.dcm": "body_part_not_chest",
    "not-chest/CR2_6247_Agfa_16x16.dcm": "body_part_not_chest",
    "not-chest/CR3_6278_Agfa_16x16.dcm": "body_part_not_chest",
    "reference-outputs": "sop_class_not_radiograph",
}


def expected_scope(path: Path) -> str:
    rel = path.relative_to(SAMPLES).as_posix()
    return EXPECTED_SCOPE.get(rel) or EXPECTED_SCOPE[rel.split("/")[0]]


def archived_files(node) -> list[Path]:
    return sorted((node.storage_root / "archive").rglob("*.dcm"))


def send_each_in_own_syntax(port: int, files: list[Path], **kwargs) -> list[tuple[str, str]]:
    by_flag: dict[str, list[Path]] = defaultdict(list)
    for path in files:
        by_flag[STORESCU_FLAG[file_transfer_syntax(path)]].append(path)
    statuses = []
    for flag, group in by_flag.items():
        result = storescu(port, group, flag, "-R", **kwargs)  # -R: propose the files' own SOP classes
        statuses += result.statuses
    return statuses


def test_every_sample_lands_byte_identical_with_its_scope_verdict(node, tmp_path):
    require_tool("echoscu")
    echo = subprocess.run(["echoscu", "-aec", "PNEUMOCAD", "127.0.0.1", str(node.port)], env=PEER_ENV,
                          capture_output=True, text=True, timeout=30)
    assert echo.returncode == 0, echo.stderr

    files = sample_files("chest", "not-chest", "reference-outputs")
    statuses = send_each_in_own_syntax(node.port, files)
    assert len(statuses) == len(files)
    assert all(status == "Success" for _, status in statuses), statuses

    engine = open_db(node)
    with Session(engine) as session:
        rows = {i.sop_instance_uid: i for i in session.scalars(select(Instance).options(selectinload(Instance.jobs)))}
        jobs = session.scalars(select(Job)).all()
    assert len(rows) == len(files) and len(jobs) == len(files)
    for path in files:
        ds = dcmread(path, stop_before_pixels=True)
        row = rows[ds.SOPInstanceUID]
        archived = node.storage_root / row.archive_path
        assert archived == (node.storage_root / "archive" / ds.StudyInstanceUID / ds.SeriesInstanceUID
                            / f"{ds.SOPInstanceUID}.dcm")
        sent = dcmtk_wire_encoding(path, tmp_path / path.name)
        assert dataset_bytes(archived) == dataset_bytes(sent), f"{path.name} was altered in transit"
        assert dcmread(archived) == dcmread(sent)
        assert row.transfer_syntax_uid == str(ds.file_meta.TransferSyntaxUID)
        assert row.sha256 == sha256_of(archived) and row.size_bytes == archived.stat().st_size
        assert row.calling_aet == "STORESCU"
        assert row.scope_reason == expected_scope(path), path.name
        assert row.in_scope == (row.scope_reason == "in_scope")
        (job,) = row.jobs
        if row.scope_reason == "sop_class_not_radiograph":  # not an image: ends here, no report about it
            assert job.state == JobState.NOT_ANALYSED and job.reason == row.scope_reason
        else:  # images, in scope or not: the worker analyses them or answers with a "not analysed" SR
            assert job.state == JobState.QUEUED
    assert not list((node.storage_root / "tmp").iterdir())

    status = node.cli("status")
    assert status.returncode == 0
    assert "queued" in status.stdout and "not_analysed" in status.stdout and "disk free" in status.stdout
    jobs_table = node.cli("jobs", "--state", "not_analysed")
    assert jobs_table.returncode == 0 and "sop_class_not_radiograph" in jobs_table.stdout
    assert "in_scope" not in jobs_table.stdout and "body_part_not_chest" not in jobs_table.stdout

    assert node.stop() == 0, node.log()
    log = node.log()
    assert "listening on" in log and str(node.port) in log
    for path in files:  # no patient names or IDs in the log
        ds = dcmread(path, stop_before_pixels=True)
        for keyword in ("PatientName", "PatientID"):
            value = str(ds.get(keyword, "") or "")
            if len(value) > 3:
                assert value not in log, f"{keyword} of {path.name} leaked into the log"


def test_calling_ae_not_on_the_allow_list_is_rejected(node_factory):
    node = node_factory(network__allowed_calling_aets="MODALITY1,MODALITY2").start()
    file = sample_files("not-chest")[0]
    refused = storescu(node.port, [file], aet="INTRUDER")
    assert refused.returncode != 0
    assert "Calling AE Title Not Recognized" in refused.output, refused.output
    assert not archived_files(node)
    accepted = storescu(node.port, [file], aet="MODALITY2")
    assert accepted.statuses == [(str(file), "Success")], accepted.output
    assert "rejected" in node.log()


def test_associations_beyond_the_limit_are_rejected(node_factory):
    """Hold one association open with a slow, never-releasing peer; a second one is refused."""
    import socket

    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    node = node_factory(network__max_associations="1").start()
    holder = AE(ae_title="HOLDER")
    holder.add_requested_context(Verification)
    assoc = holder.associate("127.0.0.1", node.port, ae_title="PNEUMOCAD")
    try:
        assert assoc.is_established
        refused = subprocess.run(["echoscu", "-aec", "PNEUMOCAD", "127.0.0.1", str(node.port)], env=PEER_ENV,
                                 capture_output=True, text=True, timeout=30)
        assert refused.returncode != 0
        assert "Local Limit Exceeded" in refused.stdout + refused.stderr, refused.stdout + refused.stderr
    finally:
        assoc.release()
    del socket


def test_idle_association_is_closed_after_the_network_timeout(node_factory):
    import time

    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    node = node_factory(network__network_timeout="1", network__acse_timeout="1", network__dimse_timeout="1").start()
    peer = AE(ae_title="IDLE")
    peer.add_requested_context(Verification)
    assoc = peer.associate("127.0.0.1", node.port, ae_title="PNEUMOCAD")
    assert assoc.is_established
    deadline = time.monotonic() + 10
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not assoc.is_established, "the node kept an idle association open past its network timeout"


def test_free_disk_reserve_refuses_with_a700_and_recovers(node_factory, tmp_path):
    import shutil

    margin = 512 * 2**20
    free = shutil.disk_usage(tmp_path).free
    reserve_mb = (free - margin) // 2**20
    node = node_factory(storage__free_disk_reserve_mb=str(reserve_mb)).start()
    files = clone_instances(synthetic_dx(64, 64), tmp_path / "in", 3)

    first = storescu(node.port, [files[0]])
    assert first.statuses == [(str(files[0]), "Success")], first.output

    ballast = tmp_path / "ballast"
    subprocess.run(["fallocate", "-l", str(2 * margin), str(ballast)], check=True)
    try:
        refused = storescu(node.port, [files[1]], "-d")
        assert refused.statuses and refused.statuses[0][1] != "Success", refused.output
        assert "0xa700" in refused.output.lower(), refused.output
    finally:
        ballast.unlink()
    recovered = storescu(node.port, [files[2]])
    assert recovered.statuses == [(str(files[2]), "Success")], recovered.output

    stored = {p.name for p in archived_files(node)}
    uid = lambda p: f"{dcmread(p, stop_before_pixels=True).SOPInstanceUID}.dcm"  # noqa: E731
    assert uid(files[0]) in stored and uid(files[2]) in stored and uid(files[1]) not in stored
    assert not list((node.storage_root / "tmp").iterdir())


def test_failing_database_step_gives_failure_and_leaves_no_file(node, tmp_path):
    files = clone_instances(synthetic_dx(64, 64), tmp_path / "in", 2)
    db_path = node.storage_root / "node.sqlite"
    with sqlite3.connect(db_path) as conn:
        conn.execute("CREATE TRIGGER inject_failure BEFORE INSERT ON jobs "
                     "BEGIN SELECT RAISE(ABORT, 'injected failure'); END")
    failed = storescu(node.port, [files[0]], "-d")
    assert failed.statuses and failed.statuses[0][1] != "Success", failed.output
    assert "0xa701" in failed.output.lower(), failed.output
    assert not archived_files(node)
    assert not list((node.storage_root / "tmp").iterdir())
    with Session(open_db(node)) as session:
        assert session.scalars(select(Instance)).first() is None  # the instance insert was rolled back too

    with sqlite3.connect(db_path) as conn:
        conn.execute("DROP TRIGGER inject_failure")
    ok = storescu(node.port, [files[1]])
    assert ok.statuses == [(str(files[1]), "Success")]
    assert len(archived_files(node)) == 1
    failed_uid = dcmread(files[0], stop_before_pixels=True).SOPInstanceUID
    failure_lines = [line for line in node.log().splitlines() if failed_uid in line]
    assert len(failure_lines) == 1 and "database commit failed" in failure_lines[0], failure_lines


def test_identical_duplicate_is_success_without_a_second_job(node, tmp_path):
    (file,) = clone_instances(synthetic_dx(64, 64), tmp_path / "in", 1)
    for _ in range(2):
        result = storescu(node.port, [file])
        assert result.statuses == [(str(file), "Success")]
    with Session(open_db(node)) as session:
        assert len(session.scalars(select(Instance)).all()) == 1
        assert len(session.scalars(select(Job)).all()) == 1
        kinds = [e.kind for e in session.scalars(select(Event))]
    assert kinds.count("received") == 1 and kinds.count("duplicate_identical") == 1


def _changed_copy(file: Path, out: Path) -> Path:
    ds = dcmread(file)
    ds.InstanceNumber = 999
    ds.save_as(out, enforce_file_format=True)
    return out


@pytest.mark.parametrize("policy", ["reject", "never", "always", "same_source"])
def test_duplicate_with_different_content_follows_the_policy(node_factory, tmp_path, policy):
    node = node_factory(storage__duplicate_policy=policy).start()
    (file,) = clone_instances(synthetic_dx(64, 64), tmp_path / "in", 1)
    changed = _changed_copy(file, tmp_path / "changed.dcm")
    assert storescu(node.port, [file], aet="MODALITY1").statuses[0][1] == "Success"
    (archived,) = archived_files(node)
    original_sha = sha256_of(archived)

    second = storescu(node.port, [changed], "-d", aet="MODALITY1")
    conflicts = list((node.storage_root / "conflicts").iterdir())
    with Session(open_db(node)) as session:
        (row,) = session.scalars(select(Instance)).all()
        jobs = session.scalars(select(Job)).all()
    assert len(jobs) == 1  # the first job is still queued and will read whatever the archive holds
    if policy == "reject":
        assert "0xc010" in second.output.lower(), second.output
        assert sha256_of(archived) == original_sha and not conflicts
    elif policy == "never":
        assert second.statuses[0][1] == "Success"
        assert sha256_of(archived) == original_sha == row.sha256
        assert [dataset_bytes(p) for p in conflicts] == [dataset_bytes(changed)]
    else:  # always, and same_source with the same calling AE
        assert second.statuses[0][1] == "Success"
        assert dataset_bytes(archived) == dataset_bytes(changed) and row.sha256 == sha256_of(archived)
        assert [sha256_of(p) for p in conflicts] == [original_sha]

    if policy == "same_source":
        third = _changed_copy(file, tmp_path / "third.dcm")
        ds = dcmread(third)
        ds.InstanceNumber = 1000
        ds.save_as(third, enforce_file_format=True)
        other = storescu(node.port, [third], "-d", aet="MODALITY2")
        assert "0xc010" in other.output.lower(), other.output


def test_concurrent_senders_lose_nothing(node, tmp_path):
    """Four storescu processes send 50 instances each at the same time: all 200 stored, none lost."""
    batches = [clone_instances(synthetic_dx(256, 256, seed=i), tmp_path / f"b{i}", 50) for i in range(4)]
    procs = [
        subprocess.Popen(["storescu", "-v", "-aet", f"SENDER{i}", "-aec", "PNEUMOCAD", "127.0.0.1", str(node.port),
                          *map(str, batch)], env=PEER_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
        for i, batch in enumerate(batches)
    ]
    from .conftest import parse_storescu

    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for proc, output in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, output[-2000:]
        statuses = parse_storescu(output)
        assert len(statuses) == 50 and all(s == "Success" for _, s in statuses)
    with Session(open_db(node)) as session:
        rows = session.scalars(select(Instance)).all()
        assert len(rows) == 200 and len(session.scalars(select(Job)).all()) == 200
    sent = {dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for batch in batches for p in batch}
    for row in rows:
        assert dataset_bytes(node.storage_root / row.archive_path) == dataset_bytes(sent[row.sop_instance_uid])
    assert os.listdir(node.storage_root / "tmp") == []


@pytest.mark.parametrize("syntax_flag", ["-xe", "-xi", "-xb"])
def test_truncated_native_pixel_data_is_refused_with_c001(node, tmp_path, syntax_flag):
    """Pixel Data shorter than Rows x Columns x Samples x Bits Allocated: refused at once, so the modality can
    resend; a whole copy afterwards is stored."""
    whole, truncated = clone_instances(synthetic_dx(64, 64), tmp_path / "in", 2)
    ds = dcmread(truncated)
    ds.PixelData = ds.PixelData[: 64 * 64 * 2 - 1000]  # an even length: a consistent element, missing pixels
    ds.save_as(truncated, enforce_file_format=True)
    refused = storescu(node.port, [truncated], syntax_flag, "-d")
    assert refused.statuses and refused.statuses[0][1] != "Success", refused.output
    assert "0xc001" in refused.output.lower(), refused.output
    assert not archived_files(node)
    assert not list((node.storage_root / "tmp").iterdir())
    assert "Pixel Data holds 7192 of the 8192 bytes" in node.log()
    assert storescu(node.port, [whole], syntax_flag).statuses == [(str(whole), "Success")]


def test_longer_native_pixel_data_is_accepted(node, tmp_path):
    """Trailing bytes after the pixels (seen in real files) are ignored by every decoder: not a reason to refuse."""
    (file,) = clone_instances(synthetic_dx(64, 64), tmp_path / "in", 1)
    ds = dcmread(file)
    ds.PixelData = ds.PixelData + b"\0" * 16
    ds.save_as(file, enforce_file_format=True)
    assert storescu(node.port, [file]).statuses == [(str(file), "Success")]
