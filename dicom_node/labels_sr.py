"""Reads of a radiologist that reached the node as DICOM SR, imported as labels with source "sr".

A reading station sends its SR to the node like any other object: the intake archives it and records it out of
scope (``sop_class_not_radiograph``); no job runs on it. ``import_sr_labels`` later looks at every archived SR that
is not one of the node's own results and has given no label yet, and understands two kinds (docs/labels.md):

a) a read: the SR references exactly one archived image (an IMAGE or COMPOSITE content item, or the Current
   Requested Procedure / Pertinent Other Evidence sequences) and holds a CODE item (PROFUSION, 99PNEUMOILO) whose
   value is an ILO major category 0-3. Present = category >= 1.
b) a review of one of our SRs: it references our result SR and holds a CODE item (REVIEW, 99PNEUMOILO) valued
   ACCEPTED or REJECTED. Accepted: the label is what our SR said. Rejected "present": absent, category 0. Rejected
   "absent": the reader's own PROFUSION category 1-3 in the same SR is needed.

The reader is the Verifying Observer Name, else the Author Observer's Person Name, else the content tree's Person
Observer Name (a staff name, at most 64 characters; nothing about the patient is stored); the read date is the
Content Date. No dataset value is ever logged; reasons are fixed texts.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path

import pydicom.uid
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from ai.limits import read_dataset_bounded
from db.engine import readonly
from db.labels import Read, ResultRef, add_reads, find_images, find_results, sr_already_imported, unimported_srs
from db.models import LabelSource

from .results import codes

SR_SOP_CLASSES = frozenset(str(value) for name, value in vars(pydicom.uid).items() if name.endswith("SRStorage"))
PERSON_OBSERVER_NAME = ("121008", "DCM")
READER_LENGTH = 64
REVIEW_VERDICTS = {(codes.ACCEPTED.value, codes.ACCEPTED.scheme_designator): True,
                   (codes.REJECTED.value, codes.REJECTED.scheme_designator): False}
CATEGORY_VALUES = {(c.value, c.scheme_designator): k for k, c in enumerate(codes.CATEGORIES)}
EVIDENCE_SEQUENCES = ("CurrentRequestedProcedureEvidenceSequence", "PertinentOtherEvidenceSequence")

LOG = logging.getLogger("dicom_node.labels")


@dataclass(frozen=True)
class NotImported:
    sop_instance_uid: str
    reason: str


@dataclass(frozen=True)
class SrImportReport:
    scanned: int  # archived SRs that had given no label yet
    imported: int
    not_imported: tuple[NotImported, ...]

    def reasons(self) -> Counter[str]:
        return Counter(item.reason for item in self.not_imported)


class NotUnderstood(Exception):
    """An SR this module cannot turn into a read; the message is a fixed text."""


# --- reading an SR --------------------------------------------------------------------------------------------------


def _key(code_sequence: object) -> tuple[str, str] | None:
    try:
        item = code_sequence[0]  # type: ignore[index]
        return str(item.CodeValue), str(item.CodingSchemeDesignator)
    except (AttributeError, IndexError, KeyError, TypeError):
        return None


def _as_key(code: Code) -> tuple[str, str]:
    return code.value, code.scheme_designator


def content_items(ds: Dataset) -> Iterator[Dataset]:
    """Every content item of the SR tree, depth first (bounded by the file, which was read with size limits)."""
    stack = list(reversed(list(ds.get("ContentSequence", []))))
    while stack:
        item = stack.pop()
        yield item
        stack.extend(reversed(list(item.get("ContentSequence", []))))


def coded_values(ds: Dataset, name: Code) -> list[tuple[str, str]]:
    """The values of every CODE item named ``name``."""
    wanted = _as_key(name)
    values = []
    for item in content_items(ds):
        if item.get("ValueType") == "CODE" and _key(item.get("ConceptNameCodeSequence")) == wanted:
            value = _key(item.get("ConceptCodeSequence"))
            if value is not None:
                values.append(value)
    return values


def referenced_uids(ds: Dataset) -> set[str]:
    """SOP Instance UIDs the SR references: its IMAGE and COMPOSITE items and its evidence sequences."""
    uids: set[str] = set()
    for item in content_items(ds):
        if item.get("ValueType") in ("IMAGE", "COMPOSITE"):
            uids |= {str(ref.get("ReferencedSOPInstanceUID", "")) for ref in item.get("ReferencedSOPSequence", [])}
    for keyword in EVIDENCE_SEQUENCES:
        for study in ds.get(keyword, []):
            for series in study.get("ReferencedSeriesSequence", []):
                uids |= {str(ref.get("ReferencedSOPInstanceUID", ""))
                         for ref in series.get("ReferencedSOPSequence", [])}
    uids.discard("")
    uids.discard(str(ds.get("SOPInstanceUID", "")))
    return uids


def profusion_category(ds: Dataset) -> int | None:
    """The SR's ILO major category (None when it has none). Raises ``NotUnderstood`` for values outside 0-3 or
    for several different ones."""
    values = coded_values(ds, codes.PROFUSION_CATEGORY)
    if not values:
        return None
    categories = {CATEGORY_VALUES.get(v) for v in values}
    if None in categories:
        raise NotUnderstood("its profusion category is not one of the codes for 0-3")
    if len(categories) > 1:
        raise NotUnderstood("it carries several different profusion categories")
    (category,) = categories
    return category


def _short(value: object) -> str | None:
    text = " ".join(str(value or "").replace("^", " ").split())
    text = "".join(ch for ch in text if ch.isprintable())
    return text[:READER_LENGTH] or None


def reader_of(ds: Dataset) -> str | None:
    """A short reader string: Verifying Observer Name, else the author's Person Name, else Person Observer Name."""
    for item in ds.get("VerifyingObserverSequence", []):
        if name := _short(item.get("VerifyingObserverName")):
            return name
    for item in ds.get("AuthorObserverSequence", []):
        if str(item.get("ObserverType", "")) == "PSN" and (name := _short(item.get("PersonName"))):
            return name
    for item in content_items(ds):
        if item.get("ValueType") == "PNAME" and _key(item.get("ConceptNameCodeSequence")) == PERSON_OBSERVER_NAME:
            if name := _short(item.get("PersonName")):
                return name
    return None


