"""Labels: the CSV import (every bad-row kind by line, all or nothing, --skip-bad, --dry-run, identifier resolution),
the consensus rules, reads and reviews sent as DICOM SR, and ``dicom-node labels`` end to end.

Instances are real sample files with new UIDs, received through the node's own intake (``Intake.store``, what a
C-STORE ends in); our own result SRs are written by the real worker. Codes are spelled out literally here,
independently of dicom_node/results/codes.py.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from highdicom.sr import (
    CodeContentItem,
    ComprehensiveSR,
    ContainerContentItem,
    ContentSequence,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    PersonObserverIdentifyingAttributes,
    QualitativeEvaluation,
    RelationshipTypeValues,
    SourceImageForMeasurementGroup,
    TrackingIdentifier,
)
from pydicom import dcmread, dcmwrite
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as std_codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid
from sqlalchemy import select
from sqlalchemy.orm import Session

import ai
from ai.classifier import Classification
from ai.explain import zone_scores
from ai.model_info import ModelInfo
from db.engine import init_schema, make_engine
from db.instances import find_instance
from db.labels import (
    Read,
    add_reads,
    label_counts,
    labels_since,
    list_labels,
    newest_label_id,
    training_labels,
)
from db.models import Instance, LabelSource, Result
from dicom_node.archive import Archive
from dicom_node.config import CONSENSUS_RULES, load_config
from dicom_node.intake import SUCCESS, Intake
from dicom_node.labels_csv import LabelsFileError, import_csv
from dicom_node.labels_sr import import_sr_labels
from dicom_node.worker import Worker

from .dicomgen import UID_ROOT, clone_instances
from .support.data import CHEST_J2K_LOSSY, CHEST_UNCOMPRESSED, CONFIG, NOT_CHEST_TINY, REPO
from .support.dicom_tools import PEER_ENV
from .support.net import free_port
from .support.node import Node

SCHEME = "99PNEUMOILO"
PROFUSION = Code("PROFUSION", SCHEME, "ILO major profusion category")
CATEGORY = [Code(str(k), SCHEME, f"ILO major profusion category {k}") for k in range(4)]
REVIEW = Code("REVIEW", SCHEME, "CAD result review")
ACCEPTED = Code("ACCEPTED", SCHEME, "CAD result accepted")
REJECTED = Code("REJECTED", SCHEME, "CAD result rejected")
PNEUMOCONIOSIS = Code("40122008", "SCT", "Pneumoconiosis")
PRESENT = Code("52101004", "SCT", "Present")
CHEST_XRAY = Code("399208008", "SCT", "Plain chest X-ray")
IMAGING_REPORT = Code("18748-4", "LN", "Diagnostic imaging report")
HEADER = "sop_instance_uid,present,category,subcategory,shape,large_opacities,reader,read_date"


# --- a node without network: the intake stores what a C-STORE would deliver ---------------------------------------


@dataclass
class Site:
    root: Path
    config: Any
    archive: Archive
    engine: Any
    intake: Intake

    def receive(self, path: Path, calling_aet: str = "MODALITY") -> int:
        """Hand a copy of ``path`` to the intake as a finished C-STORE would; returns the instance id."""
        ds = dcmread(path, stop_before_pixels=True)
        received = self.archive.tmp_dir / f"{uuid.uuid4().hex}.dcm"
        shutil.copyfile(path, received)
        outcome = self.intake.store(received, calling_aet, str(ds.SOPClassUID), str(ds.SOPInstanceUID),
                                    str(ds.file_meta.TransferSyntaxUID))
        assert outcome.status == SUCCESS, outcome
        stored = find_instance(self.engine, str(ds.SOPInstanceUID))
        assert stored is not None
        return stored.instance_id

    def receive_dataset(self, ds: Dataset, calling_aet: str = "READING") -> int:
        path = self.root / "outbox" / f"{ds.SOPInstanceUID}.dcm"
        path.parent.mkdir(exist_ok=True)
        dcmwrite(path, ds, enforce_file_format=True)
        return self.receive(path, calling_aet)

    def csv(self, *lines: str, name: str = "labels.csv") -> Path:
        path = self.root / name
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return path

    def stored(self) -> list[tuple[int, bool, int, str | None, str | None, str | None, str | None, date | None]]:
        return [(r.instance_id, r.present, r.category, r.subcategory, r.shape, r.large_opacities, r.reader,
                 r.read_date) for r in list_labels(self.engine, oldest_first=True)]


def make_site(root: Path, **sets: str) -> Site:
    values = {"storage.storage_root": str(root), "storage.free_disk_reserve_mb": "0", "worker.processes": "0",
              **sets}
    config = load_config(CONFIG, values, environ={})
    archive = Archive(root, 0)
    archive.prepare()
    engine = make_engine(f"sqlite:///{root / 'node.sqlite'}")
    init_schema(engine)
    return Site(root, config, archive, engine, Intake(archive, engine, config.storage.duplicate_policy))


def study_copies(template: Path, out_dir: Path, count: int, accession: str, study: str | None = None) -> list[Path]:
    """``count`` copies of a real sample in one study (a new one unless ``study``) with ``accession``."""
    ds = dcmread(template)
    ds.AccessionNumber = accession
    paths = clone_instances(ds, out_dir, count)
    if study is not None:
        for path in paths:
            copy_ds = dcmread(path)
            copy_ds.StudyInstanceUID = study
            copy_ds.save_as(path, enforce_file_format=True)
    return paths


@dataclass(frozen=True)
class Files:
    one: Path  # the only in-scope image of study ONE (accession ACC-ONE)
    beside_one: Path  # an out-of-scope image in study ONE
    two: list[Path]  # two in-scope images of study TWO (accession ACC-TWO)
    out: Path  # the only image of study OUT, out of scope (accession ACC-OUT)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Files:
    tmp = tmp_path_factory.mktemp("label-files")
    [one] = study_copies(CHEST_J2K_LOSSY, tmp / "one", 1, "ACC-ONE")
    study_one = str(dcmread(one, stop_before_pixels=True).StudyInstanceUID)
    [beside] = study_copies(NOT_CHEST_TINY, tmp / "beside", 1, "ACC-ONE", study=study_one)
    two = study_copies(CHEST_J2K_LOSSY, tmp / "two", 2, "ACC-TWO")
    [out] = study_copies(NOT_CHEST_TINY, tmp / "out", 1, "ACC-OUT")
    return Files(one, beside, two, out)


@dataclass
class Archived:
    site: Site
    ids: dict[str, int]  # one, beside, two0, two1, out
    uids: dict[str, str]
    study_one: str
    study_two: str


@pytest.fixture
def archived(tmp_path, files) -> Archived:
    site = make_site(tmp_path / "var")
    named = {"one": files.one, "beside": files.beside_one, "two0": files.two[0], "two1": files.two[1],
             "out": files.out}
    ids = {name: site.receive(path) for name, path in named.items()}
    uids = {name: str(dcmread(path, stop_before_pixels=True).SOPInstanceUID) for name, path in named.items()}
    with Session(site.engine) as session:
        scope = dict(session.execute(select(Instance.id, Instance.in_scope)).all())
    assert [scope[ids[n]] for n in ("one", "beside", "two0", "two1", "out")] == [True, False, True, True, False]
    return Archived(site, ids, uids, str(dcmread(files.one, stop_before_pixels=True).StudyInstanceUID),
                    str(dcmread(files.two[0], stop_before_pixels=True).StudyInstanceUID))


def bad_rows(report) -> list[tuple[int, str]]:
    return [(b.line, b.reason) for b in report.bad]


# --- CSV: good files ----------------------------------------------------------------------------------------------


def test_a_file_with_every_column_is_imported_with_its_values_normalised(archived):
    a = archived
    path = a.site.csv(HEADER,
                      f"{a.uids['one']},Yes,1,1/2,P/Q,b,Dr. Reader,2024-03-15",
                      f"{a.uids['two0']},no,0,0/-,,,,",
                      f"{a.uids['two1']},TRUE,3,3/+,t,C,reader 2,2023-01-02")
    report = import_csv(a.site.engine, path)
    assert (report.data_rows, report.valid, report.imported, report.bad) == (3, 3, 3, ())
    assert a.site.stored() == [
        (a.ids["one"], True, 1, "1/2", "p/q", "B", "Dr. Reader", date(2024, 3, 15)),
        (a.ids["two0"], False, 0, "0/-", None, None, None, None),
        (a.ids["two1"], True, 3, "3/+", "t", "C", "reader 2", date(2023, 1, 2))]
    assert {r.source for r in list_labels(a.site.engine)} == {"csv"}
    assert label_counts(a.site.engine) == (3, 0)


def test_the_example_file_in_docs_is_valid(archived):
    example = REPO / "docs" / "examples" / "labels.csv"
    header, *rows = example.read_text().splitlines()
    assert rows, "the example has rows"
    uids = [archived.uids["one"], archived.uids["two0"], archived.uids["two1"]]
    ours = [",".join([uids[i % 3]] + row.split(",")[1:]) for i, row in enumerate(rows)]
    report = import_csv(archived.site.engine, archived.site.csv(header, *ours), dry_run=True)
    assert report.bad == () and report.valid == len(rows)


# --- CSV: every bad row, by line ----------------------------------------------------------------------------------


def test_every_kind_of_bad_row_is_reported_with_its_line_and_nothing_is_imported(archived):
    a = archived
    one, two0, two1 = a.uids["one"], a.uids["two0"], a.uids["two1"]
    unknown = generate_uid(UID_ROOT)
    path = a.site.csv(
        HEADER,                                                   # 1
        f"{one},yes,2,2/1,q,0,reader A,2024-01-05",               # 2 good
        f"{unknown},yes,1,,,,,",                                  # 3 unknown instance
        f"{a.uids['out']},no,0,,,,,",                             # 4 out of scope
        f"{two0},yes,4,,,,,",                                     # 5 category outside 0-3
        f"{two0},yes,x,,,,,",                                     # 6 category not an integer
        f"{two0},no,2,,,,,",                                      # 7 present=no with category >= 1
        f"{two0},maybe,1,,,,,",                                   # 8 bad present value
        f"{two0},yes,1,2/1,,,,",                                  # 9 subcategory of another category
        f"{two0},yes,1,1/4,,,,",                                  # 10 subcategory not on the scale
        f"{two0},yes,1,,x,,,",                                    # 11 bad shape
        f"{two0},yes,1,,,D,,",                                    # 12 bad large opacities
        f"{two0},yes,1,,,,,2024-13-01",                           # 13 impossible date
        f"{two0},yes,1,,,,,15.03.2024",                           # 14 date in another form
        f"{one},yes,2,2/1,q,0,reader A,2024-01-05",               # 15 duplicate of line 2
        f"{two1},yes,1",                                          # 16 too few fields
        f'{two1},yes,1,,,,"two',                                  # 17-18: a reader spanning two lines
        'lines",',
        f"{two1},no,1,,,,,",                                      # 19: numbered after the two-line record
    )
    report = import_csv(a.site.engine, path)
    expected = [
        (3, "unknown instance"), (4, "instance out of scope"), (5, "category: outside 0-3"),
        (6, "category: not an integer"), (7, "present is no but category is 1 or more"),
        (8, "present: not yes/no, true/false or 1/0"), (9, "subcategory: its major category differs"),
        (10, "subcategory: not on the ILO 12-point scale"), (11, "shape: not one of p q r s t u"),
        (12, "large_opacities: not one of 0 A B C"), (13, "read_date: not a date in the form YYYY-MM-DD"),
        (14, "read_date: not a date in the form YYYY-MM-DD"), (15, "duplicate row: the same read as line 2"),
        (16, "3 field(s), the header names 8"), (17, "reader: holds control characters"),
        (19, "present is no but category is 1 or more")]
    got = bad_rows(report)
    assert [line for line, _ in got] == [line for line, _ in expected]
    for (line, reason), (_, wanted) in zip(got, expected, strict=True):
        assert reason.startswith(wanted), (line, reason)
    assert (report.data_rows, report.valid, report.imported) == (17, 1, 0)
    assert a.site.stored() == [], "one bad row: nothing is imported"
    for _, reason in got:  # reasons never echo an identifying value
        assert not any(uid in reason for uid in (one, two0, two1, unknown, a.uids["out"])), reason


def test_skip_bad_imports_the_good_rows_only(archived):
    a = archived
    path = a.site.csv(HEADER, f"{a.uids['one']},yes,1,,,,,", f"{a.uids['out']},no,0,,,,,",
                      f"{a.uids['two0']},no,0,,,,r,2024-02-02")
    report = import_csv(a.site.engine, path, skip_bad=True)
    assert bad_rows(report) == [(3, "instance out of scope (not a chest radiograph the node analyses)")]
    assert report.imported == 2
    assert [row[:3] for row in a.site.stored()] == [(a.ids["one"], True, 1), (a.ids["two0"], False, 0)]


def test_dry_run_reports_what_would_happen_and_writes_nothing(archived):
    a = archived
    path = a.site.csv(HEADER, f"{a.uids['one']},yes,1,,,,,", f"{a.uids['two0']},no,3,,,,,")
    report = import_csv(a.site.engine, path, dry_run=True)
    assert (report.valid, report.imported, bad_rows(report)) == (1, 0, [(3, "present is no but category is 1 or "
                                                                             "more")])
    report = import_csv(a.site.engine, path, dry_run=True, skip_bad=True)
    assert (report.valid, report.imported, report.dry_run) == (1, 0, True)
    assert a.site.stored() == []


def test_a_read_imported_again_is_refused_as_already_imported(archived):
    a = archived
    rows = (f"{a.uids['one']},yes,1,1/1,,,reader A,2024-01-05", f"{a.uids['two0']},no,0,,,,,")
    assert import_csv(a.site.engine, a.site.csv(HEADER, *rows)).imported == 2
    # the same reads under another identifier column and spelling are the same reads
    again = a.site.csv("accession_number,category,present,reader,read_date,subcategory",
                       "ACC-ONE,1,TRUE,reader A,2024-01-05,1/1", f"{a.uids['one']},1,yes,reader B,2024-01-05,1/1",
                       name="again.csv")
    report = import_csv(a.site.engine, again)
    assert bad_rows(report) == [(2, "already imported: this read of this image is stored"),
                                (3, "unknown instance: no archived image has this Accession Number")]
    # another reader's read of the same image is a new read
    report = import_csv(a.site.engine, a.site.csv(HEADER, f"{a.uids['one']},yes,1,1/1,,,reader B,2024-01-05",
                                                  name="b.csv"))
    assert (report.imported, report.bad) == (1, ())


# --- CSV: identifiers ---------------------------------------------------------------------------------------------


def test_accession_and_study_resolve_to_the_studys_single_in_scope_image(archived):
    a = archived
    by_accession = a.site.csv("accession_number,present,category", "ACC-ONE,yes,2", "ACC-TWO,yes,1",
                              "ACC-OUT,no,0", "ACC-NONE,no,0", name="acc.csv")
    report = import_csv(a.site.engine, by_accession, skip_bad=True)
    assert bad_rows(report) == [
        (3, "the study of this Accession Number holds 2 in-scope images (exactly one is needed; name the image "
            "by sop_instance_uid)"),
        (4, "the study of this Accession Number holds 0 in-scope images (exactly one is needed; name the image "
            "by sop_instance_uid)"),
        (5, "unknown instance: no archived image has this Accession Number")]
    assert [row[:3] for row in a.site.stored()] == [(a.ids["one"], True, 2)]
    by_study = a.site.csv("study_instance_uid,present,category,reader", f"{a.study_one},no,0,r2",
                          f"{a.study_two},no,0,r2", name="study.csv")
    report = import_csv(a.site.engine, by_study, skip_bad=True)
    assert [line for line, _ in bad_rows(report)] == [3]
    assert "holds 2 in-scope images" in report.bad[0].reason
    assert [row[:3] for row in a.site.stored()] == [(a.ids["one"], True, 2), (a.ids["one"], False, 0)]


@pytest.mark.parametrize(("lines", "message"), [
    (["sop_instance_uid,present,category,comment", "1.2,yes,1,x"], "line 1: unknown column 'comment'"),
    (["sop_instance_uid,category", "1.2,1"], "line 1: required column 'present' is missing"),
    (["sop_instance_uid,present", "1.2,yes"], "line 1: required column 'category' is missing"),
    (["present,category", "yes,1"], "line 1: the header needs exactly one identifier column"),
    (["sop_instance_uid,accession_number,present,category", "1.2,A,yes,1"],
     "line 1: the header needs exactly one identifier column of sop_instance_uid, accession_number, "
     "study_instance_uid (it has sop_instance_uid, accession_number)"),
    (["sop_instance_uid,present,present,category"], "line 1: column 'present' appears twice"),
    (["sop_instance_uid,,present,category"], "line 1: column 2 has no name"),
    ([], "the file is empty"),
    (["sop_instance_uid,present,category", '1.2,"yes,1', "3"], "not valid CSV"),
])
def test_a_bad_file_is_a_file_level_error_naming_the_line_or_column(archived, lines, message):
    path = archived.site.csv(*lines)
    with pytest.raises(LabelsFileError) as caught:
        import_csv(archived.site.engine, path)
    assert message in str(caught.value)
    assert archived.site.stored() == []


def test_a_file_that_is_not_utf8_names_its_line(archived):
    path = archived.site.root / "latin1.csv"
    path.write_bytes(b"sop_instance_uid,present,category,reader\n1.2,yes,1,M\xfcller\n")
    with pytest.raises(LabelsFileError, match="not UTF-8 text"):
        import_csv(archived.site.engine, path)


# --- consensus ----------------------------------------------------------------------------------------------------


def _read(instance_id: int, present: bool, category: int, read_date: date | None, reader: str) -> Read:
    return Read(instance_id=instance_id, present=present, category=category, subcategory=None, shape=None,
                large_opacities=None, reader=reader, read_date=read_date, source=LabelSource.CSV, source_uid=None)


def test_several_reads_give_one_training_label_by_either_rule(archived):
    a = archived
    one, two0, two1, out = (a.ids[k] for k in ("one", "two0", "two1", "out"))
    engine = a.site.engine
    assert CONSENSUS_RULES == ("latest", "majority")  # the configuration's choices are the rules here
    assert (newest_label_id(engine), label_counts(engine)) == (0, (0, 3))
    with Session(engine) as session, session.begin():
        add_reads(session, [
            # one: two reads say 1, the latest (by date) says 2
            _read(one, True, 1, date(2024, 1, 1), "A"), _read(one, True, 2, date(2024, 6, 1), "B"),
            _read(one, True, 1, date(2024, 2, 1), "C"),
            # two0: same date twice: the later import wins "latest"; a 1-1 tie goes to the latest read's pair
            _read(two0, False, 0, date(2024, 3, 3), "A"), _read(two0, True, 1, date(2024, 3, 3), "B"),
            # two1: an undated read is older than any dated one
            _read(two1, True, 3, None, "A"), _read(two1, False, 0, date(2020, 1, 1), "B"),
            _read(two1, True, 3, None, "C"),
            # out of scope: never a training label
            _read(out, False, 0, date(2024, 1, 1), "A"),
        ])
    first = newest_label_id(engine)
    latest = training_labels(engine, "latest")
    majority = training_labels(engine, "majority")
    assert {k: (v.present, v.category, v.reads) for k, v in latest.items()} == {
        one: (True, 2, 3), two0: (True, 1, 2), two1: (False, 0, 3)}
    assert {k: (v.present, v.category, v.reads) for k, v in majority.items()} == {
        one: (True, 1, 3), two0: (True, 1, 2), two1: (True, 3, 3)}
    assert latest[one].sources == ("csv",)
    assert label_counts(engine) == (3, 0)
    assert labels_since(engine, first) == 0
    with Session(engine) as session, session.begin():
        add_reads(session, [dataclasses.replace(_read(two0, False, 0, date(2024, 3, 1), "D"),
                                                source=LabelSource.CONSOLE)])
    assert (newest_label_id(engine), labels_since(engine, first), labels_since(engine, 0)) == (first + 1, 1, 10)
    majority = training_labels(engine, "majority")
    assert (majority[two0].present, majority[two0].category, majority[two0].sources) == (False, 0,
                                                                                        ("console", "csv"))
    assert (training_labels(engine, "latest")[two0].present, training_labels(engine, "latest")[two0].category) == (
        True, 1), "an older read added later does not change the latest"
    with pytest.raises(ValueError, match="unknown consensus rule"):
        training_labels(engine, "mean")


# --- SR: a reader's ILO category ----------------------------------------------------------------------------------


def reader_sr(images: list[Dataset], category: Code | None, *, finding: QualitativeEvaluation | None = None,
              image_items: bool = True, verified: bool = True) -> Dataset:
    """A TID 1500 report of a reading station: one measurement group with the reader's category, referencing
    ``images`` by IMAGE items (unless not ``image_items``) and in its evidence; ``verified``: a Verifying
    Observer (else the reader is named only by the observation context)."""
    evaluations = [QualitativeEvaluation(PROFUSION, category)] if category is not None else []
    if finding is not None:
        evaluations.append(finding)
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=generate_uid(UID_ROOT), identifier="ILO read"),
        finding_type=PNEUMOCONIOSIS, qualitative_evaluations=evaluations,
        source_images=[SourceImageForMeasurementGroup(str(i.SOPClassUID), str(i.SOPInstanceUID)) for i in images]
        if image_items else None)
    observer = ObserverContext(std_codes.DCM.Person, PersonObserverIdentifyingAttributes(name="Observer^Olga"))
    report = MeasurementReport(observation_context=ObservationContext(observer_person_context=observer),
                               procedure_reported=CHEST_XRAY, imaging_measurements=[group])
    return _document(report[0], images, verified)


def _document(content: Dataset, evidence: list[Dataset], verified: bool = True) -> Dataset:
    sr = ComprehensiveSR(
        evidence=evidence, content=content, series_instance_uid=generate_uid(UID_ROOT), series_number=77,
        sop_instance_uid=generate_uid(UID_ROOT), instance_number=1, manufacturer="Reading Station Inc.",
        is_complete=True, is_final=True, is_verified=verified,
        verifying_observer_name="Reader^Alice" if verified else None,
        verifying_organization="Site radiology" if verified else None)
    sr.ContentDate = "20240315"
    return sr


def test_a_readers_sr_with_an_ilo_category_becomes_a_label_once(archived, tmp_path):
    a = archived
    one = dcmread(a.site.archive.absolute(_path(a, "one")), stop_before_pixels=True)
    two = [dcmread(a.site.archive.absolute(_path(a, k)), stop_before_pixels=True) for k in ("two0", "two1")]
    out = dcmread(a.site.archive.absolute(_path(a, "out")), stop_before_pixels=True)
    good = reader_sr([one], CATEGORY[2])
    unverified = reader_sr([two[0]], CATEGORY[0], image_items=False, verified=False)
    problems = {
        "two images": (reader_sr(two, CATEGORY[1]), "a read must reference one archived image; it references 2"),
        "out of scope": (reader_sr([out], CATEGORY[0]), "the image it references is out of scope"),
        "no category": (reader_sr([one], None, finding=QualitativeEvaluation(PNEUMOCONIOSIS, PRESENT)),
                        "it holds neither a profusion category nor a review of our result"),
        "category 7": (reader_sr([one], Code("7", SCHEME, "seven")),
                       "its profusion category is not one of the codes for 0-3"),
    }
    for ds in [good, *(p[0] for p in problems.values())]:
        instance_id = a.site.receive_dataset(ds)
        with Session(a.site.engine) as session:
            inst = session.get(Instance, instance_id)
            assert inst is not None and (inst.in_scope, inst.scope_reason) == (False, "sop_class_not_radiograph")
    # the unverified read names its reader in the content tree only, and references the image by evidence only
    unverified_id = a.site.receive_dataset(unverified)
    assert unverified_id

    report = import_sr_labels(a.site.engine, a.site.archive.root)
    assert (report.scanned, report.imported) == (6, 2)
    assert sorted((p.sop_instance_uid, p.reason) for p in report.not_imported) == sorted(
        (str(ds.SOPInstanceUID), reason) for ds, reason in problems.values())
    rows = {r.source_uid: r for r in list_labels(a.site.engine)}
    assert set(rows) == {str(good.SOPInstanceUID), str(unverified.SOPInstanceUID)}
    read = rows[str(good.SOPInstanceUID)]
    assert (read.instance_id, read.present, read.category, read.reader, read.read_date, read.source) == (
        a.ids["one"], True, 2, "Reader Alice", date(2024, 3, 15), "sr")
    other = rows[str(unverified.SOPInstanceUID)]
    assert (other.instance_id, other.present, other.category, other.reader) == (a.ids["two0"], False, 0,
                                                                                "Observer Olga")
    again = import_sr_labels(a.site.engine, a.site.archive.root)
    assert (again.scanned, again.imported, len(again.not_imported)) == (4, 0, 4), "idempotent"
    assert len(list_labels(a.site.engine)) == 2
    # the serve process's periodic import reads an SR it cannot understand once, then skips it
    skip: set[str] = set()
    assert import_sr_labels(a.site.engine, a.site.archive.root, skip).scanned == 4 and len(skip) == 4
    assert import_sr_labels(a.site.engine, a.site.archive.root, skip).scanned == 0


def test_serve_imports_the_reads_of_srs_it_receives(tmp_path):
    """A reading station's SR sent to a running node becomes a label without a command."""
    image = tmp_path / "send" / "image.dcm"
    image.parent.mkdir()
    clone_instances(CHEST_UNCOMPRESSED, image.parent, 1)
    sent_image = dcmread(next(image.parent.iterdir()), stop_before_pixels=True)
    sr = reader_sr([sent_image], CATEGORY[3])
    dcmwrite(tmp_path / "send" / "read.dcm", sr, enforce_file_format=True)
    node = Node(tmp_path, free_port(), overrides={"labels.sr_import_seconds": "1"}).start()
    try:
        sent = subprocess.run(["storescu", "-aec", "PNEUMOCAD", "127.0.0.1", str(node.port), "+sd",
                               str(tmp_path / "send")], env=PEER_ENV, capture_output=True, text=True, timeout=60)
        assert sent.returncode == 0, sent.stderr
        engine = make_engine(node.db_url)
        deadline = time.monotonic() + 30
        while not list_labels(engine):
            assert time.monotonic() < deadline, node.log()[-3000:]
            time.sleep(0.2)
        (read,) = list_labels(engine)
        assert (read.present, read.category, read.source, read.source_uid) == (True, 3, "sr", str(sr.SOPInstanceUID))
        assert "SR reads: 1 imported as labels" in node.log()
    finally:
        node.stop()


