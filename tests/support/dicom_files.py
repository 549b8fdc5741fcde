"""Reading DICOM files byte for byte."""

from __future__ import annotations

from pathlib import Path


def dataset_bytes(path: Path) -> bytes:
    """The encoded dataset after the File Meta Information: what travels on the wire in the file's own syntax."""
    raw = path.read_bytes()
    assert raw[128:132] == b"DICM", f"{path} is not in the DICOM file format"
    # (0002,0000) File Meta Information Group Length is the first element: explicit VR 'UL', 4-byte value.
    assert raw[132:136] == b"\x02\x00\x00\x00", f"{path}: the File Meta Information does not start with its length"
    group_length = int.from_bytes(raw[132 + 8:132 + 12], "little")
    return raw[132 + 12 + group_length:]
