"""The pseudonymous patient key: groups a patient's images (folds, hold-out, training artifacts) without naming them.

The key is HMAC-SHA256 over (Issuer of Patient ID, Patient ID) with a per-node secret, in hex, its first 32
characters. Without the secret nobody can compute the key of a known ID, and two nodes' keys never match. The secret
is 32 random bytes made at first start and kept under the storage root (``secrets/patient-key``, mode 0600): a
backup of the storage root keeps it, and losing it gives every patient received afterwards a new key.

Values are read leniently: the bytes as the dataset's Specific Character Set decodes them (as pydicom would, but
without its converting read, whose warnings may quote the value), padding removed, Unicode NFC; so one ID sent with
other padding or another character set gets one key. A dataset with no Patient ID (absent, empty or only padding)
gets a key from its Study Instance UID instead: each such study counts as a patient of its own. The ID itself is
never logged or stored.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import unicodedata
import warnings
from pathlib import Path

from pydicom.charset import convert_encodings, decode_bytes
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import TEXT_VR_DELIMS
from sqlalchemy import Engine

from ai import header_values
from ai.limits import DEFAULT_LIMITS, ImageLimits, read_dataset_bounded
from ai.safe_text import SafeMessage, escape, exception_summary
from db.models import PATIENT_KEY_LENGTH
from db.patient_keys import KeylessInstance, instances_without_patient_key, set_patient_keys

from .secret_files import create_secret_file

LOG = logging.getLogger("dicom_node.patient_key")

SECRET_FILE = Path("secrets") / "patient-key"
"""Relative to the storage root."""
SECRET_BYTES = 32
BACKFILL_BATCH = 200  # rows keyed per transaction
_SECRET_TEXT = re.compile(r"[0-9a-f]{64}")
_PADDING = " \x00\t\r\n"


class PatientKeySecretError(SafeMessage, RuntimeError):
    """The secret file cannot be created, read or understood; the message names the file, never its content."""


class NoPatientKey(SafeMessage, ValueError):
    """A dataset with neither a Patient ID nor a Study Instance UID."""


def secret_path(storage_root: Path) -> Path:
    return Path(storage_root) / SECRET_FILE


def load_or_create_secret(storage_root: Path) -> bytes:
    """The node's secret: created at first start (atomically: two processes starting together end with one
    secret), read back from the file afterwards. Raises ``PatientKeySecretError``."""
    path = secret_path(storage_root)
    if not path.exists():
        _create_secret(path)
    return _read_secret(path)


def _create_secret(path: Path) -> None:
    """A complete file or none at the path (``create_secret_file``), or PatientKeySecretError."""
    try:
        create_secret_file(path, SECRET_BYTES)
    except OSError as exc:
        raise PatientKeySecretError(
            f"the patient-key secret {escape(path, 300)} cannot be created ({type(exc).__name__})") from None


def _read_secret(path: Path) -> bytes:
    where = escape(path, 300)
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise PatientKeySecretError(f"the patient-key secret {where} exists but cannot be read "
                                    f"({type(exc).__name__})") from None
    value = text.strip()
    if not _SECRET_TEXT.fullmatch(value):
        raise PatientKeySecretError(
            f"the patient-key secret {where} is malformed (expected {2 * SECRET_BYTES} lower-case hexadecimal "
            "digits): restore it from a backup of the storage root; removing it gives every patient new keys")
    if mode & 0o077:
        LOG.warning("the patient-key secret %s is readable by other users: chmod 600 it", where)
    return bytes.fromhex(value)


def _encodings(ds: Dataset) -> list[str]:
    terms = header_values.strings(ds, "SpecificCharacterSet")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return convert_encodings(terms or None)
    except Exception:  # an unknown term with pydicom's validation set to raise
        return ["iso8859"]


def _text(ds: Dataset, keyword: str) -> str:
    """The value as text (several values joined by backslashes), unpadded and NFC; ``""`` when absent or
    unreadable."""
    tag = tag_for_keyword(keyword)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            value = ds.get_item(tag).value if tag is not None and tag in ds else None
            if isinstance(value, (bytes, bytearray)):  # not converted yet: decoded as pydicom would
                raw = bytes(value)
                try:
                    value = decode_bytes(raw, _encodings(ds), TEXT_VR_DELIMS)
                except Exception:  # pydicom's validation set to raise on bytes the character set does not hold
                    value = raw.decode("latin-1")
    except Exception:  # a broken element: absent
        return ""
    if value is None:
        return ""
    if isinstance(value, str):
        text = value
    elif isinstance(value, (list, tuple, MultiValue)):  # several values, converted by pydicom already
        text = "\\".join(str(v) for v in value)
    else:
        text = str(value)
    return unicodedata.normalize("NFC", text.strip(_PADDING))


def _digest(secret: bytes, *parts: str) -> str:
    message = json.dumps(parts, ensure_ascii=False).encode("utf-8")  # unambiguous: each part quoted
    return hmac.new(secret, message, hashlib.sha256).hexdigest()[:PATIENT_KEY_LENGTH]


def study_key(study_instance_uid: str, secret: bytes) -> str:
    """The key of a study whose patient is not known: the study is a patient of its own."""
    return _digest(secret, "study", study_instance_uid)


def patient_key(ds: Dataset, secret: bytes) -> str:
    """The key of Issuer of Patient ID + Patient ID, or the study's key (``study_key``) without a Patient ID.
    Raises ``NoPatientKey`` when there is neither a Patient ID nor a Study Instance UID."""
    patient_id = _text(ds, "PatientID")
    if patient_id:
        return _digest(secret, "patient", _text(ds, "IssuerOfPatientID"), patient_id)
    study = header_values.uid(ds, "StudyInstanceUID")
    if not study:
        raise NoPatientKey("the dataset has neither a Patient ID nor a Study Instance UID")
    return study_key(study, secret)


def _key_of_archived(row: KeylessInstance, storage_root: Path, secret: bytes, limits: ImageLimits) -> str:
    try:
        ds = read_dataset_bounded(Path(storage_root) / row.archive_path, limits, stop_before_pixels=True)
        return patient_key(ds, secret)
    except Exception as exc:  # missing, unreadable, over the limits: never quote the library's text
        LOG.warning("instance %d (%s): archived file cannot be read (%s); its patient key is its study's",
                    row.instance_id, escape(row.archive_path), exception_summary(exc))
        return study_key(row.study_instance_uid, secret)


def backfill_patient_keys(engine: Engine, storage_root: Path, secret: bytes,
                          limits: ImageLimits = DEFAULT_LIMITS) -> int:
    """Key the instance rows that have none (rows of a database upgraded from schema version 2) from their archived
    files' headers, ``BACKFILL_BATCH`` rows per commit; a file that cannot be read gets its study's key. Returns the
    number of rows keyed."""
    keyed = 0
    after = 0
    while rows := instances_without_patient_key(engine, after, BACKFILL_BATCH):
        keyed += set_patient_keys(engine, {row.instance_id: _key_of_archived(row, storage_root, secret, limits)
                                           for row in rows})
        after = rows[-1].instance_id
    return keyed
