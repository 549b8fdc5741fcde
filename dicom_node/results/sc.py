"""The heat-map picture as a Secondary Capture image (RGB, Burned In Annotation YES).

For the readers whose viewer shows neither SEG nor SR: the same result, drawn. The banner says what the colours
are, which models drew them and, for a demo model, its notice; without a classifier it says that no classifier
is installed, so an uncoloured picture is never read as "nothing found".

By default (``results.sc_compression = "jpeg"``) the picture is stored and sent as lossy JPEG Baseline: an RGB
picture of a 2k radiograph is 12 MB uncompressed, more than the radiograph itself, in every study a PACS keeps;
as JPEG at quality 95 it is about 0.8 MB (the Philips CR: 15x, mean error 0.9 of 255 levels), and a picture marked
"not for diagnosis" loses nothing a reader uses. The chrominance is halved horizontally (4:2:2, Photometric
Interpretation YBR_FULL_422), the form DICOM's SC Image module admits and every viewer decodes; the contours stay
visible, slightly paler at their edges (full-resolution chrominance, YBR_FULL, is not an SC Image value).
Pillow's libjpeg-turbo encodes it in about 25 ms, less than the bytes it saves cost to fsync, send and store
(docs/benchmarks.md). ``"none"`` keeps Explicit VR Little Endian RGB.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import numpy as np
from highdicom.sc import SCImage
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit

from .identity import NodeIdentity, contributing_equipment, institution_name, notices, series_description
from .overlay import TEXT_COLOUR, WARNING_COLOUR, render
from .uids import model_versions, result_series_uid, result_uid

if TYPE_CHECKING:  # ai.analysis loads torch; building results needs only the record's data
    from ai.analysis import AnalysisRecord

SERIES_NUMBER = 9103
HEAT_MAP_DESCRIPTION = "AI heat map (not for diagnosis)"
CONTOURS_DESCRIPTION = "AI lung fields overlay (not for diagnosis)"
NOT_FOR_CLINICAL_USE = "AI output for orientation only - not for clinical use."
JPEG_QUALITY = 95
SUBSAMPLING_422 = 1  # Pillow's subsampling code for 4:2:2 (chrominance halved horizontally)
JPEG_METHOD = "ISO_10918_1"  # Lossy Image Compression Method of JPEG lossy (PS3.3 C.7.6.1.1.5.1)


def banner_lines(record: AnalysisRecord) -> list[tuple[str, tuple[int, int, int]]]:
    c = record.classification
    lines: list[tuple[str, tuple[int, int, int]]] = []
    if c is not None:
        verdict = "PRESENT" if c.present else "absent"
        lines.append((f"Pneumoconiosis {verdict}: probability {c.probability:.2f} (threshold {c.threshold:.2f}); "
                      f"most likely ILO category {c.most_likely_category}", TEXT_COLOUR))
    else:
        lines.append(("No pneumoconiosis classifier installed: lung fields only, NOT assessed for pneumoconiosis",
                      WARNING_COLOUR))
    lines.append((f"Models: {model_versions(record.models)}", TEXT_COLOUR))
    for notice in notices(record.models) or [NOT_FOR_CLINICAL_USE]:
        lines.append((notice, WARNING_COLOUR))
    return lines


def build_sc(source: Dataset, record: AnalysisRecord, node: NodeIdentity) -> SCImage:
    """The SC of an analysed record, compressed as ``node.sc_compression`` says."""
    if record.image is None or record.labels is None:
        raise ValueError("a secondary capture needs the image and lung labels of an analysed record")
    heat = record.classification.heat_map if record.classification is not None else None
    pixels = render(record.image.pixels, record.labels, heat, banner_lines(record))
    versions = model_versions(record.models)
    uid = str(source.SOPInstanceUID)
    orientation = source.get("PatientOrientation")
    has_orientation = orientation is not None and len(orientation) == 2
    description = HEAT_MAP_DESCRIPTION if heat is not None else CONTOURS_DESCRIPTION
    sc = SCImage.from_ref_dataset(
        ref_dataset=source, pixel_array=pixels, photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT", series_instance_uid=result_series_uid(uid, "sc", versions),
        series_number=SERIES_NUMBER, sop_instance_uid=result_uid(uid, "sc", versions), instance_number=1,
        manufacturer=node.manufacturer,
        # highdicom insists on an orientation for a PATIENT image; a source without one gets an empty value below.
        patient_orientation=(str(orientation[0]), str(orientation[1])) if has_orientation else ("L", "F"),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        contributing_equipment=contributing_equipment(node, source, record.models),
        series_description=series_description(description, record.models),
    )
    if not has_orientation:
        sc["PatientOrientation"].value = ""  # Type 2C: present, empty, rather than a guessed orientation
    # General Series Laterality is Type 2C for paired body parts; dciodvfy can only tell that the chest is not
    # paired when Body Part Examined says so, so copy it, or write an empty Laterality when the source has none.
    if source.get("BodyPartExamined"):
        sc.BodyPartExamined = source.BodyPartExamined
    else:
        sc.Laterality = ""
    sc.BurnedInAnnotation = "YES"
    sc.ConversionType = "WSD"  # made on a workstation, not digitised from film or video
    sc.ManufacturerModelName = node.model_name
    sc.SoftwareVersions = node.software_version
    institution = institution_name(node, source)
    if institution:
        sc.InstitutionName = institution
    sc.ImageComments = " ".join(notices(record.models)) or NOT_FOR_CLINICAL_USE
    sc.DerivationDescription = "Lung contours and heat map of an automated analysis drawn over the source image"
    sc.SourceImageSequence = [source_image_reference(source)]
    carry_lossy_history(source, sc)
    if node.sc_compression == "jpeg":
        compress_jpeg(sc, pixels)
    return sc


def carry_lossy_history(source: Dataset, sc: Dataset) -> None:
    """A picture drawn from a lossily compressed radiograph says so (PS3.3 C.7.6.1.1.5: once "01", never reset),
    with the source's ratios and methods when it gives one of each per compression."""
    if source.get("LossyImageCompression") != "01":
        return
    sc.LossyImageCompression = "01"
    ratios, methods = _values(source, "LossyImageCompressionRatio"), _values(source, "LossyImageCompressionMethod")
    if ratios and len(ratios) == len(methods):
        sc.LossyImageCompressionRatio = ratios
        sc.LossyImageCompressionMethod = methods