def _path(a: Archived, name: str) -> str:
    with Session(a.site.engine) as session:
        inst = session.get(Instance, a.ids[name])
        assert inst is not None
        return inst.archive_path


# --- SR: reviews of our own SRs (written by the real worker) ------------------------------------------------------

TEST_CLASSIFIER = ModelInfo(name="labels-test-classifier", version="1", notice="Test model; not for clinical use.")


def forced_findings(findings: dict[str, tuple[bool, int]]):
    """The real analysis, with the classification of the named images replaced by a known finding (a CAD result
    that says "present" and one that says "absent", whatever the installed classifier thinks)."""
    def analyse(sources, device=None, **options):
        records = ai.analyse_batch(sources, device=device, **options)
        forced = []
        for source, record in zip(sources, records, strict=True):
            want = findings.get(str(source.SOPInstanceUID))
            if want is not None:
                assert record.labels is not None, record.explanation
                heat = np.full(record.labels.shape, 0.5, dtype=np.float32)
                probabilities = [0.1] * 4
                probabilities[want[1]] = 0.7
                record = dataclasses.replace(record, classifier=TEST_CLASSIFIER, classification=Classification(
                    probability=0.9 if want[0] else 0.1, present=want[0], threshold=0.5,
                    category_probabilities=probabilities, most_likely_category=want[1],
                    zones=zone_scores(heat, record.labels), heat_map=heat, timings={}))
            forced.append(record)
        return forced
    return analyse


