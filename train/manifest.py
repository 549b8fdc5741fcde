"""The retraining manifest the node writes for ``python -m train.retrain``: read, checked key by key, and copied
without the image paths.

Every error names the key at fault (``training[3].present: must be 0 or 1``), never a value, so the one-line error
the node stores for a failed run cannot carry patient data. Keys of ``settings`` this program does not use (the
node's own, e.g. ``nice``) are kept in the copy and otherwise ignored.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

from ai.safe_text import SafeMessage

ITEM_KEYS = ("instance_id", "path", "patient_key", "present", "category", "label_source", "read_date")
CHAMPION_KEYS = ("id", "name", "version", "path")
TOP_KEYS = ("run_id", "name", "version", "site", "segmenter", "champion", "settings", "training", "holdout",
            "labels_note")
SETTING_DEFAULTS: dict[str, Any] = {"patience": 10, "lr": 1e-4, "imagenet_weights": None, "threshold_rule": "youden"}
REQUIRED_SETTINGS = ("folds", "epochs", "size", "batch_size", "seed", "threads", "device", "alpha",
                     "min_sensitivity", "min_specificity")


class ManifestError(SafeMessage, ValueError):
    """The manifest cannot be used; the message names the key (written from constants, never from values)."""


@dataclass(frozen=True)
class ManifestItem:
    instance_id: int
    path: Path
    patient_key: str
    present: int  # 0 or 1
    category: int  # ILO major category 0-3, -1 unknown
    label_source: str
    read_date: str | None


@dataclass(frozen=True)
class Champion:
    id: int
    name: str
    version: str
    path: Path


@dataclass(frozen=True)
class Settings:
    folds: int
    epochs: int
    size: int
    batch_size: int
    seed: int
    threads: int
    device: str
    imagenet_weights: Path | None
    threshold_rule: str
    alpha: float
    min_sensitivity: float
    min_specificity: float
    patience: int
    lr: float


@dataclass(frozen=True)
class Manifest:
    run_id: int
    name: str
    version: str
    site: str
    segmenter: Path
    champion: Champion | None
    settings: Settings
    training: tuple[ManifestItem, ...]
    holdout: tuple[ManifestItem, ...]
    labels_note: str
    raw_settings: dict[str, Any]  # as given, with the defaults filled in (for the copy)

    def public_copy(self) -> dict[str, Any]:
        """The manifest as the run's artifacts may hold it: images by instance id and patient key, no paths."""
        def item(i: ManifestItem) -> dict[str, Any]:
            return {"instance_id": i.instance_id, "patient_key": i.patient_key, "present": i.present,
                    "category": i.category, "label_source": i.label_source, "read_date": i.read_date}

        champion = None if self.champion is None else {"id": self.champion.id, "name": self.champion.name,
                                                       "version": self.champion.version}
        return {"run_id": self.run_id, "name": self.name, "version": self.version, "site": self.site,
                "champion": champion, "settings": self.raw_settings, "labels_note": self.labels_note,
                "training": [item(i) for i in self.training], "holdout": [item(i) for i in self.holdout]}


