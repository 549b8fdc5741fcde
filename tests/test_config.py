"""Configuration: documented defaults, precedence, and errors that name the key."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import tomllib

import pytest

from dicom_node.config import RESULT_KINDS, SCHEMA, ConfigError, Destination, Peer, load_config

from .support.data import CONFIG, REPO


def test_config_toml_documents_every_key_with_the_built_in_default():
    table = tomllib.loads(CONFIG.read_text())
    flat = {f"{section}.{key}": value for section, content in table.items() for key, value in content.items()}
    assert set(flat) == set(SCHEMA), "config.toml and the schema disagree on the keys"
    for key, value in flat.items():
        assert value == SCHEMA[key].default, key
    text = CONFIG.read_text()
    for key in SCHEMA:  # each key has a comment right above it
        lines = text.splitlines()
        index = next(i for i, line in enumerate(lines) if line.startswith(key.split(".")[1] + " ="))
        assert lines[index - 1].startswith("#"), f"{key} has no comment"


def test_defaults_and_storage_root_relative_to_the_config_file(tmp_path):
    cfg = load_config(CONFIG, environ={})
    assert cfg.network.port == 11112 and cfg.network.ae_title == "PNEUMOCAD"
    assert cfg.storage.storage_root == (REPO / "var").resolve()
    assert cfg.database.url == f"sqlite:///{REPO / 'var' / 'node.sqlite'}"


def test_every_key_is_one_field_of_a_frozen_section():
    cfg = load_config(CONFIG, environ={})
    fields = {f"{section}.{f.name}" for section in {key.split(".")[0] for key in SCHEMA}
              for f in dataclasses.fields(getattr(cfg, section))}
    assert fields == set(SCHEMA)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.worker.batch_size = 8  # type: ignore[misc]
    assert cfg.models.directory is None and cfg.worker.device == "auto" and cfg.limits.max_rows == 6144


def test_destinations_are_typed_with_their_kinds_and_alternate():
    dests = [{"name": "pacs", "ae_title": "PACS", "host": "h", "port": 104,
              "alternate": {"ae_title": "PACS2", "host": "h2", "port": 105}},
             {"name": "sr-only", "ae_title": "RIS", "host": "r", "port": 11112, "types": ["sr"]}]
    cfg = load_config(CONFIG, {"export.destinations": json.dumps(dests)}, environ={})
    assert cfg.export.destinations == (
        Destination("pacs", Peer("PACS", "h", 104), RESULT_KINDS, Peer("PACS2", "h2", 105)),
        Destination("sr-only", Peer("RIS", "r", 11112), ("sr",), None))
    assert [str(p) for p in cfg.export.destinations[0].peers] == ["PACS@h:104", "PACS2@h2:105"]
    assert cfg.export.routes == {"pacs": RESULT_KINDS, "sr-only": ("sr",)}


def test_precedence_file_then_environment_then_command_line(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[network]\nport = 2000\nae_title = "FROMFILE"\n')
    env = {"DICOM_NODE_NETWORK_PORT": "3000", "DICOM_NODE_NETWORK_ALLOWED_CALLING_AETS": "A, B"}
    cfg = load_config(path, {"network.port": "4000"}, environ=env)
    assert cfg.network.port == 4000 and cfg.sources["network.port"] == "command line"
    assert cfg.network.ae_title == "FROMFILE"
    assert cfg.network.allowed_calling_aets == ("A", "B")
    assert load_config(path, environ=env).network.port == 3000


@pytest.mark.parametrize(
    ("toml", "overrides", "env", "message"),
    [
        ('[network]\nport = 70000\n', {}, {}, "network.port: must be between 0 and 65535"),
        ('[network]\nport = "eleven"\n', {}, {}, "network.port: expected int"),
        ('[network]\nae_title = "A_TITLE_FAR_TOO_LONG"\n', {}, {}, "network.ae_title: must be at most 16"),
        ('[network]\nprot = 1\n', {}, {}, "network.prot: unknown key"),
        ('[storage]\nduplicate_policy = "maybe"\n', {}, {}, "storage.duplicate_policy: must be one of"),
        ('', {"queue.max_attempts": "0"}, {}, "queue.max_attempts: must be between 1"),
        ('', {}, {"DICOM_NODE_STORAGE_FREE_DISK_RESERVE_MB": "lots"}, "storage.free_disk_reserve_mb: expected"),
        ('', {}, {"DICOM_NODE_DATABASE_URL": "not a url"}, "database.url: is not a database URL"),
        ('[network\n', {}, {}, "is not valid TOML"),
        ('[training]\nschedule = "at two"\n', {}, {}, "training.schedule: is not a cron expression"),
        ('', {"training.consensus": "loudest"}, {}, "training.consensus: must be one of latest, majority"),
        ('[worker]\nprecision = "fp16"\n', {}, {}, "worker.precision: must be one of auto, fp32, bf16"),
        ('[results]\nsc_compression = "png"\n', {}, {}, "results.sc_compression: must be one of jpeg, none"),
        ('', {"promotion.min_sensitivity": "1.5"}, {}, "promotion.min_sensitivity: must be between 0 and 1"),
    ],
)
def test_bad_values_name_the_key(tmp_path, toml, overrides, env, message):
    path = tmp_path / "c.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(path, overrides, environ=env)


def test_bad_config_stops_start_up_with_exit_2_and_the_key(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(CONFIG), "--set", "network.port=0",
         "--set", f"storage.storage_root={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert "network.port" in proc.stderr and "configuration error" in proc.stderr
