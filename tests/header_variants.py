"""A corpus of header variants of a real chest radiograph, for the attribute coercion and for leak checks.

Every variant is the real shared chest sample (``chest/RG1_UNCR.dcm``) with distinctive planted patient values
(``BASELINE``) and one change: for every attribute the node copies from a source, the attribute missing, empty,
invalid for its VR, overlong, and (text VRs) in another character set; the header values that real files carry
and that made result building fail (see ``PROBLEMS``); pydicom's character-set test files
(``pydicom.data.get_charset_files()``) transplanted as they are encoded; veterinary sources; a source whose UIDs
are not under a valid root.

    from tests.header_variants import variants
    for v in variants():
        v.dataset            # a fresh pydicom Dataset parsed from v.data, as dcmread gives it (header only)
        v.write(path)        # a complete Part 10 file: v.data + the chest's own pixel data, ready for storescu
        v.planted            # strings that must never appear in a log line, a warning or a database column
        v.expect             # (keyword, action) repairs coerce_header must report (at least these)

``data`` holds the header only (Explicit VR Little Endian, like the chest file); the chest's pixel data element
is appended byte for byte by ``with_pixels()`` / ``write()``, so a variant can go through intake, analysis and
result building like the real file. The corpus is deterministic.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from io import BytesIO
from pathlib import Path

from pydicom import dcmread, dcmwrite
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag

from .support.data import CHEST_UNCOMPRESSED

# Distinctive values, so that a grep finds any leak. Every one is valid for its VR.
BASELINE = {
    "PatientName": "Zzplanted^Qqname",
    "PatientID": "PLANTED-ID-7731",
    "IssuerOfPatientID": "PLANTED-ISSUER-5521",
    "PatientBirthDate": "19470923",
    "PatientBirthTime": "071533",
    "PatientSex": "F",
    "OtherPatientNames": "Yyother^Plantedname",
    "PatientComments": "Planted comment Kk4411",
    "PatientAge": "077Y",
    "PatientSize": "1.6633",
    "PatientWeight": "61.377",
    "StudyDate": "20040826",
    "StudyTime": "185059",
    "AccessionNumber": "PLANTACC8812",
    "StudyID": "PLSTUDY9913",
    "ReferringPhysicianName": "Wwreferrer^Plantdoc",
    "StudyDescription": "Planted study Jj2207",
    "Manufacturer": "Planted Vendor Mm6604",
    "InstitutionName": "Planted Institute Vv3318",
    "InstitutionalDepartmentName": "Planted Department Dd7702",
    "StationName": "PLSTATION44",
    "ManufacturerModelName": "Planted Model Uu1190",
    "DeviceSerialNumber": "PLSERIAL-0934",
    "SoftwareVersions": "Planted SW 8.8.1",
}
# Values that are patient data in the strict sense: what a leak check looks for in every variant.
PATIENT_KEYWORDS = ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "OtherPatientNames",
                    "PatientComments", "AccessionNumber", "StudyID", "ReferringPhysicianName", "StudyDescription")


def _date_forms(value: str) -> tuple[str, ...]:
    """A date as it is stored and as a library might print it."""
    if len(value) == 8 and value.isdigit():
        return value, f"{value[:4]}-{value[4:6]}-{value[6:]}"
    return (value,)


def _baseline_planted() -> tuple[str, ...]:
    planted: list[str] = []
    for keyword in PATIENT_KEYWORDS:
        value = BASELINE[keyword]
        planted += list(_date_forms(value)) if keyword.endswith("Date") else [value]
        if "^" in value:
            planted += value.split("^")
    return tuple(dict.fromkeys(planted))


@dataclass(frozen=True)
class Variant:
    name: str
    data: bytes  # header-only Part 10 file
    planted: tuple[str, ...]
    expect: frozenset[tuple[str, str]] = field(default_factory=frozenset)
    uids_off_root: bool = False  # its UIDs are not under a valid root: referenced as they are (dciodvfy says so)

    @property
    def dataset(self) -> Dataset:
        return dcmread(BytesIO(self.data))

    def with_pixels(self) -> bytes:
        """The complete file: the header, then the chest's Pixel Data element exactly as in the sample."""
        return self.data + _chest_pixel_element()

    def write(self, path: Path) -> Path:
        path = Path(path)
        path.write_bytes(self.with_pixels())
        return path


