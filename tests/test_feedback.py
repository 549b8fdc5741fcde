"""Readers' feedback (``db.feedback``, ``dicom-node labels add`` and ``labels disagreements``): accept, reject and
reading become console labels with their audit events, every refusal names its field, the next retraining reads
console labels as it reads CSV ones, and disagreements and agreement rates over two model versions.

A real SQLite database per test; instance, job and finding rows are written directly (what intake and the worker
commit); the command line runs in this process through ``dicom_node.cli.main``.
"""

from __future__ import annotations

import getpass
import json
from datetime import date, datetime
from itertools import count
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from db.engine import init_schema, make_engine
from db.feedback import (
    LABEL_ADDED_EVENT,
    Agreement,
    FeedbackError,
    Reading,
    add_feedback,
    agreement_by_model,
    count_disagreements,
    disagreements,
    today_utc,
)
from db.labels import Read, add_reads, labels_since, list_labels, newest_label_id, training_labels
from db.models import Event, Finding, Instance, Job, JobState, Label, LabelSource
from db.training import labelled_instances
from dicom_node.cli import main

from .support.data import CONFIG

_serial = count(1)
EARLY, LATER, LATEST = datetime(2024, 1, 1), datetime(2024, 3, 1), datetime(2024, 5, 1)


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    engine = make_engine(f"sqlite:///{tmp_path / 'node.sqlite'}")
    init_schema(engine)
    return engine


def add_image(engine: Engine, *, in_scope: bool = True) -> tuple[int, str]:
    """An archived instance row: (instance id, SOP Instance UID)."""
    n = next(_serial)
    uid = f"2.25.7{n}"
    with Session(engine) as session, session.begin():
        inst = Instance(sop_instance_uid=uid, sop_class_uid="1.2.840.10008.5.1.4.1.1.1", study_instance_uid=f"{uid}.1",
                        series_instance_uid=f"{uid}.2", calling_aet="MODALITY", archive_path=f"archive/{n}.dcm",
                        size_bytes=1, sha256="0" * 64, transfer_syntax_uid=ExplicitVRLittleEndian, in_scope=in_scope,
                        scope_reason="in_scope" if in_scope else "body_part_not_chest", patient_key=f"{n:032x}")
        session.add(inst)
        session.flush()
        return inst.id, uid


def add_job(engine: Engine, instance_id: int, *, state: JobState = JobState.DONE,
            finding: tuple[str, float, bool, int] | None = None, at: datetime = EARLY) -> int:
    """A job of the instance, with the classifier's finding (model "name version", probability, present,
    category) created at ``at``; returns the job id."""
    with Session(engine) as session, session.begin():
        job = Job(instance_id=instance_id, state=state, attempts=1)
        session.add(job)
        session.flush()
        if finding is not None:
            model, probability, present, category = finding
            name, version = model.split(" ")
            session.add(Finding(job_id=job.id, instance_id=instance_id, model_name=name, model_version=version,
                                probability=probability, present=present, threshold=0.5, category=category,
                                category_probabilities="[0.25, 0.25, 0.25, 0.25]", analysis_seconds=1.0,
                                created_at=at))
        return job.id


def analysed(engine: Engine, present: bool, category: int, model: str = "cad 1", at: datetime = EARLY
             ) -> tuple[int, int, str]:
    """An analysed image: (job id, instance id, SOP Instance UID)."""
    instance_id, uid = add_image(engine)
    return add_job(engine, instance_id, finding=(model, 0.9 if present else 0.1, present, category), at=at), \
        instance_id, uid


def add_label(engine: Engine, instance_id: int, present: bool, category: int, source: LabelSource,
              imported_at: datetime, reader: str = "csv reader") -> int:
    with Session(engine) as session, session.begin():
        label = Label(instance_id=instance_id, present=present, category=category, reader=reader,
                      read_date=imported_at.date(), source=source, imported_at=imported_at)
        session.add(label)
        session.flush()
        return label.id


def label_values(engine: Engine, label_id: int) -> tuple:
    with Session(engine) as session:
        label = session.get(Label, label_id)
        assert label is not None
        return (label.present, label.category, label.subcategory, label.shape, label.large_opacities, label.reader,
                label.read_date, LabelSource(label.source).value)


