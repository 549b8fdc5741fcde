"""kill -9 of the node in the middle of 200 C-STOREs: what storescu saw acknowledged is archived exactly once.

The kill moment is random but seeded: the seed is printed (shown with a failure) and $PNEUMO_TEST_SEED replays it.
"""

from __future__ import annotations

import subprocess
import time

from pydicom import dcmread
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.models import Instance, Job

from .dicomgen import clone_instances, synthetic_dx
from .support.dicom_files import dataset_bytes
from .support.dicom_tools import PEER_ENV, parse_storescu, require_tool, storescu
from .support.node import open_db
from .support.seeds import SEED_ENV, seeded_random

COUNT = 200


def test_kill_9_mid_transfer_loses_nothing_acknowledged(node_factory, tmp_path):
    require_tool("storescu")
    rng, seed = seeded_random("kill moment")
    replay = f"(replay: {SEED_ENV}={seed})"
    files = clone_instances(synthetic_dx(512, 512, seed=7), tmp_path / "in", COUNT)
    by_uid = {dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in files}
    node = node_factory().start()

    sender = subprocess.Popen(
        ["storescu", "-v", "-aec", "PNEUMOCAD", "127.0.0.1", str(node.port), *map(str, files)],
        env=PEER_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    # Kill at a (seeded) random moment once some instances are through, well before the end.
    kill_after = rng.randint(5, COUNT - 50)
    deadline = time.monotonic() + 120
    while node.log().count("C-STORE from") < kill_after and time.monotonic() < deadline:
        time.sleep(0.005)
    pause = rng.uniform(0, 0.05)
    print(f"kill after {kill_after} C-STOREs and {pause:.3f} s")
    time.sleep(pause)  # land anywhere inside the next transfer, not just after a response
    node.kill()
    output = sender.communicate(timeout=120)[0]
    acknowledged = [f for f, status in parse_storescu(output) if status == "Success"]
    assert 0 < len(acknowledged) < COUNT, \
        f"kill landed outside the transfer ({len(acknowledged)} acknowledged) {replay}"

    node.start()  # same storage root and database
    tmp_leftovers = list((node.storage_root / "tmp").iterdir())
    assert tmp_leftovers == [], f"start-up must clear partial receptions {replay}"

    engine = open_db(node)
    with Session(engine) as session:
        rows = session.scalars(select(Instance)).all()
        per_uid = dict(session.execute(select(Instance.sop_instance_uid, func.count()).group_by(
            Instance.sop_instance_uid)).all())
        jobs_per_instance = dict(session.execute(select(Job.instance_id, func.count()).group_by(
            Job.instance_id)).all())
    by_row = {r.sop_instance_uid: r for r in rows}
    for name in acknowledged:
        uid = dcmread(name, stop_before_pixels=True).SOPInstanceUID
        assert per_uid.get(uid) == 1, f"acknowledged {name} is not in the database exactly once {replay}"
        archived = node.storage_root / by_row[uid].archive_path
        assert dataset_bytes(archived) == dataset_bytes(by_uid[uid]), f"{name} archived altered {replay}"
        assert jobs_per_instance[by_row[uid].id] == 1

    # Whatever else is in the archive (the interrupted instance, if its rename happened) is whole.
    for path in (node.storage_root / "archive").rglob("*.dcm"):
        uid = path.stem
        assert dataset_bytes(path) == dataset_bytes(by_uid[uid]), f"partial file {path} in the archive {replay}"

    # The modality retries everything: all 200 are stored, each once, with one job each.
    retry = storescu(node.port, files)
    assert retry.returncode == 0 and len(retry.statuses) == COUNT
    assert all(status == "Success" for _, status in retry.statuses)
    with Session(engine) as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == COUNT
        assert session.scalar(select(func.count()).select_from(Job)) == COUNT
    assert len(list((node.storage_root / "archive").rglob("*.dcm"))) == COUNT
    assert node.stop() == 0
