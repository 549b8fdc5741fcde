"""The lung fields as a DICOM Segmentation: BINARY, on the source's own pixel grid, right and left lung.

A binary SEG on the native grid lets any SEG-capable viewer overlay the fields on the very radiograph they came
from without resampling, and lets the SR's lung areas point at the exact segment they were counted on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from highdicom import AlgorithmIdentificationSequence
from highdicom.color import CIELabColor
from highdicom.seg import SegmentAlgorithmTypeValues, Segmentation, SegmentationTypeValues, SegmentDescription
from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as std_codes

from ai.lungs import LEFT_LUNG, RIGHT_LUNG
from ai.model_info import ModelInfo

from . import codes
from .identity import NodeIdentity, contributing_equipment, institution_name, notices, series_description
from .uids import model_versions, result_series_uid, result_uid

if TYPE_CHECKING:  # ai.analysis loads torch; building results needs only the record's data
    from ai.analysis import AnalysisRecord

SERIES_NUMBER = 9101
SERIES_DESCRIPTION = "AI lung fields (SEG)"
SEGMENTS = (  # segment number, label value in record.labels, label, laterality, display colour
    (1, RIGHT_LUNG, "Right lung", codes.RIGHT, "cyan"),
    (2, LEFT_LUNG, "Left lung", codes.LEFT, "yellow"),
)


def segmenter_model(record: AnalysisRecord) -> ModelInfo:
    """The lung segmenter that drew the record's fields (every analysed record names it)."""
    if record.segmenter is None:
        raise ValueError("an analysed record names the lung segmenter in record.segmenter")
    return record.segmenter


def segment_descriptions(model: ModelInfo) -> list[SegmentDescription]:
    parameters = {k: v for k, v in (("model_card", model.card_id), ("trained_on", model.trained_on)) if v}
    algorithm = AlgorithmIdentificationSequence(
        name=model.name, version=model.version, family=std_codes.cid7162.ArtificialIntelligence,
        source=None, parameters=parameters or None)
    descriptions = []
    for number, _value, label, laterality, colour in SEGMENTS:
        description = SegmentDescription(
            segment_number=number, segment_label=label,
            segmented_property_category=codes.ANATOMICAL_STRUCTURE, segmented_property_type=codes.LUNG,
            algorithm_type=SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm,
            display_color=CIELabColor.from_string(colour))
        # The laterality modifier belongs inside the property type item (Segment Description macro).
        description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
            CodedConcept.from_code(laterality)]
        descriptions.append(description)
    return descriptions


def reference_header(source: Dataset, record: AnalysisRecord) -> Dataset:
    """The source's header as highdicom should see it: no pixel data, and no Pixel Spacing that the analysis
    found unusable (a CR's "0\\0" would become a zero spacing in the SEG's Pixel Measures, which is an error)."""
    header = Dataset()
    for element in source:
        if element.tag.group != 0x7FE0:
            header.add(element)
    if hasattr(source, "file_meta"):
        header.file_meta = source.file_meta
    if record.pixel_spacing_mm is None and "PixelSpacing" in header:
        del header.PixelSpacing
    return header


def segment_label_map(labels: np.ndarray) -> np.ndarray:
    """(1, rows, cols) uint8 of segment numbers (0 = neither lung). highdicom splits a label map into the BINARY
    SEG's frames as it does a (1, rows, cols, segments) stack, but checks it with one max() where the stack costs a
    full-grid sum to rule out overlaps (about 90 ms of a 2.5k x 2k radiograph's 110 ms); the two lungs never
    overlap."""
    if all(number == value for number, value, *_ in SEGMENTS) and (labels.size == 0 or labels.max() <= len(SEGMENTS)):
        return np.ascontiguousarray(labels, dtype=np.uint8)[None]  # the label values are the segment numbers
    label_map = np.zeros(labels.shape, dtype=np.uint8)
    for number, value, *_ in SEGMENTS:
        label_map[labels == value] = number
    return label_map[None]


def build_seg(source: Dataset, record: AnalysisRecord, node: NodeIdentity) -> Segmentation:
    if record.labels is None:
        raise ValueError("a SEG needs the lung labels of an analysed record")
    labels = np.asarray(record.labels)
    if labels.shape != (int(source.Rows), int(source.Columns)):
        raise ValueError(f"labels {labels.shape} are not on the source grid {(source.Rows, source.Columns)}")
    versions = model_versions(record.models)
    uid = str(source.SOPInstanceUID)
    seg = Segmentation(
        source_images=[reference_header(source, record)], pixel_array=segment_label_map(labels),
        segmentation_type=SegmentationTypeValues.BINARY,
        segment_descriptions=segment_descriptions(segmenter_model(record)),
        series_instance_uid=result_series_uid(uid, "seg", versions), series_number=SERIES_NUMBER,
        sop_instance_uid=result_uid(uid, "seg", versions), instance_number=1,
        manufacturer=node.manufacturer, manufacturer_model_name=node.model_name,
        software_versions=node.software_version, device_serial_number=node.device_uid[-64:],
        content_description="Lung fields"[:64], content_label="LUNG_FIELDS",
        series_description=series_description(SERIES_DESCRIPTION, record.models),
        contributing_equipment=contributing_equipment(node, source, record.models),
        omit_empty_frames=False,
    )
    # highdicom 0.28.2 leaves out Patient Orientation (General Image, Type 2C: required when the image has no
    # Image Orientation (Patient)); the mask lies on the source grid, so the source's orientation is the SEG's.
    # A source without one gets an empty value (allowed for Type 2C) rather than a guessed orientation.
    seg.PatientOrientation = source.get("PatientOrientation", "")
    institution = institution_name(node, source)
    if institution:
        seg.InstitutionName = institution
    if notices(record.models):
        seg.ImageComments = " ".join(notices(record.models))
    return seg
