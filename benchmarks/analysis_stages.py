"""Per-stage analysis time on the Philips CR chest sample: decode, normalise, segment, post-process, input check,
classifier and heat map (when a classifier is installed), the whole analysis, and the whole minus decode.

    .venv/bin/python benchmarks/analysis_stages.py [--runs 15] [--threads 2] [--file PATH] [--dx-size 3000]
        [--precision auto|fp32|bf16]

Median and p90 of several runs after a warm-up, on the CPU with a fixed number of torch threads; prints a Markdown
table. The data are read from $PNEUMO_DATA_DIR or ../shared/data. As in the node's workers, idle OpenMP threads
sleep (``OMP_WAIT_POLICY=PASSIVE``) and the classifier's precision is ``worker.precision``'s (``--precision``).
``--dx-size N`` analyses instead a 16-bit N x N DX made from the sample (its pixels resampled to N x N, full 16-bit
range, MONOCHROME2, DX SOP class): the native grid that normalisation and post-processing run on at the size of
large flat-panel detectors.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_FILE = Path(os.environ.get("PNEUMO_DATA_DIR", REPO.parent / "shared" / "data")) / \
    "dicom-samples" / "chest" / "RG1_UNCR.dcm"
STAGES = ("decode", "normalise", "segment", "postprocess", "input_check", "classify", "heat_map", "total",
          "total_excl_decode")
GOAL_EXCL_DECODE_MS = 200.0


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def large_dx(source: Path, size: int) -> Path:
    """A 16-bit ``size`` x ``size`` DX For Presentation made from ``source``'s pixels, in a temporary file."""
    import tempfile

    import numpy as np
    import torch
    import torch.nn.functional as F
    from pydicom import dcmread
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = dcmread(source)
    pixels = torch.from_numpy(ds.pixel_array.astype(np.float32))[None, None]
    big = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False)[0, 0].numpy()
    big = (big - big.min()) / max(float(big.max() - big.min()), 1.0)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        big = 1.0 - big
    ds.PixelData = (big * 65535).astype("<u2").tobytes()
    ds.Rows = ds.Columns = size
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation, ds.PhotometricInterpretation = 15, 0, "MONOCHROME2"
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Modality = "DX"
    ds.WindowCenter, ds.WindowWidth = 32768, 65536
    for keyword in ("PresentationLUTShape", "RescaleSlope", "RescaleIntercept", "VOILUTSequence"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = Path(tempfile.mkdtemp(prefix="pneumo-dx-")) / f"dx_{size}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--file", type=Path, default=DEFAULT_FILE)
    parser.add_argument("--dx-size", type=int, default=0, help="analyse a 16-bit N x N DX made from --file")
    parser.add_argument("--precision", default="auto", help="the classifier's arithmetic (ai/precision.py)")
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as dicom-node worker sets it, before torch loads
    if args.dx_size:
        args.file = large_dx(args.file, args.dx_size)

    import torch

    torch.set_num_threads(args.threads)
    from ai import analyse
    from ai.models import lung_segmenter, pneumoconiosis_classifier
    from dicom_node.config import load_config

    model_dir = load_config(REPO / "config.toml").models.directory  # a site's models, as the node would use them
    segmenter = lung_segmenter("cpu", model_dir)
    classifier = pneumoconiosis_classifier("cpu", model_dir, precision=args.precision)
    samples: dict[str, list[float]] = {stage: [] for stage in STAGES}
    for i in range(args.warmup + args.runs):
        record = analyse(args.file, device="cpu", model_dir=model_dir, precision=args.precision)
        if not record.in_scope:
            print(f"warning: {args.file.name} was not analysed ({record.reason})", file=sys.stderr)
        if i >= args.warmup:
            timings = dict(record.timings)
            timings["total_excl_decode"] = timings["total"] - timings.get("decode", 0.0)
            for stage in STAGES:
                samples[stage].append(timings.get(stage, 0.0) * 1000)

    print(f"Analysis stages, {args.file.name} ({record.rows}x{record.columns}), model {segmenter.info.name} "
          f"{segmenter.info.version} at {segmenter.input_size} px; classifier "
          + (f"{classifier.info.name} {classifier.info.version} at {classifier.input_size} px" if classifier
             else "none") + (f" ({classifier.precision}; this image answered in "
                             f"{record.classification.precision})" if classifier and record.classification else ""))
    print(f"{cpu_model()}, {os.cpu_count()} cores visible, torch {torch.__version__} with {args.threads} threads, "
          f"Python {platform.python_version()}, {args.runs} runs after {args.warmup} warm-up, "
          f"{time.strftime('%Y-%m-%d')}")
    print()
    print("| stage | median ms | p90 ms |")
    print("| --- | ---: | ---: |")
    for stage in STAGES:
        values = sorted(samples[stage])
        p90 = values[min(len(values) - 1, int(round(0.9 * (len(values) - 1))))]
        print(f"| {stage} | {statistics.median(values):.1f} | {p90:.1f} |")
    median = statistics.median(samples["total_excl_decode"])
    print(f"\nwhole analysis excluding decode: median {median:.0f} ms; goal <= {GOAL_EXCL_DECODE_MS:.0f} ms: "
          f"{'met' if median <= GOAL_EXCL_DECODE_MS else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
