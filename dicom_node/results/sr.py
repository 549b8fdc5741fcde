"""The pneumoconiosis report as a TID 1500 Measurement Report in a Comprehensive SR.

Comprehensive SR (not Comprehensive 3D SR): every reference here is to 2D pixel data (the radiograph, the SEG's
frames) and there are no patient coordinates to report; see docs/results.md. An instance that was not analysed
still gets a report that says so and why, so that a missing result is never read as a normal one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from highdicom.sr import (
    AlgorithmIdentification,
    CodeContentItem,
    ComprehensiveSR,
    ContainerContentItem,
    ContentItem,
    ContentSequence,
    DeviceObserverIdentifyingAttributes,
    FindingSite,
    LanguageOfContentItemAndDescendants,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    PlanarROIMeasurementsAndQualitativeEvaluations,
    QualitativeEvaluation,
    ReferencedSegmentationFrame,
    RelationshipTypeValues,
    SourceImageForMeasurement,
    SourceImageForMeasurementGroup,
    SourceImageForSegmentation,
    TextContentItem,
    TrackingIdentifier,
)
from highdicom.sr.templates import DEFAULT_LANGUAGE
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as std_codes

from ai.model_info import ModelInfo

from . import codes
from .identity import (
    NodeIdentity,
    as_highdicom_knows,
    contributing_equipment,
    institution_name,
    notices,
    series_description,
)
from .image_library import image_library, is_image
from .seg import SEGMENTS, segmenter_model
from .uids import model_versions, result_series_uid, result_uid

if TYPE_CHECKING:  # ai.analysis loads torch; building results needs only the record's data
    from ai.analysis import AnalysisRecord
    from ai.classifier import Classification

SERIES_NUMBER = 9102
SERIES_DESCRIPTION = "AI pneumoconiosis report (SR)"
NOT_ANALYSED_DESCRIPTION = "AI pneumoconiosis report: NOT ANALYSED (SR)"
NO_CLASSIFIER_NOTE = ("No pneumoconiosis classifier is installed: only the lung fields were measured. This image "
                      "has NOT been assessed for pneumoconiosis.")
UNNAMED_CLASSIFIER = ModelInfo(name="unnamed classifier", version="unknown")
"""Named for a classification whose record does not say which model made it (a record built by hand)."""


# --- pieces shared by both reports ------------------------------------------------------------------------------

def observation_context(node: NodeIdentity) -> ObservationContext:
    """The node is the observer, as a device (TID 1004): its AE title is the device name."""
    device = DeviceObserverIdentifyingAttributes(
        uid=node.device_uid, name=node.ae_title, manufacturer_name=node.manufacturer, model_name=node.model_name)
    return ObservationContext(observer_device_context=ObserverContext(std_codes.DCM.Device, device))


def source_image_reference(source: Dataset, item_class=SourceImageForMeasurementGroup):
    """An IMAGE reference to a single-frame source with neither Referenced Frame Number nor Referenced Segment
    Number (dciodvfy: both are only for multi-frame images and segmentations)."""
    return item_class(referenced_sop_class_uid=str(source.SOPClassUID),
                      referenced_sop_instance_uid=str(source.SOPInstanceUID))


ARITHMETIC = {"bf16": "bfloat16 (the answer lies far from every decision; float32 decides near one)",
              "fp32": "float32"}
"""What the classifier's numbers were computed in (ai/precision.py): the same weights give probabilities a few
thousandths apart in bfloat16, so a reader comparing two reports of one image can tell why."""


def algorithm_identification(model: ModelInfo, precision: str | None = None) -> AlgorithmIdentification:
    """TID 4019: name (DCM 111001), version (DCM 111003), and the model card, the training data and (for the
    classifier) the arithmetic of this answer as parameters."""
    arithmetic = ARITHMETIC.get(precision, precision) if precision else ""
    parameters = [f"{label}: {value}" for label, value in (("model card", model.card_id),
                                                           ("trained on", model.trained_on),
                                                           ("arithmetic", arithmetic)) if value]
    return AlgorithmIdentification(name=model.name, version=model.version, parameters=parameters or None)


def text(name, value: str, relationship=RelationshipTypeValues.CONTAINS) -> TextContentItem:
    return TextContentItem(name=name, value=value, relationship_type=relationship)


def qualitative_evaluations(items: Sequence[ContentItem]) -> ContainerContentItem:
    """TID 1500's "Qualitative Evaluations" container (UMLS C0034375): report-level CODE and TEXT statements."""
    container = ContainerContentItem(name=codes.QUALITATIVE_EVALUATIONS,
                                     relationship_type=RelationshipTypeValues.CONTAINS)
    container.ContentSequence = ContentSequence(list(items))
    return container


