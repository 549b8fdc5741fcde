"""Training runs in the database: one at a time (checked, and enforced by a partial unique index), dead runs."""

from __future__ import annotations

import pytest
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from db.engine import init_schema, make_engine
from db.models import RunState, TrainingRun
from db.training import TrainingBusy, fail_dead_runs, get_run, start_run


def _start(engine, pid: int = 1) -> int:
    with Session(engine) as session, session.begin():
        return start_run(session, trigger="command", started_by="admin", host="h", pid=pid, config={},
                         artifacts_dir="", last_label_id=0, images=0)


@pytest.fixture
def engine(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'node.sqlite'}")
    init_schema(engine)
    return engine


def test_one_run_at_a_time_and_the_database_enforces_it(engine):
    first = _start(engine)
    with pytest.raises(TrainingBusy, match=f"#{first} is still running"):
        _start(engine)
    # Two commands that both passed the check: the index refuses the second row.
    with pytest.raises(IntegrityError), Session(engine) as session, session.begin():
        session.add(TrainingRun(state=RunState.RUNNING, trigger="command", started_by="x", host="h",
                                config_json="{}", artifacts_dir=""))
    # Finished runs do not count.
    with Session(engine) as session, session.begin():
        row = session.get(TrainingRun, first)
        assert row is not None
        row.state = RunState.FAILED
    assert _start(engine) != first


def test_a_run_whose_process_is_gone_is_marked_failed(engine):
    run_id = _start(engine, pid=11)
    assert fail_dead_runs(engine, "other-host", lambda pid: False) == []  # another host's runs are not judged here
    assert fail_dead_runs(engine, "h", lambda pid: pid == 11) == []  # its process still runs
    assert fail_dead_runs(engine, "h", lambda pid: False) == [run_id]
    run = get_run(engine, run_id)
    assert run is not None and run.state is RunState.FAILED and "ended without finishing" in (run.error or "")
