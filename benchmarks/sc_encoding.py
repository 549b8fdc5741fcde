"""How the heat-map SC could be stored: size, CPU and pixel error of each encoding, on a real picture.

    .venv/bin/python benchmarks/sc_encoding.py [--file DICOM] [--runs 7]

Analyses ``--file`` (the Philips CR by default), draws its SC picture as the node does (``render``: the radiograph,
heat map, contours and banner), builds the uncompressed SC with highdicom (``results.sc_compression = "none"``) and
then stores it in each candidate encoding: the node's JPEG Baseline (``compress_jpeg``, quality 95, 4:2:2), the same
with full or quarter chrominance and at quality 90, and the lossless codecs pydicom can encode with (RLE, JPEG-LS,
JPEG 2000, where their plugins are installed). Per encoding: the file's size and ratio to the uncompressed pixels,
the median CPU milliseconds of encoding and of writing the file with fsync (what the worker pays; the PACS pays for
the bytes again), the pixel error against the uncompressed picture on the grey pixels (mean, 99th percentile) and
on the coloured ones (contours and heat map: 99th percentile, largest), and dciodvfy's errors on the written file
(where dciodvfy is on ``PATH``). Prints a Markdown table and the machine.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.analysis_stages import DEFAULT_FILE, cpu_model  # noqa: E402

COLOURED = 20  # a pixel whose channels differ by more than this is part of the contours or the heat map


def cpu_ms(call: Callable[[], object], runs: int) -> float:
    """Median CPU milliseconds of ``call`` (this process, all threads) after one warm-up."""
    call()
    samples = []
    for _ in range(runs):
        started = time.process_time()
        call()
        samples.append((time.process_time() - started) * 1000)
    return statistics.median(samples)


def encoding_ms(encode: Callable, plain, rgb, runs: int) -> float:  # noqa: ANN001
    """Median CPU milliseconds of ``encode`` on fresh copies of the uncompressed SC (the copies made untimed)."""
    samples = []
    for _ in range(runs + 1):
        ds = copy.deepcopy(plain)
        started = time.process_time()
        encode(ds, rgb)
        samples.append((time.process_time() - started) * 1000)
    return statistics.median(samples[1:])


def write_fsync(ds, path: Path) -> None:  # noqa: ANN001
    from pydicom import dcmwrite

    with path.open("wb") as fh:
        dcmwrite(fh, ds, enforce_file_format=True)
        fh.flush()
        os.fsync(fh.fileno())


def dciodvfy_errors(path: Path) -> str:
    if shutil.which("dciodvfy") is None:
        return "n/a"
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return str(sum(line.startswith("Error") for line in (out.stdout + out.stderr).splitlines()))


def jpeg_variant(quality: int, subsampling: int) -> Callable:
    """The node's ``compress_jpeg`` with other settings (for comparison only)."""
    from dicom_node.results.sc import compress_jpeg

    return lambda ds, rgb: compress_jpeg(ds, rgb, quality=quality, subsampling=subsampling)