@lru_cache(maxsize=1)
def _chest_pixel_element() -> bytes:
    """The encoded (7FE0,0010) element of the chest file (Explicit VR Little Endian, OW: a 12-byte header)."""
    ds = dcmread(CHEST_UNCOMPRESSED)
    raw = ds.get_item(0x7FE00010)
    start = raw.value_tell - 12
    data = CHEST_UNCOMPRESSED.read_bytes()
    assert data[start:start + 4] == b"\xe0\x7f\x10\x00", "the chest's pixel data is not where it should be"
    return data[start:raw.value_tell + raw.length]


@lru_cache(maxsize=1)
def _chest_header() -> Dataset:
    return dcmread(CHEST_UNCOMPRESSED, stop_before_pixels=True)


class _Silent:
    """pydicom warns and logs when a planted invalid value is set: keep the generator out of any log."""

    def __enter__(self):
        self._logger = logging.getLogger("pydicom")
        self._disabled = self._logger.disabled
        self._logger.disabled = True
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.simplefilter("ignore")
        return self

    def __exit__(self, *exc):
        self._warnings.__exit__(*exc)
        self._logger.disabled = self._disabled
        return False


def baseline() -> Dataset:
    """The chest header with the planted values (in memory, ISO_IR 100 like the sample)."""
    ds = copy.deepcopy(_chest_header())
    for keyword, value in BASELINE.items():
        setattr(ds, keyword, value)
    return ds


def _encode(ds: Dataset) -> bytes:
    out = BytesIO()
    with _Silent():
        dcmwrite(out, ds, enforce_file_format=True)
    return out.getvalue()


Mutation = Callable[[Dataset], None]


def _set(keyword: str, value) -> Mutation:
    """The value as pydicom would write it; a value pydicom refuses to hold (DS "tall") goes in as its bytes."""
    def mutate(ds: Dataset) -> None:
        tag, vr = tag_for_keyword(keyword), dictionary_VR(keyword)
        try:
            ds.add_new(tag, vr, value)
        except (ValueError, TypeError, OverflowError):
            values = value if isinstance(value, list) else [value]
            data = b"\\".join(str(v).encode("latin-1") for v in values)
            data += b" " * (len(data) % 2)
            ds[tag] = RawDataElement(Tag(tag), vr, len(data), data, 0, False, True)
    return mutate


def _raw(keyword: str, value: bytes) -> Mutation:
    """Bytes written exactly as given (a value in an encoding that the character set may not describe)."""
    return _set(keyword, value)


def _delete(*keywords: str) -> Mutation:
    def mutate(ds: Dataset) -> None:
        for keyword in keywords:
            if keyword in ds:
                delattr(ds, keyword)
    return mutate


def _charset(value) -> Mutation:
    return _set("SpecificCharacterSet", value)


def _all(*mutations: Mutation) -> Mutation:
    def mutate(ds: Dataset) -> None:
        for m in mutations:
            m(ds)
    return mutate


def _make(name: str, mutation: Mutation, planted: tuple[str, ...] = (), expect=(), **kwargs) -> Variant:
    with _Silent():
        ds = baseline()
        mutation(ds)
    return Variant(name, _encode(ds), tuple(dict.fromkeys(_baseline_planted() + tuple(planted))),
                   frozenset(expect), **kwargs)


# --- per attribute ----------------------------------------------------------------------------------------------

# Another character set for text values: (Specific Character Set, a planted value that needs it).
CHARSETS = [
    ("ISO_IR 100", "Zzplantéd Ääq"),
    ("ISO_IR 144", "Ззплантед Кк"),
    (["", "ISO 2022 IR 87"], "Zzplanted 山田"),
    ("GB18030", "Zzplanted 王小东"),
    ("ISO_IR 126", "Ζζπλαντεδ Δδ"),
    ("ISO_IR 192", "Zzplanted ñ 雪"),
]


@dataclass(frozen=True)
class Attribute:
    keyword: str
    type: str  # of the module the node copies it as: "2", "2C" or "3"
    invalid: object  # invalid for the VR (or VM, or enumeration)
    overlong: object
    text: bool = True  # a text VR: also a variant in another character set
    valid: object = None  # a planted valid value when the baseline has none

    @property
    def empties(self) -> bool:
        return self.type in ("2", "2C")


