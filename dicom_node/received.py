"""The database record of an archived file, read again from the file itself (start-up reconciliation).

The fields are exactly those the intake records for a C-STORE (``db.instances.ReceivedInstance``), with the same
UID checks, the same Pixel Data length check and the same scope verdict (``ai.header_scope.header_scope``); the
intake still builds its own record from the received dataset, in the order its failure statuses need.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

from pydicom.dataset import Dataset

from ai.header_scope import header_scope
from ai.limits import DEFAULT_LIMITS, ImageLimits, ImageTooLarge, read_dataset_bounded
from ai.safe_text import SafeMessage, exception_summary
from db.instances import ReceivedInstance

from .archive import Archive, InvalidUID, check_uid, sha256_of
from .intake import pixel_data_shortfall


class NotRegistrable(SafeMessage, ValueError):
    """The file cannot become an instance row; the message is log-safe (no dataset values)."""


def received_instance(ds: Dataset, *, calling_aet: str, archive_path: str, size_bytes: int, sha256: str,
                      transfer_syntax_uid: str) -> ReceivedInstance:
    """The intake's record of ``ds`` (read with deferred values); raises ``InvalidUID`` for a bad UID."""
    study_uid = check_uid(ds.get("StudyInstanceUID"), "Study Instance UID")
    series_uid = check_uid(ds.get("SeriesInstanceUID"), "Series Instance UID")
    sop_uid = check_uid(ds.get("SOPInstanceUID"), "SOP Instance UID")
    sop_class = check_uid(ds.get("SOPClassUID"), "SOP Class UID")
    verdict = header_scope(ds)
    return ReceivedInstance(
        sop_instance_uid=sop_uid,
        sop_class_uid=sop_class,
        study_instance_uid=study_uid,
        series_instance_uid=series_uid,
        accession_number=str(ds.get("AccessionNumber", "") or "")[:16] or None,
        modality=str(ds.get("Modality", "") or "")[:16] or None,
        calling_aet=calling_aet,
        archive_path=archive_path,
        size_bytes=size_bytes,
        sha256=sha256,
        transfer_syntax_uid=transfer_syntax_uid,
        in_scope=verdict.in_scope,
        scope_reason=verdict.reason,
    )


def received_instance_from_file(path: Path, archive: Archive, calling_aet: str,
                                limits: ImageLimits = DEFAULT_LIMITS) -> tuple[ReceivedInstance, datetime]:
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
        record = received_instance(ds, calling_aet=calling_aet, archive_path=archive.relative(path),
                                   size_bytes=st.st_size, sha256="", transfer_syntax_uid=syntax)
    except (NotRegistrable, InvalidUID) as exc:
        raise NotRegistrable(str(exc)) from None
    except ImageTooLarge as exc:
        raise NotRegistrable(exception_summary(exc)) from None  # its own text: fixed, with the limits
    except Exception as exc:  # unreadable, not DICOM, a malformed value: never quote the library's text
        raise NotRegistrable(exception_summary(exc, message="the file cannot be parsed as DICOM")) from None
    expected = archive.relative(archive.path_for(record.study_instance_uid, record.series_instance_uid,
                                                 record.sop_instance_uid))
    if expected != record.archive_path:
        raise NotRegistrable("its path differs from the one its Study, Series and SOP Instance UIDs give")
    received_at = datetime.fromtimestamp(st.st_mtime, timezone.utc).replace(tzinfo=None)
    return replace(record, sha256=sha256_of(path)), received_at