def lossless_variant(uid, plugin: str) -> Callable | None:  # noqa: ANN001
    """pydicom's encoder for a lossless syntax through ``plugin``, or None when that plugin is not installed. Never
    GDCM's: its RLE encoder aborts the process on this picture (a C++ exception out of gdcmRLECodec.cxx)."""
    from pydicom.pixels.encoders.base import get_encoder

    if plugin not in get_encoder(uid).available_plugins:
        return None

    def encode(ds, rgb) -> None:  # noqa: ANN001
        ds.compress(uid, arr=rgb, encoding_plugin=plugin, generate_instance_uid=False)
    return encode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--file", type=Path, default=DEFAULT_FILE)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    warnings.simplefilter("ignore")

    import numpy as np
    import PIL
    import pydicom
    from pydicom import dcmread
    from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

    from ai.analysis import analyse
    from dicom_node.results import NodeIdentity, build_results, derive_device_uid
    from dicom_node.results.overlay import render
    from dicom_node.results.sc import banner_lines, compress_jpeg

    source = dcmread(args.file)
    record = analyse(source, device="cpu")
    if not record.in_scope:
        print(f"{args.file.name} was not analysed ({record.reason}): no picture to encode")
        return 1
    node = NodeIdentity(ae_title="PNEUMOCAD", device_uid=derive_device_uid("PNEUMOCAD"), sc_compression="none")
    plain = next(r.dataset for r in build_results(source, record, node) if r.kind == "sc")
    heat = record.classification.heat_map if record.classification is not None else None
    rgb = plain.pixel_array  # the picture as drawn, uncompressed
    truth = rgb.astype(np.int16)
    coloured = (truth.max(axis=-1) - truth.min(axis=-1)) > COLOURED
    render_ms = cpu_ms(lambda: render(record.image.pixels, record.labels, heat, banner_lines(record)), args.runs)

    candidates: list[tuple[str, Callable | None]] = [
        ("uncompressed RGB, Explicit VR Little Endian (`none`)", lambda ds, pixels: None),
        ("JPEG Baseline q95, 4:2:2, YBR_FULL_422 (the node's `jpeg`)", compress_jpeg),
        ("JPEG Baseline q95, 4:4:4, YBR_FULL", jpeg_variant(95, 0)),
        ("JPEG Baseline q95, 4:2:0, YBR_FULL_422 (highdicom's JPEG path)", jpeg_variant(95, 2)),
        ("JPEG Baseline q90, 4:2:2, YBR_FULL_422", jpeg_variant(90, 1)),
        ("RLE Lossless (pylibjpeg-rle)", lossless_variant(RLELossless, "pylibjpeg")),
        ("JPEG-LS Lossless (pyjpegls)", lossless_variant(JPEGLSLossless, "pyjpegls")),
        ("JPEG 2000 Lossless (pylibjpeg-openjpeg)", lossless_variant(JPEG2000Lossless, "pylibjpeg")),
    ]
    rows = []
    with tempfile.TemporaryDirectory(prefix="pneumo-sc-") as folder:
        for name, encode in candidates:
            if encode is None:
                rows.append(f"| {name} | no encoder installed | | | | | |")
                continue
            encode_ms = encoding_ms(encode, plain, rgb, args.runs)
            encoded = copy.deepcopy(plain)
            encode(encoded, rgb)
            path = Path(folder) / "sc.dcm"
            write_ms = cpu_ms(lambda: write_fsync(encoded, path), args.runs)  # noqa: B023
            size = path.stat().st_size
            decoded = dcmread(path).pixel_array.astype(np.int16)  # RGB, as pydicom returns YBR
            error = np.abs(decoded - truth).max(axis=-1)
            grey, colour = error[~coloured], error[coloured]
            rows.append(f"| {name} | {size / 1e6:.2f} MB ({rgb.nbytes / size:.1f}x) | {encode_ms:.1f} | "
                        f"{write_ms:.1f} | {grey.mean():.2f} / {np.percentile(grey, 99):.0f} | "
                        f"{np.percentile(colour, 99):.0f} / {colour.max()} | {dciodvfy_errors(path)} |")

    print(f"SC encodings of {args.file.name}'s heat-map picture ({rgb.shape[1]} x {rgb.shape[0]} RGB, "
          f"{rgb.nbytes / 1e6:.1f} MB of pixels; drawing it: {render_ms:.0f} ms of CPU)")
    print(f"{cpu_model()}, {os.cpu_count()} cores visible, Python {platform.python_version()}, pydicom "
          f"{pydicom.__version__}, Pillow {PIL.__version__}, median of {args.runs} runs, {time.strftime('%Y-%m-%d')}")
    print("\n| encoding | file | encode, CPU ms | write + fsync, CPU ms | grey pixels: mean / p99 error | "
          "coloured pixels: p99 / max error | dciodvfy errors |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
