"""End to end with real peers: storescu (modality) -> node (intake, worker, export) -> Orthanc (PACS).

What a modality sends must come back to PACS as SR + SEG + heat-map SC in the source's study; what cannot be
analysed must come back as a "not analysed" SR; PACS downtime and worker crashes must lose and duplicate nothing.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from .dicomgen import UID_ROOT, aborting_j2k, clone_instances
from .pacs import Orthanc
from .support.data import CHEST_J2K_LOSSLESS as CHEST
from .support.data import CHEST_J2K_LOSSY, CHEST_UNCOMPRESSED, HAND
from .support.dicom_tools import dciodvfy_errors, dsrdump_problems, storescu
from .support.node import open_db
from .support.sr_tree import code_of, content_items, num, text_values

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
RESULT_TIMEOUT = 240.0


@pytest.fixture
def orthanc(tmp_path):
    pacs = Orthanc(tmp_path / "orthanc").start()
    yield pacs
    pacs.stop()


def node_settings(pacs: Orthanc, **extra: str) -> dict[str, str]:
    return {"worker__processes": "1", "export__destinations": json.dumps([pacs.destination()]),
            "export__poll_seconds": "0.2", "export__retry_initial_seconds": "0.5",
            "export__retry_max_seconds": "2", **extra}


def wait_for(predicate, timeout: float, what: str, node=None, interval: float = 0.25):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            log = f"\nnode log:\n{node.log()[-6000:]}" if node else ""
            raise AssertionError(f"timed out waiting for {what}{log}")
        time.sleep(interval)


def results_in(pacs: Orthanc, study_uid: str) -> dict[str, list[dict]]:
    """Orthanc's instances of one study grouped by SOP class (source images included)."""
    grouped: dict[str, list[dict]] = {}
    for inst in pacs.instances():
        if inst.get("StudyInstanceUID") == study_uid:
            grouped.setdefault(inst["SOPClassUID"], []).append(inst)
    return grouped


def job_rows(node) -> list[tuple]:  # type: ignore[no-untyped-def]
    from sqlalchemy import text

    engine = open_db(node)
    try:
        with engine.connect() as conn:
            return list(conn.execute(text("SELECT id, state, attempts, reason FROM jobs ORDER BY id")))
    finally:
        engine.dispose()


def export_rows(node) -> list[tuple]:  # type: ignore[no-untyped-def]
    from sqlalchemy import text

    engine = open_db(node)
    try:
        with engine.connect() as conn:
            return list(conn.execute(text(
                "SELECT e.id, r.kind, r.sop_instance_uid, e.state, e.attempts, e.last_error FROM exports e "
                "JOIN results r ON r.id = e.result_id ORDER BY e.id")))
    finally:
        engine.dispose()


def test_chest_radiographs_come_back_as_sr_seg_and_sc(node_factory, orthanc, tmp_path, with_classifier):
    """With the bundled classifier installed (the node's results are compared with this process's analysis). The
    SR written without a classifier is checked in test_results.py (a node subprocess cannot be made to run
    without one: a missing model file falls back to the bundled one)."""
    from ai import analyse

    sources = clone_instances(CHEST, tmp_path / "send", 2)
    node = node_factory(**node_settings(orthanc, **with_classifier.node_settings())).start()
    sent = storescu(node.port, sources, "-xv")
    assert [s for _, s in sent.statuses] == ["Success"] * 2, sent.output
    study = str(dcmread(sources[0], stop_before_pixels=True).StudyInstanceUID)

    def complete():
        grouped = results_in(orthanc, study)
        return grouped if all(len(grouped.get(c, [])) == 2 for c in (SR_CLASS, SEG_CLASS, SC_CLASS)) else None

    grouped = wait_for(complete, RESULT_TIMEOUT, "SR + SEG + SC of both instances in Orthanc", node)
    assert sum(len(v) for v in grouped.values()) == 6  # the sources themselves stay with the modality's PACS path
    for source_path in sources:
        source = dcmread(source_path)
        record = analyse(source)
        assert record.in_scope, record.reason
        assert record.classification is not None, "the bundled classifier did not run"
        files: dict[str, Path] = {}
        for sop_class, kind in ((SR_CLASS, "sr"), (SEG_CLASS, "seg"), (SC_CLASS, "sc")):
            for inst in grouped[sop_class]:
                ds = dcmread(io.BytesIO(orthanc.file(inst["id"])))
                refs = [r.ReferencedSOPInstanceUID for r in ds.get("ReferencedSeriesSequence", [{}])[0]
                        .get("ReferencedInstanceSequence", [])] if "ReferencedSeriesSequence" in ds else []
                refs += [r.ReferencedSOPInstanceUID for r in ds.get("SourceImageSequence", [])]
                refs += [r.ReferencedSOPInstanceUID for e in ds.get("CurrentRequestedProcedureEvidenceSequence", [])
                         for s in e.ReferencedSeriesSequence for r in s.ReferencedSOPSequence]
                if source.SOPInstanceUID in refs:
                    path = tmp_path / f"{source.SOPInstanceUID}.{kind}.dcm"
                    path.write_bytes(orthanc.file(inst["id"]))
                    files[kind] = path
        assert set(files) == {"sr", "seg", "sc"}, f"results referencing {source.SOPInstanceUID}: {sorted(files)}"
        for kind, path in files.items():
            assert dciodvfy_errors(path) == [], f"{kind}: {path}"
        assert dsrdump_problems(files["sr"]) == []
        sr = dcmread(files["sr"])
        check_sr(sr, source, record)
        check_sr_classification(sr, record)
        check_seg(dcmread(files["seg"]), source, record)
        sc = dcmread(files["sc"])
        assert sc.BurnedInAnnotation == "YES" and sc.StudyInstanceUID == source.StudyInstanceUID
    # The job table agrees: both done, each result exported once.
    assert [(state, attempts) for _, state, attempts, _ in job_rows(node)] == [("done", 1), ("done", 1)]
    assert sorted((kind, state) for _, kind, _, state, _, _ in export_rows(node)) == \
        sorted([("sc", "sent"), ("seg", "sent"), ("sr", "sent")] * 2)
    # The CLI shows where each result lies and its export state.
    jobs = node.cli("jobs")
    assert jobs.returncode == 0, jobs.stderr
    result_lines = [line for line in jobs.stdout.splitlines() if "results/" in line]
    assert len(result_lines) == 6 and all("[pacs: sent]" in line for line in result_lines), jobs.stdout
    status = node.cli("status")
    assert status.returncode == 0 and "sent" in status.stdout, status.stdout


