"""Lenient reading of the few header attributes the analysis depends on. Nothing here raises.

Real archives hold headers that pydicom cannot convert, or converts to something unusable:

- multi-valued strings written with spaces where backslashes belong: Image Type ``ORIGINAL PRIMARY`` as one value,
  Pixel Spacing ``0.14 0.14``, Window Center ``40 400``;
- decimal strings with a decimal comma: ``0,139``, ``0,139\\0,139``;
- odd case and padding: ``chest``, `` PA ``, trailing NULs;
- values pydicom refuses to convert at all (a binary value of the wrong length, an IS that is not a number, or any
  value when pydicom's reading validation raises).

An element that has not been converted yet is parsed from its raw bytes here, without asking pydicom to convert it
(pydicom's conversion warnings quote the offending value). A malformed optional attribute is treated as absent:
the functions return ``None`` (or an empty list), never raise, and never put a header value into a message.
"""

from __future__ import annotations

import math
import re
from typing import Any

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset

_TEXT_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "SH", "TM", "UI"}
"""Value representations parsed here from the raw bytes; binary ones (and ambiguous ones such as "US or SS",
which depend on other attributes) are left to pydicom's conversion, inside a try."""
_TEXT_STRIP = " \x00\t\r\n"


def _raw_element(ds: Dataset, keyword: str) -> Any:
    """The element as stored (RawDataElement when not converted yet), or None when absent or unreadable."""
    tag = tag_for_keyword(keyword)
    if tag is None:
        return None
    try:
        if tag not in ds:
            return None
        return ds.get_item(tag)
    except Exception:  # a deferred read that fails, a broken element: absent
        return None


def _raw_text_values(elem: RawDataElement) -> list[str] | None:
    """Values of a not yet converted text element, decoded leniently from its bytes; None: not a text VR."""
    vr = elem.VR
    if vr is None:  # implicit VR: the dictionary says
        try:
            vr = dictionary_VR(elem.tag)
        except KeyError:
            return None
    if vr not in _TEXT_VRS:
        return None
    data = elem.value
    if data is None:
        return []
    if not isinstance(data, (bytes, bytearray)):
        return [str(v) for v in _values_of(data)]
    return bytes(data).decode("latin-1").split("\\")  # the attributes read here are ASCII (CS, DS, IS, UI)


def _values_of(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (bytes, bytearray)):
        return [part for part in bytes(value).decode("latin-1").split("\\")]
    if isinstance(value, str):
        return value.split("\\")
    if isinstance(value, (list, tuple)) or (hasattr(value, "__iter__") and hasattr(value, "__len__")):
        try:
            return list(value)
        except Exception:
            return []
    return [value]


def raw_values(ds: Dataset, keyword: str) -> list[Any]:
    """The attribute's values as a list (strings or numbers), without pydicom conversion where avoidable."""
    elem = _raw_element(ds, keyword)
    if elem is None:
        return []
    try:
        if isinstance(elem, RawDataElement):
            values = _raw_text_values(elem)
            if values is not None:
                return values
            return _values_of(ds.get(keyword))  # binary: pydicom converts (ambiguous VRs need the dataset)
        return _values_of(elem.value)
    except Exception:  # pydicom cannot convert it: absent
        return []


def strings(ds: Dataset, keyword: str, split_spaces: bool = False) -> list[str]:
    """Upper-case, unpadded values of a code string. ``split_spaces``: a single value holding spaces is several
    values written with the wrong delimiter (``ORIGINAL PRIMARY`` -> ``["ORIGINAL", "PRIMARY"]``)."""
    values = [str(v).strip(_TEXT_STRIP).upper() for v in raw_values(ds, keyword)]
    if split_spaces and len(values) == 1 and " " in values[0]:
        values = values[0].split()
    while values and values[-1] == "":
        values.pop()
    return values


def text(ds: Dataset, keyword: str) -> str:
    """The first value, upper case and unpadded; ``""`` when absent or unreadable."""
    values = strings(ds, keyword)
    return values[0] if values else ""


def uid(ds: Dataset, keyword: str) -> str:
    """A UID's value without padding (UIDs are case-sensitive digits and dots; kept as is)."""
    values = raw_values(ds, keyword)
    return str(values[0]).strip(_TEXT_STRIP) if values else ""