ATTRIBUTES = [
    Attribute("PatientName", "2", "Zzplanted=Qq=Rr=Ss", "Zzplanted^" + "Q" * 60),
    Attribute("PatientID", "2", "PLANTED-ID-\x07BEL", "PLANTED-ID-" + "7" * 60),
    Attribute("IssuerOfPatientID", "3", "PLANTED-ISS\\UER", "PLANTED-ISSUER-" + "5" * 60),
    Attribute("PatientBirthDate", "2", "19470231", "194709230", text=False),
    Attribute("PatientBirthTime", "3", "256199", "0715331234567890123", text=False),
    Attribute("PatientSex", "2", "f", "FEMALEPLANTEDSEX1", text=False),
    Attribute("OtherPatientNames", "3", "Yyother=Pl=An=Ted", "Yyother^" + "P" * 70),
    Attribute("PatientComments", "3", "Planted comment \x01 Kk4411", "Planted comment " + "K" * 10240),
    Attribute("PatientAge", "3", "77 years", "0077Y", text=False),
    Attribute("PatientSize", "3", "tall1.66", "1.66330000000000001", text=False),
    Attribute("PatientWeight", "3", "sixty", "61.3770000000000001", text=False),
    Attribute("StudyDate", "2", "20041326", "200408260", text=False),
    Attribute("StudyTime", "2", "185099", "18505912345678901234", text=False),
    Attribute("AccessionNumber", "2", "PLANTACC\x7f8812", "PLANTACC8812" + "8" * 10),
    Attribute("StudyID", "2", "PLSTUDY\\9913", "PLSTUDY9913" + "9" * 10),
    Attribute("ReferringPhysicianName", "2", "Ww^re^fe^rr^er^Plantdoc", "Wwreferrer^" + "P" * 60),
    Attribute("StudyDescription", "3", "Planted study\tJj2207", "Planted study " + "J" * 60),
    Attribute("Manufacturer", "2", "Planted Vendor\nMm6604", "Planted Vendor " + "M" * 60),
    Attribute("InstitutionName", "3", "Planted Institute\x1bVv3318", "Planted Institute " + "V" * 60),
    Attribute("InstitutionalDepartmentName", "3", "Planted Dept\x00Dd7702", "Planted Department " + "D" * 60),
    Attribute("StationName", "3", "PLSTATION\r44", "PLSTATION44" + "4" * 10),
    Attribute("ManufacturerModelName", "3", "Planted Model\x0bUu1190", "Planted Model " + "U" * 60),
    Attribute("DeviceSerialNumber", "3", "PLSERIAL\x02-0934", "PLSERIAL-0934" + "0" * 60),
    Attribute("SoftwareVersions", "3", "Planted SW\x1f8.8.1", "Planted SW 8.8.1" + "8" * 60),
    Attribute("PatientOrientation", "2C", ["L", "X"], ["L" * 17, "F"], text=False),
    Attribute("BodyPartExamined", "3", "chest", "CHESTCHESTCHESTCH", text=False),
    Attribute("PixelSpacing", "3", ["abc", "0.143"], ["0.14300000000000001", "0.143"], text=False,
              valid=["0.143", "0.143"]),
    Attribute("ImagerPixelSpacing", "3", ["0.143"], ["0.14300000000000001", "0.143"], text=False,
              valid=["0.143", "0.143"]),
    Attribute("Laterality", "2C", "l", "LEFTLEFTLEFTLEFTL", text=False, valid="L"),
]


def expected_action(attr: Attribute, kind: str) -> str:
    """What coercion must do with the attribute's invalid or overlong variant: a value too long for a VR without a
    length limit of its own (DA, TM, AS: fixed formats) is simply invalid."""
    from pydicom.valuerep import MAX_VALUE_LEN

    vr = dictionary_VR(attr.keyword)
    problem = "overlong" if kind == "overlong" and (vr in MAX_VALUE_LEN or vr == "PN") else "invalid"
    return f"{'emptied' if attr.empties else 'dropped'}_{problem}"


