"""The classifier (ResNet-34) and the lung U-Net in each candidate inference engine, from the bundled checkpoints,
on the same inputs in one run; and the heat map's two methods on the Philips CR sample.

    .venv/bin/python benchmarks/inference_engines.py [--runs 20] [--threads 2]

Engines: eager torch as the node ran it before (batch norms, NCHW), eager with batch norms folded and channels-last,
the same in bfloat16 (torch autocast, and with the weights stored in bfloat16 as the node's bfloat16 path runs it),
TorchScript trace + freeze, and ONNX Runtime (the export the node makes at load, ``ai/onnx_engine.py``). Each
row gives the median and p90 of one forward pass at batch 1 and the largest output difference from eager torch.
Heat map: Grad-CAM (backward pass) against the class activation map from the forward pass's features (what the
node computes): time on top of the forward pass and the maps' correlation on the sample's real lung crop. Prints
Markdown tables.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.analysis_stages import DEFAULT_FILE, cpu_model  # noqa: E402


def timed(call: Callable[[], object], runs: int, warmup: int = 3) -> tuple[float, float, float]:
    """Median and p90 wall-clock ms of ``call``, and its median CPU ms (all threads: what it takes from others)."""
    for _ in range(warmup):
        call()
    samples, cpu = [], []
    for _ in range(runs):
        started, cpu_started = time.perf_counter(), time.process_time()
        call()
        samples.append((time.perf_counter() - started) * 1000)
        cpu.append((time.process_time() - cpu_started) * 1000)
    samples.sort()
    return statistics.median(samples), samples[min(len(samples) - 1, int(0.9 * len(samples)))], statistics.median(cpu)


def engines(build: Callable[[], object], example, runs: int  # noqa: ANN001
            ) -> list[tuple[str, float, float, float, float]]:
    """(engine, median ms, p90 ms, median CPU ms, max |difference| from eager) for one network; ``build()`` gives
    a fresh eval-mode torch module whose forward returns one tensor."""
    import numpy as np
    import torch

    from ai.onnx_engine import onnx_model_of
    from ai.precision import bfloat16_copy, bfloat16_hardware

    rows = []
    eager = build()
    with torch.inference_mode():
        reference = eager(example).numpy()
        rows.append(("eager torch", *timed(lambda: eager(example), runs), 0.0))
        folded = build()
        folded.model.eval().fuse_for_inference().to(memory_format=torch.channels_last)  # type: ignore[attr-defined]
        last = example.contiguous(memory_format=torch.channels_last)
        diff = float(np.abs(folded(last).numpy() - reference).max())
        rows.append(("eager, batch norms folded, channels-last", *timed(lambda: folded(last), runs), diff))

        def bf16() -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return folded(last)
        diff = float(np.abs(bf16().float().numpy() - reference).max())
        hardware = bfloat16_hardware() or "emulated: no AMX or AVX-512 BF16"
        rows.append((f"the same in bfloat16 autocast ({hardware})", *timed(bf16, runs), diff))
        stored = bfloat16_copy(folded)  # what ai/classifier.py runs
        last16 = last.to(torch.bfloat16)
        diff = float(np.abs(stored(last16).float().numpy() - reference).max())
        rows.append(("the same with weights stored in bfloat16 (the node's bfloat16 path; ai/precision.py)",
                     *timed(lambda: stored(last16), runs), diff))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        frozen = torch.jit.freeze(torch.jit.trace(build(), example).eval())
        diff = float(np.abs(frozen(example).numpy() - reference).max())
        rows.append(("TorchScript trace + freeze", *timed(lambda: frozen(example), runs), diff))
    session = onnx_model_of(build(), example, ("out",))
    array = example.numpy()
    diff = float(np.abs(session(array)["out"] - reference).max())
    rows.append(("ONNX Runtime (the node's engine on CPU)", *timed(lambda: session(array), runs), diff))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--file", type=Path, default=DEFAULT_FILE)
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as dicom-node worker sets it, before torch loads

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from ai import checkpoint
    from ai.explain import class_activation_map, grad_cam
    from ai.lung_crop import classifier_input
    from ai.models import CLASSIFIER, LUNG_UNET, lung_segmenter, model_path
    from ai.normalise import decode_pixels, normalise_dataset, read_image_file
    from ai.resnet import PneumoconiosisNet
    from ai.unet import UNet

    classifier_file = checkpoint.load(model_path(CLASSIFIER), checkpoint.CLASSIFIER_FIELDS)
    unet_file = checkpoint.load(model_path(LUNG_UNET), checkpoint.SEGMENTER_FIELDS)
    size = int(classifier_file["input_size"])
    unet_size = int(unet_file["input_size"])

    class Binary(torch.nn.Module):  # one output tensor: the binary logit and the feature map are both kept alive
        def __init__(self) -> None:
            super().__init__()
            self.model = PneumoconiosisNet()
            self.model.load_state_dict(classifier_file.state_dict)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.model.forward_with_feature_map(x)
            return torch.cat([out["binary"], out["profusion"].flatten(), out["feature_map"].flatten()])

    class Lungs(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = UNet(base_width=int(unet_file["base_width"]), depth=int(unet_file["depth"]))
            self.model.load_state_dict(unet_file.state_dict)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(self.model(x))

    ds = read_image_file(args.file)
    image = normalise_dataset(ds, decode_pixels(ds))
    seg = lung_segmenter("cpu").segment([image])[0]
    x, _ = classifier_input(image, seg.labels, size)
    crop = torch.from_numpy(x)[None, None]
    from ai.segment import model_input

    lungs_input = torch.from_numpy(model_input(image, unet_size)[0])[None, None]

    print(f"Inference engines, bundled checkpoints, batch 1, inputs from {args.file.name}")
    print(f"{cpu_model()}, {os.cpu_count()} cores visible, torch {torch.__version__} with {args.threads} threads, "
          f"onnxruntime {__import__('onnxruntime').__version__}, Python {platform.python_version()}, {args.runs} runs "
          f"after 3 warm-up, {time.strftime('%Y-%m-%d')}")
    for title, build, example in ((f"ResNet-34 classifier at {size} px", lambda: Binary().eval(), crop),
                                  (f"lung U-Net at {unet_size} px", lambda: Lungs().eval(), lungs_input)):
        print(f"\n{title}\n\n| engine | median ms | p90 ms | median CPU ms | max abs difference from eager |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for name, median, p90, cpu, diff in engines(build, example, args.runs):
            print(f"| {name} | {median:.1f} | {p90:.1f} | {cpu:.1f} | {diff:.2e} |")

    net = Binary().eval().model
    with torch.inference_mode():
        forward = timed(lambda: net.forward_with_feature_map(crop), args.runs)
        out = net.forward_with_feature_map(crop)
        cam = class_activation_map(out["feature_map"], net.binary.weight[0], (size, size))
        cam_time = timed(lambda: class_activation_map(out["feature_map"], net.binary.weight[0], (size, size)),
                         args.runs)
    reference = grad_cam(net, crop)
    grad_time = timed(lambda: grad_cam(net, crop), max(5, args.runs // 2), warmup=1)
    correlation = float(np.corrcoef(cam.ravel(), reference.ravel())[0, 1])
    print(f"\nHeat map of the binary head on the sample's lung crop ({size} px; eager torch forward "
          f"{forward[0]:.1f} ms)\n")
    print("| method | median ms | p90 ms | correlation with Grad-CAM | max abs difference |")
    print("| --- | ---: | ---: | ---: | ---: |")
    print(f"| Grad-CAM (forward + backward) | {grad_time[0]:.1f} | {grad_time[1]:.1f} | 1 | 0 |")
    print(f"| CAM from the forward pass's features (after it) | {cam_time[0]:.1f} | {cam_time[1]:.1f} | "
          f"{correlation:.6f} | {float(np.abs(cam - reference).max()):.1e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
