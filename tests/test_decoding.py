"""ai.decoding: crash-proof pixel decoding, the documented decoder order, reason codes and retryable flags.

The aborting stream is built from the real Philips JPEG 2000 sample: its codestream's first bytes (SOC, the SIZ
marker and its length) followed by deterministic random bytes, re-encapsulated. Plain python-gdcm (pydicom's
default plugin for JPEG 2000) calls abort() on it; the node must lose only that image.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.pixels import pixel_array
from pydicom.uid import ExplicitVRBigEndian, ImplicitVRLittleEndian, JPEGLSLossless, RLELossless

from ai import decoding
from ai.analysis import FAILURE_REASONS, analyse_batch
from ai.decoding import (
    GDCM_READER,
    NATIVE,
    PLUGIN_ORDER,
    DecoderCrashed,
    DecoderTimeout,
    UndecodablePixels,
    UnreadableImage,
    decode,
    decoder_process,
    plugin_order,
)
from ai.normalise import decode_pixels

from .dicomgen import aborting_j2k as _aborting_j2k
from .dicomgen import write_pixel_source
from .support.data import CHEST_J2K_LOSSLESS as J2K_LOSSLESS
from .support.data import CHEST_J2K_LOSSY as J2K_LOSSY  # the smaller Philips J2K: 0.15 s to decode
from .support.data import CHEST_JPEG_LS as JPEG_LS
from .support.data import CHEST_UNCOMPRESSED as UNCOMPRESSED
from .support.data import REPO, SAMPLES
from .support.dicom_tools import require_tool


def aborting_j2k(path=J2K_LOSSY, **kwargs):
    return _aborting_j2k(path, **kwargs)


@pytest.fixture(scope="module")
def bad_j2k_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("abort") / "aborting_j2k.dcm"
    aborting_j2k().save_as(path, enforce_file_format=True)
    return path


def test_plain_gdcm_aborts_on_the_stream_and_pylibjpeg_fails_cleanly(bad_j2k_file):
    script = textwrap.dedent("""
        import sys
        from pydicom.pixels import pixel_array
        try:
            pixel_array(sys.argv[1], decoding_plugin=sys.argv[2])
        except Exception:
            sys.exit(3)  # a clean exception
        sys.exit(0)
    """)
    gdcm = subprocess.run([sys.executable, "-c", script, str(bad_j2k_file), "gdcm"], capture_output=True,
                          timeout=60)
    assert gdcm.returncode == -signal.SIGABRT, (gdcm.returncode, gdcm.stderr[-500:])
    openjpeg = subprocess.run([sys.executable, "-c", script, str(bad_j2k_file), "pylibjpeg"], capture_output=True,
                              timeout=60)
    assert openjpeg.returncode == 3, (openjpeg.returncode, openjpeg.stderr[-500:])


def test_an_aborting_decoder_costs_only_its_image_and_is_restarted():
    good = dcmread(J2K_LOSSY)
    process = decoder_process()
    decode(good)  # the decoder is up
    first_pid = process.pid
    with pytest.raises(DecoderCrashed) as caught:
        decode_pixels(aborting_j2k())
    assert caught.value.reason == "decoder_crashed" and caught.value.retryable is False
    assert isinstance(caught.value, UnreadableImage)
    assert str(caught.value) == "the decoder process died while decoding this image (killed by signal 6)"
    assert process.pid is None  # the dead child was reaped and not replaced yet
    decoded = decode(good)  # the next image starts a new child and decodes normally
    assert decoded.isolated and decoded.plugin == "pylibjpeg"
    assert process.pid not in (None, first_pid)
    np.testing.assert_array_equal(decoded.array, pixel_array(J2K_LOSSY, decoding_plugin="pylibjpeg"))


def test_a_stream_every_decoder_refuses_cleanly_is_undecodable_pixels():
    # With the whole SIZ segment kept, gdcm fails cleanly too: both decoders are tried, in order, and both refuse.
    process = decoder_process()
    decode(dcmread(J2K_LOSSY))
    pid = process.pid
    with pytest.raises(UndecodablePixels) as caught:
        decode(aborting_j2k(keep=45))
    assert caught.value.reason == "undecodable_pixels" and not caught.value.retryable
    assert str(caught.value) == "pixel data cannot be decoded (pylibjpeg: RuntimeError; gdcm: RuntimeError)"
    assert process.pid == pid  # a clean failure does not cost a restart


def test_a_hung_decode_times_out_and_the_decoder_is_killed():
    ds = dcmread(J2K_LOSSLESS)  # 0.7 s or more to decode: far above the timeout below
    process = decoder_process()
    process.start()
    pid = process.pid
    started = time.monotonic()
    with pytest.raises(DecoderTimeout) as caught:
        decode(ds, timeout=0.05)
    assert time.monotonic() - started < 5
    assert caught.value.reason == "decoder_timeout" and not caught.value.retryable
    assert str(caught.value) == "pixel data decoding took longer than 0.05 s; decoder killed"
    assert not _alive(pid)
    assert decode(dcmread(J2K_LOSSY)).plugin == "pylibjpeg"


def test_a_decoder_killed_from_outside_gets_one_more_try_with_the_same_image():
    import threading

    ds = dcmread(J2K_LOSSLESS)  # 0.7 s or more to decode: time to kill the child while it works
    process = decoder_process()
    process.start()
    pid, starts = process.pid, process.starts
    results = []
    worker = threading.Thread(target=lambda: results.append(decode(ds)))
    worker.start()
    time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)  # as the OOM killer would
    worker.join(60)
    assert results and results[0].plugin == "pylibjpeg", "the image must not fail for a kill from outside"
    assert process.starts == starts + 1 and process.pid != pid


def test_batch_with_an_aborting_image_analyses_the_others():
    bad = aborting_j2k()
    goods = [dcmread(p) for p in (J2K_LOSSY, J2K_LOSSLESS, JPEG_LS)]
    records = analyse_batch([bad, *goods], device="cpu")
    bad_record, *good_records = records
    assert not bad_record.in_scope and bad_record.reason == "decoder_crashed"
    assert bad_record.retryable is False
    assert bad_record.error == ("DecoderCrashed: the decoder process died while decoding this image "
                                "(killed by signal 6)")
    assert bad_record.explanation == FAILURE_REASONS["decoder_crashed"][0]
    header = dcmread(J2K_LOSSY, stop_before_pixels=True)
    for value in (header.PatientBirthDate, str(header.PatientName), header.PatientID):
        assert value not in bad_record.error and value not in bad_record.explanation
    for record in good_records:
        assert record.in_scope and record.error is None and record.reason == "in_scope", record.reason
        assert record.lung_area_px["right"] > 0


def test_the_decoder_imports_no_torch_although_the_parent_has_it():
    import torch  # noqa: F401 - the parent has torch loaded, as a worker does

    modules = decoder_process().loaded_modules()
    assert "pydicom" in modules and "numpy" in modules
    assert not {"torch", "torchvision", "sqlalchemy", "dicom_node", "db", "train"} & set(modules)


CHILD_PID_SCRIPT = textwrap.dedent("""
    import os, signal, sys, threading
    from pydicom import dcmread
    from ai.decoding import decode, decoder_process
    if sys.argv[2] == "kill-after-thread":  # started from a thread that has ended: no PDEATHSIG, the watchdog
        thread = threading.Thread(target=lambda: decode(dcmread(sys.argv[1])))
        thread.start()
        thread.join()
    else:
        decode(dcmread(sys.argv[1]))
    print(decoder_process().pid, flush=True)
    if sys.argv[2].startswith("kill"):
        os.kill(os.getpid(), signal.SIGKILL)  # no atexit: the kernel / the child's watchdog must end it
