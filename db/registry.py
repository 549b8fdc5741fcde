"""The model registry: which classifier the workers use (the champion), which wait (candidates), which were
replaced (retired), and the audited moves between those states.

Exactly one champion at any time once the registry holds one. Every change of state runs in one transaction that
first takes the registry's lock (SQLite: the write lock ``BEGIN IMMEDIATE`` holds from the start, see
``db.engine``; PostgreSQL: a transaction-scoped advisory lock, since READ COMMITTED row locks alone would let two
concurrent promotions each see "their" old champion), then re-reads the states it checks, and before committing
counts the champions again; a count other than one rolls the whole change back.

Plain values in and out (``ModelEntry``); the caller supplies the OS user and the reason of a change.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any

from sqlalchemy import Engine, func, select, text
from sqlalchemy.orm import Session

from .engine import readonly
from .models import Event, ModelState, RegisteredModel, utcnow

PROMOTED_EVENT = "model_promoted"
ROLLED_BACK_EVENT = "model_rolled_back"
BUNDLED_REGISTERED_EVENT = "bundled_model_registered"
BUNDLED_UPDATED_EVENT = "bundled_model_updated"
REGISTRY_LOCK_KEY = 0x6D6F64656C73  # "models": PostgreSQL advisory lock id of the registry
_SHA256 = re.compile(r"[0-9a-f]{64}")


class RegistryError(ValueError):
    """A registry change that is refused; the message says why and what would be accepted."""


@dataclass(frozen=True)
class ModelEntry:
    """One registered classifier, detached from any session."""

    id: int
    name: str
    version: str
    state: str  # "candidate", "champion", "retired"
    bundled: bool  # the demo classifier installed with the node
    path: str  # relative to the storage root; absolute for the bundled one
    sha256: str
    card_path: str | None
    run_id: int | None
    threshold: float | None
    holdout_auc: float | None
    holdout: dict[str, Any] | None  # hold-out metrics of this model
    gate_passed: bool | None  # None: the gate was not evaluated
    gate: dict[str, Any] | None  # the gate's comparison with the champion and its reasons
    replaced_model_id: int | None
    created_at: datetime
    promoted_at: datetime | None
    retired_at: datetime | None

    @property
    def label(self) -> str:
        """How messages and logs name it: "#3 pneumoconiosis-resnet34 site-3"."""
        return f"#{self.id} {self.name} {self.version}"

    def file_path(self, storage_root: Path) -> Path:
        """The model file: under the storage root, or the absolute path of the bundled one."""
        return Path(self.path) if Path(self.path).is_absolute() else storage_root / self.path

    def to_json(self) -> dict[str, Any]:
        """Every column, the hold-out metrics and the gate report as objects, times as ISO 8601 text (UTC)."""
        return {
            "id": self.id, "name": self.name, "version": self.version, "state": self.state,
            "bundled": self.bundled, "path": self.path, "sha256": self.sha256, "card_path": self.card_path,
            "run_id": self.run_id, "threshold": self.threshold, "holdout_auc": self.holdout_auc,
            "holdout": self.holdout, "gate_passed": self.gate_passed, "gate": self.gate,
            "replaced_model_id": self.replaced_model_id, "created_at": _iso(self.created_at),
            "promoted_at": _iso(self.promoted_at), "retired_at": _iso(self.retired_at),
        }


def _iso(at: datetime | None) -> str | None:
    return None if at is None else at.isoformat()


def _parsed(text_value: str | None) -> dict[str, Any] | None:
    if not text_value:
        return None
    value = json.loads(text_value)
    return value if isinstance(value, dict) else {"value": value}


def _entry(row: RegisteredModel) -> ModelEntry:
    return ModelEntry(
        id=row.id, name=row.name, version=row.version, state=ModelState(row.state).value, bundled=row.bundled,
        path=row.path, sha256=row.sha256, card_path=row.card_path, run_id=row.run_id, threshold=row.threshold,
        holdout_auc=row.holdout_auc, holdout=_parsed(row.holdout_json), gate_passed=row.gate_passed,
        gate=_parsed(row.gate_json), replaced_model_id=row.replaced_model_id, created_at=row.created_at,
        promoted_at=row.promoted_at, retired_at=row.retired_at,
    )


# --- reading ----------------------------------------------------------------------------------------------------


def champion(engine: Engine) -> ModelEntry | None:
    """The model the workers use; None while the registry holds none (the installed classifier is used)."""
    with Session(readonly(engine)) as session:
        row = session.scalars(select(RegisteredModel).where(RegisteredModel.state == ModelState.CHAMPION)
                              .order_by(RegisteredModel.id).limit(1)).first()
        return None if row is None else _entry(row)


def get_model(engine: Engine, model_id: int) -> ModelEntry | None:
    with Session(readonly(engine)) as session:
        row = session.get(RegisteredModel, model_id)
        return None if row is None else _entry(row)


def list_models(engine: Engine) -> list[ModelEntry]:
    """Every registered model, oldest first."""
    with Session(readonly(engine)) as session:
        return [_entry(r) for r in session.scalars(select(RegisteredModel).order_by(RegisteredModel.id))]


# --- changing -----------------------------------------------------------------------------------------------------


def _lock(session: Session) -> None:
    """Serialise registry changes (SQLite's BEGIN IMMEDIATE already holds the database's write lock)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": REGISTRY_LOCK_KEY})