def events(engine: Engine) -> list[tuple[str | None, str | None, str | None]]:
    with Session(engine) as session:
        return [(e.sop_instance_uid, e.actor, e.detail)
                for e in session.scalars(select(Event).where(Event.kind == LABEL_ADDED_EVENT).order_by(Event.id))]


def counts(engine: Engine) -> tuple[int, int]:
    with Session(engine) as session:
        return (int(session.scalar(select(func.count()).select_from(Label)) or 0),
                int(session.scalar(select(func.count()).select_from(Event)) or 0))


# --- writing --------------------------------------------------------------------------------------------------------


def test_accept_reject_and_reading_become_console_labels_with_their_audit_events(engine):
    today = today_utc()
    positive, _, positive_uid = analysed(engine, True, 2)
    negative, _, negative_uid = analysed(engine, False, 0)
    odd, _, _ = analysed(engine, True, 0)  # decision and category head disagree: present with category 0

    accepted = add_feedback(engine, job_id=positive, reader=" Dr A ", action="accept")
    rejected = add_feedback(engine, job_id=positive, reader="Dr B", action="reject", actor="admin")
    detailed = add_feedback(engine, job_id=positive, reader="Dr C", action="accept",
                            reading=Reading(True, 2, "2/1", "Q/T", "a"))
    found = add_feedback(engine, job_id=negative, reader="Dr A", action="reject",
                         reading=Reading(True, 1, "1/0", "P", "0"), read_date=date(2025, 1, 2))
    own = add_feedback(engine, job_id=negative, reader="Dr B", action="reading", reading=Reading(False, 0, "0/1"))
    consistent = add_feedback(engine, job_id=odd, reader="Dr A", action="accept")

    assert label_values(engine, accepted) == (True, 2, None, None, None, "Dr A", today, "console")
    assert label_values(engine, rejected) == (False, 0, None, None, None, "Dr B", today, "console")
    assert label_values(engine, detailed) == (True, 2, "2/1", "q/t", "A", "Dr C", today, "console")
    assert label_values(engine, found) == (True, 1, "1/0", "p", "0", "Dr A", date(2025, 1, 2), "console")
    assert label_values(engine, own) == (False, 0, "0/1", None, None, "Dr B", today, "console")
    assert label_values(engine, consistent)[:2] == (True, 1)
    assert events(engine) == [
        (positive_uid, "Dr A", f"job {positive}: accept -> label {accepted}: present, category 2; model cad 1"),
        (positive_uid, "admin", f"job {positive}: reject -> label {rejected}: absent, category 0; model cad 1"),
        (positive_uid, "Dr C", f"job {positive}: accept -> label {detailed}: present, category 2 (2/1, shape q/t, "
                               "large opacities A); model cad 1"),
        (negative_uid, "Dr A", f"job {negative}: reject -> label {found}: present, category 1 (1/0, shape p, "
                               "large opacities 0); model cad 1"),
        (negative_uid, "Dr B", f"job {negative}: reading -> label {own}: absent, category 0 (0/1); model cad 1"),
        (events(engine)[5][0], "Dr A", f"job {odd}: accept -> label {consistent}: present, category 1; model cad 1"),
    ]


@pytest.fixture(scope="module")
def refusals(tmp_path_factory):
    """One database with a job of each kind the refusals need."""
    engine = make_engine(f"sqlite:///{tmp_path_factory.mktemp('refusals') / 'node.sqlite'}")
    init_schema(engine)
    jobs = {"positive": analysed(engine, True, 2)[0], "negative": analysed(engine, False, 0)[0]}
    instance_id, _ = add_image(engine)
    jobs["no finding"] = add_job(engine, instance_id)
    instance_id, _ = add_image(engine)
    jobs["queued"] = add_job(engine, instance_id, state=JobState.QUEUED)
    instance_id, _ = add_image(engine, in_scope=False)
    jobs["out of scope"] = add_job(engine, instance_id, state=JobState.NOT_ANALYSED)
    add_feedback(engine, job_id=jobs["positive"], reader="Dr A", action="reading", reading=Reading(True, 3),
                 read_date=date(2025, 1, 1))
    return engine, jobs


