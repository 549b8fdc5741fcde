"""A site's reads of its archived radiographs from a CSV file (docs/labels.md): parsed, checked row by row,
imported in one transaction.

Nothing here quotes a cell of the file in a message (it may hold accession numbers or UIDs): a reason names the
column and what is wrong with it, and the line number says where. Line numbers are the file's own, the header being
line 1; a record whose quoted cell spans lines is numbered by the line it starts on.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from ai.safe_text import SafeMessage, escape
from db.engine import readonly
from db.labels import (  # the value lists are db.labels' so that every way a read comes in checks the same
    IDENTIFIER_COLUMNS,
    LARGE_OPACITIES,
    READER_LENGTH,
    SHAPE_PATTERN,
    SUBCATEGORIES,
    ImageRef,
    Read,
    add_reads,
    find_images,
    stored_read_exists,
)
from db.models import LabelSource

REQUIRED_COLUMNS = ("present", "category")
OPTIONAL_COLUMNS = ("subcategory", "shape", "large_opacities", "reader", "read_date")
PRESENT_VALUES = {"yes": True, "true": True, "1": True, "no": False, "false": False, "0": False}
DATE_PATTERN = re.compile(r"^\d{4}-\d{2}-\d{2}$")
MAX_FILE_BYTES = 64 * 2**20  # a labels file is text: far below this even for a large archive


class LabelsFileError(SafeMessage, ValueError):
    """The file as a whole cannot be read as a labels CSV; the message names the line or column, never a value."""


@dataclass(frozen=True)
class BadRow:
    line: int
    reason: str


@dataclass(frozen=True)
class ParsedRow:
    """A data row whose cells are valid, before its identifier is looked up."""

    line: int
    identifier: str
    present: bool
    category: int
    subcategory: str | None
    shape: str | None
    large_opacities: str | None
    reader: str | None
    read_date: date | None


@dataclass(frozen=True)
class LabelsFile:
    identifier_column: str
    rows: list[ParsedRow]
    bad: list[BadRow]
    data_rows: int


@dataclass(frozen=True)
class ImportReport:
    """``valid`` rows passed every check; ``imported`` were written (0 for a dry run, or when bad rows stopped the
    import)."""

    data_rows: int
    valid: int
    imported: int
    bad: tuple[BadRow, ...]
    dry_run: bool
    skip_bad: bool

    @property
    def written(self) -> bool:
        return self.imported > 0


@dataclass
class _Checks:
    reasons: list[str] = field(default_factory=list)

    def bad(self, reason: str) -> None:
        self.reasons.append(reason)


# --- cells ----------------------------------------------------------------------------------------------------------


def _present(text: str, checks: _Checks) -> bool | None:
    value = PRESENT_VALUES.get(text.strip().lower())
    if value is None:
        checks.bad("present: empty" if not text.strip() else "present: not yes/no, true/false or 1/0")
    return value


def _category(text: str, checks: _Checks) -> int | None:
    text = text.strip()
    if not text:
        checks.bad("category: empty")
        return None
    if not re.fullmatch(r"[+-]?\d+", text):
        checks.bad("category: not an integer")
        return None
    value = int(text)
    if not 0 <= value <= 3:
        checks.bad("category: outside 0-3")
        return None
    return value


def _subcategory(text: str, category: int | None, checks: _Checks) -> str | None:
    text = text.strip()
    if not text:
        return None
    if text not in SUBCATEGORIES:
        checks.bad("subcategory: not on the ILO 12-point scale (0/- 0/0 0/1 1/0 1/1 1/2 2/1 2/2 2/3 3/2 3/3 3/+)")
        return None
    if category is not None and int(text[0]) != category:
        checks.bad("subcategory: its major category differs from category")
    return text


def _shape(text: str, checks: _Checks) -> str | None:
    text = text.strip().lower()
    if not text:
        return None
    if not SHAPE_PATTERN.match(text):
        checks.bad("shape: not one of p q r s t u, or primary/secondary such as p/q")
        return None
    return text


def _large_opacities(text: str, checks: _Checks) -> str | None:
    text = text.strip().upper()
    if not text:
        return None
    if text not in LARGE_OPACITIES:
        checks.bad("large_opacities: not one of 0 A B C")
        return None
    return text


def _reader(text: str, checks: _Checks) -> str | None:
    text = text.strip()
    if len(text) > READER_LENGTH:
        checks.bad(f"reader: longer than {READER_LENGTH} characters")
        return None
    if any(not ch.isprintable() for ch in text):
        checks.bad("reader: holds control characters")
        return None
    return text or None


def _read_date(text: str, checks: _Checks) -> date | None:
    text = text.strip()
    if not text:
        return None
    try:
        if not DATE_PATTERN.match(text):
            raise ValueError
        return date.fromisoformat(text)
    except ValueError:
        checks.bad("read_date: not a date in the form YYYY-MM-DD")
        return None


# --- the file -------------------------------------------------------------------------------------------------------


def _records(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(line number, cells) of every non-blank record, numbered by the line the record starts on."""
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise LabelsFileError(f"the file is larger than {MAX_FILE_BYTES // 2**20} MiB")
        with path.open(encoding="utf-8-sig", newline="") as fh:
            reader = csv.reader(fh, strict=True)
            try:
                start = 1
                for cells in reader:
                    if any(cell.strip() for cell in cells):
                        yield start, cells
                    start = reader.line_num + 1
            except csv.Error:
                raise LabelsFileError(f"line {reader.line_num + 1}: not valid CSV (a quote is not closed or "
                                      "is misplaced)") from None
            except UnicodeDecodeError:
                raise LabelsFileError(f"line {reader.line_num + 1}: not UTF-8 text") from None
    except OSError as exc:
        raise LabelsFileError(f"cannot read the file: {exc.strerror or type(exc).__name__}") from None