def _champions(session: Session) -> list[RegisteredModel]:
    return list(session.scalars(select(RegisteredModel).where(RegisteredModel.state == ModelState.CHAMPION)
                                .order_by(RegisteredModel.id)))


def _check_one_champion(session: Session) -> None:
    """The registry's invariant, checked inside the change's transaction just before it commits."""
    session.flush()
    count = session.scalar(select(func.count()).select_from(RegisteredModel)
                           .where(RegisteredModel.state == ModelState.CHAMPION))
    if count != 1:
        raise RegistryError(f"the change would leave {count} champions; nothing was changed")


def _audit(session: Session, kind: str, detail: dict[str, Any]) -> None:
    session.add(Event(kind=kind, detail=json.dumps(detail, sort_keys=True)))


def _check_sha256(sha256: str) -> None:
    if not _SHA256.fullmatch(sha256):
        raise RegistryError("sha256 must be 64 lower-case hexadecimal digits")


def ensure_bundled_champion(engine: Engine, *, name: str, version: str, path: Path | str, sha256: str,
                            card_path: Path | str | None, threshold: float | None) -> ModelEntry | None:
    """Register the installed demo classifier (``path``, absolute) as the champion while the registry has neither
    a champion nor a bundled entry (a new node); keep its entry up to date when the installed file changed (a
    software update). Returns the bundled entry, or None when the registry has a champion but no bundled entry."""
    _check_sha256(sha256)
    path_text = str(Path(path).resolve())
    card_text = None if card_path is None else str(card_path)
    with Session(engine, expire_on_commit=False) as session, session.begin():
        _lock(session)
        row = session.scalars(select(RegisteredModel).where(RegisteredModel.bundled.is_(True))
                              .order_by(RegisteredModel.id.desc()).limit(1)).first()
        if row is not None:
            if (row.sha256, row.path) != (sha256, path_text):
                _audit(session, BUNDLED_UPDATED_EVENT, {"model_id": row.id, "old_version": row.version,
                                                        "version": version, "old_sha256": row.sha256,
                                                        "sha256": sha256})
                row.name, row.version, row.sha256, row.path = name, version, sha256, path_text
                row.card_path, row.threshold = card_text, threshold
            return _entry(row)
        if _champions(session):
            return None
        now = utcnow()
        row = RegisteredModel(name=name, version=version, state=ModelState.CHAMPION, bundled=True, path=path_text,
                              sha256=sha256, card_path=card_text, threshold=threshold, created_at=now,
                              promoted_at=now)
        session.add(row)
        session.flush()
        _audit(session, BUNDLED_REGISTERED_EVENT, {"model_id": row.id, "name": name, "version": version,
                                                   "sha256": sha256})
        _check_one_champion(session)
        return _entry(row)


def register_candidate(session: Session, *, name: str, version: str, path: Path | str, sha256: str,
                       card_path: Path | str | None, run_id: int | None, threshold: float | None,
                       holdout_auc: float | None, holdout: dict[str, Any], gate_passed: bool | None,
                       gate: dict[str, Any]) -> int:
    """Add a trained classifier as a candidate inside the caller's transaction (a training run's finishing one);
    returns its id. ``path`` and ``card_path`` are relative to the storage root."""
    _check_sha256(sha256)
    relative = _relative(path, "path")
    card = None if card_path is None else _relative(card_path, "card_path")
    row = RegisteredModel(name=name, version=version, state=ModelState.CANDIDATE, bundled=False, path=relative,
                          sha256=sha256, card_path=card, run_id=run_id, threshold=threshold,
                          holdout_auc=holdout_auc, holdout_json=json.dumps(holdout, sort_keys=True),
                          gate_passed=gate_passed, gate_json=json.dumps(gate, sort_keys=True), created_at=utcnow())
    session.add(row)
    session.flush()
    return row.id