def check_sr(sr, source, record) -> None:  # type: ignore[no-untyped-def]
    """Every item the issue asks for of any analysed SR, compared with what ``ai.analyse`` says about the same
    source."""
    assert sr.SOPClassUID == SR_CLASS
    assert sr.StudyInstanceUID == source.StudyInstanceUID and sr.SeriesInstanceUID != source.SeriesInstanceUID
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    items = list(content_items(sr))
    names = [n for n, _ in items]
    # Observer: the node as a device.
    assert "121012" in names  # Device Observer UID
    # Image library with the source.
    to_source = [i.ReferencedSOPSequence[0] for n, i in items if i.ValueType == "IMAGE"
                 and i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID]
    assert to_source, "no reference to the source image"
    for ref in to_source:  # a single-frame source: neither frame nor segment numbers (dciodvfy)
        assert "ReferencedFrameNumber" not in ref and "ReferencedSegmentNumber" not in ref
    # Right and left lung areas, each inferred from its SEG segment.
    areas = [i for n, i in items if n == "42798000"]
    assert len(areas) == 2
    segments = sorted(int(r.ReferencedSOPSequence[0].ReferencedSegmentNumber) for a in areas
                      for r in a.ContentSequence if r.ValueType == "IMAGE")
    assert segments == [1, 2]
    expected = record.lung_area_mm2 or record.lung_area_px
    assert sorted(round(num(a), 1) for a in areas) == sorted(round(float(v), 1) for v in expected.values())
    # Algorithm identification.
    algorithm_names = [str(i.TextValue) for n, i in items if n == "111001"]
    assert any(m.name in algorithm_names for m in record.models)


def check_sr_classification(sr, record) -> None:  # type: ignore[no-untyped-def]
    """The classifier's items of an SR written with a classifier installed."""
    c = record.classification
    assert c is not None, "the analysis ran without a classifier"
    items = list(content_items(sr))
    texts = " ".join(text_values(sr))
    # Finding Pneumoconiosis present/absent and its probability.
    finding = [(n, i) for n, i in items if n == "40122008" or
               (i.ValueType == "CODE" and code_of(i) == ("40122008", "SCT"))]
    assert finding, "no Pneumoconiosis (SCT 40122008) item"
    probabilities = [num(i) for n, i in items if i.ValueType == "NUM" and
                     "probab" in i.ConceptNameCodeSequence[0].CodeMeaning.lower()]
    assert any(abs(p - c.probability) < 1e-3 or abs(p - 100 * c.probability) < 0.1 for p in probabilities), \
        (probabilities, c.probability)
    # ILO category from a private coding scheme declared in the header.
    schemes = {str(s.CodingSchemeDesignator) for s in sr.get("CodingSchemeIdentificationSequence", [])}
    categories = [code_of(i) for _, i in items if i.ValueType == "CODE" and code_of(i)[1] in schemes
                  and code_of(i)[1] not in ("DCM", "SCT", "UCUM", "LN")]
    assert (categories[0][0] == str(c.most_likely_category)), categories
    # Demo notice reaches the SR.
    for model in record.models:
        if model.notice:
            assert model.notice in texts
            assert "DEMO" in sr.SeriesDescription.upper()
    # Six zone scores with their finding sites.
    zones = [i for n, i in items if i.ValueType == "NUM" and any(
        m.ValueType == "CODE" and code_of(m)[0] in ("281392002", "281393007", "281394001")
        for m in i.get("ContentSequence", []))]
    assert sorted(round(num(z), 3) for z in zones) == sorted(round(v, 3) for v in c.zones.values())


