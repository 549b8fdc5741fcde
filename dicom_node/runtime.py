"""What every database-backed command opens first: the configuration, the archive and the database engine."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import Engine

from db.engine import init_schema, make_engine

from .archive import Archive
from .config import NodeConfig, default_config_path, load_config, parse_set_options
from .log_safety import setup_logging
from .tls import check_files


@dataclass
class Runtime:
    config: NodeConfig
    archive: Archive
    engine: Engine
    config_path: Path | None = None  # passed on to worker and training processes
    overrides: list[str] = field(default_factory=list)  # the --set options, passed on likewise


def open_runtime(config: Path | None, sets: list[str] | None, *, serve: bool = False) -> Runtime:
    """Load the configuration (``config`` or the default file, then ``--set`` options), set up logging, open the
    archive (``serve`` prepares its folders and checks the disk) and the database (schema created or upgraded).

    Raises ConfigError, SchemaError or OSError; the command line turns each into a clear message."""
    config_path = config if config is not None else default_config_path()
    cfg = load_config(config_path, parse_set_options(sets))
    setup_logging(cfg.logging.level)
    if serve:  # the TLS files must load (a ConfigError naming the key) before anything listens or exports
        check_files(cfg.tls, server=cfg.tls.enabled, client=any(d.tls for d in cfg.export.destinations))
    archive = Archive(cfg.storage.storage_root, cfg.storage.free_disk_reserve_bytes)
    archive.prepare() if serve else archive.root.mkdir(parents=True, exist_ok=True)
    engine = make_engine(cfg.database.url)
    init_schema(engine)
    return Runtime(cfg, archive, engine, config_path, list(sets or []))
