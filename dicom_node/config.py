"""Node configuration: built-in defaults < config.toml < environment < command line.

Every key is declared once in ``SCHEMA`` with its type, default and a validator, so that a bad value anywhere
stops start-up with a message naming the key (``ConfigError``), instead of failing later on the network.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from ai.safe_text import escape

from .worker_layout import AUTO, resolve_layout

if TYPE_CHECKING:
    from ai.limits import ImageLimits

ENV_PREFIX = "DICOM_NODE_"
DUPLICATE_POLICIES = ("reject", "never", "always", "same_source")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type or out of range; the message names the key."""


def _check_ae_title(value: str) -> str | None:
    if not value.strip():
        return "must not be empty"
    if len(value) > 16:
        return "must be at most 16 characters"
    if "\\" in value or any(ord(c) < 32 or ord(c) > 126 for c in value):
        return "must be printable ASCII without backslash"
    return None


def _range(lo: float, hi: float | None = None) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if value < lo or (hi is not None and value > hi):
            return f"must be between {lo} and {hi}" if hi is not None else f"must be >= {lo}"
        return None

    return check


def _auto_or(check: Callable[[Any], str | None]) -> Callable[[Any], str | None]:
    def either(value: Any) -> str | None:
        if value == AUTO:
            return None
        problem = check(value)
        return f"{problem}, or \"auto\"" if problem else None

    return either


def _one_of(choices: tuple[str, ...]) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        return None if value in choices else f"must be one of {', '.join(choices)}"

    return check


def _check_ae_list(value: list[str]) -> str | None:
    for item in value:
        if not isinstance(item, str):
            return "must be a list of strings"
        problem = _check_ae_title(item)
        if problem:
            return f"entry {item!r} {problem}"
    return None


def _is_uid(value: str) -> bool:
    from pydicom.uid import UID

    return len(value) <= 64 and UID(value).is_valid


def _check_db_url(value: str) -> str | None:
    if not value:
        return None
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        make_url(value)
    except ArgumentError as exc:
        return f"is not a database URL ({exc})"
    return None


RESULT_KINDS = ("sr", "seg", "sc")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")  # ai.precision.PRECISIONS (the configuration does not import torch)
SC_COMPRESSIONS = ("jpeg", "none")  # how the heat-map SC is stored and sent: dicom_node.results.sc
CONSENSUS_RULES = ("latest", "majority")


def _check_password_hash(value: str) -> str | None:
    if not value:
        return None
    from .console.passwords import is_password_hash

    return None if is_password_hash(value) else \
        "is not a password hash: make one with 'dicom-node console hash-password'"


def _check_cron(value: str) -> str | None:
    if not value.strip():
        return None
    from apscheduler.triggers.cron import CronTrigger

    try:
        CronTrigger.from_crontab(value)
    except ValueError as exc:
        return f"is not a cron expression (minute hour day month day-of-week): {exc}"
    return None


def _check_destinations(value: list[Any]) -> str | None:
    """``[[export.destinations]]`` tables: name, ae_title, host, port, optional types and alternate {ae_title,
    host, port}."""
    names = set()
    for i, dest in enumerate(value):
        where = f"entry {i + 1}"
        if not isinstance(dest, Mapping):
            return f"{where} must be a table (name, ae_title, host, port)"
        unknown = set(dest) - {"name", "ae_title", "host", "port", "types", "alternate", "tls"}
        if unknown:
            return f"{where} has unknown field(s) {', '.join(sorted(unknown))}"
        name = dest.get("name")
        if not isinstance(name, str) or not name.strip() or len(name) > 64:
            return f"{where} needs a name (1-64 characters)"
        if name in names:
            return f"{where}: name {name!r} is used twice"
        names.add(name)
        for peer_where, peer in ((where, dest), (f"{where} alternate", dest.get("alternate"))):
            if peer is None:
                continue
            if not isinstance(peer, Mapping):
                return f"{peer_where} must be a table"
            problem = _check_ae_title(peer.get("ae_title", "")) if isinstance(peer.get("ae_title"), str) \
                else "is missing"
            if problem:
                return f"{peer_where} ae_title {problem}"
            if not isinstance(peer.get("host"), str) or not peer["host"].strip():
                return f"{peer_where} needs a host"
            port = peer.get("port")
            if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
                return f"{peer_where} port must be an integer 1-65535"
        if not isinstance(dest.get("tls", False), bool):
            return f"{where} tls must be true or false"
        types = dest.get("types", list(RESULT_KINDS))
        if not isinstance(types, list) or not types or any(t not in RESULT_KINDS for t in types):
            return f"{where} types must be a non-empty list of {', '.join(RESULT_KINDS)}"
    return None


