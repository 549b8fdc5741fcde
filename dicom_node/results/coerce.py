"""Attribute coercion at the boundary: the source's header as it may enter a result object.

In the spirit of dcm4chee's attribute coercion: before anything of the source goes into a SEG, SR or SC, the
attributes the node copies (the Patient, Clinical Trial Subject, General Study, Patient Study and Clinical Trial
Study modules that highdicom copies, the equipment highdicom names as acquisition equipment, and the image and
series attributes the builders read) are decoded from the source's character set, validated against their VR
(pydicom's own validators), their VM and their module's rules, and repaired:

- a Type 2 (or 2C) value that is invalid or overlong, or outside its enumeration (Patient's Sex M/F/O), becomes
  empty; a Type 1C or 3 one is dropped;
- a missing Type 2 attribute of a mandatory module (or of an optional module the source carries) is added empty;
- a veterinary source (Patient Species Description or Patient Species Code Sequence) gets the Type 2C attributes
  its Patient module then requires, empty;
- text is decoded strictly with the source's Specific Character Set (ISO 2022 code extensions included); when the
  set is unknown or a value cannot be decoded with it, the value is decoded as UTF-8, else as ISO 8859-1
  (deterministic, never fails) and the repair says ``charset_fallback``;
- the result is UTF-8: Specific Character Set ``ISO_IR 192``, every text value a ``str``.

Study, Series, SOP Instance, SOP Class and Frame of Reference UIDs are kept exactly as they are: intake validated
them, and a result must reference its source as it is, even a UID under a non-conformant root.

``coerce_header`` returns a new header-only dataset (no pixel data; file meta copied) and the repairs. The source
is never modified, and coercion is idempotent: coercing its result again repairs nothing. A ``Repair`` names the
attribute keyword and the action only, never a value: repairs go into audit events and logs. Nothing here logs or
warns: values are decoded and validated without the pydicom paths that log the offending value.
"""

from __future__ import annotations

import copy
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from pydicom import config
from pydicom.charset import CODES_TO_ENCODINGS, ESC, default_encoding, handled_encodings, python_encoding
from pydicom.datadict import dictionary_VM, dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.valuerep import DA, DT, MAX_VALUE_LEN, PN_DELIMS, TEXT_VR_DELIMS, TM, PersonName, validate_value

from .quiet import quiet

UTF8 = "ISO_IR 192"

# Repair actions (a Repair carries one of these and a keyword, nothing else).
EMPTIED_INVALID = "emptied_invalid"
EMPTIED_OVERLONG = "emptied_overlong"
EMPTIED_NOT_ENUMERATED = "emptied_not_enumerated"
EMPTIED_UNMET_CONDITION = "emptied_unmet_condition"
DROPPED_INVALID = "dropped_invalid"
DROPPED_OVERLONG = "dropped_overlong"
DROPPED_NOT_ENUMERATED = "dropped_not_enumerated"
DROPPED_UNMET_CONDITION = "dropped_unmet_condition"
ADDED_EMPTY = "added_empty"
CHARSET_FALLBACK = "charset_fallback"
ACTIONS = (EMPTIED_INVALID, EMPTIED_OVERLONG, EMPTIED_NOT_ENUMERATED, EMPTIED_UNMET_CONDITION, DROPPED_INVALID,
           DROPPED_OVERLONG, DROPPED_NOT_ENUMERATED, DROPPED_UNMET_CONDITION, ADDED_EMPTY, CHARSET_FALLBACK)


@dataclass(frozen=True)
class Repair:
    """One repair of the header: the attribute's keyword and what was done. Never the value."""

    keyword: str
    action: str


# --- which attributes, and their rules -------------------------------------------------------------------------

# The modules highdicom's copy_patient_and_study_information copies (root attributes), and whether the IODs of
# our results require them ("M") or use them when present ("U").
PATIENT_STUDY_MODULES = {"patient": "M", "clinical-trial-subject": "U", "general-study": "M", "patient-study": "U",
                         "clinical-trial-study": "U"}

# What ContributingEquipment.for_image_acquisition reads from the source (General Equipment).
EQUIPMENT = {"Manufacturer": "2", "ManufacturerModelName": "3", "SoftwareVersions": "3", "DeviceSerialNumber": "3",
             "InstitutionName": "3", "InstitutionalDepartmentName": "3", "InstitutionAddress": "3",
             "StationName": "3"}

