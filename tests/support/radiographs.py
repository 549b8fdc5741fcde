"""Real radiographs as DICOM files: a public lung-mask PNG (Montgomery / Shenzhen) written as a CR image with the
patient data a site's archive would hold, so that training tests run on real anatomy from the node's own input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

UID_ROOT = "1.2.826.0.1.3680043.10.1456."  # test data only (as tests/dicomgen.py)
CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"


def radiograph_dicom(png: Path, path: Path, *, patient_name: str, patient_id: str, accession: str,
                     birth_date: str = "19500101") -> Path:
    """Write ``png`` (8-bit grey) as a 12-bit MONOCHROME2 CR chest PA file at ``path``; returns ``path``."""
    with Image.open(png) as img:
        pixels = (np.asarray(img.convert("L"), dtype=np.uint16) * 16).astype(np.uint16)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CR_IMAGE_STORAGE
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CR_IMAGE_STORAGE
    ds.SOPInstanceUID = generate_uid(UID_ROOT)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = generate_uid(UID_ROOT)
    ds.SeriesInstanceUID = generate_uid(UID_ROOT)
    ds.Modality = "CR"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = birth_date
    ds.AccessionNumber = accession
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
