"""Reads of archived images (the ``labels`` table) and the training label each image gets from them.

Several reads of one image are kept (several readers, or one reader twice); ``training_labels`` turns them into
one label per image by a consensus rule, chosen by the node's ``training.consensus`` setting:

- ``"latest"``: the read with the latest read date; reads without a date count as older than any dated read, and
  reads with the same date are ordered by import (the later import, the higher label id, wins).
- ``"majority"``: the most frequent (present, category) pair among the image's reads; a tie goes to the tied pair
  whose newest read comes first in the "latest" order above.

Values in, values out: no configuration objects, no files. Only in-scope images count for training.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from sqlalchemy import Engine, exists, func, select
from sqlalchemy.orm import InstrumentedAttribute, Session

from .engine import readonly
from .models import Instance, Label, LabelSource, Result

CONSENSUS_RULES = ("latest", "majority")
IDENTIFIER_COLUMNS = ("sop_instance_uid", "accession_number", "study_instance_uid")
NOT_AN_IMAGE_REASON = "sop_class_not_radiograph"
# the values a read may hold: the CSV import (dicom_node.labels_csv) and the readers' feedback (db.feedback) check
# against these same lists
SUBCATEGORIES = ("0/-", "0/0", "0/1", "1/0", "1/1", "1/2", "2/1", "2/2", "2/3", "3/2", "3/3", "3/+")
SHAPE_PATTERN = re.compile(r"^[pqrstu](/[pqrstu])?$")
LARGE_OPACITIES = ("0", "A", "B", "C")
READER_LENGTH = 64  # Label.reader's column length
_IN_CHUNK = 500  # values per IN (...) list: well below SQLite's bound-parameter limit


@dataclass(frozen=True)
class Read:
    """One reader's read of one instance, as it is stored."""

    instance_id: int
    present: bool
    category: int
    subcategory: str | None
    shape: str | None
    large_opacities: str | None
    reader: str | None
    read_date: date | None
    source: LabelSource
    source_uid: str | None


@dataclass(frozen=True)
class TrainingLabel:
    """The consensus of an image's reads; ``sources`` are the distinct sources of those reads, sorted."""

    instance_id: int
    present: bool
    category: int
    reads: int
    sources: tuple[str, ...]


@dataclass(frozen=True)
class LabelRow:
    """A stored read as the CLI lists and exports it."""

    id: int
    instance_id: int
    sop_instance_uid: str
    present: bool
    category: int
    subcategory: str | None
    shape: str | None
    large_opacities: str | None
    reader: str | None
    read_date: date | None
    source: str
    source_uid: str | None
    imported_at: datetime


@dataclass(frozen=True)
class ImageRef:
    """An archived instance a label may name: its id, its study and whether it is in scope."""

    instance_id: int
    sop_instance_uid: str
    in_scope: bool
    is_image: bool  # False for objects that are not images at all (SR, SEG, presentation states, ...)


@dataclass(frozen=True)
class ResultRef:
    """One of the node's own result objects, for an SR that reviews it."""

    sop_instance_uid: str
    instance_id: int  # the radiograph it reports on
    kind: str
    analysed: bool
    archive_path: str  # relative to the storage root


@dataclass(frozen=True)
class SrInstance:
    """An archived SR the node did not write, whose reads are not imported yet."""

    instance_id: int
    sop_instance_uid: str
    archive_path: str  # relative to the storage root


# --- writing --------------------------------------------------------------------------------------------------------


def add_reads(session: Session, reads: Iterable[Read]) -> int:
    """Add ``reads`` inside the caller's transaction; returns how many were added."""
    rows = [Label(instance_id=r.instance_id, present=r.present, category=r.category, subcategory=r.subcategory,
                  shape=r.shape, large_opacities=r.large_opacities, reader=r.reader, read_date=r.read_date,
                  source=r.source, source_uid=r.source_uid) for r in reads]
    session.add_all(rows)
    session.flush()
    return len(rows)