_DECIMAL_COMMA = re.compile(r"^([+-]?\d*),(\d+(?:[eE][+-]?\d+)?)$")


def _decimal(token: Any) -> float | None:
    if isinstance(token, (int, float)) and not isinstance(token, bool):
        value = float(token)
    else:
        word = str(token).strip(_TEXT_STRIP)
        match = _DECIMAL_COMMA.match(word)
        if match:  # "0,139" -> "0.139"; more than one comma is ambiguous and stays malformed
            word = f"{match.group(1)}.{match.group(2)}"
        try:
            value = float(word)
        except ValueError:
            return None
    return value if math.isfinite(value) else None


def decimals(ds: Dataset, keyword: str) -> list[float] | None:
    """Every value of a decimal (or integer) string as floats; None when absent or when any value is malformed.

    Values written with spaces instead of backslashes (``0.14 0.14``) and with decimal commas (``0,139``) are read.
    """
    values = raw_values(ds, keyword)
    tokens: list[Any] = []
    for value in values:
        if isinstance(value, str):
            stripped = value.strip(_TEXT_STRIP)
            tokens.extend(stripped.split() if stripped else [""])
        else:
            tokens.append(value)
    while tokens and tokens[-1] == "":
        tokens.pop()
    if not tokens:
        return None
    out = [_decimal(t) for t in tokens]
    if any(v is None for v in out):
        return None
    return out  # type: ignore[return-value]


def decimal(ds: Dataset, keyword: str) -> float | None:
    """The first value of a decimal string (Window Center's first window, ...); None when absent or malformed."""
    values = decimals(ds, keyword)
    return values[0] if values else None


def integer(ds: Dataset, keyword: str) -> int | None:
    """The first value of an integer attribute (IS, US, SS, ...); None when absent, malformed or not whole."""
    value = decimal(ds, keyword)
    if value is None or value != int(value):
        return None
    return int(value)


ANATOMY_SPACING = ("PixelSpacing", "ImagerPixelSpacing")
"""Preference for a spacing that measures the patient: the analysis's lung areas in mm² (``pixel_spacing``)."""
DETECTOR_SPACING = ("ImagerPixelSpacing", "PixelSpacing")
"""Preference for a spacing at the detector: the SR image library's TID 1603 descriptors (``pixel_spacing``)."""


def pixel_spacing(ds: Dataset, preference: tuple[str, ...]) -> tuple[float, float] | None:
    """(row, column) spacing in mm from the first attribute of ``preference`` holding two positive decimals;
    None when none does. Read leniently (``0.14 0.14``, ``0,139\\0,139``); a value of ``0\\0`` (a real-world way of
    saying "unknown"), a single value, three values or a malformed one count as absent, and the next is tried.

    Which attribute comes first depends on what the spacing is for. For CR and DX (PS3.3 C.8.11.7), Imager Pixel
    Spacing is measured at the front plane of the image receptor, the detector, and is never corrected for the
    geometric magnification; Pixel Spacing, when present, is calibrated to the patient (Pixel Spacing Calibration
    Type says how) and is smaller by that magnification, 10-20 % for a PA chest. So:

    - the analysis measures anatomy (lung areas in mm², ``ai.normalise.pixel_spacing``): ``ANATOMY_SPACING``,
      Pixel Spacing first, Imager Pixel Spacing when that is all the header has (the area is then the magnified
      one, at the detector);
    - the SR image library describes the image (``dicom_node.results.image_library``): TID 1603's Horizontal and
      Vertical Pixel Spacing (DCM 111026, 111066) are defined for projection radiography at the front plane of the
      image receptor housing (highdicom fills them from Imager Pixel Spacing), so ``DETECTOR_SPACING``, Imager
      Pixel Spacing first, Pixel Spacing when that is all the header has (a secondary capture, or a CR written
      before Imager Pixel Spacing existed, whose Pixel Spacing was the plate's).
    """
    for keyword in preference:
        values = decimals(ds, keyword)
        if values is None or len(values) != 2:
            continue
        row, column = values
        if row > 0 and column > 0:
            return row, column
    return None
