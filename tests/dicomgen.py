"""Test data: many distinct instances made from one real sample by giving each copy new UIDs."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

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


def dataset_bytes(path: Path) -> bytes:
    """The encoded dataset after the File Meta Information: what travels on the wire in the file's own syntax."""
    raw = path.read_bytes()
    assert raw[128:132] == b"DICM", f"{path} is not in the DICOM file format"
    # (0002,0000) File Meta Information Group Length is the first element: explicit VR 'UL', 4-byte value.
    group_length = int.from_bytes(raw[132 + 8:132 + 12], "little")
    return raw[132 + 12 + group_length:]