@pytest.mark.parametrize(("job", "reader", "action", "reading", "field", "message"), [
    (None, "Dr A", "accept", None, "job", "there is no job"),
    ("out of scope", "Dr A", "reading", Reading(True, 1), "job", "out of scope"),
    ("no finding", "Dr A", "accept", None, "job", "has no classifier finding to accept; record a reading"),
    ("no finding", "Dr A", "reject", Reading(True, 1), "job", "has no classifier finding to reject"),
    ("queued", "Dr A", "accept", None, "job", "was not analysed (queued)"),
    ("positive", "", "accept", None, "reader", "reader: empty"),
    ("positive", "   ", "accept", None, "reader", "reader: empty"),
    ("positive", "x" * 65, "accept", None, "reader", "longer than 64"),
    ("positive", "Dr\nA", "accept", None, "reader", "control characters"),
    ("positive", "Dr A", "maybe", None, "action", "not one of accept, reject, reading"),
    ("positive", "Dr A", "reading", None, "present", "a reading needs present and category"),
    ("positive", "Dr A", "reading", Reading(True, 0), "category", "present needs category 1, 2 or 3"),
    ("positive", "Dr A", "reading", Reading(False, 1), "category", "absent needs category 0"),
    ("positive", "Dr A", "reading", Reading(True, 4), "category", "not an ILO major category 0-3"),
    ("positive", "Dr A", "reading", Reading(True, "2"), "category", "not an ILO major category 0-3"),  # type: ignore[arg-type]
    ("positive", "Dr A", "reading", Reading("yes", 2), "present", "not yes or no"),  # type: ignore[arg-type]
    ("positive", "Dr A", "reading", Reading(True, 2, "2/4"), "subcategory", "not on the ILO 12-point scale"),
    ("positive", "Dr A", "reading", Reading(True, 2, "1/0"), "subcategory", "differs from category"),
    ("positive", "Dr A", "reading", Reading(True, 2, shape="x"), "shape", "not one of p q r s t u"),
    ("positive", "Dr A", "reading", Reading(True, 2, large_opacities="D"), "large_opacities", "not one of 0 A B C"),
    ("negative", "Dr A", "reject", None, "category", "rejecting an absent result needs the reader's category"),
    ("positive", "Dr A", "reject", Reading(True, 3), "present", "rejecting a present result records absent"),
    ("positive", "Dr A", "accept", Reading(True, 3), "category", "accepting the result records present, category 2"),
    ("positive", "Dr A", "reading", Reading(True, 3), "job", "stored already"),  # the fixture's read, sent again
])
def test_every_refusal_is_a_feedback_error_naming_its_field_and_writes_nothing(refusals, job, reader, action,
                                                                                 reading, field, message):
    engine, jobs = refusals
    before = counts(engine)
    with pytest.raises(FeedbackError) as caught:
        add_feedback(engine, job_id=jobs[job] if job else 9999, reader=reader, action=action, reading=reading,
                     read_date=date(2025, 1, 1))
    assert caught.value.field == field
    assert message in str(caught.value)
    assert counts(engine) == before


def test_a_reading_of_an_analysed_job_without_a_finding_is_stored(refusals):
    engine, jobs = refusals
    label_id = add_feedback(engine, job_id=jobs["no finding"], reader="Dr A", action="reading",
                            reading=Reading(True, 1, "1/1"))
    assert label_values(engine, label_id)[:3] == (True, 1, "1/1")
    assert events(engine)[-1][2] == f"job {jobs['no finding']}: reading -> label {label_id}: present, category 1 (1/1)"


