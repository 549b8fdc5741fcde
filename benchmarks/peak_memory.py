"""Peak memory of one analysis process for the largest image the default limits admit, and for the Philips CR.

    .venv/bin/python benchmarks/peak_memory.py [--size 6144] [--threads 2]

Each case runs ``dicom-node analyse`` in a fresh process (models loaded, as a worker has them) on a chest
radiograph: the Philips CR sample as it is, and the same image resized to ``--size`` x ``--size`` at 16 bits (the
default ``limits.max_rows`` / ``max_columns``), uncompressed and as JPEG 2000 lossless (decoded in the decoder
child process, whose own peak is reported separately when the platform tells it). Peak RSS comes from
``getrusage(RUSAGE_CHILDREN)`` after each run. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid

REPO = Path(__file__).resolve().parents[1]
SAMPLE = Path(os.environ.get("PNEUMO_DATA_DIR", REPO.parent / "shared" / "data")) / \
    "dicom-samples" / "chest" / "RG1_UNCR.dcm"


def resized(size: int, out: Path, compressed: bool) -> Path:
    ds = dcmread(SAMPLE)
    pixels = ds.pixel_array.astype(np.float32)
    big = np.asarray(Image.fromarray(pixels).resize((size, size), Image.BILINEAR))
    ds.Rows = ds.Columns = size
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 15, 14
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    data = np.clip(big, 0, 2**15 - 1).astype(np.uint16)
    if compressed:
        ds.compress(JPEG2000Lossless, data, encoding_plugin="pylibjpeg")
    else:
        ds.PixelData = data.tobytes()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(out, enforce_file_format=True)
    return out


def peak_of_child(args: list[str], threads: int) -> tuple[float, float, str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TORCH_NUM_THREADS": str(threads)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd=REPO)
    elapsed = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    verdict = (proc.stdout.strip().splitlines() or [proc.stderr.strip()[-200:]])[-1]
    # ru_maxrss of RUSAGE_CHILDREN is the largest child so far: only meaningful when it grew, so run the
    # cases from the smallest to the largest.
    return max(after, before) / 1024, elapsed, verdict


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=6144)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cases = [("Philips CR 1955 x 1841 (uncompressed)", SAMPLE),
                 (f"{args.size} x {args.size} 16-bit, JPEG 2000 lossless", resized(args.size, Path(tmp) / "j2k.dcm",
                                                                                  True)),
                 (f"{args.size} x {args.size} 16-bit, uncompressed", resized(args.size, Path(tmp) / "raw.dcm",
                                                                            False))]
        for name, path in cases:
            cli = [sys.executable, "-m", "dicom_node.cli", "analyse", str(path)]
            peak, elapsed, verdict = peak_of_child(cli, args.threads)
            rows.append((name, path.stat().st_size / 2**20, peak, elapsed, verdict.split(":", 1)[-1].strip()[:60]))
    print("| input | file MiB | peak RSS MiB (largest process so far) | wall s | verdict |")
    print("|---|---:|---:|---:|---|")
    for name, size, peak, elapsed, verdict in rows:
        print(f"| {name} | {size:.1f} | {peak:.0f} | {elapsed:.1f} | {verdict} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