def _planted_of(value) -> tuple[str, ...]:
    values = value if isinstance(value, list) else [value]
    out = []
    for v in values:
        text = str(v)
        if len(text) >= 6:
            out.append(text)
            out += [part for part in text.replace("=", "^").split("^") if len(part) >= 6]
    return tuple(out)


def attribute_variants() -> list[Variant]:
    out: list[Variant] = []
    for index, attr in enumerate(ATTRIBUTES):
        k = attr.keyword
        if attr.valid is not None:
            out.append(_make(f"{k}-valid", _set(k, attr.valid), _planted_of(attr.valid)))
        missing_expect = [(k, "added_empty")] if attr.type == "2" else []
        out.append(_make(f"{k}-missing", _delete(k), expect=missing_expect))
        out.append(_make(f"{k}-empty", _set(k, "")))
        for kind in ("invalid", "overlong"):
            value = getattr(attr, kind)
            out.append(_make(f"{k}-{kind}", _set(k, value), _planted_of(value),
                             expect=[(k, expected_action(attr, kind))]))
        if attr.text:
            charset, text = CHARSETS[index % len(CHARSETS)]
            value = text if k not in ("PatientName", "OtherPatientNames", "ReferringPhysicianName") else \
                text.replace(" ", "^", 1)
            if dictionary_VR(k) == "SH":  # 16 bytes at most, in UTF-8 too
                value = "PL" + text.split()[-1]
            out.append(_make(f"{k}-charset-{_charset_name(charset)}", _all(_charset(charset), _set(k, value)),
                             _planted_of(value) + tuple(p for p in value.split() if len(p) >= 2 and not p.isascii())))
    return out


def _charset_name(value) -> str:
    values = value if isinstance(value, list) else [value]
    return "+".join(v.replace(" ", "_") or "default" for v in values)


# --- the header values that made result building fail ----------------------------------------------------------

HASH = "5f2b9c0e7d1a4f3b8e6c"  # a de-identification tool's hash in place of a date

PROBLEMS: list[tuple[str, Mutation, tuple[str, ...], tuple[tuple[str, str], ...]]] = [
    ("birth-date-hash", _set("PatientBirthDate", HASH), (HASH,), (("PatientBirthDate", "emptied_invalid"),)),
    ("birth-date-iso", _set("PatientBirthDate", "1950-12-31"), ("1950-12-31", "19501231"),
     (("PatientBirthDate", "emptied_invalid"),)),
    ("birth-date-xyz", _set("PatientBirthDate", "XYZ"), ("'XYZ'",), (("PatientBirthDate", "emptied_invalid"),)),
    ("patient-id-absent", _delete("PatientID"), (), (("PatientID", "added_empty"),)),
    ("birth-date-absent", _delete("PatientBirthDate"), (), (("PatientBirthDate", "added_empty"),)),
    ("sex-absent", _delete("PatientSex"), (), (("PatientSex", "added_empty"),)),
    ("study-id-absent", _delete("StudyID"), (), (("StudyID", "added_empty"),)),
    ("patient-and-study-type-2-absent",
     _delete("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyID", "StudyDate", "StudyTime",
             "AccessionNumber", "ReferringPhysicianName"), (),
     tuple((k, "added_empty") for k in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyID",
                                        "StudyDate", "StudyTime", "AccessionNumber", "ReferringPhysicianName"))),
    ("sex-q", _set("PatientSex", "Q"), ("'Q'",), (("PatientSex", "emptied_not_enumerated"),)),
    ("sex-planted-not-enumerated", _set("PatientSex", "XQZSEX"), ("XQZSEX",),
     (("PatientSex", "emptied_not_enumerated"),)),
    ("study-date-notadate", _set("StudyDate", "notadate"), ("notadate",), (("StudyDate", "emptied_invalid"),)),
    ("study-time-99-99", _set("StudyTime", "99:99"), ("99:99",), (("StudyTime", "emptied_invalid"),)),
    ("charset-iso2022-ir100-alone", _all(_charset("ISO 2022 IR 100"), _set("PatientName", "Zzplantéd^Qqnäme")),
     ("Zzplantéd", "Qqnäme"), ()),
    ("charset-empty-then-ir87", _all(_charset(["", "ISO 2022 IR 87"]), _set("PatientName", "Zzplanted^山田=やまだ")),
     ("山田", "やまだ"), ()),
    ("accession-number-60", _set("AccessionNumber", "PLANTEDACC" + "6" * 50), ("PLANTEDACC" + "6" * 50,),
     (("AccessionNumber", "emptied_overlong"),)),
    ("charset-unknown", _all(_charset("ISO_IR 999"), _raw("PatientName", "Zzplantéd^Qqnäme".encode("latin-1"))),
     ("Zzplantéd", "Qqnäme"), (("SpecificCharacterSet", "charset_fallback"), ("PatientName", "charset_fallback"))),
    ("charset-utf8-declared-latin1-bytes",
     _all(_charset("ISO_IR 192"), _raw("PatientName", "Zzplantéd^Qqnäme".encode("latin-1"))),
     ("Zzplantéd", "Qqnäme"), (("PatientName", "charset_fallback"),)),
    ("charset-none-utf8-bytes", _all(_delete("SpecificCharacterSet"),
                                     _raw("PatientName", "Zzplantéd^Qqnäme".encode())),
     ("Zzplantéd", "Qqnäme"), (("PatientName", "charset_fallback"),)),
    ("charset-ir87-broken-escape", _all(_charset(["", "ISO 2022 IR 87"]),
                                        _raw("PatientName", b"Zzplanted^\x1b$Z;3ED\x1b(B")),
     (), (("PatientName", "charset_fallback"),)),
]