# Image and series attributes the builders (ours and highdicom's) read from the source. These are the source's
# own attributes, not copied as a module, so an invalid one is simply dropped, except the two Type 2C ones that
# our SEG and SC copy (an empty value is allowed there).
IMAGE = {"Modality": "3", "SeriesNumber": "3", "InstanceNumber": "3", "ImageType": "3", "BodyPartExamined": "3",
         "Laterality": "2C", "ImageLaterality": "3", "ViewPosition": "3", "PatientOrientation": "2C",
         "AnatomicalOrientationType": "3", "PixelSpacing": "3", "ImagerPixelSpacing": "3",
         "PositionReferenceIndicator": "3", "ImageOrientationPatient": "3", "ImagePositionPatient": "3",
         "AcquisitionDateTime": "3", "LossyImageCompression": "3", "LossyImageCompressionRatio": "3",
         "LossyImageCompressionMethod": "3", "Rows": "3", "Columns": "3", "SamplesPerPixel": "3",
         "PhotometricInterpretation": "3", "BitsAllocated": "3", "BitsStored": "3", "HighBit": "3",
         "PixelRepresentation": "3", "PlanarConfiguration": "3", "NumberOfFrames": "3"}

# Kept exactly as they are (validated at intake; a result references its source as it is).
UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID")

ENUMERATED = {
    "PatientSex": frozenset({"M", "F", "O"}),
    "PatientSexNeutered": frozenset({"ALTERED", "UNALTERED"}),
    "QualityControlSubject": frozenset({"YES", "NO"}),
    "PatientIdentityRemoved": frozenset({"YES", "NO"}),
    "SmokingStatus": frozenset({"YES", "NO", "UNKNOWN"}),
    "PregnancyStatus": frozenset({1, 2, 3, 4}),
    "Laterality": frozenset({"R", "L"}),
    "ImageLaterality": frozenset({"R", "L", "U", "B"}),
    "AnatomicalOrientationType": frozenset({"BIPED", "QUADRUPED"}),
    "LossyImageCompression": frozenset({"00", "01"}),
}

# Type 2C when the patient is an animal: the Patient module's (PS3.3 C.7.1.1) and Patient Study's neutered
# status (C.7.2.2; dciodvfy requires it of every result IOD, which all include that module).
VETERINARY = ("PatientBreedDescription", "PatientBreedCodeSequence", "BreedRegistrationSequence",
              "ResponsiblePerson", "ResponsibleOrganization", "PatientSexNeutered")

TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "UT", "UC", "PN"})
UNSPLIT_VRS = frozenset({"ST", "LT", "UT", "UR"})  # a backslash is part of the value, not a delimiter
BINARY_VRS = frozenset({"US", "SS", "UL", "SL", "UV", "SV", "FL", "FD", "AT"})
MULTI_LINE_VRS = frozenset({"ST", "LT", "UT"})
ALLOWED_CONTROLS = frozenset("\n\r\t\f")


@dataclass(frozen=True)
class Rule:
    type: str  # "1", "1C", "2", "2C", "3"
    module: str  # module key, "equipment" or "image"


@lru_cache(maxsize=1)
def rules() -> dict[str, Rule]:
    """keyword -> rule, for every attribute the node copies from a source (UIDs aside)."""
    from highdicom._standard_utils import get_module_attribute_map  # the table highdicom copies by

    modules = get_module_attribute_map()
    table: dict[str, Rule] = {}
    for module in PATIENT_STUDY_MODULES:
        for item in modules[module]:
            keyword = str(item["keyword"])
            if not item["path"] and keyword not in UIDS and tag_for_keyword(keyword) is not None:
                table.setdefault(keyword, Rule(str(item["type"]), module))
    for keyword, kind in EQUIPMENT.items():
        table.setdefault(keyword, Rule(kind, "equipment"))
    for keyword, kind in IMAGE.items():
        table.setdefault(keyword, Rule(kind, "image"))
    return table