@dataclass(frozen=True)
class Key:
    type: type
    default: Any
    check: Callable[[Any], str | None] | None = None
    auto: bool = False  # the value may also be "auto" (resolved when the configuration is built)


SCHEMA: dict[str, Key] = {
    "network.ae_title": Key(str, "PNEUMOCAD", _check_ae_title),
    "network.bind_address": Key(str, "0.0.0.0", lambda v: None if v.strip() else "must not be empty"),
    "network.port": Key(int, 11112, _range(0, 65535)),  # 0 = no plain Storage SCP (TLS only: tls.port)
    "network.allowed_calling_aets": Key(list, [], _check_ae_list),
    "network.max_associations": Key(int, 10, _range(1, 1000)),
    "network.network_timeout": Key(float, 60.0, _range(1)),
    "network.acse_timeout": Key(float, 30.0, _range(1)),
    "network.dimse_timeout": Key(float, 60.0, _range(1)),
    "network.max_pdu_size": Key(int, 131072,
                                lambda v: None if v == 0 or v >= 4096 else "must be 0 (unlimited) or >= 4096"),
    "network.accept_any_called_aet": Key(bool, False),
    "network.association_request_deadline": Key(float, 10.0, _range(0.1, 3600)),
    "network.max_association_request_size": Key(int, 262144, _range(1024, 1048576)),
    "network.max_pending_connections": Key(int, 32, _range(1, 1000)),
    "network.max_connections_per_address": Key(int, 8, _range(0, 1000)),
    "storage.storage_root": Key(str, "./var", lambda v: None if v.strip() else "must not be empty"),
    "storage.free_disk_reserve_mb": Key(float, 1024.0, _range(0)),
    "storage.duplicate_policy": Key(str, "reject", _one_of(DUPLICATE_POLICIES)),
    "database.url": Key(str, "", _check_db_url),
    "database.identity_check_seconds": Key(float, 2.0, _range(0.1, 60)),
    "queue.lease_seconds": Key(float, 300.0, _range(1)),
    "queue.max_attempts": Key(int, 3, _range(1, 100)),
    "worker.processes": Key(int, "auto", _auto_or(_range(0, 64)), auto=True),
    "worker.batch_size": Key(int, 4, _range(1, 64)),
    "worker.poll_seconds": Key(float, 0.1, _range(0.05)),
    "worker.device": Key(str, "auto", _one_of(DEVICES)),
    "worker.threads": Key(int, "auto", _auto_or(_range(0, 256)), auto=True),
    "worker.nice": Key(int, 15, _range(0, 19)),
    "worker.precision": Key(str, "auto", _one_of(PRECISIONS)),
    "models.directory": Key(str, ""),
    "results.device_uid": Key(str, "", lambda v: None if not v or _is_uid(v) else "must be a DICOM UID"),
    "results.institution_name": Key(str, ""),
    "results.sc_compression": Key(str, "jpeg", _one_of(SC_COMPRESSIONS)),
    "export.destinations": Key(list, [], _check_destinations),
    "export.retry_initial_seconds": Key(float, 30.0, _range(0.1)),
    "export.retry_max_seconds": Key(float, 3600.0, _range(0.1)),
    "export.max_attempts": Key(int, 10, _range(1, 1000)),
    "export.poll_seconds": Key(float, 0.2, _range(0.05)),
    "export.timeout_seconds": Key(float, 30.0, _range(1)),
    "export.deadline_seconds": Key(float, 120.0, _range(1)),
    "limits.max_rows": Key(int, 6144, _range(1, 65535)),
    "limits.max_columns": Key(int, 6144, _range(1, 65535)),
    "limits.max_frames": Key(int, 16, _range(1, 100000)),
    "limits.max_uncompressed_mb": Key(float, 128.0, _range(1)),
    "logging.level": Key(str, "INFO", _one_of(LOG_LEVELS)),
    "labels.sr_import_seconds": Key(float, 60.0, lambda v: None if v == 0 or v >= 1 else "must be 0 (off) or >= 1"),
    "training.schedule": Key(str, "", _check_cron),
    "training.min_new_labels": Key(int, 50, _range(0)),
    "training.consensus": Key(str, "latest", _one_of(CONSENSUS_RULES)),
    "training.holdout_fraction": Key(float, 0.2, _range(0.05, 0.5)),
    "training.seed": Key(int, 2026, _range(0)),
    "training.folds": Key(int, 10, _range(2, 20)),
    "training.epochs": Key(int, 50, _range(1, 1000)),
    "training.size": Key(int, 384, _range(64, 1024)),
    "training.batch_size": Key(int, 32, _range(1, 512)),
    "training.threads": Key(int, 1, _range(1, 256)),
    "training.nice": Key(int, 19, _range(0, 19)),
    "training.device": Key(str, "auto", _one_of(DEVICES)),
    "training.imagenet_weights": Key(str, ""),
    "console.enabled": Key(bool, True),
    "console.bind_address": Key(str, "127.0.0.1", lambda v: None if v.strip() else "must not be empty"),
    "console.port": Key(int, 11180, _range(1, 65535)),
    "console.admin_user": Key(str, "admin", lambda v: None if 0 < len(v.strip()) <= 64 else "must be 1-64 characters"),
    "console.admin_password_hash": Key(str, "", _check_password_hash),
    "console.session_hours": Key(float, 8.0, _range(0.1, 720)),
    "console.require_login": Key(bool, False),
    "console.secure_cookie": Key(bool, False),
    "tls.port": Key(int, 0, _range(0, 65535)),
    "tls.certificate": Key(str, ""),
    "tls.private_key": Key(str, ""),
    "tls.ca_bundle": Key(str, ""),
    "tls.require_client_certificate": Key(bool, False),
    "tls.handshake_timeout": Key(float, 10.0, _range(0.1, 600)),
    "promotion.alpha": Key(float, 0.05, _range(0.001, 0.5)),
    "promotion.min_sensitivity": Key(float, 0.8, _range(0, 1)),
    "promotion.min_specificity": Key(float, 0.8, _range(0, 1)),
}


