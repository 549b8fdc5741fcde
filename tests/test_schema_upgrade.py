"""A version-3 database (before the console) is upgraded in place: the new tables appear, events get their actor
column, and the rows already there are kept."""

from sqlalchemy import inspect, text
from sqlalchemy.orm import Session

from db.engine import init_schema, make_engine
from db.instances import record_event
from db.models import SCHEMA_VERSION, Event


def test_a_version_3_database_is_upgraded_to_the_console_schema(tmp_path):
    url = f"sqlite:///{tmp_path / 'node.sqlite'}"
    engine = make_engine(url)
    init_schema(engine)
    record_event(engine, "received", "1.2.3", "MODALITY", "kept across the upgrade")
    with engine.begin() as conn:  # what a version-3 node left behind
        for table in ("findings", "associations", "workers"):
            conn.execute(text(f"DROP TABLE {table}"))
        conn.execute(text("ALTER TABLE events DROP COLUMN actor"))
        conn.execute(text("UPDATE schema_info SET version = 3"))
    engine.dispose()

    engine = make_engine(url)
    assert init_schema(engine) == SCHEMA_VERSION == 4
    tables = set(inspect(engine).get_table_names())
    assert {"findings", "associations", "workers"} <= tables
    assert "actor" in {c["name"] for c in inspect(engine).get_columns("events")}
    with Session(engine) as session:
        (event,) = session.query(Event).all()
        assert event.detail == "kept across the upgrade" and event.actor is None
    record_event(engine, "label_added", None, None, "after the upgrade")