def copied_keywords() -> tuple[str, ...]:
    """The keywords coercion looks at (and keeps when valid), in tag order; the UIDs are kept as they are."""
    return tuple(sorted((*rules(), *UIDS), key=lambda k: int(Tag(k))))


# --- decoding -------------------------------------------------------------------------------------------------


class _Undecodable(Exception):
    pass


def _codec(python_name: str) -> str:
    # pydicom decodes the default repertoire as ISO 8859-1; a non-ASCII byte there is a wrong character set, so
    # it is decoded strictly as ASCII and a failure falls back (UTF-8 first: the usual culprit).
    return "ascii" if python_name == default_encoding else python_name


def source_codecs(values: Iterable[str]) -> list[str] | None:
    """The Python codecs for Specific Character Set values, or None when a value is unknown. Strict: the
    spelling mistakes pydicom corrects with a warning count as unknown (decoded by the fallback)."""
    terms = [str(v).strip() for v in values]
    if not terms:
        return [default_encoding]
    codecs: list[str] = []
    for index, term in enumerate(terms):
        if term == "" and index > 0:
            return None
        name = python_encoding.get(term)
        if name is None:
            return None
        if name not in codecs:
            codecs.append(name)
    return codecs


def _decode_fragment(fragment: bytes, codecs: list[str], delimiters: set[int]) -> str:
    if not fragment.startswith(ESC):
        return fragment.decode(_codec(codecs[0]))
    length = 4 if fragment.startswith((b"\x1b$(", b"\x1b$)")) else 3
    name = CODES_TO_ENCODINGS.get(fragment[:length])
    if name is None or (name not in codecs and name != default_encoding):
        raise _Undecodable
    if name in handled_encodings:  # Python's ISO 2022 codecs read the escape sequences themselves
        return fragment.decode(name)
    body = fragment[length:]
    index = next((i for i, byte in enumerate(body) if byte in delimiters), None)
    if index is None:
        return body.decode(_codec(name))
    return body[:index].decode(_codec(name)) + body[index:].decode(_codec(codecs[0]))


def strict_decode(value: bytes, codecs: list[str], delimiters: set[int]) -> str:
    """pydicom's decode_bytes (ISO 2022 code extensions, PS3.5 6.1.2.5), but raising instead of replacing
    characters with a warning that pydicom also logs."""
    try:
        if ESC not in value:
            return value.decode(_codec(codecs[0]))
        fragments = re.findall(b"(^[^\x1b]+|[\x1b][^\x1b]*)", value)
        return "".join(_decode_fragment(f, codecs, delimiters) for f in fragments)
    except (UnicodeError, LookupError) as exc:
        raise _Undecodable from exc


def fallback_decode(value: bytes) -> str:
    """UTF-8 if the bytes are UTF-8, else ISO 8859-1 (which decodes anything): deterministic."""
    try:
        return value.decode("utf-8")
    except UnicodeError:
        return value.decode("latin-1")


def _split(raw: bytes, vr: str) -> list[bytes]:
    return [raw] if vr in UNSPLIT_VRS else raw.split(b"\\")


def _strip(text: str, vr: str) -> str:
    """Padding and non-significant spaces: both ends for the code-like VRs (PS3.5 6.2), trailing ones otherwise
    (pydicom's reading), so that a value stays the source's value."""
    if vr in ("AE", "AS", "CS", "DA", "DS", "DT", "IS", "TM"):
        return text.strip(" \x00")
    return text.rstrip(" \x00")


def _decode_text(raw: bytes, vr: str, codecs: list[str] | None) -> tuple[list[str], bool]:
    """Values of a string VR from their encoded bytes; True when the fallback decoded them."""
    values: list[str] = []
    fell_back = False
    for part in _split(raw, vr):
        if vr not in TEXT_VRS:  # default repertoire only: bytes outside ASCII make the value invalid
            values.append(_strip(part.decode("latin-1"), vr))
            continue
        groups = part.split(b"=") if vr == "PN" else [part]
        delimiters = PN_DELIMS if vr == "PN" else TEXT_VR_DELIMS
        decoded = []
        for group in groups:
            try:
                if codecs is None:
                    raise _Undecodable
                decoded.append(strict_decode(group, codecs, delimiters))
            except _Undecodable:
                if codecs is not None or any(byte > 0x7F or byte == 0x1B for byte in group):
                    fell_back = True
                decoded.append(fallback_decode(group))
        values.append(_strip("=".join(decoded), vr))
    if values == [""]:
        values = []
    return values, fell_back


