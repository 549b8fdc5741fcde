"""Resource limits checked before anything is inflated or decoded: a small input must not take the machine's memory.

A 1.5 MB Deflated Explicit VR Little Endian dataset can declare a 28043 x 28043 image (1.5 GB of pixels) and a
compressed one any size its header likes. The header's Rows, Columns, frames, samples and Bits Allocated say how
much memory decoding will need; datasets that declare more than the limits are refused before any pixel is
touched. For a deflated dataset, the header itself is read by inflating only its first bytes, and inflating the
rest stops as soon as it passes what the declared image needs.

The defaults admit the largest real chest detectors (about 4.3k x 4.3k at 16 bits, 37 MB) with room to spare.
Both the intake (``dicom_node.intake``) and the analysis (``ai.analysis``, ``dicom-node analyse``) use them.
"""

from __future__ import annotations

import copy
import io
import zlib
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filereader import read_preamble
from pydicom.uid import ExplicitVRLittleEndian

from . import header_values
from .safe_text import SafeMessage

DEFLATED = "1.2.840.10008.1.2.1.99"
HEADER_WINDOW = 1 << 20  # inflated bytes read to find the image attributes (they come before Pixel Data)
HEADER_ALLOWANCE = 16 << 20  # inflated bytes allowed beside the pixels (overlays, private data, ...)
CHUNK = 1 << 16


class ImageTooLarge(SafeMessage, ValueError):
    """The dataset declares (or inflates to) more than the configured limits."""


@dataclass(frozen=True)
class ImageLimits:
    max_rows: int = 6144
    max_columns: int = 6144
    max_frames: int = 16
    max_uncompressed_mb: float = 128.0

    @property
    def max_uncompressed_bytes(self) -> int:
        return int(self.max_uncompressed_mb * 1024 * 1024)


DEFAULT_LIMITS = ImageLimits()


def _int(ds: Dataset, keyword: str, default: int) -> int:
    value = header_values.integer(ds, keyword)
    return default if value is None else value


def declared_pixel_bytes(ds: Dataset) -> int:
    """What the image attributes say the decoded pixels take (0 without Rows/Columns)."""
    rows, columns = _int(ds, "Rows", 0), _int(ds, "Columns", 0)
    samples, bits = _int(ds, "SamplesPerPixel", 1), _int(ds, "BitsAllocated", 16)
    frames = _int(ds, "NumberOfFrames", 1)
    return (max(rows, 0) * max(columns, 0) * max(samples, 1) * max(frames, 1) * max(bits, 1) + 7) // 8


def check_declared_size(ds: Dataset, limits: ImageLimits = DEFAULT_LIMITS) -> None:
    """Raise ``ImageTooLarge`` when the header declares more than ``limits`` (no pixel data is read; the header
    may have been read without it)."""
    rows, columns, frames = _int(ds, "Rows", 0), _int(ds, "Columns", 0), _int(ds, "NumberOfFrames", 1)
    if rows > limits.max_rows or columns > limits.max_columns:
        raise ImageTooLarge(f"image of {rows} x {columns} pixels exceeds the limit of "
                            f"{limits.max_rows} x {limits.max_columns}")
    if frames > limits.max_frames:
        raise ImageTooLarge(f"{frames} frames exceed the limit of {limits.max_frames}")
    size = declared_pixel_bytes(ds)
    if size > limits.max_uncompressed_bytes:
        raise ImageTooLarge(f"{size / 2**20:.0f} MiB of pixels exceed the limit of "
                            f"{limits.max_uncompressed_mb:.0f} MiB")


def _file_meta_and_offset(path: Path) -> tuple[Dataset, int]:
    """The file meta and where the dataset starts, without reading the dataset."""
    from pydicom.filereader import _read_file_meta_info

    with path.open("rb") as fh:
        read_preamble(fh, force=False)
        meta = _read_file_meta_info(fh)
        return meta, fh.tell()


def _inflate_bounded(raw: io.BufferedReader, limit: int) -> bytes:
    """Inflate a raw deflate stream, refusing as soon as the output passes ``limit`` bytes."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    out = bytearray()

    def take(data: bytes) -> None:
        out.extend(data)
        if len(out) > limit:
            raise ImageTooLarge(f"the deflated dataset inflates to more than {limit / 2**20:.0f} MiB")

    while chunk := raw.read(CHUNK):
        take(inflater.decompress(chunk, limit + 1 - len(out)))  # at most one byte past the limit: then refused
        while inflater.unconsumed_tail:
            take(inflater.decompress(inflater.unconsumed_tail, limit + 1 - len(out)))
    take(inflater.flush())
    return bytes(out)


def _inflated_header(path: Path, offset: int, meta: Dataset) -> Dataset:
    """The dataset's attributes before Pixel Data, from the first ``HEADER_WINDOW`` inflated bytes only."""
    with path.open("rb") as fh:
        fh.seek(offset)
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        head = bytearray()
        while len(head) < HEADER_WINDOW and (chunk := fh.read(CHUNK)):
            head += inflater.decompress(chunk, HEADER_WINDOW - len(head))
    return _parse_inflated(bytes(head), meta, stop_before_pixels=True)


def _parse_inflated(data: bytes, meta: Dataset, stop_before_pixels: bool) -> Dataset:
    """Inflated explicit-VR-little-endian bytes as a dataset that keeps the file's own (deflated) file meta."""
    from pydicom.dataset import FileMetaDataset

    buffer = io.BytesIO(b"\0" * 128 + b"DICM" + _meta_bytes(meta) + data)
    ds = dcmread(buffer, stop_before_pixels=stop_before_pixels, force=True)
    ds.file_meta = FileMetaDataset(meta)
    return ds


def _meta_bytes(meta: Dataset) -> bytes:
    from pydicom.dataset import FileMetaDataset
    from pydicom.filewriter import write_file_meta_info

    out = io.BytesIO()
    plain = FileMetaDataset(copy.deepcopy(meta))
    plain.TransferSyntaxUID = ExplicitVRLittleEndian  # the inflated bytes are explicit VR little endian
    write_file_meta_info(out, plain, enforce_standard=False)  # type: ignore[arg-type]
    return out.getvalue()


def read_dataset_bounded(path: Path, limits: ImageLimits = DEFAULT_LIMITS, defer_size: int | None = None,
                         stop_before_pixels: bool = False, force: bool = False) -> Dataset:
    """``dcmread`` that refuses (``ImageTooLarge``) before inflating or loading more than ``limits`` allow.

    Only a deflated file needs the bounded path; any other file is read as pydicom reads it (its size on disk
    bounds the memory it takes) and its declared size is checked before the caller decodes anything. ``force``
    as in ``dcmread``: also read a file without preamble and file meta (an old ACR-NEMA style export)."""
    path = Path(path)
    try:
        meta, offset = _file_meta_and_offset(path)
    except Exception:  # no preamble / file meta (ACR-NEMA style): not deflated; pydicom reads it as it can
        meta, offset = Dataset(), 0
    if str(meta.get("TransferSyntaxUID", "")) != DEFLATED:
        ds = dcmread(path, defer_size=defer_size, stop_before_pixels=stop_before_pixels, force=force)
        check_declared_size(ds, limits)
        return ds
    header = _inflated_header(path, offset, meta)
    check_declared_size(header, limits)
    if stop_before_pixels:
        return header
    limit = declared_pixel_bytes(header) + HEADER_ALLOWANCE
    with path.open("rb") as fh:
        fh.seek(offset)
        inflated = _inflate_bounded(fh, limit)
    return _parse_inflated(inflated, meta, stop_before_pixels=False)