def _header(line: int, cells: list[str]) -> tuple[str, dict[str, int]]:
    """The identifier column and the position of each column named; raises ``LabelsFileError``."""
    names = [c.strip().lower() for c in cells]
    columns: dict[str, int] = {}
    known = set(IDENTIFIER_COLUMNS + REQUIRED_COLUMNS + OPTIONAL_COLUMNS)
    for position, name in enumerate(names, start=1):
        if not name:
            raise LabelsFileError(f"line {line}: column {position} has no name")
        if name not in known:
            raise LabelsFileError(f"line {line}: unknown column '{escape(name, 40)}' (known columns: "
                                  f"{', '.join(IDENTIFIER_COLUMNS + REQUIRED_COLUMNS + OPTIONAL_COLUMNS)})")
        if name in columns:
            raise LabelsFileError(f"line {line}: column '{name}' appears twice")
        columns[name] = position - 1
    identifiers = [c for c in IDENTIFIER_COLUMNS if c in columns]
    if len(identifiers) != 1:
        raise LabelsFileError(f"line {line}: the header needs exactly one identifier column of "
                              f"{', '.join(IDENTIFIER_COLUMNS)}" + (f" (it has {', '.join(identifiers)})"
                                                                    if identifiers else ""))
    for name in REQUIRED_COLUMNS:
        if name not in columns:
            raise LabelsFileError(f"line {line}: required column '{name}' is missing")
    return identifiers[0], columns


