"""Which classifier file a worker's next batch uses: the registry's champion, looked up between batches, so that
a promotion or a rollback reaches running workers without a restart.

A bundled champion (or none registered yet) means the installed classifier (``models.directory``, else the bundled
file), as before the registry existed. A site champion means ``<storage root>/<entry.path>``; its file must exist,
match the registry's SHA-256 and load as a classifier. If it does not, the worker keeps the classifier it had
(at start-up: the installed one), logs an error once and records one audit event (``db.registry.UNUSABLE_EVENT``)
per champion and problem, and checks again at later batches (re-hashing only when the file changed).

``register_installed`` puts the installed classifier into a new registry as its first champion (the commands that
read or change the registry, and ``dicom-node retrain``, call it first).
"""

from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy import Engine

from ai.safe_text import escape, exception_summary
from db.registry import ModelEntry, champion, ensure_bundled_champion, report_unusable

from .archive import sha256_of

LOG = logging.getLogger("dicom_node.worker")

INSTALLED = "the installed classifier"


class ChampionWatch:
    """The champion in use by one worker process; ``refresh`` returns the classifier file for the next batch
    (None: the installed classifier)."""

    def __init__(self, engine: Engine, storage_root: Path, *, device: str | None, model_dir: Path | None,
                 worker: str, precision: str = "auto") -> None:
        self.engine = engine
        self.storage_root = storage_root
        self.device = device
        self.precision = precision
        self.model_dir = model_dir
        self.worker = worker
        self.path: Path | None = None  # the file in use; None: the installed classifier
        self.entry: ModelEntry | None = None  # the registry entry in use; None: none registered yet
        self._key: tuple[object, ...] | None = None  # identity of the champion in use (None: not looked up yet)
        self._refused: tuple[tuple[object, ...], str, tuple[int, int] | None] | None = None

    def refresh(self) -> Path | None:
        """Look up the champion (one small query) and switch to it when it changed and its file is usable."""
        entry = champion(self.engine)
        if entry is None or entry.bundled:
            key: tuple[object, ...] = ("installed", None if entry is None else entry.id)
            if key != self._key:
                self._switch(key, entry, None)
            return self.path
        key = (entry.id, entry.sha256, entry.path)
        if key == self._key:
            return self.path
        file = entry.file_path(self.storage_root)
        signature = _signature(file)
        if self._refused is not None and self._refused[0] == key and self._refused[2] == signature:
            return self.path  # refused before, and the file has not changed since
        problem = self._problem(entry, file, signature)
        if problem is None:
            self._switch(key, entry, file)
        else:
            self._refuse(key, entry, problem, signature)
        return self.path

    @property
    def in_use(self) -> str:
        """How logs and audit events name the classifier in use."""
        if self.entry is None:
            return INSTALLED
        return self.entry.label + (f" ({INSTALLED})" if self.path is None else "")

    def _problem(self, entry: ModelEntry, file: Path, signature: tuple[int, int] | None) -> str | None:
        """Why the champion's file cannot be used, or None; a usable file is loaded here (the cache keeps it)."""
        from ai.models import pneumoconiosis_classifier

        if signature is None:
            return "its file is missing"
        try:
            if sha256_of(file) != entry.sha256:
                return "its file's sha256 does not match the registry"
            classifier = pneumoconiosis_classifier(self.device, self.model_dir, file, self.precision)
        except Exception as exc:  # unreadable file, not a classifier, out of memory: keep the previous one
            return f"its file cannot be loaded as a classifier ({exception_summary(exc)})"
        if classifier is None or classifier.info.sha256 != entry.sha256:
            return "the classifier loaded from its file is not the registered one"
        return None

    def _switch(self, key: tuple[object, ...], entry: ModelEntry | None, file: Path | None) -> None:
        first = self._key is None
        self._key, self.entry, self.path, self._refused = key, entry, file, None
        if entry is None:
            LOG.info("classifier: %s (no champion registered)", INSTALLED)
        else:
            LOG.info("classifier %s %s", "is" if first else "switched to", escape(self.in_use))

    def _refuse(self, key: tuple[object, ...], entry: ModelEntry, problem: str,
                signature: tuple[int, int] | None) -> None:
        seen = self._refused is not None and self._refused[:2] == (key, problem)
        self._refused = (key, problem, signature)
        if seen:
            return
        LOG.error("champion %s cannot be used: %s; keeping %s", escape(entry.label), problem, escape(self.in_use))
        report_unusable(self.engine, entry, problem=problem, worker=self.worker, kept=self.in_use)


def _signature(file: Path) -> tuple[int, int] | None:
    """Size and modification time of ``file`` (None: missing), to see whether it changed since the last check."""
    try:
        stat = file.stat()
    except OSError:
        return None
    return stat.st_size, stat.st_mtime_ns


def register_installed(engine: Engine, models_directory: Path | None) -> str | None:
    """``ensure_bundled_champion`` with the installed classifier file, read without building its network;
    returns a warning when there is no usable installed classifier (nothing is registered then)."""
    from ai import checkpoint
    from ai.models import CLASSIFIER, model_path

    installed = model_path(CLASSIFIER, models_directory)
    if not installed.is_file():
        return f"no classifier is installed ({installed.name}): the registry gets no bundled entry"
    try:
        model = checkpoint.load(installed, checkpoint.CLASSIFIER_FIELDS)
    except checkpoint.ModelFileError as exc:  # our own message: names the file and the fields missing
        return f"the installed classifier cannot be used: {exc}"
    except OSError as exc:
        return f"the installed classifier {installed} cannot be read ({exception_summary(exc)})"
    card = installed.parent / (model.get("model_card") or installed.with_suffix(".md").name)
    ensure_bundled_champion(engine, name=str(model["name"]), version=str(model["version"]),
                            path=installed.resolve(), sha256=model.sha256, card_path=card.resolve(),
                            threshold=float(model["threshold"]))
    return None
