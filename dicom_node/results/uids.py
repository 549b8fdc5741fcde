"""Deterministic UIDs: re-analysing the same instance with the same models gives the same result UIDs.

A receiving PACS then replaces (or ignores as a duplicate) a re-sent result instead of piling up copies, while a
new model version gives new UIDs, so results of different models never overwrite each other. All UIDs hang off
pydicom's registered root (1.2.826.0.1.3680043.8.498.), hashed from their sources.
"""

from __future__ import annotations

from collections.abc import Iterable

from pydicom.uid import PYDICOM_ROOT_UID, generate_uid

from ai.model_info import ModelInfo


def model_versions(models: Iterable[ModelInfo]) -> str:
    """The models' names and versions as one string ("lung-field-unet 1.0.0; classifier 0.1.0"), in run order."""
    return "; ".join(f"{m.name} {m.version}" for m in models) or "no models"


def _uid(*parts: str) -> str:
    return generate_uid(prefix=PYDICOM_ROOT_UID, entropy_srcs=list(parts))


def result_uid(source_sop_instance_uid: str, kind: str, model_versions: str) -> str:
    """SOP Instance UID of one result object."""
    return _uid(str(source_sop_instance_uid), kind, model_versions)


def result_series_uid(source_sop_instance_uid: str, kind: str, model_versions: str) -> str:
    """Series Instance UID of one result object: its own series per source instance, kind and model versions."""
    return _uid(str(source_sop_instance_uid), kind, model_versions, "series")


def derive_device_uid(ae_title: str) -> str:
    """A stable Device UID for a node that has none configured: the same AE title always gives the same UID."""
    return _uid("pneumo-cad-node device", ae_title.strip())
