"""Every coded concept the result objects use, in one place, so the SR, the SEG and docs/results.md agree.

Standard codes come first (SNOMED CT, DCM, UCUM). DICOM and SNOMED CT have no codes for the ILO profusion
categories, for per-category probabilities or for a zone's heat score, so those live in a private coding scheme
that every SR declares in its Coding Scheme Identification Sequence (0008,0110).
"""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.sr.coding import Code


def _code(value: str, scheme: str, meaning: str) -> Code:
    """An immutable pydicom Code: highdicom turns each use into its own CodedConcept dataset. (A shared
    CodedConcept is a mutable Dataset; a modifier added to one use would appear in every other.)"""
    return Code(value=value, scheme_designator=scheme, meaning=meaning)


# --- SNOMED CT -------------------------------------------------------------------------------------------------
ANATOMICAL_STRUCTURE = _code("91723000", "SCT", "Anatomical Structure")
LUNG = _code("39607008", "SCT", "Lung")
RIGHT = _code("24028007", "SCT", "Right")
LEFT = _code("7771000", "SCT", "Left")
UPPER_ZONE = _code("281392002", "SCT", "Upper zone of lung")
MIDDLE_ZONE = _code("281393007", "SCT", "Middle zone of lung")
LOWER_ZONE = _code("281394001", "SCT", "Lower zone of lung")
PNEUMOCONIOSIS = _code("40122008", "SCT", "Pneumoconiosis")
PRESENT = _code("52101004", "SCT", "Present")
ABSENT = _code("2667000", "SCT", "Absent")
AREA = _code("42798000", "SCT", "Area")
PLAIN_CHEST_XRAY = _code("399208008", "SCT", "Plain chest X-ray")

# --- DICOM (DCM) -----------------------------------------------------------------------------------------------
PROBABILITY = _code("122157", "DCM", "Probability")
THRESHOLD = _code("122411", "DCM", "Threshold Value")
CAD_SUMMARY = _code("111017", "DCM", "CAD Processing and Findings Summary")
ALL_SUCCEEDED_WITH_FINDINGS = _code("111242", "DCM", "All algorithms succeeded; with findings")
ALL_SUCCEEDED_WITHOUT_FINDINGS = _code("111241", "DCM", "All algorithms succeeded; without findings")
NONE_SUCCEEDED = _code("111245", "DCM", "No algorithms succeeded; without findings")
PROCESSING_EQUIPMENT = _code("109102", "DCM", "Processing Equipment")

# --- UMLS: TID 1500's "Qualitative Evaluations" container (the standard's own choice of scheme) ----------------
QUALITATIVE_EVALUATIONS = _code("C0034375", "UMLS", "Qualitative Evaluations")

# --- UCUM ------------------------------------------------------------------------------------------------------
NO_UNITS = _code("1", "UCUM", "no units")
SQUARE_MM = _code("mm2", "UCUM", "square millimeter")
PIXELS = _code("{pixels}", "UCUM", "pixels")

# --- private scheme --------------------------------------------------------------------------------------------
PRIVATE_SCHEME = "99PNEUMOILO"
PRIVATE_SCHEME_NAME = "Pneumo CAD node: ILO profusion and CAD result concepts"
PRIVATE_SCHEME_ORGANIZATION = "Pneumo CAD node project"
PRIVATE_SCHEME_VERSION = "1"

PROFUSION_CATEGORY = _code("PROFUSION", PRIVATE_SCHEME, "ILO major profusion category")
CATEGORIES = tuple(_code(str(k), PRIVATE_SCHEME, f"ILO major profusion category {k}") for k in range(4))
CATEGORY_PROBABILITIES = tuple(_code(f"P{k}", PRIVATE_SCHEME, f"Probability of ILO major profusion category {k}")
                               for k in range(4))
ZONE_SCORE = _code("ZONESCORE", PRIVATE_SCHEME, "Mean heat map value in lung zone")
MODEL_NOTICE = _code("NOTICE", PRIVATE_SCHEME, "Model notice")
NODE_NOTE = _code("NOTE", PRIVATE_SCHEME, "CAD node note")
NOT_ANALYSED_REASON = _code("REASON", PRIVATE_SCHEME, "Reason not analysed")
NOT_ANALYSED_EXPLANATION = _code("EXPLANATION", PRIVATE_SCHEME, "Why not analysed")
# a reading station's verdict on one of our SRs (imported as a label by dicom_node.labels_sr; docs/labels.md)
REVIEW = _code("REVIEW", PRIVATE_SCHEME, "CAD result review")
ACCEPTED = _code("ACCEPTED", PRIVATE_SCHEME, "CAD result accepted")
REJECTED = _code("REJECTED", PRIVATE_SCHEME, "CAD result rejected")

ZONE_SITES = {  # classifier zone key -> (zone of lung, laterality)
    "right_upper": (UPPER_ZONE, RIGHT), "right_middle": (MIDDLE_ZONE, RIGHT), "right_lower": (LOWER_ZONE, RIGHT),
    "left_upper": (UPPER_ZONE, LEFT), "left_middle": (MIDDLE_ZONE, LEFT), "left_lower": (LOWER_ZONE, LEFT),
}


def coding_scheme_identification() -> list[Dataset]:
    """Items of (0008,0110): the private scheme must be declared; the standard ones are named for readers."""
    private = Dataset()
    private.CodingSchemeDesignator = PRIVATE_SCHEME
    private.CodingSchemeName = PRIVATE_SCHEME_NAME
    private.CodingSchemeVersion = PRIVATE_SCHEME_VERSION
    private.CodingSchemeResponsibleOrganization = PRIVATE_SCHEME_ORGANIZATION
    return [private]