def _element_values(element: Any, vr: str, codecs: list[str] | None) -> tuple[list[Any], bool]:
    """The element's values as a list of str (string VRs) or numbers (binary VRs), decoded from the raw bytes
    wherever the element has not been converted yet."""
    value = element.value
    if value is None:
        return [], False
    if isinstance(value, (bytes, bytearray)):
        if vr in BINARY_VRS:
            raise _Undecodable  # only reached for an unconverted binary element, handled by the caller
        return _decode_text(bytes(value), vr, codecs)
    items = list(value) if isinstance(value, (MultiValue, list, tuple)) else [value]
    out: list[Any] = []
    fell_back = False
    for item in items:
        if isinstance(item, PersonName) and item.original_string is not None:
            decoded, fb = _decode_text(item.original_string, "PN", codecs)
            out.extend(decoded or [""])
            fell_back |= fb
        elif isinstance(item, (bytes, bytearray)):
            decoded, fb = _decode_text(bytes(item), vr, codecs)
            out.extend(decoded or [""])
            fell_back |= fb
        elif vr in BINARY_VRS:
            out.append(item)
        else:
            out.append(_strip(str(item), vr))
    if out == [""]:
        out = []
    return out, fell_back


# --- validation -----------------------------------------------------------------------------------------------

OVERLONG, INVALID, NOT_ENUMERATED = "overlong", "invalid", "not_enumerated"


def _vm_allows(vm: str, count: int) -> bool:
    if count == 0:
        return True
    low, _, high = vm.partition("-")
    try:
        if not high:
            return count == int(low)
        if high == "n":
            return count >= int(low)
        if high.endswith("n"):
            return count >= int(low) and count % int(high[:-1]) == 0
        return int(low) <= count <= int(high)
    except ValueError:
        return True


ORIENTATION_BIPED = re.compile(r"^[APRLHF]+$")
ORIENTATION_QUADRUPED = re.compile(r"^(LE|RT|D|V|CR|CD|R|M|L|PR|DI|PA|PL)+$")


def value_problem(vr: str, value: Any) -> str | None:
    """Why one value is not valid for its VR (and the attribute's own rules), or None. Uses pydicom's validators
    (in RAISE mode, so nothing is logged), and adds what they leave out: lengths in encoded (UTF-8) bytes, as
    dciodvfy counts them; control characters; stored dates and times must be single values (no ranges) of a real
    calendar date or time of day."""
    if vr in BINARY_VRS:
        try:
            validate_value(vr, value, config.RAISE)
        except (ValueError, TypeError):
            return INVALID
        return None
    if not isinstance(value, str):
        return INVALID
    if value == "":
        return None
    limit = MAX_VALUE_LEN.get(vr)
    if vr == "PN":
        groups = value.split("=")
        if len(groups) <= 3 and any(len(g.encode("utf-8")) > 64 for g in groups):
            return OVERLONG
        if any(g.count("^") > 4 for g in groups):  # five components at most
            return INVALID
    elif limit and len(value.encode("utf-8")) > limit:
        return OVERLONG
    try:
        validate_value(vr, value, config.RAISE)
    except (ValueError, TypeError):
        return INVALID
    allowed = ALLOWED_CONTROLS if vr in MULTI_LINE_VRS else frozenset()
    if any(unicodedata.category(ch) in ("Cc", "Cs") and ch not in allowed for ch in value):
        return INVALID
    if vr in ("DA", "TM", "DT"):
        if vr != "DT" and "-" in value:
            return INVALID
        try:
            with quiet("source header"):
                {"DA": DA, "TM": TM, "DT": DT}[vr](value)
        except (ValueError, TypeError, OverflowError):
            return INVALID
    return None


