"""Whether static int8 quantisation of the classifier keeps its decisions: speed and error against float32.

    .venv/bin/python benchmarks/int8_classifier.py --synthetic-train runs/synth_train --synthetic-test runs/synth_test \
        [--calibration 120] [--runs 15] [--threads 2] [--full-range]

Issue 14 allows int8 "only if it keeps the decisions". This measures that instead of assuming it. The bundled
classifier's float32 ONNX export (the one the node runs) is quantised by ONNX Runtime's static quantiser (QDQ, int8
weights per channel, uint8 activations, MinMax calibration). The calibration crops come from the training split only:
real films of the lung-mask set's training part and synthetic training images
(``python -m train.synthetic_opacities dataset DIR --part train --categories-per-image 2``). Every crop is made
through the node's path: normalise, lung U-Net, input check, lung crop.

The held-out crops are the classifier card's test images: the real test part and the synthetic test set
(``dataset DIR --part test --seed 1``). For each variant the table gives:

- its forward time (median of ``--runs``, batch 1);
- the largest and the 95th-percentile probability error against float32, and the largest category-probability error;
- the binary decisions and most likely categories that change;
- the lowest correlation of layer4's features with float32's (the heat map is made from them);
- how many held-out answers a guard of 3x the largest errors would send back to float32, as ``ai/precision.py``
  does for bfloat16.

Quantising takes about a minute per variant on 2 cores. Prints Markdown.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the worker, before torch loads

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from benchmarks.analysis_stages import cpu_model  # noqa: E402
from benchmarks.inference_engines import timed  # noqa: E402
from train.datasets import data_dir  # noqa: E402


def node_crops(classifier, segmenter, data: Path, part: str | None, limit: int) -> np.ndarray:  # noqa: ANN001
    """The classifier's input crops of the images in ``data`` (a labels.csv folder), made as the node makes them; at
    most ``limit``, drawn with a fixed seed. ``part`` is one part of the seeded split the classifier card uses
    (``train.evaluate_classifier``'s selection)."""
    from ai.input_check import check_lung_fields
    from ai.lung_crop import classifier_input
    from ai.normalise import normalise
    from train.evaluate_classifier import evaluation_items

    items = evaluation_items(data, part)
    if len(items) > limit:
        items = [items[i] for i in sorted(np.random.default_rng(0).choice(len(items), limit, replace=False))]
    crops = []
    for item in items:
        image = normalise(item.image)
        seg = segmenter.segment([image])[0]
        if check_lung_fields(seg.labels, seg.confidence).accepted:
            x, _ = classifier_input(image, seg.labels, classifier.input_size, classifier.margin,
                                    classifier.suppress_outside)
            crops.append(x.astype(np.float32))
    return np.stack(crops)


def quantise(fp32: Path, out: Path, calibration: np.ndarray, exclude: list[str], reduce_range: bool = True) -> None:
    """ONNX Runtime's static QDQ quantisation of ``fp32`` calibrated on ``calibration``. ``reduce_range``: 7-bit
    weights, which avoid the u8s8 saturation of CPUs without VNNI; CPUs with VNNI can take full 8-bit weights."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Crops(CalibrationDataReader):
        def __init__(self) -> None:
            self.crops = iter(calibration)

        def get_next(self) -> dict | None:
            x = next(self.crops, None)
            return None if x is None else {"input": x[None, None]}

    quantize_static(str(fp32), str(out), Crops(), quant_format=QuantFormat.QDQ, per_channel=True,
                    reduce_range=reduce_range, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=exclude)


def answers(model, crops: np.ndarray) -> list[tuple[float, np.ndarray, np.ndarray]]:  # noqa: ANN001
    """(probability, category probabilities, layer4 features) of each crop, computed as the node computes them."""
    import torch

    from ai.classifier import output_probabilities

    out = []
    for x in crops:
        outputs = model(x[None, None])
        probability, categories = output_probabilities({k: torch.from_numpy(v) for k, v in outputs.items()})
        out.append((probability, categories, outputs["feature_map"].ravel()))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="the lung-mask set (default: the shared data's)")
    parser.add_argument("--synthetic-train", type=Path, required=True)
    parser.add_argument("--synthetic-test", type=Path, required=True)
    parser.add_argument("--calibration", type=int, default=120, help="crops of each training source")
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--full-range", action="store_true",
                        help="8-bit weights (reduce_range off): only for CPUs with VNNI (AVX-512 VNNI, AVX-VNNI)")
    args = parser.parse_args()
    data = args.data or data_dir() / "cxr-lung-masks"

    import onnx
    import torch
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from ai.classifier import OUTPUTS, PneumoconiosisClassifier, inference_module
    from ai.models import CLASSIFIER, LUNG_UNET, model_path
    from ai.onnx_engine import OnnxModel, export_onnx
    from ai.precision import near_decision
    from ai.segment import LungSegmenter

    torch.set_num_threads(args.threads)  # OnnxModel takes its thread count from torch, as in the worker
    classifier = PneumoconiosisClassifier(model_path(CLASSIFIER), torch.device("cpu"), "onnxruntime", "fp32")
    segmenter = LungSegmenter(model_path(LUNG_UNET), torch.device("cpu"))
    calibration = np.concatenate([node_crops(classifier, segmenter, data, "train", args.calibration),
                                  node_crops(classifier, segmenter, args.synthetic_train, None, args.calibration)])
    held_out = {"real test": node_crops(classifier, segmenter, data, "test", 10**6),
                "synthetic test": node_crops(classifier, segmenter, args.synthetic_test, None, 10**6)}
    n = classifier.input_size
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        fp32.write_bytes(export_onnx(inference_module(classifier.model), torch.zeros(1, 1, n, n), OUTPUTS))
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32), str(prepared))
        nodes = onnx.load(str(prepared)).graph.node
        first_conv = next(nd.name for nd in nodes if nd.op_type == "Conv")
        heads = [nd.name for nd in nodes if nd.op_type in ("Gemm", "MatMul")]
        variants = {"int8, every layer": [], "int8, first convolution and heads in float32": [first_conv, *heads]}
        engines = {"float32 (the node)": OnnxModel(fp32.read_bytes(), OUTPUTS)}
        for name, exclude in variants.items():
            out = Path(tmp) / f"{len(engines)}.onnx"
            quantise(prepared, out, calibration, exclude, reduce_range=not args.full_range)
            engines[name] = OnnxModel(out.read_bytes(), OUTPUTS)
        example = held_out["real test"][0][None, None]
        reference = {k: answers(engines["float32 (the node)"], v) for k, v in held_out.items()}
        print(f"{cpu_model()}, {args.threads} threads, Python {platform.python_version()}, torch {torch.__version__}; "
              f"calibration {len(calibration)} training crops; "
              f"{'8' if args.full_range else '7'}-bit weights; held out: "
              + ", ".join(f"{k} {len(v)}" for k, v in held_out.items()) + f"; threshold {classifier.threshold:.4f}\n")
        print("| engine | forward ms | held-out set | probability error max / p95 | category error max "
              "| decisions changed | categories changed | layer4 correlation min | sent to float32 by a 3x guard |")
        print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for name, engine in engines.items():
            ms = timed(lambda engine=engine: engine(example), args.runs)[0]
            for set_name, crops in held_out.items():
                ref, got = reference[set_name], answers(engine, crops)
                dp = np.array([abs(a[0] - b[0]) for a, b in zip(ref, got, strict=True)])
                dc = np.array([np.abs(a[1] - b[1]).max() for a, b in zip(ref, got, strict=True)])
                flips = sum((a[0] >= classifier.threshold) != (b[0] >= classifier.threshold)
                            for a, b in zip(ref, got, strict=True))
                categories = sum(int(a[1].argmax()) != int(b[1].argmax()) for a, b in zip(ref, got, strict=True))
                corr = min(float(np.corrcoef(a[2], b[2])[0, 1]) for a, b in zip(ref, got, strict=True))
                # a category gap moves by up to twice a category's error
                sent = sum(near_decision(b[0], classifier.threshold, b[1].tolist(), 3 * dp.max(), 3 * 2 * dc.max())
                           for b in got)
                print(f"| {name} | {ms:.1f} | {set_name} | {dp.max():.4f} / {np.percentile(dp, 95):.4f} "
                      f"| {dc.max():.4f} | {flips} | {categories} | {corr:.4f} | {sent} of {len(crops)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