def test_the_next_retraining_reads_a_console_label_as_it_reads_a_csv_label(engine):
    last = newest_label_id(engine)
    job, instance_id, _ = analysed(engine, True, 2)
    add_feedback(engine, job_id=job, reader="Dr A", action="reject", read_date=date(2025, 2, 1))
    _, other, _ = analysed(engine, False, 0)
    add_feedback(engine, job_id=analysed(engine, False, 0)[0], reader="Dr A", action="accept")

    consensus = training_labels(engine, "latest")
    assert (consensus[instance_id].present, consensus[instance_id].category, consensus[instance_id].sources) == \
        (False, 0, ("console",))
    assert other not in consensus  # no read: no label
    assert [r.instance_id for r in labelled_instances(engine, list(consensus))] == sorted(consensus)
    assert labels_since(engine, last) == 2  # what the schedule's training.min_new_labels counts

    with Session(engine) as session, session.begin():  # a CSV read of the same image, newer: both count alike
        add_reads(session, [Read(instance_id, True, 2, None, None, None, "csv reader", date(2025, 3, 1),
                                 LabelSource.CSV, None)])
    latest, majority = training_labels(engine, "latest")[instance_id], training_labels(engine, "majority")[instance_id]
    assert (latest.present, latest.category, latest.reads, latest.sources) == (True, 2, 2, ("console", "csv"))
    assert (majority.present, majority.category) == (True, 2)  # a tie: the newest read's pair
    assert [r.source for r in list_labels(engine, 2)] == ["csv", "console"]


# --- reading --------------------------------------------------------------------------------------------------------


def test_disagreements_and_agreement_rates_over_two_model_versions(engine):
    # version 1 analysed four images; CSV and SR reads judged it; then version 2 analysed two of them again
    job1, a, _ = analysed(engine, True, 2, "cad 1", EARLY)
    job2, b, uid_b = analysed(engine, True, 1, "cad 1", EARLY)
    job3, c, uid_c = analysed(engine, False, 0, "cad 1", EARLY)
    job4, d, uid_d = analysed(engine, False, 0, "cad 1", EARLY)
    add_label(engine, a, True, 3, LabelSource.CSV, LATER)  # agrees on present, not on the category
    sr_b = add_label(engine, b, False, 0, LabelSource.SR, LATER)  # disagrees
    early_d = add_label(engine, d, True, 1, LabelSource.CSV, datetime(2023, 12, 1))  # before any finding: the latest
    job1_v2 = add_job(engine, a, finding=("cad 2", 0.8, True, 3), at=LATEST)
    job2_v2 = add_job(engine, b, finding=("cad 2", 0.3, False, 0), at=LATEST)
    # readers on the console, now: they judge the latest findings
    add_feedback(engine, job_id=job1_v2, reader="Dr A", action="accept")
    console_b = add_feedback(engine, job_id=job2_v2, reader="Dr A", action="reading", reading=Reading(True, 1))
    console_c = add_feedback(engine, job_id=job3, reader="Dr B", action="reject", reading=Reading(True, 2))
    add_feedback(engine, job_id=job4, reader="Dr B", action="accept")

    found = disagreements(engine)
    assert [(x.label_id, x.job_id, x.model, x.source) for x in found] == [
        (console_c, job3, "cad 1", "console"), (console_b, job2_v2, "cad 2", "console"),
        (early_d, job4, "cad 1", "csv"), (sr_b, job2, "cad 1", "sr")]
    first = found[0]
    assert (first.instance_id, first.sop_instance_uid, first.reader, first.read_date) == (c, uid_c, "Dr B",
                                                                                          today_utc())
    assert (first.model_present, first.model_category, first.model_probability, first.reader_present,
            first.reader_category) == (False, 0, pytest.approx(0.1), True, 2)
    assert [x.sop_instance_uid for x in found[1:]] == [uid_b, uid_d, uid_b]
    assert [x.label_id for x in disagreements(engine, model="cad 2")] == [console_b]
    assert [x.label_id for x in disagreements(engine, limit=2, offset=1)] == [console_b, early_d]
    assert disagreements(engine, model="cad 3") == []
    assert (count_disagreements(engine), count_disagreements(engine, model="cad 1")) == (4, 3)

    # cad 1: labels a (csv, category differs), b (sr, no), c (console, no), d (csv, no), d (console accept, yes)
    assert agreement_by_model(engine) == [Agreement("cad 2", 2, 1, 1), Agreement("cad 1", 5, 2, 1)]
    cad1 = agreement_by_model(engine)[1]
    assert (cad1.rate, cad1.category_rate) == (pytest.approx(0.4), pytest.approx(0.2))