def _values(ds: Dataset, keyword: str) -> list:
    value = ds.get(keyword)
    if value is None or value == "":
        return []
    return list(value) if isinstance(value, MultiValue) else [value]


def compress_jpeg(sc: Dataset, rgb: np.ndarray, quality: int = JPEG_QUALITY, subsampling: int = SUBSAMPLING_422
                  ) -> None:
    """Replace the SC's uncompressed RGB pixel data by one JPEG Baseline frame of ``rgb``: by default 4:2:2,
    YBR_FULL_422 (``subsampling`` is Pillow's: 0 = 4:4:4, YBR_FULL, which is not an SC Image value; 2 = 4:2:0, which
    DICOM also labels YBR_FULL_422; ``benchmarks/sc_encoding.py`` compares them).

    highdicom validates the picture uncompressed first; its own JPEG path is not used because it lets Pillow
    subsample the chrominance vertically too (4:2:0) under a Photometric Interpretation that says 4:2:2. The frame
    is encoded by Pillow and encapsulated by pydicom, and the attributes that say the pixels were compressed
    lossily are written as PS3.3 C.7.6.1.1.5 asks."""
    with io.BytesIO() as buffer:
        Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), mode="RGB").save(
            buffer, format="JPEG", quality=quality, subsampling=subsampling)
        frame = buffer.getvalue()
    ratio = rgb.size / len(frame)
    sc.PixelData = encapsulate([frame])
    sc["PixelData"].VR = "OB"
    sc["PixelData"].is_undefined_length = True
    sc.PhotometricInterpretation = "YBR_FULL" if subsampling == 0 else "YBR_FULL_422"
    sc.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    sc.LossyImageCompression = "01"
    sc.LossyImageCompressionRatio = _values(sc, "LossyImageCompressionRatio") + [f"{ratio:.2f}"]
    sc.LossyImageCompressionMethod = _values(sc, "LossyImageCompressionMethod") + [JPEG_METHOD]
    sc.DerivationDescription += f"; lossy JPEG Baseline compression, quality {quality}, ratio {ratio:.1f}:1"


def source_image_reference(source: Dataset) -> Dataset:
    """The radiograph this picture was drawn from, so that PACS and viewers can link the two."""
    purpose = Dataset()
    purpose.CodeValue = "121322"
    purpose.CodingSchemeDesignator = "DCM"
    purpose.CodeMeaning = "Source image for image processing operation"
    ref = Dataset()
    ref.ReferencedSOPClassUID = source.SOPClassUID
    ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
    ref.PurposeOfReferenceCodeSequence = [purpose]
    return ref