def read_date_of(ds: Dataset) -> date | None:
    try:
        return datetime.strptime(str(ds.get("ContentDate", "") or "").strip(), "%Y%m%d").date()
    except ValueError:
        return None


def cad_finding(path: Path) -> tuple[bool, int]:
    """(present, category) as one of our SRs states it. Raises ``NotUnderstood`` when it states none."""
    try:
        ours = read_dataset_bounded(path, stop_before_pixels=True)
    except Exception:
        raise NotUnderstood("the reviewed result's file cannot be read") from None
    present = set(coded_values(ours, codes.PNEUMOCONIOSIS)) & {_as_key(codes.PRESENT), _as_key(codes.ABSENT)}
    category = profusion_category(ours)
    if len(present) != 1 or category is None:
        raise NotUnderstood("the reviewed result states no CAD finding")
    return present == {_as_key(codes.PRESENT)}, category


# --- turning an SR into a read --------------------------------------------------------------------------------------


def _review(ds: Dataset, verdicts: list[tuple[str, str]], results: dict[str, ResultRef],
            storage_root: Path) -> tuple[int, bool, int]:
    """(instance id, present, category) from a review of one of our SRs."""
    accepted = {REVIEW_VERDICTS.get(v) for v in verdicts}
    if None in accepted or len(accepted) != 1:
        raise NotUnderstood("its review is neither ACCEPTED nor REJECTED, or both")
    reviewed = [r for r in results.values() if r.kind == "sr"]
    if len(reviewed) != 1:
        raise NotUnderstood(f"a review must reference one SR of this node; it references {len(reviewed)}")
    result = reviewed[0]
    if not result.analysed:
        raise NotUnderstood("the reviewed result is a 'not analysed' report")
    ours_present, ours_category = cad_finding(storage_root / result.archive_path)
    readers_category = profusion_category(ds)
    if accepted == {True}:
        return result.instance_id, ours_present, ours_category
    if ours_present:
        if readers_category is not None and readers_category >= 1:
            raise NotUnderstood("it rejects a 'present' result but gives a profusion category of 1 or more")
        return result.instance_id, False, 0
    if readers_category is None or readers_category == 0:
        raise NotUnderstood("it rejects an 'absent' result without a profusion category of 1-3")
    return result.instance_id, True, readers_category