def _int(value: Any, key: str, low: int | None = None, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ManifestError(f"{key}: must be an integer")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"{low} to {high}" if high is not None else f"at least {low}"
        raise ManifestError(f"{key}: must be {bounds}")
    return value


def _float(value: Any, key: str, low: float, high: float, open_ends: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ManifestError(f"{key}: must be a number")
    inside = low < value < high if open_ends else low <= value <= high
    if not inside:
        left, right = ("(", ")") if open_ends else ("[", "]")
        raise ManifestError(f"{key}: must lie in {left}{low:g}, {high:g}{right}")
    return float(value)


def _str(value: Any, key: str, empty: bool = False) -> str:
    if not isinstance(value, str) or (not empty and not value.strip()):
        raise ManifestError(f"{key}: must be a {'' if empty else 'non-empty '}string")
    return value


def _path(value: Any, key: str, must_exist: bool = True) -> Path:
    path = Path(_str(value, key))
    if not path.is_absolute():
        raise ManifestError(f"{key}: must be an absolute path")
    if must_exist and not path.is_file():
        raise ManifestError(f"{key}: no such file")
    return path


def _keys(obj: Any, key: str, allowed: tuple[str, ...], required: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise ManifestError(f"{key}: must be an object")
    unknown = sorted(set(obj) - set(allowed))
    if unknown:
        raise ManifestError(f"{key}: unknown key(s) {', '.join(map(repr, unknown))}")
    missing = [k for k in required if k not in obj]
    if missing:
        raise ManifestError(f"{key}: missing key(s) {', '.join(missing)}")
    return obj


def _item(obj: Any, key: str) -> ManifestItem:
    obj = _keys(obj, key, ITEM_KEYS, ITEM_KEYS[:5])
    present = _int(obj["present"], f"{key}.present", 0, 1)
    category = _int(obj["category"], f"{key}.category", -1, 3)
    if present == 0 and category >= 1:
        raise ManifestError(f"{key}: present 0 with category 1 or higher")
    read_date = obj.get("read_date")
    if read_date is not None:
        try:
            date.fromisoformat(_str(read_date, f"{key}.read_date"))
        except ValueError:
            raise ManifestError(f"{key}.read_date: must be a date YYYY-MM-DD or null") from None
    return ManifestItem(
        instance_id=_int(obj["instance_id"], f"{key}.instance_id", 0),
        path=_path(obj["path"], f"{key}.path", must_exist=False),  # a missing file is excluded, not fatal
        patient_key=_str(obj["patient_key"], f"{key}.patient_key"), present=present, category=category,
        label_source=_str(obj.get("label_source", ""), f"{key}.label_source", empty=True),
        read_date=None if read_date is None else _str(read_date, f"{key}.read_date"))


def _settings(obj: Any) -> tuple[Settings, dict[str, Any]]:
    if not isinstance(obj, dict):
        raise ManifestError("settings: must be an object")
    missing = [k for k in REQUIRED_SETTINGS if k not in obj]
    if missing:
        raise ManifestError(f"settings: missing key(s) {', '.join(missing)}")
    raw = {**SETTING_DEFAULTS, **obj}
    rule = _str(raw["threshold_rule"], "settings.threshold_rule")
    if rule != "youden" and not rule.startswith("sensitivity:"):
        raise ManifestError("settings.threshold_rule: must be youden or sensitivity:<target>")
    weights = raw["imagenet_weights"]
    settings = Settings(
        folds=_int(raw["folds"], "settings.folds", 2), epochs=_int(raw["epochs"], "settings.epochs", 1),
        size=_int(raw["size"], "settings.size", 32, 2048), batch_size=_int(raw["batch_size"], "settings.batch_size", 1),
        seed=_int(raw["seed"], "settings.seed"), threads=_int(raw["threads"], "settings.threads", 0),
        device=_str(raw["device"], "settings.device"),
        imagenet_weights=None if weights is None else _path(weights, "settings.imagenet_weights"),
        threshold_rule=rule, alpha=_float(raw["alpha"], "settings.alpha", 0, 1, open_ends=True),
        min_sensitivity=_float(raw["min_sensitivity"], "settings.min_sensitivity", 0, 1),
        min_specificity=_float(raw["min_specificity"], "settings.min_specificity", 0, 1),
        patience=_int(raw["patience"], "settings.patience", 1),
        lr=_float(raw["lr"], "settings.lr", 0, 1, open_ends=True))
    return settings, raw


def _items(obj: Any, key: str) -> tuple[ManifestItem, ...]:
    if not isinstance(obj, list):
        raise ManifestError(f"{key}: must be a list")
    return tuple(_item(o, f"{key}[{i}]") for i, o in enumerate(obj))


def parse(obj: Any) -> Manifest:
    """A checked manifest; hold-out patients and instances must not occur in training."""
    obj = _keys(obj, "manifest", TOP_KEYS, TOP_KEYS)
    champion = obj["champion"]
    if champion is not None:
        champion = _keys(champion, "champion", CHAMPION_KEYS, CHAMPION_KEYS)
        champion = Champion(id=_int(champion["id"], "champion.id"), name=_str(champion["name"], "champion.name"),
                            version=_str(champion["version"], "champion.version"),
                            path=_path(champion["path"], "champion.path"))
    settings, raw = _settings(obj["settings"])
    training, holdout = _items(obj["training"], "training"), _items(obj["holdout"], "holdout")
    for key, items in (("training", training), ("holdout", holdout)):
        seen: set[int] = set()
        for i, item in enumerate(items):
            if item.instance_id in seen:
                raise ManifestError(f"{key}[{i}].instance_id: listed twice")
            seen.add(item.instance_id)
    train_patients = {i.patient_key for i in training}
    train_instances = {i.instance_id for i in training}
    for i, item in enumerate(holdout):
        if item.patient_key in train_patients:
            raise ManifestError(f"holdout[{i}].patient_key: a hold-out patient is among the training items")
        if item.instance_id in train_instances:
            raise ManifestError(f"holdout[{i}].instance_id: a hold-out image is among the training items")
    return Manifest(run_id=_int(obj["run_id"], "run_id", 0), name=_str(obj["name"], "name"),
                    version=_str(obj["version"], "version"), site=_str(obj["site"], "site"),
                    segmenter=_path(obj["segmenter"], "segmenter"), champion=champion, settings=settings,
                    training=training, holdout=holdout,
                    labels_note=_str(obj["labels_note"], "labels_note", empty=True), raw_settings=raw)


def read(path: Path) -> Manifest:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError("the manifest file does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"the manifest is not readable JSON ({type(exc).__name__})") from None
    return parse(obj)