def _all_problems() -> Mutation:
    return _all(_set("PatientBirthDate", HASH), _delete("PatientID", "StudyID"), _set("PatientSex", "Q"),
                _set("StudyDate", "notadate"), _set("StudyTime", "99:99"), _charset(["", "ISO 2022 IR 87"]),
                _set("AccessionNumber", "PLANTEDACC" + "6" * 50))


def problem_variants() -> list[Variant]:
    out = [_make(name, mutation, planted, expect) for name, mutation, planted, expect in PROBLEMS]
    out.append(_make("all-problems-at-once", _all_problems(), (HASH, "'Q'", "notadate", "99:99",
                                                               "PLANTEDACC" + "6" * 50),
                     (("PatientBirthDate", "emptied_invalid"), ("PatientID", "added_empty"),
                      ("StudyID", "added_empty"), ("PatientSex", "emptied_not_enumerated"),
                      ("StudyDate", "emptied_invalid"), ("StudyTime", "emptied_invalid"),
                      ("AccessionNumber", "emptied_overlong"))))
    return out


# --- sequences, veterinary sources, UIDs ------------------------------------------------------------------------


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _sequence(keyword: str, items: list[Dataset]) -> Mutation:
    def mutate(ds: Dataset) -> None:
        setattr(ds, keyword, Sequence(items))
    return mutate


def _other_id(value: str) -> Dataset:
    item = Dataset()
    with _Silent():
        item.PatientID, item.TypeOfPatientID = value, "TEXT"
    return item