def values_problem(keyword: str, vr: str, values: list[Any], orientation_type: str = "") -> str | None:
    for value in values:
        problem = value_problem(vr, value)
        if problem:
            return problem
    if not _vm_allows(dictionary_VM(keyword), len(values)):
        return INVALID
    if keyword == "PatientOrientation" and values:
        pattern = ORIENTATION_QUADRUPED if orientation_type == "QUADRUPED" else ORIENTATION_BIPED
        if not all(pattern.match(str(v)) for v in values):
            return INVALID
    allowed = ENUMERATED.get(keyword)
    if allowed is not None and any(v not in allowed for v in values):
        return NOT_ENUMERATED
    return None


# --- sequences ------------------------------------------------------------------------------------------------

CODE_VALUES = ("CodeValue", "LongCodeValue", "URNCodeValue")


def _coerce_item(item: Dataset, codecs: list[str] | None) -> tuple[Dataset | None, bool]:
    """A sequence item rebuilt with decoded, valid values; None when any of its values is invalid (the whole
    sequence then counts as invalid). Private elements are left out."""
    own = item.get_item(0x00080005)
    if own is not None:
        try:
            charset, _ = _element_values(own, "CS", [default_encoding])
        except _Undecodable:
            return None, False
        codecs = source_codecs(charset)
    out = Dataset()
    fell_back = False
    for tag in sorted(item.keys()):
        tag = Tag(tag)
        if tag == 0x00080005 or tag.is_private or tag.element == 0:
            continue
        keyword = keyword_for_tag(tag)
        if not keyword:
            continue
        vr = dictionary_VR(tag)
        if vr == "SQ":
            converted = _converted(item, tag)
            if converted is None:
                return None, fell_back
            items = []
            for child in converted.value or []:
                new, fb = _coerce_item(child, codecs)
                fell_back |= fb
                if new is None:
                    return None, fell_back
                items.append(new)
            out.add(DataElement(tag, "SQ", Sequence(items), validation_mode=config.IGNORE))
            continue
        if vr not in BINARY_VRS and vr not in VALIDATED_STRING_VRS:
            return None, fell_back  # OB, UN, ...: nothing we copy carries those inside its sequences
        values, fb = _values(item, tag, vr, codecs)
        fell_back |= fb
        if values is None or values_problem(keyword, vr, values):
            return None, fell_back
        out.add(_element(tag, vr, values))
    if _code_item_complete(out) is False:
        return None, fell_back
    return out, fell_back


def _code_item_complete(item: Dataset) -> bool | None:
    """For an item that looks like a code (it has a code value): whether the Basic Code Sequence Macro's Type 1
    attributes are there; None for an item that is not a code."""
    if not any(k in item for k in CODE_VALUES) and "CodeMeaning" not in item:
        return None
    has_value = any(item.get(k) for k in CODE_VALUES)
    has_scheme = bool(item.get("CodingSchemeDesignator")) or bool(item.get("URNCodeValue"))
    return has_value and has_scheme and bool(item.get("CodeMeaning"))


# --- elements -------------------------------------------------------------------------------------------------

VALIDATED_STRING_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM",
                                  "UC", "UI", "UR", "UT"})


def _converted(dataset: Dataset, tag) -> DataElement | None:
    """pydicom's conversion of an element (binary values and sequences); None when it fails."""
    try:
        with quiet("source header"):
            return dataset[tag]
    except Exception:
        return None


def _values(dataset: Dataset, tag, vr: str, codecs: list[str] | None) -> tuple[list[Any] | None, bool]:
    element = dataset.get_item(tag)
    try:
        if vr in BINARY_VRS:
            raw = getattr(element, "value", None)
            if isinstance(raw, (bytes, bytearray)) or isinstance(element, RawDataElement):
                element = _converted(dataset, tag)
                if element is None:
                    return None, False
        return _element_values(element, vr, codecs)
    except _Undecodable:
        return None, False


def _element(tag, vr: str, values: list[Any]) -> DataElement:
    if not values:
        value: Any = None if vr in BINARY_VRS else ""
    elif len(values) == 1:
        value = values[0]
    else:
        value = list(values)
    if vr == "PN" and value not in (None, ""):
        value = [PersonName(v) for v in values] if len(values) > 1 else PersonName(values[0])
    return DataElement(tag, vr, value, validation_mode=config.IGNORE)


def _empty(keyword: str) -> DataElement:
    tag = Tag(keyword)
    vr = dictionary_VR(tag)
    if vr == "SQ":
        return DataElement(tag, "SQ", Sequence([]), validation_mode=config.IGNORE)
    return _element(tag, vr, [])


