"""Test data: many distinct instances made from one real sample by giving each copy new UIDs."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from .support.dicom_files import dataset_bytes

__all__ = ["ABORTING_J2K_KEEP", "UID_ROOT", "aborting_j2k", "clone_instances", "dataset_bytes", "deflate_bomb",
           "synthetic_dx"]

UID_ROOT = "1.2.826.0.1.3680043.10.1456."  # test data only


def synthetic_dx(rows: int = 512, cols: int = 512, seed: int = 0) -> Dataset:
    """A DX-for-presentation chest-like dataset of ``rows x cols`` 16-bit pixels (noise, not anatomy)."""
    from pydicom.dataset import FileMetaDataset

    rng = np.random.default_rng(seed)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.Modality = "DX"
    ds.PatientName = "Test^Synthetic"
    ds.PatientID = "SYN-0001"
    ds.StudyInstanceUID = generate_uid(UID_ROOT)
    ds.SeriesInstanceUID = generate_uid(UID_ROOT)
    ds.SOPInstanceUID = generate_uid(UID_ROOT)
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = rng.integers(0, 4096, size=(rows, cols), dtype=np.uint16).tobytes()
    return ds


def clone_instances(template: Path | Dataset, out_dir: Path, count: int, per_series: int = 50) -> list[Path]:
    """Write ``count`` copies of ``template`` with fresh SOP Instance UIDs (new series every ``per_series``)."""
    base = dcmread(template) if isinstance(template, Path) else template
    out_dir.mkdir(parents=True, exist_ok=True)
    study = generate_uid(UID_ROOT)
    paths: list[Path] = []
    series = ""
    for i in range(count):
        if i % per_series == 0:
            series = generate_uid(UID_ROOT)
        ds = copy.deepcopy(base)
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = generate_uid(UID_ROOT)
        ds.InstanceNumber = i + 1
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = out_dir / f"img{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def deflate_bomb(path: Path, rows: int, cols: int, sop_class: str = "1.2.840.10008.5.1.4.1.1.1") -> Path:
    """A Deflated Explicit VR Little Endian file whose Pixel Data is ``rows x cols`` 16-bit zeros: small on disk,
    huge when inflated. Streamed into the deflater, so making it takes no memory."""
    import struct
    import zlib

    from pydicom.dataset import FileMetaDataset
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid(UID_ROOT)
    ds.StudyInstanceUID = generate_uid(UID_ROOT)
    ds.SeriesInstanceUID = generate_uid(UID_ROOT)
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    from pydicom.filebase import DicomBytesIO

    header = DicomBytesIO()
    header.is_little_endian, header.is_implicit_VR = True, False
    write_dataset(header, ds)
    size = rows * cols * 2
    pixel_header = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, size)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    with path.open("wb") as fh:
        fh.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(fh, meta)  # type: ignore[arg-type]
        deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        fh.write(deflater.compress(header.getvalue() + pixel_header))
        zeros = bytes(1 << 24)
        left = size
        while left:
            step = min(left, len(zeros))
            fh.write(deflater.compress(zeros[:step]))
            left -= step
        fh.write(deflater.flush())
    return path


ABORTING_J2K_KEEP = 6  # SOC (FF4F), the SIZ marker (FF51) and its length; the SIZ parameters and the rest: garbage


def aborting_j2k(path: Path, keep: int = ABORTING_J2K_KEEP, seed: int = 0) -> Dataset:
    """A JPEG 2000 dataset whose codestream has a valid start marker and garbage after it: python-gdcm calls
    ``abort()`` on it (the process dies with SIGABRT), pylibjpeg-openjpeg raises a clean error."""
    from pydicom.encaps import encapsulate, generate_frames

    ds = dcmread(path)
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    assert frame[:4] == b"\xff\x4f\xff\x51", "not a raw J2K codestream starting with SOC, SIZ"
    garbage = np.random.default_rng(seed).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    ds.PixelData = encapsulate([frame[:keep] + garbage])
    ds.SOPInstanceUID = generate_uid(UID_ROOT)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def write_pixel_source(template: Path, pixels: np.ndarray, bits_stored: int, path: Path,
                       study: str | None = None, series: str | None = None) -> Path:
    """``template`` with ``pixels`` (8- or 16-bit allocated, 8-bit ones as MONOCHROME2) and a fresh SOP Instance
    UID, as explicit VR little endian; ``study``/``series`` replace the template's when given."""
    ds = dcmread(template)
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 8 if pixels.dtype == np.uint8 else 16
    ds.BitsStored, ds.HighBit = bits_stored, bits_stored - 1
    if ds.BitsAllocated == 8:
        ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = pixels.tobytes()
    ds["PixelData"].VR = "OB" if ds.BitsAllocated == 8 else "OW"
    if study is not None:
        ds.StudyInstanceUID = study
    if series is not None:
        ds.SeriesInstanceUID = series
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(UID_ROOT)
    ds.save_as(path, enforce_file_format=True)
    return path