def structure_variants() -> list[Variant]:
    dog = "Canis lupus familiaris"
    species_code = _code("448771007", "SCT", "Canis lupus familiaris")
    no_meaning = Dataset()
    no_meaning.CodeValue, no_meaning.CodingSchemeDesignator = "PLANTCODE77", "99PLANT"
    return [
        _make("veterinary-species-description", _set("PatientSpeciesDescription", dog), (),
              tuple((k, "added_empty") for k in ("PatientBreedDescription", "PatientBreedCodeSequence",
                                                 "BreedRegistrationSequence", "ResponsiblePerson",
                                                 "ResponsibleOrganization"))),
        _make("veterinary-species-code", _sequence("PatientSpeciesCodeSequence", [species_code]), (),
              (("PatientBreedDescription", "added_empty"), ("ResponsiblePerson", "added_empty"))),
        _make("veterinary-responsible-person-without-role",
              _all(_set("PatientSpeciesDescription", dog), _set("ResponsiblePerson", "Ownerplanted^Rr")),
              ("Ownerplanted",), (("ResponsiblePerson", "emptied_unmet_condition"),)),
        _make("veterinary-complete",
              _all(_set("PatientSpeciesDescription", dog), _set("PatientBreedDescription", "Beagle"),
                   _sequence("PatientBreedCodeSequence", []), _sequence("BreedRegistrationSequence", []),
                   _set("ResponsiblePerson", "Ownerplanted^Rr"), _set("ResponsiblePersonRole", "OWNER"),
                   _set("ResponsibleOrganization", "Planted Kennel Oo5151")),
              ("Ownerplanted", "Planted Kennel Oo5151")),
        _make("veterinary-species-description-overlong", _set("PatientSpeciesDescription", "Canis " + "l" * 70),
              (), (("PatientSpeciesDescription", "dropped_overlong"),)),
        _make("other-patient-ids-sequence", _sequence("OtherPatientIDsSequence", [_other_id("PLANTED-OTHER-ID-3")]),
              ("PLANTED-OTHER-ID-3",)),
        _make("other-patient-ids-sequence-invalid-item",
              _sequence("OtherPatientIDsSequence", [_other_id("PLANTED-OTHER-ID-" + "3" * 60)]),
              ("PLANTED-OTHER-ID-" + "3" * 60,), (("OtherPatientIDsSequence", "dropped_invalid"),)),
        _make("procedure-code-sequence-ir87",
              _all(_charset(["", "ISO 2022 IR 87"]), _sequence("ProcedureCodeSequence",
                                                              [_code("PLPROC1", "99PLANT", "胸部 planted")]))),
        _make("procedure-code-sequence-item-without-meaning", _sequence("ProcedureCodeSequence", [no_meaning]),
              ("PLANTCODE77",), (("ProcedureCodeSequence", "dropped_invalid"),)),
        _make("identity-removed-without-method", _set("PatientIdentityRemoved", "YES"), (),
              (("PatientIdentityRemoved", "dropped_unmet_condition"),)),
        _make("clinical-trial-subject-incomplete", _set("ClinicalTrialSponsorName", "Planted Sponsor Ss8080"),
              ("Planted Sponsor Ss8080",), (("ClinicalTrialSponsorName", "dropped_unmet_condition"),)),
        _make("uids-not-under-a-valid-root",
              _all(_set("StudyInstanceUID", "999.7731.1"), _set("SeriesInstanceUID", "999.7731.1.2"),
                   _set("SOPInstanceUID", "999.7731.1.2.3")), uids_off_root=True),
    ]


# --- pydicom's character-set test files ------------------------------------------------------------------------

# Text attributes the node copies that the charset files carry, transplanted as the files encode them.
TRANSPLANTED = ("PatientName", "OtherPatientNames", "ReferringPhysicianName", "StudyDescription", "InstitutionName",
                "StationName", "PatientComments", "ManufacturerModelName")


def charset_file_variants() -> list[Variant]:
    import pydicom.data

    out: list[Variant] = []
    for path in sorted(pydicom.data.get_charset_files(), key=lambda p: Path(p).name):
        path = Path(path)
        if path.suffix != ".dcm":
            continue
        try:
            with _Silent():
                source = dcmread(path)
        except Exception:
            continue
        if "PatientName" not in source or "SpecificCharacterSet" not in source:
            continue
        raws = {k: source.get_item(tag_for_keyword(k)).value for k in TRANSPLANTED if k in source}
        charset = source.get_item(0x00080005).value
        with _Silent():
            planted = tuple(str(source.PatientName).replace("=", "^").split("^"))

        def mutate(ds: Dataset, raws=raws, charset=charset) -> None:
            terms = charset.decode("ascii").split("\\") if isinstance(charset, bytes) else charset
            ds.add_new(0x00080005, "CS", [t.strip() for t in terms] if isinstance(terms, list) else terms)
            for keyword, value in raws.items():
                ds.add_new(tag_for_keyword(keyword), dictionary_VR(keyword), value)

        out.append(_make(f"charset-file-{path.stem}", mutate, tuple(p for p in planted if len(p) >= 2)))
    return out


@lru_cache(maxsize=1)
def _variants() -> tuple[Variant, ...]:
    corpus = [_make("baseline", lambda ds: None), *problem_variants(), *attribute_variants(),
              *structure_variants(), *charset_file_variants()]
    names = [v.name for v in corpus]
    assert len(names) == len(set(names)), "variant names must be unique"
    return tuple(corpus)


def variants() -> list[Variant]:
    """The whole corpus, deterministic, baseline first."""
    return list(_variants())


def variant(name: str) -> Variant:
    return next(v for v in _variants() if v.name == name)
