"""Header-level scope verdict: is this instance something the chest CAD should analyse? (No pixel decoding.)

Out-of-scope instances are still stored and acknowledged (a modality must not keep retrying them); their job goes
straight to "not analysed" with the reason code below. Image-based checks (two plausible lung fields) belong to
the analysis, not to the intake.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.dataset import Dataset

from . import header_values

CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
DX_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"

RADIOGRAPH_SOP_CLASSES = (CR_IMAGE, DX_FOR_PRESENTATION, DX_FOR_PROCESSING, SECONDARY_CAPTURE)
"""The SOP classes the chest CAD analyses. Other storage SOP classes (a dose SR sent with the images, say) are
stored and acknowledged but never analysed, so that a modality does not retry them forever."""

CHEST_BODY_PARTS = {"", "CHEST", "THORAX"}
FRONTAL_VIEWS = {"", "PA", "AP"}
MONOCHROME = {"MONOCHROME1", "MONOCHROME2"}

IN_SCOPE = "in_scope"
REASONS = {
    IN_SCOPE: "frontal chest radiograph by its header",
    "sop_class_not_radiograph": "SOP class is not CR, DX or secondary capture",
    "body_part_not_chest": "Body Part Examined is neither CHEST nor THORAX",
    "view_not_frontal": "View Position is neither PA nor AP",
    "not_original_image": "Image Type is neither ORIGINAL nor DERIVED\\PRIMARY",
    "multi_frame": "more than one frame",
    "no_pixel_data": "no Pixel Data",
    "not_monochrome": "Photometric Interpretation is not MONOCHROME1/2",
}


@dataclass(frozen=True)
class ScopeVerdict:
    in_scope: bool
    reason: str

    @property
    def explanation(self) -> str:
        return REASONS[self.reason]


def _is_original_acquisition(image_type: list[str]) -> bool:
    """ORIGINAL, or DERIVED\\PRIMARY: CR/DX readers routinely mark their processed output of a primary
    acquisition DERIVED (the Philips chest CR in our samples does); only SECONDARY images (screenshots, reformats,
    annotated copies) are not the radiograph itself. An absent Image Type is given the benefit of the doubt.

    ``image_type`` is read leniently (``header_values.strings``): ``ORIGINAL PRIMARY`` written as one value with a
    space is ORIGINAL\\PRIMARY."""
    if not image_type or not image_type[0]:
        return True
    if image_type[0] == "ORIGINAL":
        return True
    return image_type[0] == "DERIVED" and len(image_type) > 1 and image_type[1] == "PRIMARY"


def header_scope(ds: Dataset) -> ScopeVerdict:
    """Judge the header; ``ds`` may be read with deferred pixel data (only the presence of Pixel Data matters).

    Values are read leniently (``ai.header_values``): odd case and padding (``chest``, `` PA ``), spaces for
    backslashes, and values pydicom cannot convert (treated as absent) never raise."""
    sop_class = header_values.uid(ds, "SOPClassUID")
    if sop_class not in RADIOGRAPH_SOP_CLASSES:
        return ScopeVerdict(False, "sop_class_not_radiograph")
    if "PixelData" not in ds:
        return ScopeVerdict(False, "no_pixel_data")
    if header_values.text(ds, "BodyPartExamined") not in CHEST_BODY_PARTS:
        return ScopeVerdict(False, "body_part_not_chest")
    if header_values.text(ds, "ViewPosition") not in FRONTAL_VIEWS:
        return ScopeVerdict(False, "view_not_frontal")
    if not _is_original_acquisition(header_values.strings(ds, "ImageType", split_spaces=True)):
        return ScopeVerdict(False, "not_original_image")
    frames = header_values.integer(ds, "NumberOfFrames")  # malformed: treated as absent (one frame)
    if frames is not None and frames > 1:
        return ScopeVerdict(False, "multi_frame")
    if header_values.text(ds, "PhotometricInterpretation") not in MONOCHROME:
        return ScopeVerdict(False, "not_monochrome")
    return ScopeVerdict(True, IN_SCOPE)