@pytest.fixture(scope="module")
def reviewed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reviewed")
    site = make_site(tmp / "var")
    chests = clone_instances(CHEST_UNCOMPRESSED, tmp / "in", 2)
    [tiny] = clone_instances(NOT_CHEST_TINY, tmp / "tiny", 1)
    uids = [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in chests]
    ids = {"present": site.receive(chests[0]), "absent": site.receive(chests[1]), "not analysed": site.receive(tiny)}
    worker = Worker(site.config, site.engine, site.archive,
                    analyse=forced_findings({uids[0]: (True, 2), uids[1]: (False, 0)}))
    while worker.run_once():
        pass
    ours = {}
    with Session(site.engine) as session:
        for name, instance_id in ids.items():
            row = session.scalars(select(Result).where(Result.instance_id == instance_id,
                                                       Result.kind == "sr")).one()
            ours[name] = dcmread(site.archive.absolute(row.archive_path))
            assert row.analysed == (name != "not analysed")
    return site, ids, ours


def review_sr(ours: Dataset, verdict: Code, category: Code | None = None) -> Dataset:
    """A reading station's verdict on our SR: the verdict (and the reader's category) in its tree, our SR in its
    evidence."""
    root = ContainerContentItem(name=IMAGING_REPORT)
    items = [CodeContentItem(name=REVIEW, value=verdict, relationship_type=RelationshipTypeValues.CONTAINS)]
    if category is not None:
        items.append(CodeContentItem(name=PROFUSION, value=category,
                                     relationship_type=RelationshipTypeValues.CONTAINS))
    root.ContentSequence = ContentSequence(items)
    return _document(root, [ours])


