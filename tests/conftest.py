"""Shared fixtures: real DCMTK peers against a real ``dicom-node serve`` subprocess, and the model installations.

The helpers live in ``tests/support`` (see its ``__init__``); the names older tests import from here are
re-exported. The public data lives beside the checkout (``../shared/data``) or wherever $PNEUMO_DATA_DIR points.

Database tests take ``db_url`` (or ``databases``/``module_databases`` where they need several databases, or one
shared by a module), which runs them on SQLite and on PostgreSQL (``tests/support/postgres.py``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from .support.data import CONFIG, DATA_DIR, REPO, SAMPLES, sample_files
from .support.dicom_tools import (
    PEER_ENV,
    STORE_RE,
    STORESCU_FLAG,
    StoreResult,
    dcmtk_wire_encoding,
    file_transfer_syntax,
    parse_storescu,
    require_tool,
    storescu,
)
from .support.models import BUNDLED_MODELS, InstalledModels, install_models, installed_classifier, model_dir
from .support.net import free_port
from .support.node import Node, open_db
from .support.postgres import SKIP_ENV, Databases, PostgresCluster, PostgresUnavailable, start_cluster

__all__ = ["CONFIG", "DATA_DIR", "PEER_ENV", "REPO", "SAMPLES", "STORESCU_FLAG", "STORE_RE", "Node", "StoreResult",
           "dcmtk_wire_encoding", "file_transfer_syntax", "free_port", "open_db", "parse_storescu", "require_tool",
           "sample_files", "storescu"]


@pytest.fixture
def node_factory(tmp_path):
    nodes: list[Node] = []

    def make(**overrides: str) -> Node:
        node = Node(root=tmp_path / f"node{len(nodes)}", port=free_port(),
                    overrides={k.replace("__", "."): v for k, v in overrides.items()})
        node.root.mkdir(parents=True)
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        node.kill()


@pytest.fixture
def node(node_factory) -> Node:
    return node_factory().start()


# --- which models are installed: explicit, never whatever happens to be there ----------------------------------


@pytest.fixture(scope="session")
def segmenter_only_dir(tmp_path_factory):
    """A model directory with the bundled lung segmenter and no classifier (one per session: models load once)."""
    return model_dir(tmp_path_factory.mktemp("models-without-classifier"), classifier=False)


@pytest.fixture
def with_classifier(monkeypatch) -> InstalledModels:
    """The bundled lung segmenter and pneumoconiosis classifier, installed for this process and the nodes it
    starts."""
    overrides = install_models(monkeypatch, BUNDLED_MODELS)
    assert installed_classifier() is not None, f"no classifier in {BUNDLED_MODELS}"
    return InstalledModels(BUNDLED_MODELS, classifier=True, overrides=overrides)


@pytest.fixture
def without_classifier(monkeypatch, segmenter_only_dir) -> InstalledModels:
    """The bundled lung segmenter alone: no pneumoconiosis classifier is installed in this process (its analyses,
    result building and worker). A node subprocess would still fall back to the bundled classifier (see
    ``tests/support/models.py``)."""
    overrides = install_models(monkeypatch, segmenter_only_dir)
    assert installed_classifier() is None, f"a classifier is still found beside {segmenter_only_dir}"
    return InstalledModels(segmenter_only_dir, classifier=False, overrides=overrides)


@pytest.fixture(params=["with_classifier", "without_classifier"])
def installed_models(request) -> InstalledModels:
    """Each installation in turn: for tests whose every assertion is stated for both."""
    return request.getfixturevalue(request.param)


# --- the database: SQLite and PostgreSQL ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """One throwaway PostgreSQL cluster for the session, started by the first test that needs it. Missing server
    binaries or driver fail those tests (scripts/test.sh installs both) unless $PNEUMO_SKIP_POSTGRES=1."""
    if os.environ.get(SKIP_ENV) == "1":
        pytest.skip(f"PostgreSQL tests skipped: {SKIP_ENV}=1")
    try:
        cluster = start_cluster()
    except PostgresUnavailable as exc:
        missing = str(exc)
    else:
        missing = ""
    if missing:
        pytest.fail(missing, pytrace=False)
    yield cluster
    cluster.stop()


DB_BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgresql)]


@pytest.fixture(scope="module", params=DB_BACKENDS)
def db_backend(request) -> str:
    """Each backend in turn (module-scoped, so that a module's tests run on one backend, then on the other)."""
    return request.param


def _databases(request: pytest.FixtureRequest, backend: str) -> Databases:
    cluster = request.getfixturevalue("postgres_cluster") if backend == "postgresql" else None
    return Databases(backend, cluster)


@pytest.fixture
def databases(request, db_backend) -> Iterator[Databases]:
    made = _databases(request, db_backend)
    yield made
    made.drop()


@pytest.fixture(scope="module")
def module_databases(request, db_backend) -> Iterator[Databases]:
    """For module-scoped fixtures: their databases live as long as the module's tests of one backend."""
    made = _databases(request, db_backend)
    yield made
    made.drop()


@pytest.fixture
def db_url(databases, tmp_path) -> str:
    """The URL of a new, empty database: ``<tmp_path>/node.sqlite``, or a PostgreSQL database of its own."""
    return databases.url(tmp_path / "node.sqlite")


@pytest.fixture
def postgres_url(postgres_cluster) -> Iterator[str]:
    """A new, empty PostgreSQL database, for what only PostgreSQL does (row locks that other claims skip)."""
    url = postgres_cluster.create_database()
    yield url
    postgres_cluster.drop_database(url)
