"""docs/conformance.md against the code, so the two cannot drift apart: every SOP class and transfer syntax the
Storage SCP accepts is listed (and nothing it does not accept), the analysed classes are the header scope's, the SCU's
proposed contexts and the SOP classes of the objects the node really builds are listed, and so are the status codes,
the private codes, the implementation identity and the configuration keys of the DICOM interfaces."""

from __future__ import annotations

import re
import types

import numpy as np
import pytest
from pynetdicom import DEFAULT_TRANSFER_SYNTAXES
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from ai.header_scope import RADIOGRAPH_SOP_CLASSES
from ai.model_info import ModelInfo
from ai.normalise import NormalisedImage
from dicom_node import intake
from dicom_node.config import SCHEMA, load_config
from dicom_node.results import NodeIdentity, build_not_analysed, build_results, codes, derive_device_uid
from dicom_node.scp import TRANSFER_SYNTAXES, UNHANDLED_STATUS, build_ae
from dicom_node.store_scu import WARNING_STATUSES, StoreItem, requested_contexts

from .dicomgen import synthetic_dx
from .support.data import CONFIG, REPO

DOC = REPO / "docs" / "conformance.md"
UID_TOKEN = re.compile(r"\d+(?:\.\d+)+")  # greedy: a UID never ends with a dot, so each token is one whole UID
SOP_ROW = re.compile(r"^\| \d+ \| [^|]+ \| ([0-9.]+) \| (\*\*yes\*\*|no) \|$", re.MULTILINE)
TRANSFER_SYNTAX_ROOT = "1.2.840.10008.1.2"


def section(text: str, start: str, end: str) -> str:
    """The text from the heading line ``start`` up to the heading line ``end`` (each must occur once)."""
    begin = text.index("\n" + start + "\n")
    return text[begin:text.index("\n" + end + "\n", begin)]


def uids_in(text: str) -> set[str]:
    return set(UID_TOKEN.findall(text))


def transfer_syntaxes_in(text: str) -> set[str]:
    return {u for u in uids_in(text) if u == TRANSFER_SYNTAX_ROOT or u.startswith(TRANSFER_SYNTAX_ROOT + ".")}


@pytest.fixture(scope="module")
def doc() -> str:
    return DOC.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def scp_section(doc) -> str:
    return section(doc, "#### 4.2.1 Storage SCP AE", "#### 4.2.2 Result Storage SCU AE")


@pytest.fixture(scope="module")
def scu_section(doc) -> str:
    return section(doc, "#### 4.2.2 Result Storage SCU AE", "### 4.3 Network Interfaces")


@pytest.fixture(scope="module")
def ae():
    """The Storage SCP's AE exactly as ``serve`` builds it from the shipped configuration."""
    return build_ae(load_config(CONFIG, environ={}))


@pytest.fixture(scope="module")
def results():
    """The objects the node builds for an analysed image and for a refused one: a small synthetic DX and a record
    with two lung fields, no classifier (the SOP classes and transfer syntaxes do not depend on it)."""
    source = synthetic_dx(48, 48)
    labels = np.zeros((48, 48), np.uint8)
    labels[6:42, 4:22], labels[6:42, 26:44] = 1, 2
    segmenter = ModelInfo(name="lung-field-unet", version="conformance-test")
    record = types.SimpleNamespace(
        in_scope=True, reason="in_scope", explanation="", labels=labels, segmenter=segmenter, classifier=None,
        classification=None, models=[segmenter], pixel_spacing_mm=None, lung_area_mm2=None,
        lung_area_px={"right": int((labels == 1).sum()), "left": int((labels == 2).sum())},
        image=NormalisedImage(pixels=np.zeros((48, 48), np.float32), pixel_spacing_mm=None, kind="dicom"))
    node = NodeIdentity(ae_title="PNEUMOCAD", device_uid=derive_device_uid("PNEUMOCAD"))
    analysed = build_results(source, record, node)
    refused = build_not_analysed(source, "body_part_not_chest", "Body Part Examined is KNEE", node, [segmenter])
    assert sorted(r.kind for r in analysed) == ["sc", "seg", "sr"] and [r.kind for r in refused] == ["sr"]
    return analysed + refused


def test_every_context_the_scp_accepts_is_listed(ae, doc, scp_section):
    listed = uids_in(scp_section)
    contexts = ae.supported_contexts
    assert Verification in {cx.abstract_syntax for cx in contexts}
    for cx in contexts:
        assert str(cx.abstract_syntax) in listed, f"SOP class {cx.abstract_syntax} accepted but not listed"
        for syntax in cx.transfer_syntax:
            assert str(syntax) in listed, f"transfer syntax {syntax} accepted but not listed"
    assert f"The {len(contexts) - 1} Storage SOP classes" in doc  # the overview's count