def parse_labels_csv(path: Path) -> LabelsFile:
    """The file's rows, checked cell by cell (lookups in the database come later). Raises ``LabelsFileError``."""
    records = _records(path)
    first = next(records, None)
    if first is None:
        raise LabelsFileError("the file is empty (line 1 must be the header)")
    identifier_column, columns = _header(*first)
    rows: list[ParsedRow] = []
    bad: list[BadRow] = []
    count = 0
    for line, cells in records:
        count += 1
        if len(cells) != len(columns):
            bad.append(BadRow(line, f"{len(cells)} field(s), the header names {len(columns)}"))
            continue

        def cell(name: str, cells: list[str] = cells) -> str:
            return cells[columns[name]] if name in columns else ""

        checks = _Checks()
        identifier = cell(identifier_column).strip()
        if not identifier:
            checks.bad(f"{identifier_column}: empty")
        present = _present(cell("present"), checks)
        category = _category(cell("category"), checks)
        if present is False and category is not None and category >= 1:
            checks.bad("present is no but category is 1 or more")
        parsed = ParsedRow(line=line, identifier=identifier, present=bool(present), category=category or 0,
                           subcategory=_subcategory(cell("subcategory"), category, checks),
                           shape=_shape(cell("shape"), checks),
                           large_opacities=_large_opacities(cell("large_opacities"), checks),
                           reader=_reader(cell("reader"), checks), read_date=_read_date(cell("read_date"), checks))
        if checks.reasons:
            bad.append(BadRow(line, "; ".join(checks.reasons)))
        else:
            rows.append(parsed)
    return LabelsFile(identifier_column, rows, bad, count)


def _resolve(column: str, refs: list[ImageRef] | None) -> tuple[int | None, str | None]:
    """(instance id, None) or (None, reason) for one identifier's matches."""
    if column == "sop_instance_uid":
        if not refs:
            return None, "unknown instance: no archived image has this SOP Instance UID"
        ref = refs[0]
        if not ref.in_scope:
            return None, "instance out of scope (not a chest radiograph the node analyses)"
        return ref.instance_id, None
    what = "Accession Number" if column == "accession_number" else "Study Instance UID"
    if not refs:
        return None, f"unknown instance: no archived image has this {what}"
    in_scope = [r for r in refs if r.in_scope]
    if len(in_scope) != 1:
        return None, (f"the study of this {what} holds {len(in_scope)} in-scope images (exactly one is needed; "
                      "name the image by sop_instance_uid)")
    return in_scope[0].instance_id, None


def check_rows(session: Session, parsed: LabelsFile) -> tuple[list[tuple[int, Read]], list[BadRow]]:
    """Look up every row's instance and compare it with the file and the database: (line, read) of the rows that
    pass, and the bad ones (the file's own bad rows included), by line."""
    refs = find_images(session, parsed.identifier_column, [r.identifier for r in parsed.rows])
    good: list[tuple[int, Read]] = []
    bad = list(parsed.bad)
    seen: dict[Read, int] = {}
    for row in parsed.rows:
        instance_id, reason = _resolve(parsed.identifier_column, refs.get(row.identifier))
        if instance_id is None:
            bad.append(BadRow(row.line, reason or "unknown instance"))
            continue
        read = Read(instance_id=instance_id, present=row.present, category=row.category,
                    subcategory=row.subcategory, shape=row.shape, large_opacities=row.large_opacities,
                    reader=row.reader, read_date=row.read_date, source=LabelSource.CSV, source_uid=None)
        if read in seen:
            bad.append(BadRow(row.line, f"duplicate row: the same read as line {seen[read]}"))
            continue
        seen[read] = row.line
        if stored_read_exists(session, read):
            bad.append(BadRow(row.line, "already imported: this read of this image is stored"))
            continue
        good.append((row.line, read))
    return good, sorted(bad, key=lambda b: b.line)


def import_csv(engine: Engine, path: Path, *, dry_run: bool = False, skip_bad: bool = False) -> ImportReport:
    """Check ``path`` and import its reads in one transaction: with any bad row nothing is written unless
    ``skip_bad``; ``dry_run`` writes nothing and reports what would be written. Raises ``LabelsFileError``."""
    parsed = parse_labels_csv(path)
    with Session(readonly(engine) if dry_run else engine) as session, session.begin():
        good, bad = check_rows(session, parsed)
        imported = 0
        if not dry_run and (skip_bad or not bad):
            imported = add_reads(session, [read for _, read in good])
    return ImportReport(data_rows=parsed.data_rows, valid=len(good), imported=imported, bad=tuple(bad),
                        dry_run=dry_run, skip_bad=skip_bad)