def notice_items(models: Sequence[ModelInfo]) -> list[TextContentItem]:
    return [text(codes.MODEL_NOTICE, notice) for notice in notices(models)]


def referenced_instances(content: Dataset) -> set[str]:
    """SOP Instance UIDs that the IMAGE and COMPOSITE items anywhere under ``content`` reference."""
    found: set[str] = set()
    pending = list(content.get("ContentSequence", []))
    while pending:
        item = pending.pop()
        if item.get("ValueType") in ("IMAGE", "COMPOSITE"):
            found.update(str(ref.ReferencedSOPInstanceUID) for ref in item.get("ReferencedSOPSequence", []))
        pending.extend(item.get("ContentSequence", []))
    return found


def document(content: Dataset, evidence: Sequence[Dataset], **attributes: Any) -> ComprehensiveSR:
    """highdicom's Comprehensive SR of ``content``, a root container whose tree was built here from highdicom's
    content items (so already checked by them), without the constructor's own pass over the whole tree: it deep
    copies the tree, parses the copy back into content items and searches it twice (for SCOORD3D items, which we
    never make, and for references, checked here instead), about 110 of an SR's 150 ms. The constructor gets the
    root's attributes alone; the tree is then set as it was built, and the document is the same."""
    evidence_uids = {str(e.SOPInstanceUID) for e in evidence}
    missing = referenced_instances(content) - evidence_uids
    if missing:
        raise ValueError(f"the report references {len(missing)} instance(s) that are not among its evidence")
    shell = Dataset()
    for element in content:
        if element.keyword != "ContentSequence":
            shell.add(element)
    shell.ContentSequence = []  # the constructor's searches need the attribute
    sr = ComprehensiveSR(evidence=list(evidence), content=shell, **attributes)
    sr.ContentSequence = content.ContentSequence
    return sr


def _sr(source: Dataset, evidence: Sequence[Dataset], content: Dataset, node: NodeIdentity, kind: str,
        models: Sequence[ModelInfo], description: str) -> ComprehensiveSR:
    versions = model_versions(models)
    uid = str(source.SOPInstanceUID)
    sr = document(
        content, evidence,
        series_instance_uid=result_series_uid(uid, kind, versions), series_number=SERIES_NUMBER,
        sop_instance_uid=result_uid(uid, kind, versions), instance_number=1,
        manufacturer=node.manufacturer, is_complete=True, is_final=False, is_verified=False,
        institution_name=institution_name(node, source),
        series_description=series_description(description, models),
        contributing_equipment=contributing_equipment(node, source, models),
    )
    sr.ManufacturerModelName = node.model_name
    sr.SoftwareVersions = node.software_version
    sr.CodingSchemeIdentificationSequence = codes.coding_scheme_identification()
    return sr


# --- the analysed report ----------------------------------------------------------------------------------------

def _tracking(source: Dataset, versions: str, name: str) -> TrackingIdentifier:
    return TrackingIdentifier(uid=result_uid(str(source.SOPInstanceUID), f"tracking {name}", versions),
                              identifier=name)


def _unitless(name, value: float, **kwargs) -> Measurement:
    return Measurement(name=name, value=round(float(value), 6), unit=codes.NO_UNITS, **kwargs)


