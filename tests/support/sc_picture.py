"""A small secondary capture stored as the node stores its heat-map picture, for tests of what reads or sends it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicom_node.results.sc import compress_jpeg

SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"


def red_ramp(rows: int = 600, cols: int = 1500) -> np.ndarray:
    """RGB pixels: red rising from 0 at the left to 255 at the right, green and blue 0."""
    pixels = np.zeros((rows, cols, 3), np.uint8)
    pixels[:, :, 0] = np.linspace(0, 255, cols, dtype=np.uint8)
    return pixels


def write_sc(path: Path, pixels: np.ndarray) -> Dataset:
    """An SC of ``pixels`` at ``path`` in JPEG Baseline (YBR_FULL_422), as the node stores it by default."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID, ds.SeriesInstanceUID = SC_CLASS, generate_uid(), generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = SC_CLASS, ds.SOPInstanceUID
    ds.Modality, ds.ConversionType = "OT", "WSD"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = *pixels.shape[:2], 3, "RGB"
    ds.PlanarConfiguration, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 0, 8, 8, 7, 0
    ds.ImageComments = "DEMO model: not for clinical use."
    ds.DerivationDescription = "test picture"
    ds.PixelData = pixels.tobytes()
    compress_jpeg(ds, pixels)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return ds