def _env_name(key: str) -> str:
    return ENV_PREFIX + key.replace(".", "_").upper()


def _coerce(key: str, raw: Any, from_text: bool) -> Any:
    """Convert ``raw`` to the key's type; text from env/CLI is parsed, TOML values must already match."""
    spec = SCHEMA[key]
    if spec.auto and isinstance(raw, str) and raw.strip().lower() == AUTO:
        return AUTO
    try:
        if spec.type is list:
            if from_text:
                text = str(raw).strip()
                if text.startswith("["):  # JSON for lists of tables, e.g. export.destinations
                    import json

                    try:
                        return json.loads(text)
                    except json.JSONDecodeError:
                        raise ValueError from None
                return [part.strip() for part in text.split(",") if part.strip()]
            if not isinstance(raw, list):
                raise TypeError
            return raw
        if spec.type is bool:
            if from_text:
                if str(raw).lower() in ("1", "true", "yes", "on"):
                    return True
                if str(raw).lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError
            if not isinstance(raw, bool):
                raise TypeError
            return raw
        if spec.type is int:
            if isinstance(raw, bool) or (not from_text and not isinstance(raw, int)):
                raise TypeError
            return int(str(raw).strip())
        if spec.type is float:
            if isinstance(raw, bool) or (not from_text and not isinstance(raw, (int, float))):
                raise TypeError
            return float(str(raw).strip())
        if not from_text and not isinstance(raw, str):
            raise TypeError
        return str(raw)
    except (TypeError, ValueError):
        expected = f"{spec.type.__name__} or \"auto\"" if spec.auto else spec.type.__name__
        raise ConfigError(f"{key}: expected {expected}, got {raw!r}") from None