def test_the_scp_section_lists_nothing_the_scp_does_not_accept(ae, scp_section):
    contexts = ae.supported_contexts
    storage = {str(cx.abstract_syntax) for cx in contexts} - {str(Verification)}
    rows = SOP_ROW.findall(scp_section)
    assert len(rows) == len({uid for uid, _ in rows}), "a SOP class is listed twice"
    assert {uid for uid, _ in rows} == storage
    accepted = {str(ts) for cx in contexts for ts in cx.transfer_syntax}
    assert accepted == set(TRANSFER_SYNTAXES)
    assert transfer_syntaxes_in(scp_section) == accepted, "a transfer syntax listed for the SCP is not accepted"


def test_the_analysed_marks_are_the_header_scope_classes(scp_section):
    marked = {uid for uid, mark in SOP_ROW.findall(scp_section) if mark == "**yes**"}
    assert marked == set(RADIOGRAPH_SOP_CLASSES)


def test_the_created_objects_and_the_contexts_the_scu_proposes_for_them_are_listed(results, doc, scu_section):
    annex = section(doc, "### 8.1 IOD Contents", "### 8.2 Data Dictionary of Private Attributes")
    items = [StoreItem(REPO / "unused.dcm", str(r.dataset.SOPClassUID), str(r.dataset.file_meta.TransferSyntaxUID))
             for r in results]
    for item in items:
        assert item.sop_class_uid in uids_in(annex), f"created SOP class {item.sop_class_uid} not in Annex 8.1"
        assert item.transfer_syntax_uid in uids_in(annex)
    contexts = requested_contexts(items)
    assert {str(cx.abstract_syntax) for cx in contexts} == {i.sop_class_uid for i in items}
    for sop_class in {str(cx.abstract_syntax) for cx in contexts}:  # one row per context, in the proposed order
        rows = [line for line in scu_section.splitlines()
                if line.startswith("| ") and "| SCU | None |" in line and sop_class in UID_TOKEN.findall(line)]
        listed = [[u for u in UID_TOKEN.findall(row) if u.startswith(TRANSFER_SYNTAX_ROOT)] for row in rows]
        proposed = [[str(ts) for ts in cx.transfer_syntax] for cx in contexts if cx.abstract_syntax == sop_class]
        assert listed == proposed, f"proposed contexts for {sop_class}: {proposed}, listed {listed}"


def test_the_destination_test_proposes_what_the_scu_section_lists(scu_section):
    """The console's C-ECHO (``dicom_node.console.echo``) adds Verification with pynetdicom's default syntaxes."""
    row = next(line for line in scu_section.splitlines() if line.startswith(f"| Verification {Verification} |"))
    assert [u for u in UID_TOKEN.findall(row) if u.startswith(TRANSFER_SYNTAX_ROOT)] == \
        [str(ts) for ts in DEFAULT_TRANSFER_SYNTAXES]


def test_every_status_code_is_explained(scp_section, scu_section):
    statuses = {value for name, value in vars(intake).items() if name.isupper() and isinstance(value, int)
                and (value == 0 or 0xA000 <= value <= 0xCFFF)}  # the Intake outcomes' C-STORE statuses
    assert {0x0000, 0xA700, 0xC001} <= statuses
    for status in statuses | {UNHANDLED_STATUS}:
        assert f"| 0x{status:04X} |" in scp_section, f"SCP status 0x{status:04X} not in Table 4.2-5"
    for status in WARNING_STATUSES:
        assert f"0x{status:04X}" in scu_section


def test_the_private_coding_scheme_is_documented(doc):
    private = section(doc, "#### 8.3.3 Private Coding Scheme `99PNEUMOILO`", "### 8.4 Grayscale Image Consistency")
    for text in (codes.PRIVATE_SCHEME, codes.PRIVATE_SCHEME_NAME, codes.PRIVATE_SCHEME_ORGANIZATION):
        assert text in private
    assert f"| Coding Scheme Version | {codes.PRIVATE_SCHEME_VERSION} |" in private
    ours = [c for c in vars(codes).values() if getattr(c, "scheme_designator", None) == codes.PRIVATE_SCHEME]
    ours += [c for group in (codes.CATEGORIES, codes.CATEGORY_PROBABILITIES) for c in group]
    for code in ours:
        assert f"| `{code.value}` | {code.meaning} |" in private, code


def test_implementation_identity_and_dicom_configuration_keys_are_listed(ae, doc):
    assert f"| {ae.implementation_class_uid} |" in doc and f"| {ae.implementation_version_name} |" in doc
    configuration = section(doc, "### 4.4 Configuration", "## 5 Media Interchange")
    for key in SCHEMA:
        if key.split(".")[0] in ("network", "tls", "export"):
            assert f"`{key}`" in configuration, f"{key} missing from Section 4.4"
    assert SCHEMA["network.ae_title"].default == "PNEUMOCAD" and SCHEMA["network.port"].default == 11112