def test_no_reads_no_agreement(engine):
    analysed(engine, True, 2)
    assert agreement_by_model(engine) == [] and disagreements(engine) == []
    assert Agreement("m 1", 0, 0, 0).rate == 0.0


# --- the command line -----------------------------------------------------------------------------------------------


def cli(root: Path, *argv: str) -> int:
    return main(["labels", *argv, "--config", str(CONFIG), "--set", f"storage.storage_root={root}"])


def test_labels_add_and_disagreements_on_the_command_line(engine, tmp_path, capsys):
    positive, _, positive_uid = analysed(engine, True, 2)
    negative, _, negative_uid = analysed(engine, False, 0)

    assert cli(tmp_path, "add", "--job", str(positive), "--reader", "Dr CLI", "--accept") == 0
    out = capsys.readouterr().out
    assert out == f"label 1 recorded for job {positive} (accept): present, category 2; reader Dr CLI, read " \
                  f"{today_utc().isoformat()}, source console\n"
    assert events(engine)[-1][1] == getpass.getuser()  # the actor is the OS user, the reader is named
    assert cli(tmp_path, "add", "--sop-instance-uid", negative_uid, "--reader", "Dr CLI", "--present", "yes",
               "--category", "2", "--subcategory", "2/1", "--shape", "q", "--read-date", "2025-03-04") == 0
    assert "label 2 recorded for job" in capsys.readouterr().out
    assert label_values(engine, 2) == (True, 2, "2/1", "q", None, "Dr CLI", date(2025, 3, 4), "console")
    assert cli(tmp_path, "add", "--job", str(negative), "--reader", "Dr B", "--reject", "--category", "1",
               "--large-opacities", "a") == 0
    assert label_values(engine, 3)[:5] == (True, 1, None, None, "A")
    capsys.readouterr()

    for argv, option in [
        (["--job", str(negative), "--present", "yes", "--category", "7"], "--category: not an ILO major category"),
        (["--job", str(negative), "--present", "yes"], "--category: a reading needs --category with --present"),
        (["--job", str(positive), "--reject", "--subcategory", "0/1"], "--subcategory: give --category with it"),
        (["--job", str(positive), "--accept", "--category", "3"], "--category: --accept records the model's"),
        (["--job", str(negative), "--reject"], "--category: rejecting an absent result"),
        (["--job", "999", "--accept"], "--job: there is no job 999"),
        (["--sop-instance-uid", "1.2.3", "--accept"], "--sop-instance-uid: no archived image has this"),
        (["--job", str(positive), "--present", "yes", "--category", "2", "--shape", "z"], "--shape: not one of"),
    ]:
        assert cli(tmp_path, "add", "--reader", "Dr CLI", *argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(f"dicom-node: labels add: {option}") and "Traceback" not in err, (argv, err)
    with pytest.raises(SystemExit) as exited:  # argparse's own check names the option too
        cli(tmp_path, "add", "--job", str(positive), "--reader", "Dr CLI", "--accept", "--read-date", "2025-13-01")
    assert exited.value.code == 2 and "--read-date: not a date in the form YYYY-MM-DD" in capsys.readouterr().err
    assert counts(engine)[0] == 3

    assert cli(tmp_path, "disagreements") == 0
    out = capsys.readouterr().out
    table = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    assert table["cad"] == ["cad", "1", "3", "1", "33.3%", "33.3%"]
    assert [table[str(label)][-1] for label in (2, 3)] == [negative_uid, negative_uid]
    assert positive_uid not in out
    assert cli(tmp_path, "disagreements", "--json") == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[0] == {"model": "cad 1", "reads": 3, "agree_binary": 1, "agree_category": 1, "rate": 0.3333,
                        "category_rate": 0.3333}
    assert [(x["label_id"], x["reader_present"], x["model_present"]) for x in lines[1:]] == [(3, True, False),
                                                                                           (2, True, False)]