def _flatten(table: Mapping[str, Any], source: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for section, content in table.items():
        if not isinstance(content, Mapping):
            raise ConfigError(f"{section}: expected a [section] table in {source}")
        for name, value in content.items():
            flat[f"{section}.{name}"] = value
    return flat


@dataclass(frozen=True)
class Peer:
    """A DICOM application entity on the network: what a C-STORE association is opened to."""

    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"

    @property
    def safe(self) -> str:
        """``str(self)`` for a log line or an error text: escaped, bounded."""
        return escape(str(self))


@dataclass(frozen=True)
class Destination:
    """One ``[[export.destinations]]`` table: where the result kinds in ``types`` are sent, the ``alternate``
    taking over within the same attempt when ``peer`` cannot be reached."""

    name: str
    peer: Peer
    types: tuple[str, ...] = RESULT_KINDS
    alternate: Peer | None = None
    tls: bool = False  # associations to it (and its alternate) use TLS with the [tls] section's files

    @property
    def peers(self) -> tuple[Peer, ...]:
        return (self.peer,) if self.alternate is None else (self.peer, self.alternate)


@dataclass(frozen=True)
class NetworkSettings:
    ae_title: str
    bind_address: str
    port: int
    allowed_calling_aets: tuple[str, ...]
    max_associations: int
    network_timeout: float
    acse_timeout: float
    dimse_timeout: float
    max_pdu_size: int
    accept_any_called_aet: bool
    association_request_deadline: float
    max_association_request_size: int
    max_pending_connections: int
    max_connections_per_address: int


@dataclass(frozen=True)
class StorageSettings:
    storage_root: Path  # resolved: a relative value is taken against the config file's folder
    free_disk_reserve_mb: float
    duplicate_policy: str

    @property
    def free_disk_reserve_bytes(self) -> int:
        return int(self.free_disk_reserve_mb * 1024 * 1024)


@dataclass(frozen=True)
class DatabaseSettings:
    url: str  # resolved: empty in the configuration means the SQLite file under the storage root
    identity_check_seconds: float


@dataclass(frozen=True)
class QueueSettings:
    lease_seconds: float
    max_attempts: int


@dataclass(frozen=True)
class WorkerSettings:
    processes: int  # resolved: "auto" is replaced by dicom_node.worker_layout
    batch_size: int
    poll_seconds: float
    device: str
    threads: int  # CPU threads of the models in each worker process (0 = torch's default: every core); resolved
    nice: int  # niceness of each worker process: the intake in serve gets the CPU first
    precision: str  # the classifier's arithmetic (ai/precision.py): auto, fp32 or bf16


@dataclass(frozen=True)
class ModelsSettings:
    directory: Path | None  # None: the bundled models only


@dataclass(frozen=True)
class ResultsSettings:
    device_uid: str  # empty: derived from the AE title
    institution_name: str
    sc_compression: str  # "jpeg" (lossy JPEG Baseline) or "none" (uncompressed RGB)


@dataclass(frozen=True)
class ExportSettings:
    destinations: tuple[Destination, ...]
    retry_initial_seconds: float
    retry_max_seconds: float
    max_attempts: int
    poll_seconds: float
    timeout_seconds: float
    deadline_seconds: float

    @property
    def routes(self) -> dict[str, tuple[str, ...]]:
        """Destination name -> the result kinds it takes: what ``db`` needs to queue exports."""
        return {d.name: d.types for d in self.destinations}


@dataclass(frozen=True)
class LoggingSettings:
    level: str


@dataclass(frozen=True)
class LabelsSettings:
    sr_import_seconds: float  # how often serve imports the reads of SRs received since; 0 = only on command


@dataclass(frozen=True)
class TrainingSettings:
    schedule: str  # cron expression; "" = no scheduled retraining
    min_new_labels: int  # a scheduled run starts only when at least this many labels came since the last run
    consensus: str  # how several reads of one image become its training label: "latest" or "majority"
    holdout_fraction: float
    seed: int
    folds: int
    epochs: int
    size: int
    batch_size: int
    threads: int
    nice: int
    device: str
    imagenet_weights: Path | None  # resolved; None: no local ImageNet weights (train from scratch)


@dataclass(frozen=True)
class PromotionSettings:
    alpha: float  # DeLong test: the candidate is refused when it is worse than the champion at this level
    min_sensitivity: float  # at the candidate's stored threshold, on the hold-out
    min_specificity: float


@dataclass(frozen=True)
class ConsoleSettings:
    enabled: bool
    bind_address: str
    port: int
    admin_user: str
    admin_password_hash: str  # "" = none configured: only a loopback binding is allowed (no login)
    session_hours: float
    require_login: bool  # also on loopback (behind a reverse proxy on this host)
    secure_cookie: bool  # the session cookie only over HTTPS (behind a TLS-terminating proxy)

    @property
    def is_local(self) -> bool:
        """Bound to a loopback address only: the one binding that needs no login."""
        import ipaddress

        host = self.bind_address.strip().lower()
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False


@dataclass(frozen=True)
class TlsSettings:
    port: int  # 0 = no TLS Storage SCP
    certificate: Path | None  # resolved; the node's certificate (PEM), for the SCP and as client certificate
    private_key: Path | None
    ca_bundle: Path | None  # CAs that sign peers' certificates (clients of the SCP, TLS destinations)
    require_client_certificate: bool
    handshake_timeout: float  # seconds a TLS client may take to finish its handshake

    @property
    def enabled(self) -> bool:
        return self.port > 0


def _peer(table: Mapping[str, Any]) -> Peer:
    return Peer(str(table["ae_title"]), str(table["host"]), int(table["port"]))


def _destination(table: Mapping[str, Any]) -> Destination:
    alternate = table.get("alternate")
    return Destination(name=str(table["name"]), peer=_peer(table),
                       types=tuple(table.get("types") or RESULT_KINDS),
                       alternate=_peer(alternate) if alternate else None, tls=bool(table.get("tls", False)))


def _resolve_path(value: str, base_dir: Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base_dir / path).resolve()


def _section_values(values: Mapping[str, Any], section: str) -> dict[str, Any]:
    """The keys of ``section`` without their prefix, lists turned into tuples (the sections are frozen)."""
    prefix = section + "."
    return {key[len(prefix):]: tuple(value) if isinstance(value, list) else value
            for key, value in values.items() if key.startswith(prefix)}


@dataclass(frozen=True)
class NodeConfig:
    """Validated configuration, one frozen object per ``[section]``: ``cfg.worker.batch_size``,
    ``cfg.export.destinations``. ``values`` keeps every key of ``SCHEMA`` as given (for display), ``sources``
    where each value came from, ``base_dir`` the folder relative paths were resolved against."""

    network: NetworkSettings
    storage: StorageSettings
    database: DatabaseSettings
    queue: QueueSettings
    worker: WorkerSettings
    models: ModelsSettings
    results: ResultsSettings
    export: ExportSettings
    limits: ImageLimits
    logging: LoggingSettings
    labels: LabelsSettings
    training: TrainingSettings
    promotion: PromotionSettings
    console: ConsoleSettings
    tls: TlsSettings
    base_dir: Path
    values: Mapping[str, Any]
    sources: Mapping[str, str]

    @classmethod
    def from_values(cls, values: Mapping[str, Any], base_dir: Path,
                    sources: Mapping[str, str] | None = None) -> NodeConfig:
        """Sections from validated ``values`` (every key of ``SCHEMA``)."""
        from ai.limits import ImageLimits

        storage = _section_values(values, "storage")
        storage["storage_root"] = _resolve_path(storage["storage_root"], base_dir)
        database = _section_values(values, "database")
        database["url"] = database["url"] or f"sqlite:///{storage['storage_root'] / 'node.sqlite'}"
        directory = str(values["models.directory"]).strip()
        export = _section_values(values, "export")
        export["destinations"] = tuple(_destination(d) for d in values["export.destinations"])
        training = _section_values(values, "training")
        weights = str(training["imagenet_weights"]).strip()
        training["imagenet_weights"] = _resolve_path(weights, base_dir) if weights else None
        tls = _section_values(values, "tls")
        for name in ("certificate", "private_key", "ca_bundle"):
            tls[name] = _resolve_path(tls[name].strip(), base_dir) if str(tls[name]).strip() else None
        return cls(
            network=NetworkSettings(**_section_values(values, "network")),
            storage=StorageSettings(**storage),
            database=DatabaseSettings(**database),
            queue=QueueSettings(**_section_values(values, "queue")),
            worker=_worker_settings(values),
            models=ModelsSettings(directory=_resolve_path(directory, base_dir) if directory else None),
            results=ResultsSettings(**_section_values(values, "results")),
            export=ExportSettings(**export),
            limits=ImageLimits(**_section_values(values, "limits")),
            logging=LoggingSettings(**_section_values(values, "logging")),
            labels=LabelsSettings(**_section_values(values, "labels")),
            training=TrainingSettings(**training),
            promotion=PromotionSettings(**_section_values(values, "promotion")),
            console=ConsoleSettings(**_section_values(values, "console")),
            tls=TlsSettings(**tls),
            base_dir=base_dir,
            values=MappingProxyType(dict(values)),
            sources=MappingProxyType(dict(sources or {})),
        )


def default_config_path() -> Path | None:
    """The config file used when none is named: $DICOM_NODE_CONFIG, else ./config.toml if it exists."""
    env = os.environ.get(ENV_PREFIX + "CONFIG")
    if env:
        return Path(env)
    candidate = Path.cwd() / "config.toml"
    return candidate if candidate.is_file() else None


def _worker_settings(values: Mapping[str, Any]) -> WorkerSettings:
    """The [worker] section with "auto" processes and threads resolved for this host (dicom_node/worker_layout.py)."""
    worker = _section_values(values, "worker")
    if AUTO in (worker["processes"], worker["threads"]):
        layout = resolve_layout(worker["processes"], worker["threads"], worker["precision"], worker["device"])
        worker.update(processes=layout.processes, threads=layout.threads)
    return WorkerSettings(**worker)


def load_config(
    path: Path | str | None = None,
    overrides: Mapping[str, str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> NodeConfig:
    """Build the configuration from defaults, a TOML file, the environment and ``overrides`` (CLI text values)."""
    environ = os.environ if environ is None else environ
    values = {key: spec.default for key, spec in SCHEMA.items()}
    sources = {key: "default" for key in SCHEMA}
    base_dir = Path.cwd()

    config_path = Path(path) if path is not None else default_config_path()
    if config_path is not None:
        if not config_path.is_file():
            raise ConfigError(f"config file {config_path} does not exist")
        try:
            table = tomllib.loads(config_path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {config_path} is not valid TOML: {exc}") from None
        base_dir = config_path.resolve().parent
        for key, raw in _flatten(table, str(config_path)).items():
            if key not in SCHEMA:
                raise ConfigError(f"{key}: unknown key in {config_path}")
            values[key] = _coerce(key, raw, from_text=False)
            sources[key] = str(config_path)

    for key in SCHEMA:
        name = _env_name(key)
        if name in environ:
            values[key] = _coerce(key, environ[name], from_text=True)
            sources[key] = f"${name}"

    for key, raw in (overrides or {}).items():
        if key not in SCHEMA:
            raise ConfigError(f"{key}: unknown key (known: {', '.join(SCHEMA)})")
        values[key] = _coerce(key, raw, from_text=True)
        sources[key] = "command line"

    for key, value in values.items():
        check = SCHEMA[key].check
        problem = check(value) if check else None
        if problem:
            raise ConfigError(f"{key}: {problem} (got {value!r} from {sources[key]})")
    _check_tls(values, sources)
    return NodeConfig.from_values(values, base_dir, sources)


def _check_tls(values: Mapping[str, Any], sources: Mapping[str, str]) -> None:
    """The [tls] keys that only make sense together: a TLS port or a TLS destination needs the node's certificate
    and key; requiring client certificates needs the CA bundle that signs them."""
    uses_tls = values["tls.port"] > 0 or any(isinstance(d, Mapping) and d.get("tls")
                                               for d in values["export.destinations"])
    if uses_tls:
        for key in ("tls.certificate", "tls.private_key"):
            if not str(values[key]).strip():
                why = "tls.port is set" if values["tls.port"] > 0 else "an export destination has tls = true"
                raise ConfigError(f"{key}: must name a PEM file when {why}")
    if values["tls.require_client_certificate"] and not str(values["tls.ca_bundle"]).strip():
        raise ConfigError("tls.ca_bundle: must name the CA bundle that signs client certificates when "
                          f"tls.require_client_certificate is true (from {sources['tls.require_client_certificate']})")
    if not values["network.port"] and not values["tls.port"]:
        raise ConfigError("network.port: 0 (no plain Storage SCP) needs tls.port set, else nothing would listen")
    if values["tls.port"] and values["tls.port"] == values["network.port"]:
        raise ConfigError(f"tls.port: must differ from network.port ({values['network.port']})")


def parse_set_options(items: list[str] | None) -> dict[str, str]:
    """Turn ``--set section.key=value`` strings into a mapping, rejecting malformed ones."""
    result: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        result[key.strip()] = value
    return result
