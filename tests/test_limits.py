"""Resource limits before decoding: a small deflated dataset that declares a huge image is refused at intake and by
the analysis without being inflated, and the node's memory stays bounded."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ai.limits import DEFAULT_LIMITS, ImageLimits, ImageTooLarge, check_declared_size, read_dataset_bounded

from .dicomgen import clone_instances, deflate_bomb, synthetic_dx

SEND_AS_IS = """
import sys
from pynetdicom import AE, _config
_config.STORE_SEND_CHUNKED_DATASET = True  # the file's bytes as they are: deflated on the wire, never inflated
ae = AE(ae_title="ATTACKER")
ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.1.2.1.99")
assoc = ae.associate("127.0.0.1", int(sys.argv[1]), ae_title="PNEUMOCAD")
assert assoc.is_established, "association refused"
status = assoc.send_c_store(sys.argv[2])
print(f"status=0x{int(status.Status):04X}")
assoc.release()
"""


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    """The reported case: 1.5 MB on disk, a 28043 x 28043 16-bit image (1.5 GB) when inflated."""
    return deflate_bomb(tmp_path_factory.mktemp("bomb") / "bomb.dcm", 28043, 28043)


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_deflate_bomb_is_refused_at_intake_with_memory_bounded(node, bomb):
    assert bomb.stat().st_size < 2 * 2**20
    before = _peak_rss_mb(node.proc.pid)
    sent = subprocess.run([sys.executable, "-c", SEND_AS_IS, str(node.port), str(bomb)], capture_output=True,
                          text=True, timeout=60)
    assert "status=0xC004" in sent.stdout, sent.stdout + sent.stderr
    after = _peak_rss_mb(node.proc.pid)
    assert after - before < 100, f"serve's peak RSS grew from {before:.0f} to {after:.0f} MB"
    assert not list((node.storage_root / "archive").rglob("*.dcm"))
    assert not list((node.storage_root / "tmp").iterdir())
    assert "image exceeds the node's size limits" in node.log()
    assert "28043 x 28043" in node.log()


def test_a_deflated_image_within_the_limits_is_stored(node, tmp_path):
    small = deflate_bomb(tmp_path / "small.dcm", 512, 512)
    sent = subprocess.run([sys.executable, "-c", SEND_AS_IS, str(node.port), str(small)], capture_output=True,
                          text=True, timeout=60)
    assert "status=0x0000" in sent.stdout, sent.stdout + sent.stderr
    assert len(list((node.storage_root / "archive").rglob("*.dcm"))) == 1


def test_bounded_reader_refuses_before_inflating(bomb):
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with pytest.raises(ImageTooLarge, match="28043 x 28043"):
        read_dataset_bounded(bomb)
    with pytest.raises(ImageTooLarge):
        read_dataset_bounded(bomb, stop_before_pixels=True)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before < 100


def test_deflated_data_beyond_what_the_header_declares_is_refused(tmp_path):
    """A header that declares a small image but inflates to far more (a bomb hidden in a private element)."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = synthetic_dx(64, 64)
    ds.add_new(0x00091010, "OB", bytes(64 * 2**20))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    path = tmp_path / "hidden.dcm"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(ImageTooLarge, match="inflates to more than"):
        read_dataset_bounded(path)


def test_declared_limits_each(tmp_path):
    ds = synthetic_dx(16, 16)
    limits = ImageLimits(max_rows=100, max_columns=200, max_frames=2, max_uncompressed_mb=0.01)
    for rows, cols, frames, message in ((101, 10, 1, "101 x 10"), (10, 201, 1, "10 x 201"),
                                        (10, 10, 3, "3 frames"), (80, 80, 1, "MiB of pixels")):
        ds.Rows, ds.Columns, ds.NumberOfFrames = rows, cols, frames
        with pytest.raises(ImageTooLarge, match=message):
            check_declared_size(ds, limits)
    ds.Rows, ds.Columns, ds.NumberOfFrames = 4300, 4300, 1  # the largest real chest detectors pass the defaults
    check_declared_size(ds, DEFAULT_LIMITS)


def test_compressed_and_native_files_are_checked_too(tmp_path):
    (path,) = clone_instances(synthetic_dx(64, 64), tmp_path, 1)
    assert read_dataset_bounded(path).Rows == 64
    with pytest.raises(ImageTooLarge):
        read_dataset_bounded(path, ImageLimits(max_rows=32))


PEAK_OF_CHILD = """
import resource, subprocess, sys
proc = subprocess.run(sys.argv[1:], capture_output=True, text=True)
print(proc.stdout, end="")
print(f"peak_mb={resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024:.0f}")
"""


def test_analyse_refuses_the_bomb_with_a_clear_reason_and_bounded_memory(bomb):
    """`dicom-node analyse` on the deflate bomb passed 12 GB before the limits; now it refuses before inflating.
    What remains of its peak is the models, loaded at start (about 1 GB)."""
    import json

    cli = [sys.executable, "-m", "dicom_node.cli", "analyse", "--json", str(bomb)]
    run = subprocess.run([sys.executable, "-c", PEAK_OF_CHILD, *cli], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    record = json.loads(run.stdout.splitlines()[0])
    assert (record["analysed"], record["reason"], record["retryable"]) == (False, "image_too_large", False)
    assert "28043 x 28043" in record["explanation"]
    peak = float(run.stdout.rsplit("peak_mb=", 1)[1])
    assert peak < 2000, f"dicom-node analyse peaked at {peak:.0f} MB"


def test_analyse_takes_the_limits_from_the_configuration(tmp_path):
    import json

    (path,) = clone_instances(synthetic_dx(64, 64), tmp_path, 1)
    cli = [sys.executable, "-m", "dicom_node.cli", "analyse", "--json", "--set", "limits.max_rows=32", str(path)]
    run = subprocess.run(cli, capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert json.loads(run.stdout.splitlines()[0])["reason"] == "image_too_large", run.stdout + run.stderr
    bad = subprocess.run(cli[:-2] + ["limits.max_rows=0", str(path)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "limits.max_rows" in bad.stderr