def pneumoconiosis_group(source: Dataset, record: AnalysisRecord, c: Classification,
                         model: ModelInfo) -> MeasurementsAndQualitativeEvaluations:
    """TID 1501 on the whole radiograph: the decision, its probability and threshold, the ILO category with each
    category's probability, and the six zone scores with their finding sites."""
    measurements = [_unitless(codes.PROBABILITY, c.probability), _unitless(codes.THRESHOLD, c.threshold)]
    measurements += [_unitless(codes.CATEGORY_PROBABILITIES[k], p) for k, p in enumerate(c.category_probabilities)]
    for zone, (site, laterality) in codes.ZONE_SITES.items():
        measurements.append(_unitless(codes.ZONE_SCORE, c.zones[zone],
                                      finding_sites=[FindingSite(site, laterality=laterality)]))
    evaluations = [
        QualitativeEvaluation(codes.PNEUMOCONIOSIS, codes.PRESENT if c.present else codes.ABSENT),
        QualitativeEvaluation(codes.PROFUSION_CATEGORY, codes.CATEGORIES[c.most_likely_category]),
    ]
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(source, model_versions(record.models), "Pneumoconiosis"),
        finding_type=codes.PNEUMOCONIOSIS, algorithm_id=algorithm_identification(model, c.precision),
        finding_sites=[FindingSite(codes.LUNG)], measurements=measurements, qualitative_evaluations=evaluations,
        source_images=[source_image_reference(source)])


def segment_frame(seg: Dataset, segment_number: int) -> int:
    """The SEG frame that holds a segment (a BINARY SEG stores one frame per segment)."""
    for index, frame in enumerate(seg.PerFrameFunctionalGroupsSequence, start=1):
        if int(frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber) == segment_number:
            return index
    raise ValueError(f"segment {segment_number} has no frame in the SEG")


def segment_source(seg: Dataset, segment_number: int) -> SourceImageForMeasurement:
    """The area's "Source of Measurement": the SEG instance and the segment number, without a frame number (the
    image reference allows one or the other)."""
    item = SourceImageForMeasurement(referenced_sop_class_uid=str(seg.SOPClassUID),
                                     referenced_sop_instance_uid=str(seg.SOPInstanceUID))
    item.ReferencedSOPSequence[0].ReferencedSegmentNumber = segment_number
    return item


def lung_area_group(source: Dataset, record: AnalysisRecord, seg: Dataset, segment_number: int, side: str,
                    laterality) -> PlanarROIMeasurementsAndQualitativeEvaluations:
    """TID 1410 for one lung field: the region is the SEG frame that holds the segment, and the area (in mm² when
    the pixel spacing is known, else a pixel count, UCUM "{pixels}") names the segment it was counted on."""
    if record.lung_area_mm2 is not None:
        value, unit = record.lung_area_mm2[side], codes.SQUARE_MM
    elif record.lung_area_px is not None:
        value, unit = float(record.lung_area_px[side]), codes.PIXELS
    else:
        raise ValueError("an analysed record without lung areas")
    area = Measurement(name=codes.AREA, value=float(value), unit=unit,
                       referenced_images=[segment_source(seg, segment_number)])
    reference = ReferencedSegmentationFrame(
        sop_class_uid=str(seg.SOPClassUID), sop_instance_uid=str(seg.SOPInstanceUID),
        frame_number=segment_frame(seg, segment_number), segment_number=segment_number,
        source_image=source_image_reference(source, SourceImageForSegmentation))
    # highdicom 0.28.2 writes both Referenced Frame Number and Referenced Segment Number here; an SR image
    # reference may carry the segment number only without a frame number (dciodvfy error, dsrdump warning).
    # "Referenced Segmentation Frame" is about a frame, so the frame stays; the area's source names the segment.
    del reference[0].ReferencedSOPSequence[0].ReferencedSegmentNumber
    return PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(source, model_versions(record.models), f"{side.capitalize()} lung field"),
        referenced_segment=reference, finding_type=codes.LUNG,
        algorithm_id=algorithm_identification(segmenter_model(record)),
        finding_sites=[FindingSite(codes.LUNG, laterality=laterality)], measurements=[area])