def test_reviews_of_our_srs_become_labels(reviewed, tmp_path):
    site, ids, ours = reviewed
    before = len(list_labels(site.engine))
    understood = {
        "accept present": (review_sr(ours["present"], ACCEPTED), (ids["present"], True, 2)),
        "reject present": (review_sr(ours["present"], REJECTED), (ids["present"], False, 0)),
        "accept absent": (review_sr(ours["absent"], ACCEPTED), (ids["absent"], False, 0)),
        "reject absent with a category": (review_sr(ours["absent"], REJECTED, CATEGORY[1]),
                                          (ids["absent"], True, 1)),
    }
    refused = {
        "reject absent without a category": (review_sr(ours["absent"], REJECTED),
                                             "it rejects an 'absent' result without a profusion category of 1-3"),
        "reject absent with category 0": (review_sr(ours["absent"], REJECTED, CATEGORY[0]),
                                          "it rejects an 'absent' result without a profusion category of 1-3"),
        "reject present with a category": (review_sr(ours["present"], REJECTED, CATEGORY[3]),
                                           "it rejects a 'present' result but gives a profusion category of 1 or "
                                           "more"),
        "accept not analysed": (review_sr(ours["not analysed"], ACCEPTED),
                                "the reviewed result is a 'not analysed' report"),
        "review of an image": (review_sr(dcmread(site.archive.absolute(
            _instance_path(site, ids["present"])), stop_before_pixels=True), ACCEPTED),
            "a review must reference one SR of this node; it references 0"),
    }
    for ds, _ in [*understood.values(), *refused.values()]:
        site.receive_dataset(ds)
    report = import_sr_labels(site.engine, site.archive.root)
    assert report.imported == len(understood)
    assert sorted((p.sop_instance_uid, p.reason) for p in report.not_imported) == sorted(
        (str(ds.SOPInstanceUID), reason) for ds, reason in refused.values())
    rows = {r.source_uid: r for r in list_labels(site.engine)}
    assert len(rows) == before + len(understood)
    for name, (ds, want) in understood.items():
        row = rows[str(ds.SOPInstanceUID)]
        assert (row.instance_id, row.present, row.category) == want, name
        assert (row.source, row.reader, row.read_date) == ("sr", "Reader Alice", date(2024, 3, 15))
    assert import_sr_labels(site.engine, site.archive.root).imported == 0
    # the CLI runs the same import: nothing new, the refused ones listed by SOP Instance UID with their reason
    result = cli(site.root, "labels", "import-sr")
    assert result.returncode == 0, result.stderr
    assert f"{len(refused)} archived SR(s) not imported before: 0 read(s) imported" in result.stdout
    for ds, reason in refused.values():
        assert f"  {ds.SOPInstanceUID}: {reason}" in result.stdout


