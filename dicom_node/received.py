"""The database record of a received instance (``db.instances.ReceivedInstance``): built here, and only here.

``received_instance`` is the one builder: the intake calls it for every C-STORE, start-up reconciliation for every
archived file the database does not know (``received_instance_from_file``), and the worker tests queue their
instances with it, so what they store cannot drift from what the intake stores. It lives here rather than as a
``ReceivedInstance`` classmethod in ``db.instances`` because it needs the node's UID check and archive layout
(``dicom_node.archive``) and the scope verdict (``ai.header_scope``), which ``db`` must not import; the record
itself stays a plain dataclass of values there.

The checks a caller needs in its own order (the intake's failure statuses: UIDs, then the Pixel Data length, then
the request's UIDs, then the header) are separate functions: ``checked_uids`` and ``pixel_data_shortfall``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from ai import header_values
from ai.header_scope import header_scope
from ai.limits import DEFAULT_LIMITS, ImageLimits, ImageTooLarge, declared_pixel_bytes, read_dataset_bounded
from ai.safe_text import SafeMessage, exception_summary
from db.instances import ReceivedInstance

from .archive import Archive, InvalidUID, check_uid, sha256_of
from .patient_key import patient_key

NATIVE_SYNTAXES = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2"}


class NotRegistrable(SafeMessage, ValueError):
    """The file cannot become an instance row; the message is log-safe (no dataset values)."""


@dataclass(frozen=True)
class InstanceUIDs:
    """The four UIDs of a dataset, each checked (``check_uid``: present, a valid UID, safe in a path)."""

    study: str
    series: str
    sop_instance: str
    sop_class: str


def checked_uids(ds: Dataset) -> InstanceUIDs:
    """Raises ``InvalidUID`` (log-safe message) for a missing or malformed one; a malformed element may raise
    whatever pydicom raises when it is read."""
    return InstanceUIDs(
        study=check_uid(ds.get("StudyInstanceUID"), "Study Instance UID"),
        series=check_uid(ds.get("SeriesInstanceUID"), "Series Instance UID"),
        sop_instance=check_uid(ds.get("SOPInstanceUID"), "SOP Instance UID"),
        sop_class=check_uid(ds.get("SOPClassUID"), "SOP Class UID"),
    )


def pixel_data_shortfall(ds: Dataset, file_size: int) -> str | None:
    """For a native (uncompressed) transfer syntax: a log-safe description if the Pixel Data holds fewer bytes than
    Rows x Columns x Samples per Pixel x Bits Allocated x frames require (a truncated transfer or file), else None.

    ``ds`` is read with deferred values, so the element's declared length and its offset in the file are known
    without loading it; for a deflated dataset the inflated value is measured. Longer Pixel Data (trailing padding)
    is accepted, as every decoder ignores the excess."""
    syntax = str(getattr(ds, "file_meta", Dataset()).get("TransferSyntaxUID", ""))
    if syntax not in NATIVE_SYNTAXES or "PixelData" not in ds:
        return None
    raw: Any = ds.get_item("PixelData")  # a RawDataElement while deferred: its length and offset are known
    if min(header_values.integer(ds, k) or 0 for k in ("Rows", "Columns", "BitsAllocated")) <= 0:
        return "Rows, Columns or Bits Allocated missing or zero for native Pixel Data"
    expected = declared_pixel_bytes(ds)
    if syntax == "1.2.840.10008.1.2.1.99" or getattr(raw, "value_tell", None) is None:
        value = ds.PixelData
        available = len(value) if value is not None else 0
    else:
        declared = 0 if raw.length == 0xFFFFFFFF else int(raw.length)
        available = min(declared, max(0, file_size - int(raw.value_tell)))
    if available < expected:
        return f"Pixel Data holds {available} of the {expected} bytes its image attributes require"
    return None


def received_instance(ds: Dataset, archive: Archive, *, calling_aet: str, size_bytes: int, sha256: str,
                      transfer_syntax_uid: str, uids: InstanceUIDs | None = None,
                      patient_key_secret: bytes | None = None) -> ReceivedInstance:
    """The intake's record of ``ds`` (read with deferred values): its UIDs (``uids`` when the caller has checked
    them already, else ``checked_uids``), the archive path they give, the technical facts passed in, the scope
    verdict and, given the node's secret, the patient key. Raises ``InvalidUID`` for a bad UID, and whatever
    ``header_scope`` raises for an unreadable header."""
    uids = uids if uids is not None else checked_uids(ds)
    verdict = header_scope(ds)
    key = patient_key(ds, patient_key_secret) if patient_key_secret is not None else None
    return ReceivedInstance(
        sop_instance_uid=uids.sop_instance,
        sop_class_uid=uids.sop_class,
        study_instance_uid=uids.study,
        series_instance_uid=uids.series,
        accession_number=str(ds.get("AccessionNumber", "") or "")[:16] or None,
        modality=str(ds.get("Modality", "") or "")[:16] or None,
        calling_aet=calling_aet,
        archive_path=archive.relative(archive.path_for(uids.study, uids.series, uids.sop_instance)),
        size_bytes=size_bytes,
        sha256=sha256,
        transfer_syntax_uid=transfer_syntax_uid,
        in_scope=verdict.in_scope,
        scope_reason=verdict.reason,
        patient_key=key,
    )


def received_instance_from_file(path: Path, archive: Archive, calling_aet: str,
                                limits: ImageLimits = DEFAULT_LIMITS, patient_key_secret: bytes | None = None,
                                ) -> tuple[ReceivedInstance, datetime]:
    """The record for an archived file and the time it was received (its modification time, naive UTC).

    The file is read as the intake reads a reception (``read_dataset_bounded`` with the node's size limits).
    Raises ``NotRegistrable`` when the intake would not have accepted the file, or when it does not lie at the
    archive path its own UIDs give (it would then be another instance's path)."""
    st = path.stat()
    try:
        ds = read_dataset_bounded(path, limits, defer_size=1024)
        syntax = check_uid(str(ds.file_meta.get("TransferSyntaxUID", "") or ""), "Transfer Syntax UID")
        short = pixel_data_shortfall(ds, st.st_size)
        if short is not None:
            raise NotRegistrable(short)
        record = received_instance(ds, archive, calling_aet=calling_aet, size_bytes=st.st_size, sha256="",
                                   transfer_syntax_uid=syntax, patient_key_secret=patient_key_secret)
    except (NotRegistrable, InvalidUID) as exc:
        raise NotRegistrable(str(exc)) from None
    except ImageTooLarge as exc:
        raise NotRegistrable(exception_summary(exc)) from None  # its own text: fixed, with the limits
    except Exception as exc:  # unreadable, not DICOM, a malformed value: never quote the library's text
        raise NotRegistrable(exception_summary(exc, message="the file cannot be parsed as DICOM")) from None
    if record.archive_path != archive.relative(path):
        raise NotRegistrable("its path differs from the one its Study, Series and SOP Instance UIDs give")
    received_at = datetime.fromtimestamp(st.st_mtime, UTC).replace(tzinfo=None)
    return replace(record, sha256=sha256_of(path)), received_at