def _equal(column: InstrumentedAttribute[Any], value: object) -> Any:
    return column.is_(None) if value is None else column == value


def stored_read_exists(session: Session, read: Read) -> bool:
    """Whether the same read is stored already (same instance, reader, read date and values, whatever its source):
    a file imported twice."""
    stmt = select(Label.id).where(
        Label.instance_id == read.instance_id, Label.present == read.present, Label.category == read.category,
        _equal(Label.subcategory, read.subcategory), _equal(Label.shape, read.shape),
        _equal(Label.large_opacities, read.large_opacities), _equal(Label.reader, read.reader),
        _equal(Label.read_date, read.read_date)).limit(1)
    return session.scalars(stmt).first() is not None


# --- looking up what a read names -----------------------------------------------------------------------------------


def _chunks(values: Sequence[str]) -> Iterable[Sequence[str]]:
    for start in range(0, len(values), _IN_CHUNK):
        yield values[start:start + _IN_CHUNK]


def find_images(session: Session, column: str, values: Iterable[str]) -> dict[str, list[ImageRef]]:
    """The archived instances whose ``column`` (one of ``IDENTIFIER_COLUMNS``) is one of ``values``, by value;
    a value nothing matches is absent from the result. Our own result objects routed back are left out."""
    if column not in IDENTIFIER_COLUMNS:
        raise ValueError(f"not an identifier column: {column}")
    attribute = getattr(Instance, column)
    found: dict[str, list[ImageRef]] = defaultdict(list)
    own = exists().where(Result.sop_instance_uid == Instance.sop_instance_uid)
    for chunk in _chunks(sorted(set(values))):
        rows = session.execute(
            select(attribute, Instance.id, Instance.sop_instance_uid, Instance.in_scope, Instance.scope_reason)
            .where(attribute.in_(chunk), ~own).order_by(Instance.id)).all()
        for value, instance_id, uid, in_scope, reason in rows:
            found[str(value)].append(ImageRef(int(instance_id), str(uid), bool(in_scope),
                                              reason != NOT_AN_IMAGE_REASON or bool(in_scope)))
    return dict(found)


def find_results(session: Session, sop_instance_uids: Iterable[str]) -> dict[str, ResultRef]:
    """The node's own result objects among ``sop_instance_uids``."""
    found: dict[str, ResultRef] = {}
    for chunk in _chunks(sorted(set(sop_instance_uids))):
        rows = session.execute(select(Result.sop_instance_uid, Result.instance_id, Result.kind, Result.analysed,
                                      Result.archive_path).where(Result.sop_instance_uid.in_(chunk))).all()
        for uid, instance_id, kind, analysed, path in rows:
            found[str(uid)] = ResultRef(str(uid), int(instance_id), str(kind), bool(analysed), str(path))
    return found


def unimported_srs(engine: Engine, sr_sop_classes: Iterable[str]) -> list[SrInstance]:
    """Archived instances of ``sr_sop_classes`` (or of modality SR) that are not the node's own results and have no
    label from them yet (``source_uid``), oldest first."""
    own = exists().where(Result.sop_instance_uid == Instance.sop_instance_uid)
    imported = exists().where(Label.source == LabelSource.SR, Label.source_uid == Instance.sop_instance_uid)
    stmt = (select(Instance.id, Instance.sop_instance_uid, Instance.archive_path)
            .where(Instance.sop_class_uid.in_(sorted(set(sr_sop_classes))) | (Instance.modality == "SR"),
                   ~own, ~imported).order_by(Instance.id))
    with Session(readonly(engine)) as session:
        return [SrInstance(int(i), str(uid), str(path)) for i, uid, path in session.execute(stmt).all()]


def sr_already_imported(session: Session, sop_instance_uid: str) -> bool:
    return session.scalars(select(Label.id).where(Label.source == LabelSource.SR,
                                                  Label.source_uid == sop_instance_uid).limit(1)).first() is not None


# --- reading --------------------------------------------------------------------------------------------------------


