"""TID 1600 Image Library for one projection radiograph, built from what the header actually holds.

highdicom 0.28.2's ImageLibrary reads Patient Orientation and Imager Pixel Spacing of every CR/DX source
unconditionally (TID 1603) and fails on the many radiographs without them; here each descriptor is written only
when its attribute is present and meaningful (a CR's "0\\0" spacing is not).
"""

from __future__ import annotations

from highdicom.sr import (
    CodeContentItem,
    CodedConcept,
    ContainerContentItem,
    ContentItem,
    ContentSequence,
    ImageContentItem,
    NumContentItem,
    RelationshipTypeValues,
    TextContentItem,
)
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as std_codes

from ai import header_values

ACQ = RelationshipTypeValues.HAS_ACQ_CONTEXT
PIXELS = CodedConcept(value="{pixels}", scheme_designator="UCUM", meaning="Pixels")
MM = CodedConcept(value="mm", scheme_designator="UCUM", meaning="mm")
SOURCE = CodedConcept(value="260753009", scheme_designator="SCT", meaning="Source")


def coded_modality(source: Dataset) -> CodedConcept:
    from highdicom.sr.templates import _get_coded_modality  # the SOP class -> CID 29 table; no public form

    try:
        return CodedConcept.from_code(_get_coded_modality(str(source.SOPClassUID)))
    except ValueError:
        return CodedConcept.from_code(std_codes.cid32.Other)


def is_image(source: Dataset) -> bool:
    """Whether the source's SOP class is an image (a dose SR sent with the images is not)."""
    from highdicom._standard_utils import does_iod_have_pixel_data  # highdicom's SOP class -> IOD table

    try:
        return bool(does_iod_have_pixel_data(str(source.get("SOPClassUID", ""))))
    except (KeyError, ValueError):
        return False


def _spacing(source: Dataset) -> tuple[float, float] | None:
    """The spacing TID 1603 reports: Imager Pixel Spacing (at the detector), else Pixel Spacing; why this order,
    and why the analysis prefers the other: ``ai.header_values.pixel_spacing``."""
    return header_values.pixel_spacing(source, header_values.DETECTOR_SPACING)


def descriptors(source: Dataset) -> list[ContentItem]:
    """TID 1602/1603 descriptors: modality, matrix, and orientation / spacing where the header has them."""
    items: list[ContentItem] = [
        CodeContentItem(name=std_codes.DCM.Modality, value=coded_modality(source), relationship_type=ACQ)]
    if source.get("Rows") and source.get("Columns"):  # a header whose pixel data never arrived may lack them
        items += [NumContentItem(name=std_codes.DCM.PixelDataRows, value=int(source.Rows), unit=PIXELS,
                                 relationship_type=ACQ),
                  NumContentItem(name=std_codes.DCM.PixelDataColumns, value=int(source.Columns), unit=PIXELS,
                                 relationship_type=ACQ)]
    orientation = source.get("PatientOrientation")
    if orientation is not None and len(orientation) == 2 and all(str(v) for v in orientation):
        items += [TextContentItem(name=std_codes.DCM.PatientOrientationRow, value=str(orientation[0]),
                                  relationship_type=ACQ),
                  TextContentItem(name=std_codes.DCM.PatientOrientationColumn, value=str(orientation[1]),
                                  relationship_type=ACQ)]
    spacing = _spacing(source)
    if spacing is not None:
        items += [NumContentItem(name=std_codes.DCM.HorizontalPixelSpacing, value=spacing[1], unit=MM,
                                 relationship_type=ACQ),
                  NumContentItem(name=std_codes.DCM.VerticalPixelSpacing, value=spacing[0], unit=MM,
                                 relationship_type=ACQ)]
    return items


def image_library(source: Dataset) -> ContainerContentItem:
    """Image Library > Image Library Group > IMAGE (the source, no frame or segment numbers) with descriptors."""
    image = ImageContentItem(name=SOURCE, referenced_sop_class_uid=str(source.SOPClassUID),
                             referenced_sop_instance_uid=str(source.SOPInstanceUID),
                             relationship_type=RelationshipTypeValues.CONTAINS)
    image.ContentSequence = ContentSequence(descriptors(source))
    group = ContainerContentItem(name=std_codes.DCM.ImageLibraryGroup,
                                 relationship_type=RelationshipTypeValues.CONTAINS)
    group.ContentSequence = ContentSequence([image])
    library = ContainerContentItem(name=std_codes.DCM.ImageLibrary, relationship_type=RelationshipTypeValues.CONTAINS)
    library.ContentSequence = ContentSequence([group])
    return library