def _problem_action(kind: str, problem: str) -> str:
    keep_empty = kind in ("2", "2C")
    return {OVERLONG: EMPTIED_OVERLONG if keep_empty else DROPPED_OVERLONG,
            INVALID: EMPTIED_INVALID if keep_empty else DROPPED_INVALID,
            NOT_ENUMERATED: EMPTIED_NOT_ENUMERATED if keep_empty else DROPPED_NOT_ENUMERATED}[problem]


# --- the header -----------------------------------------------------------------------------------------------


def _charset(source: Dataset) -> tuple[list[str] | None, bool]:
    element = source.get_item(0x00080005)
    if element is None or element.value is None:
        return [default_encoding], False
    value = element.value
    if isinstance(value, (bytes, bytearray)):
        terms = [t.strip(" \x00") for t in bytes(value).decode("latin-1").split("\\")]
    elif isinstance(value, str):
        terms = [value]
    else:
        terms = [str(v) for v in value]
    if terms in ([""], []):
        return [default_encoding], False
    codecs = source_codecs(terms)
    return codecs, codecs is None


def coerce_header(source: Dataset) -> tuple[Dataset, list[Repair]]:
    """A new header-only dataset with the source's UIDs and every copied attribute decoded, validated and
    repaired (see the module docstring), Specific Character Set ISO_IR 192; and the repairs, in tag order."""
    with quiet("source header"):
        return _coerce(source)


def _coerce(source: Dataset) -> tuple[Dataset, list[Repair]]:
    table = rules()
    codecs, unknown_charset = _charset(source)
    repairs: list[Repair] = []
    if unknown_charset:
        repairs.append(Repair("SpecificCharacterSet", CHARSET_FALLBACK))
    out = Dataset()
    if hasattr(source, "file_meta"):
        out.file_meta = copy.deepcopy(source.file_meta)
    out.add(DataElement(0x00080005, "CS", UTF8, validation_mode=config.IGNORE))
    for keyword in UIDS:
        tag = Tag(keyword)
        if tag in source:
            values, _ = _values(source, tag, "UI", [default_encoding])
            if values:
                out.add(DataElement(tag, "UI", values[0], validation_mode=config.IGNORE))
    orientation_type = ""
    anatomical = source.get_item(Tag("AnatomicalOrientationType"))
    if anatomical is not None:
        values, _ = _values(source, Tag("AnatomicalOrientationType"), "CS", [default_encoding])
        orientation_type = str(values[0]) if values else ""

    for keyword, rule in table.items():
        tag = Tag(keyword)
        if tag not in source:
            continue
        vr = dictionary_VR(tag)
        if vr == "SQ":
            _sequence(source, tag, keyword, rule, codecs, out, repairs)
            continue
        values, fell_back = _values(source, tag, vr, codecs)
        if fell_back:
            repairs.append(Repair(keyword, CHARSET_FALLBACK))
        problem = INVALID if values is None else values_problem(keyword, vr, values, orientation_type)
        if problem is None:
            out.add(_element(tag, vr, values or []))
            continue
        action = _problem_action(rule.type, problem)
        repairs.append(Repair(keyword, action))
        if action.startswith("emptied"):
            out.add(_empty(keyword))

    _module_conditions(out, table, repairs)
    repairs.sort(key=lambda r: (int(Tag(r.keyword)), ACTIONS.index(r.action)))
    return out, repairs


def _sequence(source: Dataset, tag, keyword: str, rule: Rule, codecs, out: Dataset, repairs: list[Repair]) -> None:
    element = _converted(source, tag)
    items: list[Dataset] | None = None
    fell_back = False
    if element is not None:
        coerced: list[Dataset] = []
        for item in element.value or []:
            new, fb = _coerce_item(item, codecs)
            fell_back |= fb
            if new is None:
                break
            coerced.append(new)
        else:
            items = coerced
    if fell_back:
        repairs.append(Repair(keyword, CHARSET_FALLBACK))
    if items is not None and not _vm_allows(dictionary_VM(tag), len(items)):
        items = None
    if items is not None:
        out.add(DataElement(tag, "SQ", Sequence(items), validation_mode=config.IGNORE))
        return
    action = _problem_action(rule.type, INVALID)
    repairs.append(Repair(keyword, action))
    if action.startswith("emptied"):
        out.add(_empty(keyword))