def _relative(path: Path | str, what: str) -> str:
    """``path`` as stored: relative to the storage root, with forward slashes, never leaving the root."""
    pure = PurePosixPath(Path(path).as_posix())
    if pure.is_absolute() or ".." in pure.parts or not pure.parts:
        raise RegistryError(f"{what} must be relative to the storage root and stay below it")
    return str(pure)


def promote(engine: Engine, model_id: int, *, user: str, reason: str | None, force: bool = False) -> ModelEntry:
    """Make candidate ``model_id`` the champion and retire the champion it replaces, with one audit event.

    Refused (``RegistryError``): an unknown model, one that is not a candidate, and one whose gate failed or was
    not evaluated, unless ``force`` with a reason."""
    why = (reason or "").strip()
    if force and not why:
        raise RegistryError("a forced promotion needs a reason (--reason TEXT)")
    with Session(engine, expire_on_commit=False) as session, session.begin():
        _lock(session)
        row = session.get(RegisteredModel, model_id)
        if row is None:
            raise RegistryError(f"there is no model #{model_id} ('dicom-node models list' shows them)")
        if row.state != ModelState.CANDIDATE:
            raise RegistryError(f"model #{model_id} is {ModelState(row.state).value}: only a candidate can be "
                                "promoted" + (" ('dicom-node models rollback' brings back the champion a model "
                                              "replaced)" if row.state == ModelState.RETIRED else ""))
        if row.gate_passed is not True and not force:
            verdict = "did not pass the champion gate" if row.gate_passed is False else \
                "has no champion gate result"
            raise RegistryError(f"model #{model_id} {verdict}{_gate_reasons(row.gate_json)}; promote it anyway "
                                "only with --force --reason TEXT")
        old = _champions(session)
        if len(old) > 1:
            raise RegistryError(f"the registry holds {len(old)} champions; nothing was changed")
        now = utcnow()
        replaced = old[0] if old else None
        if replaced is not None:
            replaced.state, replaced.retired_at = ModelState.RETIRED, now
        row.state, row.promoted_at, row.retired_at = ModelState.CHAMPION, now, None
        row.replaced_model_id = None if replaced is None else replaced.id
        _audit(session, PROMOTED_EVENT, {
            "model_id": row.id, "name": row.name, "version": row.version, "gate_passed": row.gate_passed,
            "forced": bool(force), "user": user, "reason": why or None,
            "replaced_model_id": None if replaced is None else replaced.id,
            "replaced_version": None if replaced is None else replaced.version,
        })
        _check_one_champion(session)
        return _entry(row)


def _gate_reasons(gate_json: str | None) -> str:
    reasons = (_parsed(gate_json) or {}).get("reasons")
    if isinstance(reasons, list) and reasons:
        return " (" + "; ".join(str(r) for r in reasons) + ")"
    return ""


def rollback(engine: Engine, *, user: str, reason: str | None) -> ModelEntry:
    """Retire the champion and make the model it replaced the champion again, with one audit event; returns the
    new champion. Repeated rollbacks walk further back along the promotions."""
    with Session(engine, expire_on_commit=False) as session, session.begin():
        _lock(session)
        current = _champions(session)
        if len(current) != 1:
            raise RegistryError("there is no champion to roll back" if not current else
                                f"the registry holds {len(current)} champions; nothing was changed")
        [row] = current
        previous = None if row.replaced_model_id is None else session.get(RegisteredModel, row.replaced_model_id)
        if previous is None:
            raise RegistryError(f"champion #{row.id} {row.name} {row.version} replaced no other model: there is "
                                "nothing to roll back to")
        now = utcnow()
        row.state, row.retired_at = ModelState.RETIRED, now
        previous.state, previous.promoted_at, previous.retired_at = ModelState.CHAMPION, now, None
        _audit(session, ROLLED_BACK_EVENT, {
            "model_id": previous.id, "name": previous.name, "version": previous.version,
            "retired_model_id": row.id, "retired_version": row.version, "user": user,
            "reason": (reason or "").strip() or None,
        })
        _check_one_champion(session)
        return _entry(previous)


UNUSABLE_EVENT = "champion_unusable"


def report_unusable(engine: Engine, entry: ModelEntry, *, problem: str, worker: str, kept: str) -> None:
    """Audit event of a worker that cannot use the champion's file and keeps the classifier it had (``kept``)."""
    with Session(engine) as session, session.begin():
        _audit(session, UNUSABLE_EVENT, {"model_id": entry.id, "name": entry.name, "version": entry.version,
                                         "problem": problem, "worker": worker, "kept": kept})