""")


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("ending", ["exit", "kill", "kill-after-thread"])
def test_the_decoder_never_outlives_its_parent(ending):
    proc = subprocess.run([sys.executable, "-c", CHILD_PID_SCRIPT, str(J2K_LOSSY), ending], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    child = int(proc.stdout.split()[0])
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child), f"decoder {child} outlived its parent ({ending})"


# ---------------------------------------------------------------------------------------------------- order

EXPECTED_ORDER = {  # the table in docs/transfer-syntaxes.md
    "1.2.840.10008.1.2.4.50": ("gdcm", "pillow"),
    "1.2.840.10008.1.2.4.51": ("gdcm", "pillow"),
    "1.2.840.10008.1.2.4.57": ("gdcm",),
    "1.2.840.10008.1.2.4.70": ("gdcm",),
    "1.2.840.10008.1.2.4.80": ("gdcm", "pyjpegls"),
    "1.2.840.10008.1.2.4.81": ("gdcm", "pyjpegls"),
    "1.2.840.10008.1.2.4.90": ("pylibjpeg", "gdcm"),
    "1.2.840.10008.1.2.4.91": ("pylibjpeg", "gdcm"),
    "1.2.840.10008.1.2.5": ("pylibjpeg", "pydicom"),
}


def test_plugin_order_is_the_documented_one():
    assert PLUGIN_ORDER == EXPECTED_ORDER
    assert plugin_order("1.2.840.10008.1.2.4.51", 12) == (GDCM_READER,)
    assert plugin_order("1.2.840.10008.1.2.4.51", 8) == ("gdcm", "pillow")
    doc = (REPO / "docs" / "transfer-syntaxes.md").read_text()
    section = doc.split("## Decoder order", 1)[1].split("\n## ", 1)[0]
    rows = dict(re.findall(r"^\| [^|]+ \| `?(1\.2\.840\.10008\.[0-9.]+)`? \| ([^|]+) \|", section, re.MULTILINE))
    for uid, plugins in EXPECTED_ORDER.items():
        assert uid in rows, f"{uid} missing from the decoder order table"
        assert [p.strip(" `*") for p in rows[uid].split("->")] == list(plugins), uid


def test_every_compressed_sample_is_decoded_by_the_first_plugin_of_its_syntax():
    compressed = [p for d in ("chest", "not-chest") for p in sorted((SAMPLES / d).glob("*.dcm"))
                  if "J2K" in p.name or "JLS" in p.name]
    assert len(compressed) == 5
    for path in compressed:
        ds = dcmread(path)
        result = decode(ds)
        syntax = str(ds.file_meta.TransferSyntaxUID)
        assert result.isolated and result.failed == [], path.name
        assert result.plugin == EXPECTED_ORDER[syntax][0], (path.name, result.plugin)
        assert result.array.shape == (ds.Rows, ds.Columns)


@pytest.fixture(scope="module")
def crops(tmp_path_factory):
    """A 128x128 crop of the Philips chest in every other compressed syntax (pydicom and DCMTK encoders)."""
    work = tmp_path_factory.mktemp("crops")
    full = dcmread(UNCOMPRESSED)
    pixels = np.ascontiguousarray(full.pixel_array[900:1028, 900:1028])

    def source(values: np.ndarray, bits: int, name: str):
        return write_pixel_source(UNCOMPRESSED, values, bits, work / f"{name}.dcm"), values

    src16 = source(pixels, 15, "src16")
    src12 = source(pixels >> 3, 12, "src12")
    src8 = source((255 - (pixels >> 7)).astype(np.uint8), 8, "src8")
    out = {}
    for name, (src, reference), command in [
        ("jpeg-baseline", src8, "dcmcjpeg +eb +sr"), ("jpeg-extended-8", src8, "dcmcjpeg +ee +sr"),
        ("jpeg-extended-12", src12, "dcmcjpeg +ee +sr"), ("jpeg-lossless", src16, "dcmcjpeg +el"),
        ("jpeg-lossless-sv1", src16, "dcmcjpeg +e1"),
    ]:
        tool, *options = command.split()
        dest = work / f"{name}.dcm"
        subprocess.run([require_tool(tool), *options, str(src), str(dest)], check=True, capture_output=True,
                       timeout=60)
        out[name] = (dest, reference)
    for name, syntax in (("rle", RLELossless), ("jpeg-ls-lossless", JPEGLSLossless)):
        ds = dcmread(src16[0])
        ds.compress(syntax)
        dest = work / f"{name}.dcm"
        ds.save_as(dest, enforce_file_format=True)
        out[name] = (dest, pixels)
    return out


@pytest.mark.parametrize("name, plugin, lossless", [
    ("jpeg-baseline", "gdcm", False), ("jpeg-extended-8", "gdcm", False), ("jpeg-extended-12", GDCM_READER, False),
    ("jpeg-lossless", "gdcm", True), ("jpeg-lossless-sv1", "gdcm", True), ("rle", "pylibjpeg", True),
    ("jpeg-ls-lossless", "gdcm", True),
])
def test_other_syntaxes_are_decoded_by_the_documented_plugin(crops, name, plugin, lossless):
    path, reference = crops[name]
    result = decode(dcmread(path))
    assert result.isolated and result.plugin == plugin and result.failed == []
    if lossless:
        np.testing.assert_array_equal(result.array, reference)
    else:
        error = np.abs(result.array.astype(np.int64) - reference.astype(np.int64))
        assert error.mean() < 0.01 * reference.max()


def test_native_syntaxes_decode_in_process():
    ds = dcmread(UNCOMPRESSED)
    reference = ds.pixel_array
    for syntax in (ImplicitVRLittleEndian, ExplicitVRBigEndian):
        copy = dcmread(UNCOMPRESSED)
        copy.file_meta.TransferSyntaxUID = syntax
        if syntax == ExplicitVRBigEndian:
            copy.PixelData = reference.astype(">u2").tobytes()
        result = decode(copy)
        assert (result.plugin, result.isolated) == (NATIVE, False)
        np.testing.assert_array_equal(result.array, reference)


def test_truncated_native_pixels_are_undecodable_in_process():
    ds = dcmread(UNCOMPRESSED)
    ds.PixelData = ds.PixelData[:1000]
    with pytest.raises(UndecodablePixels) as caught:
        decode(ds)
    assert caught.value.reason == "undecodable_pixels"
    assert str(caught.value) == "pixel data cannot be decoded (native: ValueError)"


def test_no_pixel_data_and_no_transfer_syntax():
    ds = dcmread(UNCOMPRESSED, stop_before_pixels=True)
    with pytest.raises(UnreadableImage) as caught:
        decode(ds)
    assert caught.value.reason == "no_pixel_data"
    ds = dcmread(UNCOMPRESSED)
    del ds.file_meta
    with pytest.raises(UndecodablePixels):
        decode(ds)


def test_decoder_module_is_the_only_child_entry_point():
    # The child runs "python -m ai.decoding <parent pid>": a wrong parent pid makes it exit at once.
    proc = subprocess.run([sys.executable, "-m", "ai.decoding", str(os.getpid() + 999_999)], cwd=REPO,
                          capture_output=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout == b""
    assert decoding.DECODE_TIMEOUT == 60.0