def _has_value(ds: Dataset, keyword: str) -> bool:
    value = ds.get(keyword)
    return value is not None and value != "" and not (isinstance(value, (list, MultiValue, Sequence))
                                                      and len(value) == 0)


def _drop(out: Dataset, keyword: str, repairs: list[Repair], action: str = DROPPED_UNMET_CONDITION) -> None:
    if keyword in out:
        del out[keyword]
        repairs.append(Repair(keyword, action))


def _module_conditions(out: Dataset, table: dict[str, Rule], repairs: list[Repair]) -> None:
    """The module rules that single values cannot tell: Type 1 attributes of optional modules, conditional
    attributes and their conditions, missing Type 2 attributes, the veterinary Patient module attributes."""
    # Clinical Trial Subject: the sponsor, the protocol and one of the subject identifiers, or not the module.
    subject = [k for k, r in table.items() if r.module == "clinical-trial-subject"]
    if any(k in out for k in subject):
        complete = (all(_has_value(out, k) for k in ("ClinicalTrialSponsorName", "ClinicalTrialProtocolID"))
                    and (_has_value(out, "ClinicalTrialSubjectID") or _has_value(out, "ClinicalTrialSubjectReadingID")))
        if not complete:
            for keyword in subject:
                _drop(out, keyword, repairs)
        elif "ClinicalTrialProtocolEthicsCommitteeApprovalNumber" in out and not _has_value(
                out, "ClinicalTrialProtocolEthicsCommitteeName"):
            _drop(out, "ClinicalTrialProtocolEthicsCommitteeApprovalNumber", repairs)
    # Clinical Trial Study: an offset from an event needs the event's type.
    if "LongitudinalTemporalOffsetFromEvent" in out and not _has_value(out, "LongitudinalTemporalEventType"):
        _drop(out, "LongitudinalTemporalOffsetFromEvent", repairs)
    # Patient: dates in an alternative calendar need the calendar; a removed identity needs its method.
    if not _has_value(out, "PatientAlternativeCalendar"):
        for keyword in ("PatientBirthDateInAlternativeCalendar", "PatientDeathDateInAlternativeCalendar"):
            _drop(out, keyword, repairs)
    if out.get("PatientIdentityRemoved") == "YES" and not (_has_value(out, "DeidentificationMethod") or _has_value(
            out, "DeidentificationMethodCodeSequence")):
        _drop(out, "PatientIdentityRemoved", repairs)
    # A veterinary patient: the Type 2C attributes become required (empty when unknown).
    if _has_value(out, "PatientSpeciesDescription") or _has_value(out, "PatientSpeciesCodeSequence"):
        for keyword in VETERINARY:
            if keyword not in out:
                out.add(_empty(keyword))
                repairs.append(Repair(keyword, ADDED_EMPTY))
    if _has_value(out, "ResponsiblePerson") and not _has_value(out, "ResponsiblePersonRole"):
        out.add(_empty("ResponsiblePerson"))
        repairs.append(Repair("ResponsiblePerson", EMPTIED_UNMET_CONDITION))
    # Missing Type 2 attributes: mandatory modules always, optional ones when the source has the module.
    present_modules = {r.module for k, r in table.items() if k in out}
    for keyword, rule in table.items():
        if rule.type != "2" or keyword in out:
            continue
        usage = PATIENT_STUDY_MODULES.get(rule.module, "M" if rule.module == "equipment" else "")
        if usage == "M" or (usage == "U" and rule.module in present_modules):
            out.add(_empty(keyword))
            repairs.append(Repair(keyword, ADDED_EMPTY))


def strictly_valid(keyword: str, value: Any) -> bool:
    """Whether a single already-decoded value passes coercion's validation for that attribute unchanged."""
    tag = tag_for_keyword(keyword)
    if tag is None:
        return False
    vr = dictionary_VR(tag)
    values = list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]
    values = [str(v) if isinstance(v, PersonName) else v for v in values]
    return values_problem(keyword, vr, values) is None
