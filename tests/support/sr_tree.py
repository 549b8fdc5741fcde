"""Reading SR content trees (TID 1500 and below) the way a test compares them with what it expects.

Codes are always ``(code value, coding scheme designator)``, for concept names and coded values alike.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from pydicom.dataset import Dataset

Code = tuple[str, str]


def name_of(item: Dataset) -> Code:
    """The concept name of a content item (or of the root: its attributes live on the dataset itself)."""
    code = item.ConceptNameCodeSequence[0]
    return str(code.CodeValue), str(code.CodingSchemeDesignator)


def code_of(item: Dataset) -> Code:
    """The value of a CODE content item."""
    code = item.ConceptCodeSequence[0]
    return str(code.CodeValue), str(code.CodingSchemeDesignator)


def children(item: Dataset, name: Code) -> list[Dataset]:
    """The direct children of ``item`` named ``name``."""
    return [c for c in item.get("ContentSequence", []) if name_of(c) == name]


def only(item: Dataset, name: Code) -> Dataset:
    """The one direct child of ``item`` named ``name`` (fails unless there is exactly one)."""
    found = children(item, name)
    assert len(found) == 1, (name, len(found))
    return found[0]


def walk(items: Iterable[Dataset]) -> Iterator[Dataset]:
    """Every content item below ``items`` (e.g. ``sr.ContentSequence``), depth first."""
    for item in items:
        yield item
        yield from walk(item.get("ContentSequence", []))


def content_items(ds: Dataset) -> Iterator[tuple[str | None, Dataset]]:
    """Every content item of an SR, depth first, as (concept name code value or None, item)."""
    for item in walk(ds.get("ContentSequence", [])):
        yield (name_of(item)[0] if "ConceptNameCodeSequence" in item else None), item


def sr_text(ds: Dataset, code_value: str) -> list[str]:
    """TextValue of every content item named ``code_value`` anywhere in an SR tree."""
    return [str(item.TextValue) for name, item in content_items(ds) if name == code_value and "TextValue" in item]


def text_values(ds: Dataset) -> list[str]:
    """TextValue of every TEXT content item of an SR, depth first."""
    return [str(item.TextValue) for _, item in content_items(ds) if item.ValueType == "TEXT"]


def num(item: Dataset) -> float:
    """The value of a NUM content item."""
    return float(item.MeasuredValueSequence[0].NumericValue)


def unit_of(item: Dataset) -> Code:
    """The UCUM unit of a NUM content item."""
    unit = item.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0]
    return str(unit.CodeValue), str(unit.CodingSchemeDesignator)
