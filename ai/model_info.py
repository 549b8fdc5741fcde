"""What a result says about the model that made it: ``ModelInfo``, read once from the model file.

Kept free of torch (and of every other module of the project) so that the result builders and the worker can name
models without loading them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelInfo:
    """One installed model, as results and the ``dicom-node analyse --json`` line name it."""

    name: str
    version: str
    card_id: str = ""  # which model card describes the weights: "classifier.md (weights sha256 c3629e73ca156e28)"
    notice: str = ""  # a sentence every result of this model must carry verbatim (demo models); "" = none
    threshold: float | None = None  # the classifier's decision threshold; None for the segmenter
    input_size: int | None = None  # side of the square model input, in pixels
    sha256: str = ""  # hex digest of the weights file
    trained_on: str = ""  # what the training data were, for the results' algorithm parameters; "" = not stated

    def to_json(self) -> dict[str, str]:
        """The model's entry of the ``models`` list of ``dicom-node analyse --json``: name, version, model_card,
        and trained_on and notice when the model file states them."""
        entry = {"name": self.name, "version": self.version, "model_card": self.card_id}
        if self.trained_on:
            entry["trained_on"] = self.trained_on
        if self.notice:
            entry["notice"] = self.notice
        return entry
