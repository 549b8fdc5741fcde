"""Where things lie: the repository, its config file and the public sample data (one definition of each).

The data live beside the checkout (``../shared/data``) or wherever $PNEUMO_DATA_DIR points.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "config.toml"
DATA_DIR = Path(os.environ.get("PNEUMO_DATA_DIR", REPO.parent / "shared" / "data")).resolve()
SAMPLES = DATA_DIR / "dicom-samples"
CHEST_DIR = SAMPLES / "chest"
NOT_CHEST_DIR = SAMPLES / "not-chest"
REFERENCE_OUTPUTS = SAMPLES / "reference-outputs"

# Named samples (the chest samples share one SOP Instance UID: clone them where that matters).
CHEST_UNCOMPRESSED = CHEST_DIR / "RG1_UNCR.dcm"  # the cheapest chest to decode
CHEST_J2K_LOSSLESS = CHEST_DIR / "RG1_J2KR.dcm"
CHEST_J2K_LOSSY = CHEST_DIR / "RG1_J2KI.dcm"  # the smaller Philips J2K: 0.15 s to decode
CHEST_JPEG_LS = CHEST_DIR / "RG1_JLSN_Philips_CR_chest_JPEGLS_near_lossless.dcm"
HAND = NOT_CHEST_DIR / "Kodak_CR500_hand_J2KR.dcm"
NOT_CHEST_TINY = NOT_CHEST_DIR / "CR1_6154_Agfa_16x16.dcm"  # 16 x 16 pixels


def sample_files(*subdirs: str) -> list[Path]:
    """Every ``*.dcm`` under the named sample folders (fails, naming the setting, when there are none)."""
    files = sorted(p for d in subdirs for p in (SAMPLES / d).glob("*.dcm"))
    if not files:
        pytest.fail(f"no DICOM samples under {SAMPLES}: set PNEUMO_DATA_DIR to the shared data folder")
    return files