def _instance_path(site: Site, instance_id: int) -> str:
    with Session(site.engine) as session:
        inst = session.get(Instance, instance_id)
        assert inst is not None
        return inst.archive_path


# --- the command line, end to end ---------------------------------------------------------------------------------


def cli(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dicom_node.cli", *args, "--config", str(CONFIG),
                           "--set", f"storage.storage_root={root}", "--set", "storage.free_disk_reserve_mb=0"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)


def test_labels_commands_end_to_end(archived):
    a = archived
    root = a.site.root
    bad_file = a.site.csv("sop_instance_uid,present,category,comment", name="bad-file.csv")
    result = cli(root, "labels", "import", str(bad_file))
    assert result.returncode == 2
    assert "bad-file.csv: line 1: unknown column 'comment'" in result.stderr
    assert "Traceback" not in result.stderr

    rows = a.site.csv(HEADER, f"{a.uids['one']},yes,1,1/0,p,0,Dr. A,2024-01-05", f"{a.uids['out']},no,0,,,,,",
                      f"{a.uids['two0']},no,7,,,,,", name="rows.csv")
    result = cli(root, "labels", "import", str(rows))
    assert result.returncode == 1
    assert result.stderr.splitlines() == ["line 3: instance out of scope (not a chest radiograph the node analyses)",
                                          "line 4: category: outside 0-3"]
    assert "nothing imported" in result.stdout
    result = cli(root, "labels", "import", str(rows), "--dry-run", "--skip-bad")
    assert result.returncode == 0 and "1 read(s) would be imported" in result.stdout
    assert a.site.stored() == []
    result = cli(root, "labels", "import", str(rows), "--skip-bad")
    assert result.returncode == 0, result.stderr
    assert "1 read(s) imported, the bad rows skipped" in result.stdout

    result = cli(root, "labels", "list", "--json")
    assert result.returncode == 0, result.stderr
    [line] = result.stdout.splitlines()
    listed = json.loads(line)
    assert {k: listed[k] for k in ("sop_instance_uid", "present", "category", "subcategory", "shape",
                                   "large_opacities", "reader", "read_date", "source", "source_uid")} == {
        "sop_instance_uid": a.uids["one"], "present": True, "category": 1, "subcategory": "1/0", "shape": "p",
        "large_opacities": "0", "reader": "Dr. A", "read_date": "2024-01-05", "source": "csv", "source_uid": None}
    result = cli(root, "labels", "list", "--limit", "5")
    assert result.returncode == 0 and a.uids["one"] in result.stdout

    exported = root / "exported.csv"
    result = cli(root, "labels", "export", "--out", str(exported))
    assert result.returncode == 0, result.stderr
    assert exported.read_text().splitlines() == [HEADER, f"{a.uids['one']},yes,1,1/0,p,0,Dr. A,2024-01-05"]
    assert cli(root, "labels", "export").stdout == exported.read_text()
    result = cli(root, "labels", "import", str(exported))
    assert result.returncode == 1
    assert result.stderr.splitlines() == ["line 2: already imported: this read of this image is stored"]

    result = cli(root, "status")
    assert result.returncode == 0, result.stderr
    assert "labels       : 1 labelled, 2 unlabelled in-scope image(s)" in result.stdout.splitlines()


def test_a_missing_file_is_a_clear_error(archived):
    result = cli(archived.site.root, "labels", "import", str(archived.site.root / "nowhere.csv"))
    assert result.returncode == 2
    assert "nowhere.csv: cannot read the file: No such file or directory" in result.stderr
    assert "Traceback" not in result.stderr