def understand(session: Session, ds: Dataset, storage_root: Path) -> Read:
    """The read an SR states. Raises ``NotUnderstood``."""
    uid = str(ds.get("SOPInstanceUID", ""))
    references = referenced_uids(ds)
    results = find_results(session, references)
    verdicts = coded_values(ds, codes.REVIEW)
    if verdicts:
        instance_id, present, category = _review(ds, verdicts, results, storage_root)
    else:
        category_or_none = profusion_category(ds)
        if category_or_none is None:
            raise NotUnderstood("it holds neither a profusion category nor a review of our result")
        images = [ref for refs in find_images(session, "sop_instance_uid", references - set(results)).values()
                  for ref in refs if ref.is_image]
        if len(images) != 1:
            raise NotUnderstood(f"a read must reference one archived image; it references {len(images)}")
        if not images[0].in_scope:
            raise NotUnderstood("the image it references is out of scope")
        instance_id, present, category = images[0].instance_id, category_or_none >= 1, category_or_none
    return Read(instance_id=instance_id, present=present, category=category, subcategory=None, shape=None,
                large_opacities=None, reader=reader_of(ds), read_date=read_date_of(ds), source=LabelSource.SR,
                source_uid=uid)


def import_new_sr_labels(engine: Engine, storage_root: Path, skip: set[str]) -> None:
    """The serve process's ``labels-sr`` job: import what SRs received since say, and log the counts."""
    report = import_sr_labels(engine, storage_root, skip)
    if report.imported or report.not_imported:
        LOG.info("SR reads: %d imported as labels, %d SR(s) not importable ('dicom-node labels import-sr' "
                 "says why)", report.imported, len(report.not_imported))


def import_sr_labels(engine: Engine, storage_root: Path, skip: set[str] | None = None) -> SrImportReport:
    """Import the reads of every archived SR not imported yet; idempotent.

    The files are read and understood in a read-only session, and the reads written in one short transaction, so
    that the intake's writes never wait for this (the serve process runs it every minute). ``skip`` (SOP Instance
    UIDs) is left out and gets the SRs found not importable added: archived files do not change, so a periodic
    caller reads each such SR once per process."""
    candidates = [sr for sr in unimported_srs(engine, SR_SOP_CLASSES)
                  if skip is None or sr.sop_instance_uid not in skip]
    understood: list[tuple[str, Read]] = []
    problems: list[NotImported] = []
    with Session(readonly(engine)) as session:
        for sr in candidates:
            try:
                ds = read_dataset_bounded(storage_root / sr.archive_path, stop_before_pixels=True)
            except Exception:
                problems.append(NotImported(sr.sop_instance_uid, "the archived file cannot be read as DICOM"))
                continue
            try:
                understood.append((sr.sop_instance_uid, understand(session, ds, storage_root)))
            except NotUnderstood as exc:
                problems.append(NotImported(sr.sop_instance_uid, str(exc)))
            except (AttributeError, KeyError, TypeError, ValueError):  # a malformed element, read only now
                problems.append(NotImported(sr.sop_instance_uid, "its content tree cannot be read"))
    with Session(engine) as session, session.begin():
        # imported since the scan by another command: left alone
        reads = [read for uid, read in understood if not sr_already_imported(session, uid)]
        imported = add_reads(session, reads)
    if skip is not None:
        skip.update(problem.sop_instance_uid for problem in problems)
    return SrImportReport(scanned=len(candidates), imported=imported, not_imported=tuple(problems))
