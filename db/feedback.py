"""Readers' feedback on the classifier's results (the console's job page, ``dicom-node labels add``): accepting,
rejecting or reading anew an analysed image stores a label of source ``console``, which the next retraining uses
like any other read (``db.labels.training_labels``); and how often the readers' labels agree with each model.

The model's *answer* is its binary decision with its category made to agree with it (absent: 0; present: at least
1), since the decision (probability against threshold) and the category (another head) may differ. It is what an
accepted result records and what the agreement compares a label with. A label judges the latest finding of its
image created at or before the label was stored (else the image's latest finding): the result the reader saw.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from .engine import readonly
from .labels import LARGE_OPACITIES, READER_LENGTH, SHAPE_PATTERN, SUBCATEGORIES, Read, stored_read_exists
from .models import Event, Finding, Instance, Job, JobState, Label, LabelSource

ACTIONS = ("accept", "reject", "reading")
LABEL_ADDED_EVENT = "label_added"


class FeedbackError(ValueError):
    """Feedback that cannot be stored; the message says what is wrong (never a patient's data) and ``field`` names
    the input it is about (job, action, reader, present, category, subcategory, shape, large_opacities, read_date),
    for a form or the command line."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Reading:
    """A reader's own read: present, ILO major category 0-3 and the optional ILO details."""

    present: bool
    category: int  # present False requires 0; present True requires 1-3
    subcategory: str | None = None  # 12-point scale, e.g. "2/1"; its first digit must equal category
    shape: str | None = None  # small opacities, primary[/secondary]: "p", "q/t"
    large_opacities: str | None = None  # "0", "A", "B", "C"


@dataclass(frozen=True)
class Disagreement:
    label_id: int
    job_id: int
    instance_id: int
    sop_instance_uid: str
    reader: str | None
    read_date: date | None
    source: str
    model: str  # "name version"
    model_present: bool
    model_category: int  # the model's answer (module docstring)
    model_probability: float
    reader_present: bool
    reader_category: int


@dataclass(frozen=True)
class Agreement:
    """Labels judging one model's findings: how many, how many agree on present/absent, and on the category too."""

    model: str
    reads: int
    agree_binary: int
    agree_category: int

    @property
    def rate(self) -> float:
        return self.agree_binary / self.reads if self.reads else 0.0

    @property
    def category_rate(self) -> float:
        return self.agree_category / self.reads if self.reads else 0.0


def model_answer(present: bool, category: int) -> tuple[bool, int]:
    """A finding's (present, category) made consistent: absent -> 0, present -> at least 1."""
    return (True, max(1, min(3, int(category)))) if present else (False, 0)


# --- checking -------------------------------------------------------------------------------------------------------


def _reader(reader: str) -> str:
    text = (reader or "").strip()
    if not text:
        raise FeedbackError("reader: empty (the reader's name is needed)", "reader")
    if len(text) > READER_LENGTH:
        raise FeedbackError(f"reader: longer than {READER_LENGTH} characters", "reader")
    if any(not ch.isprintable() for ch in text):
        raise FeedbackError("reader: holds control characters", "reader")
    return text


def _checked(reading: Reading) -> Reading:
    """``reading`` with its details normalised as the CSV import stores them; raises ``FeedbackError``."""
    if not isinstance(reading.present, bool):
        raise FeedbackError("present: not yes or no", "present")
    if isinstance(reading.category, bool) or not isinstance(reading.category, int) or not 0 <= reading.category <= 3:
        raise FeedbackError("category: not an ILO major category 0-3", "category")
    if reading.present and reading.category == 0:
        raise FeedbackError("category: present needs category 1, 2 or 3", "category")
    if not reading.present and reading.category != 0:
        raise FeedbackError("category: absent needs category 0", "category")
    subcategory = (reading.subcategory or "").strip() or None
    if subcategory is not None:
        if subcategory not in SUBCATEGORIES:
            raise FeedbackError(f"subcategory: not on the ILO 12-point scale ({' '.join(SUBCATEGORIES)})",
                                "subcategory")
        if int(subcategory[0]) != reading.category:
            raise FeedbackError("subcategory: its major category differs from category", "subcategory")
    shape = (reading.shape or "").strip().lower() or None
    if shape is not None and not SHAPE_PATTERN.match(shape):
        raise FeedbackError("shape: not one of p q r s t u, or primary/secondary such as p/q", "shape")
    large = (reading.large_opacities or "").strip().upper() or None
    if large is not None and large not in LARGE_OPACITIES:
        raise FeedbackError(f"large_opacities: not one of {' '.join(LARGE_OPACITIES)}", "large_opacities")
    return Reading(reading.present, reading.category, subcategory, shape, large)


def _yes_no(present: bool) -> str:
    return "present" if present else "absent"


def _label_values(action: str, job_id: int, finding: Finding | None, reading: Reading | None) -> Reading:
    """What the label records for ``action``; raises ``FeedbackError``."""
    checked = _checked(reading) if reading is not None else None
    if action == "reading":
        if checked is None:
            raise FeedbackError("present: a reading needs present and category", "present")
        return checked
    if finding is None:
        raise FeedbackError(f"job: job {job_id} has no classifier finding to {action}; record a reading instead",
                            "job")
    present, category = model_answer(finding.present, finding.category)
    if action == "accept":
        if checked is None:
            return Reading(present, category)
        if (checked.present, checked.category) != (present, category):
            raise FeedbackError(f"category: accepting the result records {_yes_no(present)}, category {category}; "
                                "record a reading to give another", "category")
        return checked
    # reject: the opposite of the model's binary answer
    if checked is None:
        if present:
            return Reading(False, 0)
        raise FeedbackError("category: rejecting an absent result needs the reader's category 1-3; record a "
                            "reading", "category")
    if checked.present == present:
        raise FeedbackError(f"present: rejecting a {_yes_no(present)} result records {_yes_no(not present)}",
                            "present")
    return checked


# --- writing --------------------------------------------------------------------------------------------------------


def today_utc() -> date:
    return datetime.now(UTC).date()


def add_feedback(engine: Engine, *, job_id: int, reader: str, action: str, reading: Reading | None = None,
                 read_date: date | None = None, actor: str | None = None) -> int:
    """Store a reader's feedback on job ``job_id`` as a label (source console) and a ``label_added`` audit event,
    in one transaction; returns the label id.

    accept: the model's answer (``reading`` may add the ILO details, and must then agree with it); reject: the
    opposite of its binary answer (a rejected positive is absent, category 0; a rejected negative needs
    ``reading`` with the reader's category); reading: the reader's own ``reading``. Raises ``FeedbackError`` for an
    unknown job, an image the node does not analyse, accept/reject of a job without a finding, a bad reader or
    reading, and a read stored already (the same reader, date and values: a form sent twice)."""
    if action not in ACTIONS:
        raise FeedbackError(f"action: not one of {', '.join(ACTIONS)}", "action")
    name = _reader(reader)
    if read_date is not None and not isinstance(read_date, date):
        raise FeedbackError("read_date: not a date", "read_date")
    when = read_date or today_utc()
    with Session(engine) as session, session.begin():
        row = session.execute(select(Job.id, Job.state, Instance.id, Instance.sop_instance_uid, Instance.in_scope)
                              .join(Instance, Instance.id == Job.instance_id).where(Job.id == job_id)).first()
        if row is None:
            raise FeedbackError(f"job: there is no job {job_id}", "job")
        _, state, instance_id, sop_instance_uid, in_scope = row
        if not in_scope:
            raise FeedbackError(f"job: job {job_id}'s image is out of scope (not a chest radiograph the node "
                                "analyses), so it takes no label", "job")
        finding = session.scalars(select(Finding).where(Finding.job_id == job_id)).first()
        if finding is None and action != "reading" and state is not JobState.DONE:
            raise FeedbackError(f"job: job {job_id} was not analysed ({JobState(state).value}); record a reading "
                                "instead", "job")
        values = _label_values(action, job_id, finding, reading)
        read = Read(instance_id=instance_id, present=values.present, category=values.category,
                    subcategory=values.subcategory, shape=values.shape, large_opacities=values.large_opacities,
                    reader=name, read_date=when, source=LabelSource.CONSOLE, source_uid=None)
        if stored_read_exists(session, read):
            raise FeedbackError("job: this reader's read of this image with these values on this date is stored "
                                "already", "job")
        label = Label(instance_id=instance_id, present=read.present, category=read.category,
                      subcategory=read.subcategory, shape=read.shape, large_opacities=read.large_opacities,
                      reader=name, read_date=when, source=LabelSource.CONSOLE)
        session.add(label)
        session.flush()
        model = f"; model {finding.model_name} {finding.model_version}" if finding is not None else ""
        session.add(Event(kind=LABEL_ADDED_EVENT, sop_instance_uid=sop_instance_uid, actor=(actor or name)[:64],
                          detail=f"job {job_id}: {action} -> label {label.id}: {describe(values)}{model}"))
        return int(label.id)


def describe(reading: Reading) -> str:
    """A read in one line, e.g. ``present, category 2 (2/1, shape q/t, large opacities A)``."""
    details = [d for d in (reading.subcategory, reading.shape and f"shape {reading.shape}",
                           reading.large_opacities and f"large opacities {reading.large_opacities}") if d]
    return f"{_yes_no(reading.present)}, category {reading.category}" + (f" ({', '.join(details)})" if details
                                                                        else "")


def recorded(engine: Engine, label_id: int) -> tuple[Reading, str | None, date | None] | None:
    """A stored label's values, reader and read date (None when there is no such label)."""
    with Session(readonly(engine)) as session:
        label = session.get(Label, label_id)
        if label is None:
            return None
        return (Reading(label.present, label.category, label.subcategory, label.shape, label.large_opacities),
                label.reader, label.read_date)


def job_of_instance(engine: Engine, sop_instance_uid: str) -> int:
    """The job a reader judges for an image: the job of its latest finding, else its latest job. Raises
    ``FeedbackError`` when no archived image has this UID."""
    with Session(readonly(engine)) as session:
        instance_id = session.scalars(select(Instance.id).where(Instance.sop_instance_uid == sop_instance_uid)
                                      ).first()
        if instance_id is None:
            raise FeedbackError("job: no archived image has this SOP Instance UID", "job")
        job_id = session.scalars(select(Finding.job_id).where(Finding.instance_id == instance_id)
                                 .order_by(Finding.id.desc()).limit(1)).first()
        if job_id is None:
            job_id = session.scalars(select(Job.id).where(Job.instance_id == instance_id)
                                     .order_by(Job.id.desc()).limit(1)).first()
        if job_id is None:
            raise FeedbackError("job: this image has no analysis job", "job")
        return int(job_id)


# --- reading: the labels against the findings they judge ------------------------------------------------------------


def _judged_finding_id() -> Any:
    """Per label (correlated): the latest finding of its image created at or before it, else the latest one."""
    before = (select(func.max(Finding.id)).where(Finding.instance_id == Label.instance_id,
                                                 Finding.created_at <= Label.imported_at)
              .correlate(Label).scalar_subquery())
    latest = select(func.max(Finding.id)).where(Finding.instance_id == Label.instance_id).correlate(Label) \
        .scalar_subquery()
    return func.coalesce(before, latest)


def _model_column() -> Any:
    return Finding.model_name + " " + Finding.model_version


def _disagreeing(stmt: Any, model: str | None) -> Any:
    stmt = stmt.join(Finding, Finding.id == _judged_finding_id()).where(Label.present != Finding.present)
    return stmt if model is None else stmt.where(_model_column() == model)


def disagreements(engine: Engine, *, limit: int = 100, offset: int = 0, model: str | None = None
                  ) -> list[Disagreement]:
    """Labels of every source (console, csv, sr) whose present/absent differs from the model's answer in the finding
    they judge, newest label first; ``model`` ("name version") keeps one model's."""
    stmt = (_disagreeing(select(Label, Finding, Instance.sop_instance_uid), model)
            .join(Instance, Instance.id == Label.instance_id)
            .order_by(Label.id.desc()).limit(max(0, limit)).offset(max(0, offset)))
    out = []
    with Session(readonly(engine)) as session:
        for label, finding, uid in session.execute(stmt).all():
            present, category = model_answer(finding.present, finding.category)
            out.append(Disagreement(
                label_id=label.id, job_id=finding.job_id, instance_id=label.instance_id, sop_instance_uid=uid,
                reader=label.reader, read_date=label.read_date, source=LabelSource(label.source).value,
                model=f"{finding.model_name} {finding.model_version}", model_present=present,
                model_category=category, model_probability=float(finding.probability),
                reader_present=bool(label.present), reader_category=int(label.category)))
    return out


def count_disagreements(engine: Engine, *, model: str | None = None) -> int:
    """How many labels ``disagreements`` would list without a limit (for a page's pager)."""
    with Session(readonly(engine)) as session:
        return int(session.scalar(_disagreeing(select(func.count(Label.id)).select_from(Label), model)) or 0)


def agreement_by_model(engine: Engine) -> list[Agreement]:
    """Per model version whose findings labels judge: the labels and how many agree with the model's answer
    (present/absent; and the category as well); the model with the newest finding first."""
    stmt = (select(Finding.model_name, Finding.model_version, Finding.id, Finding.present, Finding.category,
                   Label.present, Label.category)
            .select_from(Label).join(Finding, Finding.id == _judged_finding_id()))
    counts: dict[str, list[int]] = {}  # model -> [newest finding id, reads, agree binary, agree category]
    with Session(readonly(engine)) as session:
        for name, version, finding_id, f_present, f_category, l_present, l_category in session.execute(stmt).all():
            entry = counts.setdefault(f"{name} {version}", [0, 0, 0, 0])
            present, category = model_answer(f_present, f_category)
            entry[0] = max(entry[0], int(finding_id))
            entry[1] += 1
            entry[2] += present == bool(l_present)
            entry[3] += present == bool(l_present) and category == int(l_category)
    ordered = sorted(counts.items(), key=lambda item: item[1][0], reverse=True)
    return [Agreement(model, reads, binary, cat) for model, (_, reads, binary, cat) in ordered]
