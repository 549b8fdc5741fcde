"""Model directories with and without the pneumoconiosis classifier, and how to install one for a test.

Tests that depend on the classifier say which installation they need (the ``with_classifier`` and
``without_classifier`` fixtures in ``tests/conftest.py``) instead of adapting to whatever is installed.

A node finds a site's models through the config key ``models.directory``; each file there takes precedence over
the bundled one in ``ai/models/``, and a file missing there is taken from the bundled folder. ``install_models``
therefore also points this process's bundled folder at the directory: in this process the installation is exact (a
directory without a classifier means no classifier).
A node or CLI subprocess gets the directory through the config key's environment variable, but still falls back to
the bundled classifier: only ``with_classifier`` describes a subprocess exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .data import REPO

BUNDLED_MODELS = REPO / "ai" / "models"
SEGMENTER_FILES = ("lung_unet.pt", "lung_unet.md")
CLASSIFIER_FILES = ("classifier.pt", "classifier.md")
MODEL_DIR_KEY = "models.directory"


@dataclass(frozen=True)
class InstalledModels:
    directory: Path
    classifier: bool  # whether a pneumoconiosis classifier is installed
    overrides: dict[str, str] = field(default_factory=dict)  # node ``--set`` values that select ``directory``

    def node_settings(self) -> dict[str, str]:
        """``overrides`` in the ``node_factory(**settings)`` spelling (``__`` for ``.``)."""
        return {key.replace(".", "__"): value for key, value in self.overrides.items()}


def model_dir(root: Path, classifier: bool) -> Path:
    """A model directory holding the bundled lung segmenter and, if ``classifier``, the bundled classifier
    (links, not copies)."""
    root.mkdir(parents=True, exist_ok=True)
    for name in SEGMENTER_FILES + (CLASSIFIER_FILES if classifier else ()):
        link = root / name
        if not link.exists():
            link.symlink_to(BUNDLED_MODELS / name)
    return root


def install_models(monkeypatch: pytest.MonkeyPatch, directory: Path) -> dict[str, str]:
    """Make ``directory`` the installed models for the rest of the test; returns the node ``--set`` values that
    select it."""
    import ai.models
    from dicom_node.config import ENV_PREFIX

    overrides = {MODEL_DIR_KEY: str(directory)}
    monkeypatch.setenv(ENV_PREFIX + MODEL_DIR_KEY.replace(".", "_").upper(), str(directory))
    # A file missing from a site's model directory falls back to the bundled one, and the in-process analyses of a
    # test name no directory at all: the bundled folder of this process is ``directory`` too.
    monkeypatch.setattr(ai.models, "BUNDLED_DIR", directory)
    return overrides


def installed_classifier():  # type: ignore[no-untyped-def]
    """The classifier the code finds now (None: none installed)."""
    from ai.models import pneumoconiosis_classifier

    return pneumoconiosis_classifier()
