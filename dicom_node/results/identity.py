"""The node as a device: who made each result object (equipment, contributing equipment, SR observer).

Every object carries a Contributing Equipment item with purpose "Processing Equipment" (DCM 109102), the
node's Device UID and a description naming the models and any model notice, so the provenance survives even when
a viewer shows nothing but the header.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from highdicom import ContributingEquipment
from pydicom.dataset import Dataset

import dicom_node
from ai.model_info import ModelInfo

from . import codes
from .uids import derive_device_uid, model_versions

if TYPE_CHECKING:
    from ..config import NodeConfig


@dataclass(frozen=True)
class NodeIdentity:
    """The node as a device (observer context, equipment, contributing equipment) and how it writes its pictures."""

    ae_title: str
    device_uid: str  # config results.device_uid; when empty the caller uses derive_device_uid(ae_title)
    manufacturer: str = "Pneumo CAD node project"
    model_name: str = "pneumo-cad-node"
    software_version: str = dicom_node.__version__
    institution_name: str = ""  # empty = copy the source's InstitutionName if any
    sc_compression: str = "jpeg"  # config results.sc_compression: "jpeg" (lossy JPEG Baseline) or "none"

    @classmethod
    def from_config(cls, config: NodeConfig) -> NodeIdentity:
        """The node as ``network.ae_title``, ``results.device_uid`` (derived from the AE title when empty),
        ``results.institution_name`` and ``results.sc_compression`` describe it."""
        ae_title = config.network.ae_title
        return cls(ae_title=ae_title, device_uid=config.results.device_uid or derive_device_uid(ae_title),
                   institution_name=config.results.institution_name,
                   sc_compression=config.results.sc_compression)


def as_highdicom_knows(source: Dataset) -> Dataset:
    """The source as highdicom can copy patient and study from it. highdicom finds those modules through the
    source's SOP class and raises KeyError for one it does not know (a private SOP class); such a source is shown
    to it as a header-only Secondary Capture, whose Patient and Study modules are the standard ones."""
    from highdicom._standard_utils import get_sop_class_iod_map  # the table highdicom itself uses

    if str(source.get("SOPClassUID", "")) in get_sop_class_iod_map():
        return source
    header = Dataset()
    for element in source:
        if element.tag.group != 0x7FE0:
            header.add(element)
    header.add_new(0x00080016, "UI", "1.2.840.10008.5.1.4.1.1.7")  # a new element: the source's stays as it is
    return header


def institution_name(node: NodeIdentity, source: Dataset) -> str | None:
    return node.institution_name or str(source.get("InstitutionName", "")) or None


def notices(models: Sequence[ModelInfo]) -> list[str]:
    """The models' notices (e.g. "DEMO model ... not for clinical use."), each once, in model order."""
    seen: list[str] = []
    for m in models:
        text = m.notice.strip()
        if text and text not in seen:
            seen.append(text)
    return seen


def is_demo(models: Sequence[ModelInfo]) -> bool:
    return bool(notices(models))


def contribution_description(models: Sequence[ModelInfo]) -> str:
    """Short Text (1024 characters at most): which models made the object, and their notices verbatim."""
    text = f"Automated analysis by {model_versions(models)}."
    for notice in notices(models):
        text += f" {notice}"
    return text[:1024]


def contributing_equipment(node: NodeIdentity, source: Dataset,
                           models: Sequence[ModelInfo]) -> list[ContributingEquipment]:
    item = ContributingEquipment(
        manufacturer=node.manufacturer,
        purpose_of_reference=codes.PROCESSING_EQUIPMENT,
        manufacturer_model_name=node.model_name,
        software_versions=node.software_version,
        institution_name=institution_name(node, source),
        station_name=node.ae_title[:16] or None,
        contribution_description=contribution_description(models),
    )
    item.DeviceUID = node.device_uid
    return [item]


def series_description(base: str, models: Sequence[ModelInfo]) -> str:
    """Series Description (LO, 64 characters): prefixed with DEMO when any model carries a notice."""
    return (f"DEMO {base}" if is_demo(models) else base)[:64]


def is_own_result(source: Dataset, node: NodeIdentity) -> bool:
    """Whether ``source`` is a result object of ``node`` (e.g. its heat-map SC routed back by a PACS rule): a
    Contributing Equipment item with the node's Device UID, or with its manufacturer and model name. Such an object
    must never get a "not analysed" SR, nor any other report about itself."""
    for item in source.get("ContributingEquipmentSequence", []):
        if item.get("DeviceUID") == node.device_uid or (
                item.get("Manufacturer") == node.manufacturer
                and item.get("ManufacturerModelName") == node.model_name):
            return True
    return False