def _latest_first_key(row: Any) -> tuple[date, int]:
    return (row.read_date or date.min, int(row.id))


def _consensus(rows: list[Any], rule: str) -> tuple[bool, int]:
    ordered = sorted(rows, key=_latest_first_key, reverse=True)
    if rule == "latest":
        return bool(ordered[0].present), int(ordered[0].category)
    votes = Counter((bool(r.present), int(r.category)) for r in ordered)
    most = max(votes.values())
    for r in ordered:  # the newest read whose pair has the most votes
        pair = (bool(r.present), int(r.category))
        if votes[pair] == most:
            return pair
    raise AssertionError("unreachable: every image here has a read")


def training_labels(engine: Engine, rule: str) -> dict[int, TrainingLabel]:
    """Instance id -> training label, for every in-scope instance with at least one read (rules: module docstring).
    Raises ValueError for an unknown rule."""
    if rule not in CONSENSUS_RULES:
        raise ValueError(f"unknown consensus rule {rule!r}: one of {', '.join(CONSENSUS_RULES)}")
    stmt = (select(Label.id, Label.instance_id, Label.present, Label.category, Label.read_date, Label.source)
            .join(Instance, Instance.id == Label.instance_id).where(Instance.in_scope.is_(True)))
    by_instance: dict[int, list[Any]] = defaultdict(list)
    with Session(readonly(engine)) as session:
        for row in session.execute(stmt).all():
            by_instance[int(row.instance_id)].append(row)
    labels = {}
    for instance_id, rows in sorted(by_instance.items()):
        present, category = _consensus(rows, rule)
        sources = tuple(sorted({LabelSource(r.source).value for r in rows}))
        labels[instance_id] = TrainingLabel(instance_id, present, category, len(rows), sources)
    return labels


def label_counts(engine: Engine) -> tuple[int, int]:
    """(in-scope images with at least one read, in-scope images without one)."""
    has_read = exists().where(Label.instance_id == Instance.id)
    with Session(readonly(engine)) as session:
        labelled = session.scalar(select(func.count()).select_from(Instance)
                                  .where(Instance.in_scope.is_(True), has_read)) or 0
        unlabelled = session.scalar(select(func.count()).select_from(Instance)
                                    .where(Instance.in_scope.is_(True), ~has_read)) or 0
    return int(labelled), int(unlabelled)


def newest_label_id(engine: Engine) -> int:
    """The highest label id (0 when there is none): a training run records it to count the labels added since."""
    with Session(readonly(engine)) as session:
        return int(session.scalar(select(func.max(Label.id))) or 0)


def labels_since(engine: Engine, label_id: int) -> int:
    """How many reads were stored after the one with ``label_id``."""
    with Session(readonly(engine)) as session:
        return int(session.scalar(select(func.count()).select_from(Label).where(Label.id > label_id)) or 0)


def list_labels(engine: Engine, limit: int | None = None, *, oldest_first: bool = False,
                instance_id: int | None = None) -> list[LabelRow]:
    """Stored reads, newest first (``oldest_first`` for an export); ``limit`` None: all of them; ``instance_id``:
    only that image's."""
    stmt = (select(Label, Instance.sop_instance_uid).join(Instance, Instance.id == Label.instance_id)
            .order_by(Label.id if oldest_first else Label.id.desc()))
    if instance_id is not None:
        stmt = stmt.where(Label.instance_id == instance_id)
    if limit is not None:
        stmt = stmt.limit(limit)
    with Session(readonly(engine)) as session:
        return [LabelRow(id=label.id, instance_id=label.instance_id, sop_instance_uid=uid, present=label.present,
                         category=label.category, subcategory=label.subcategory, shape=label.shape,
                         large_opacities=label.large_opacities, reader=label.reader, read_date=label.read_date,
                         source=LabelSource(label.source).value, source_uid=label.source_uid,
                         imported_at=label.imported_at)
                for label, uid in session.execute(stmt).all()]
