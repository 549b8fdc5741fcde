"""The public lung-mask radiographs as a site's archive: each PNG becomes a CR chest PA DICOM file of its own
patient (synthetic, distinct Patient ID, name, birth date and accession number), so that the retraining path can be
exercised on real films with the patient data a real archive has (and the de-identification can be checked)."""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
UID_ROOT = "1.2.826.0.1.3680043.10.1456."  # test data only
ISSUER = "REHEARSAL"
PIXEL_SPACING_MM = 0.7  # the 512 px films cover about 36 cm


@dataclass(frozen=True)
class Film:
    """One converted film: its file, the source PNG's name and label, and the planted patient values."""

    path: Path
    source_file: str
    present: int  # 1: tuberculosis in the public labels (standing in for pneumoconiosis)
    sop_instance_uid: str
    study_instance_uid: str
    patient_id: str
    patient_name: str
    birth_date: str
    accession_number: str


def _uid(*parts: str) -> str:
    digest = int(hashlib.sha256("/".join(parts).encode()).hexdigest()[:24], 16)
    return f"{UID_ROOT}{digest}"[:64]


def write_film(png: Path, out: Path, *, index: int, present: int, tag: str = "reh") -> Film:
    """``png`` as a CR file at ``out`` with the synthetic patient number ``index``."""
    with Image.open(png) as img:
        pixels = np.asarray(img.convert("L"), dtype=np.uint8)
    patient_id = f"PID{tag.upper()}{index:05d}"
    film = Film(path=out, source_file=png.name, present=present,
                sop_instance_uid=_uid(tag, png.name, "sop"), study_instance_uid=_uid(tag, png.name, "study"),
                patient_id=patient_id, patient_name=f"Rehearsal^Patient{index:05d}",
                birth_date=f"19{40 + index % 50:02d}0{1 + index % 9}1{index % 10}",
                accession_number=f"ACC{tag.upper()}{index:06d}")
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CR_IMAGE_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = film.sop_instance_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = CR_IMAGE_STORAGE, film.sop_instance_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = film.study_instance_uid, _uid(tag, png.name, "series")
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "PA"
    ds.Manufacturer = "rehearsal (public film converted)"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PatientName, ds.PatientID, ds.IssuerOfPatientID = film.patient_name, film.patient_id, ISSUER
    ds.PatientBirthDate, ds.PatientSex = film.birth_date, "O"
    ds.AccessionNumber, ds.StudyDate, ds.StudyTime = film.accession_number, "20260101", "120000"
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 1, 1
    ds.ReferringPhysicianName = ""
    ds.ImagerPixelSpacing = [PIXEL_SPACING_MM, PIXEL_SPACING_MM]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pixels.tobytes()
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out, enforce_file_format=True)
    return film


def lung_mask_films(data_dir: Path, out_dir: Path, *, limit: int | None = None, per_class: int | None = None,
                    from_end: bool = False, tag: str = "reh") -> list[Film]:
    """The films of ``data_dir`` (the lung-mask layout: labels.csv, images/) as CR files under ``out_dir``: all of
    them, the first ``limit``, or the first ``per_class`` normal and ``per_class`` tuberculosis films; counted from
    the end of labels.csv with ``from_end`` (a second set of other films than the first)."""
    with (data_dir / "labels.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    if from_end:
        rows.reverse()
    picked: list[dict[str, str]] = []
    counts = {0: 0, 1: 0}
    for row in rows:
        present = int(row["finding"].strip().lower() != "normal")
        if per_class is not None:
            if counts[present] >= per_class:
                continue
            counts[present] += 1
        picked.append(row)
        if limit is not None and len(picked) >= limit:
            break
    films = []
    for index, row in enumerate(picked, start=1):
        present = int(row["finding"].strip().lower() != "normal")
        films.append(write_film(data_dir / "images" / row["file"], out_dir / f"{index:05d}.dcm", index=index,
                                present=present, tag=tag))
    return films


def labels_csv(films: list[Film], path: Path, *, reader: str = "rehearsal", read_date: str = "2026-11-30") -> Path:
    """The films' labels in the node's import format: tuberculosis stands in for "pneumoconiosis present", and a
    present film gets ILO category 1 (the public labels have no category)."""
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["sop_instance_uid", "present", "category", "reader", "read_date"])
        for film in films:
            writer.writerow([film.sop_instance_uid, "yes" if film.present else "no", 1 if film.present else 0,
                             reader, read_date])
    return path