def build_sr(source: Dataset, record: AnalysisRecord, node: NodeIdentity, seg: Dataset) -> ComprehensiveSR:
    groups: list[MeasurementsAndQualitativeEvaluations | PlanarROIMeasurementsAndQualitativeEvaluations] = []
    statements: list[ContentItem] = []
    c = record.classification
    if c is not None:
        groups.append(pneumoconiosis_group(source, record, c, record.classifier or UNNAMED_CLASSIFIER))
        summary = codes.ALL_SUCCEEDED_WITH_FINDINGS if c.present else codes.ALL_SUCCEEDED_WITHOUT_FINDINGS
        statements.append(CodeContentItem(name=codes.CAD_SUMMARY, value=summary,
                                          relationship_type=RelationshipTypeValues.CONTAINS))
    else:
        statements.append(text(codes.NODE_NOTE, NO_CLASSIFIER_NOTE))
    for number, _value, label, laterality, _colour in SEGMENTS:
        side = label.split()[0].lower()
        groups.append(lung_area_group(source, record, seg, number, side, laterality))
    statements += notice_items(record.models)
    report = MeasurementReport(observation_context=observation_context(node),
                               procedure_reported=codes.PLAIN_CHEST_XRAY, imaging_measurements=groups)
    content = report[0].ContentSequence
    content.insert(len(content) - 1, image_library(source))  # TID 1500 order: library before the measurements
    content.append(qualitative_evaluations(statements))
    return _sr(source, [source, seg], report[0], node, "sr", record.models, SERIES_DESCRIPTION)


# --- the "not analysed" report ----------------------------------------------------------------------------------

def build_not_analysed_sr(source: Dataset, reason: str, explanation: str, node: NodeIdentity,
                          models: Sequence[ModelInfo]) -> ComprehensiveSR:
    """TID 1500 without imaging measurements (allowed when a Qualitative Evaluations container is present): the
    image library names the source (when it is an image at all; the evidence sequence names it in any case), and
    the statements say that it was not analysed and why."""
    root = ContainerContentItem(name=std_codes.DCM.ImagingMeasurementReport, template_id="1500")
    content = ContentSequence()
    content.extend(LanguageOfContentItemAndDescendants(DEFAULT_LANGUAGE))
    content.extend(observation_context(node))
    content.append(CodeContentItem(name=std_codes.DCM.ProcedureReported, value=codes.PLAIN_CHEST_XRAY,
                                   relationship_type=RelationshipTypeValues.HAS_CONCEPT_MOD))
    if is_image(source):  # the library lists images only; a non-image source is still named in the evidence
        content.append(image_library(source))
    statements: list[ContentItem] = [
        CodeContentItem(name=codes.CAD_SUMMARY, value=codes.NONE_SUCCEEDED,
                        relationship_type=RelationshipTypeValues.CONTAINS),
        text(codes.NOT_ANALYSED_REASON, reason or "unknown"),
        text(codes.NOT_ANALYSED_EXPLANATION,
             f"Not analysed: {explanation or reason or 'no explanation recorded'}. This image has NOT been "
             f"assessed for pneumoconiosis."),
    ]
    statements += notice_items(models)
    content.append(qualitative_evaluations(statements))
    root.ContentSequence = content
    sr = _sr(source, [as_highdicom_knows(source)], root, node, "sr-not-analysed", models, NOT_ANALYSED_DESCRIPTION)
    for study in sr.get("CurrentRequestedProcedureEvidenceSequence", []):  # the real SOP class, whatever it is
        for series in study.ReferencedSeriesSequence:
            for instance in series.ReferencedSOPSequence:
                if instance.ReferencedSOPInstanceUID == source.SOPInstanceUID:
                    instance.ReferencedSOPClassUID = source.SOPClassUID
    return sr