def check_seg(seg, source, record) -> None:  # type: ignore[no-untyped-def]
    import highdicom as hd

    assert seg.StudyInstanceUID == source.StudyInstanceUID
    assert (seg.Rows, seg.Columns) == (source.Rows, source.Columns)
    assert seg.PatientOrientation == source.PatientOrientation
    segmentation = hd.seg.Segmentation.from_dataset(seg)
    assert len(seg.SegmentSequence) == 2
    pixels = segmentation.pixel_array if segmentation.pixel_array.ndim == 3 else segmentation.pixel_array[None]
    masks = {}
    for frame, item in zip(pixels, seg.PerFrameFunctionalGroupsSequence, strict=True):
        number = item.SegmentIdentificationSequence[0].ReferencedSegmentNumber
        masks[number] = frame.astype(bool)
    np.testing.assert_array_equal(masks[1], record.labels == 1)
    np.testing.assert_array_equal(masks[2], record.labels == 2)


def test_not_chest_and_corrupted_instances_get_not_analysed_srs(node_factory, orthanc, tmp_path):
    """A hand, and a chest whose JPEG 2000 stream is garbage after its start marker (the one that makes gdcm abort):
    both come back as "not analysed" SRs. Pixels that cannot be decoded are a permanent failure: no retry. A chest
    whose native Pixel Data is cut short is refused at intake (0xC001), so the modality can send it again."""
    hand = HAND
    corrupt = tmp_path / "corrupt.dcm"
    ds = aborting_j2k(CHEST_J2K_LOSSY)
    ds.StudyInstanceUID = generate_uid(UID_ROOT)
    ds.save_as(corrupt, enforce_file_format=True)
    truncated = tmp_path / "truncated.dcm"
    cut = dcmread(CHEST_UNCOMPRESSED)
    cut.SOPInstanceUID = generate_uid(UID_ROOT)
    cut.PixelData = cut.PixelData[: len(cut.PixelData) // 3 // 2 * 2]  # header intact, pixels cut short
    cut.save_as(truncated, enforce_file_format=True)
    node = node_factory(**node_settings(orthanc, queue__max_attempts="2")).start()
    for path, flag in ((hand, "-xv"), (corrupt, "-xw")):
        sent = storescu(node.port, [path], flag)
        assert [s for _, s in sent.statuses] == ["Success"], sent.output
    refused = storescu(node.port, [truncated], "-xe", "-d")
    assert refused.statuses and refused.statuses[0][1] != "Success" and "0xc001" in refused.output.lower()
    studies = {str(dcmread(p, stop_before_pixels=True).StudyInstanceUID): p for p in (hand, corrupt)}
    for study, path in studies.items():
        srs = wait_for(lambda s=study: results_in(orthanc, s).get(SR_CLASS), RESULT_TIMEOUT,
                       f"a not-analysed SR for {path.name}", node)
        assert len(srs) == 1 and set(results_in(orthanc, study)) == {SR_CLASS}
        sr_path = tmp_path / f"{path.stem}.sr.dcm"
        sr_path.write_bytes(orthanc.file(srs[0]["id"]))
        assert dciodvfy_errors(sr_path) == []
        assert dsrdump_problems(sr_path) == []
        texts = " ".join(text_values(dcmread(sr_path)))
        assert "not analysed" in texts.lower(), texts
    jobs = {state: (attempts, reason) for _, state, attempts, reason in job_rows(node)}
    assert len(job_rows(node)) == 2  # the truncated one was never acknowledged
    assert jobs["not_analysed"][1] == "body_part_not_chest"
    assert jobs["failed"] == (1, "undecodable_pixels") or jobs["failed"] == (1, "decoder_crashed"), jobs
    failed_sr = dcmread(tmp_path / "corrupt.sr.dcm")
    texts = " ".join(text_values(failed_sr))
    assert jobs["failed"][1] in texts


def test_results_wait_for_pacs_downtime_and_arrive_once(node_factory, tmp_path):
    pacs = Orthanc(tmp_path / "orthanc")  # configured but not running yet
    sources = clone_instances(CHEST, tmp_path / "send", 1)
    node = node_factory(**node_settings(pacs)).start()
    assert [s for _, s in storescu(node.port, sources, "-xv").statuses] == ["Success"]
    wait_for(lambda: (rows := export_rows(node)) and len(rows) == 3 and all(r[4] >= 2 for r in rows),
             RESULT_TIMEOUT, "every export to fail twice while PACS is down", node)
    # Waiting for the next try (or in one right now), with the reason of the last failure kept.
    assert all(state in ("pending", "sending") and error for _, _, _, state, _, error in export_rows(node))
    pacs.start()
    try:
        study = str(dcmread(sources[0], stop_before_pixels=True).StudyInstanceUID)
        wait_for(lambda: all(s == "sent" for _, _, _, s, _, _ in export_rows(node)), 60, "exports after restart",
                 node)
        grouped = results_in(pacs, study)
        assert {k: len(v) for k, v in grouped.items()} == {SR_CLASS: 1, SEG_CLASS: 1, SC_CLASS: 1}
        time.sleep(2)  # nothing else arrives later
        assert sum(len(v) for v in results_in(pacs, study).values()) == 3
        new_instances = [c for c in pacs.get("/changes?limit=1000")["Changes"] if c["ChangeType"] == "NewInstance"]
        assert len(new_instances) == 3
    finally:
        pacs.stop()


def test_worker_killed_mid_job_is_taken_back_and_completed_once(node_factory, orthanc, tmp_path):
    sources = clone_instances(CHEST, tmp_path / "send", 1)
    node = node_factory(**node_settings(orthanc, queue__lease_seconds="4")).start()
    # The worker must be up (models loaded) before the job arrives, so the kill lands in the analysis.
    wait_for(lambda: "ready" in node.log(), 120, "worker start", node)
    assert [s for _, s in storescu(node.port, sources, "-xv").statuses] == ["Success"]
    wait_for(lambda: any(state == "running" for _, state, _, _ in job_rows(node)), 30, "the job to start", node,
             interval=0.02)
    workers = subprocess.run(["pgrep", "-P", str(node.proc.pid), "-f", "dicom_node.cli worker"],
                             capture_output=True, text=True).stdout.split()
    assert len(workers) == 1
    os.kill(int(workers[0]), signal.SIGKILL)
    study = str(dcmread(sources[0], stop_before_pixels=True).StudyInstanceUID)
    wait_for(lambda: len(results_in(orthanc, study)) == 3, RESULT_TIMEOUT, "results after the crash", node)
    assert [(state, attempts) for _, state, attempts, _ in job_rows(node)] == [("done", 2)]
    assert {k: len(v) for k, v in results_in(orthanc, study).items()} == {SR_CLASS: 1, SEG_CLASS: 1, SC_CLASS: 1}
    assert "restarting" in node.log()


def test_doorbells_wake_the_worker_and_the_exporter_long_before_their_polls(node_factory, orthanc, tmp_path):
    """serve rings its worker when a job is committed and the worker rings serve when the results are recorded
    (dicom_node.doorbell): with both polls at a minute, the results still reach PACS within seconds."""
    sources = clone_instances(CHEST_UNCOMPRESSED, tmp_path / "send", 1)
    node = node_factory(**node_settings(orthanc, worker__poll_seconds="60", export__poll_seconds="60")).start()
    wait_for(lambda: "ready" in node.log(), 120, "worker start", node)
    time.sleep(0.5)  # the worker's first look at the empty queue is over: it now waits on its doorbell
    sent_at = time.monotonic()
    assert [s for _, s in storescu(node.port, sources).statuses] == ["Success"]
    study = str(dcmread(sources[0], stop_before_pixels=True).StudyInstanceUID)
    wait_for(lambda: len(results_in(orthanc, study)) == 3, 40, "results without waiting for the polls", node,
             interval=0.1)
    assert time.monotonic() - sent_at < 40  # either poll alone would have taken 60 s


def test_workers_stop_when_serve_is_killed(node_factory):
    """kill -9 of serve must not leave orphaned workers polling the queue (a restart would add more)."""
    node = node_factory(worker__processes="1").start()
    wait_for(lambda: "ready" in node.log(), 120, "worker start", node)
    (worker,) = subprocess.run(["pgrep", "-P", str(node.proc.pid), "-f", "dicom_node.cli worker"],
                               capture_output=True, text=True).stdout.split()
    node.kill()

    def gone() -> bool:
        try:
            state = Path(f"/proc/{worker}/status").read_text()
        except FileNotFoundError:
            return True
        return "\nState:\tZ" in state  # exited, waiting to be reaped

    wait_for(gone, 30, "the orphaned worker to stop")
