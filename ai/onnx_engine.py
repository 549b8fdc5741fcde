"""Inference through ONNX Runtime: the same network, exported from the same checkpoint when the model loads.

Why: on CPU, ONNX Runtime runs the classifier's ResNet-34 and the lung U-Net faster than eager torch, even with
batch norms folded and channels-last tensors, most clearly on the workers' one thread (``benchmarks/
inference_engines.py``, docs/benchmarks.md). The checkpoint stays the only model file: the export is made from it
at load, so a site's retrained champion runs on the same engine without an extra file to ship. Exporting takes
seconds, so the exported graph is cached per user (``$XDG_CACHE_HOME/pneumo-node/onnx``, else ``~/.cache/...``)
under a name derived from the checkpoint's SHA-256 (which ``ai.checkpoint.load`` already computed), the torch
version and the export's shape: a changed checkpoint can never meet a stale export. An unwritable cache only costs
the export time. The cache keeps the ``CACHE_KEEP`` most recently used exports (each retrained champion would
otherwise add 85 MB for good). Torch stays the engine for training and on GPUs (no CUDA build of ONNX Runtime is
installed). ``engine="torch"`` or a missing ``onnxruntime`` package falls back to torch; the choice is part of each
model's loaded form, not its file.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

LOG = logging.getLogger("ai.onnx_engine")

ENGINES = ("auto", "torch", "onnxruntime")
OPSET = 17
CACHE_KEEP = 8
"""Exports kept in the cache: the installed models, the champion and a few earlier ones (a rollback stays fast)."""


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def use_onnxruntime(engine: str, device: torch.device) -> bool:
    """Whether a model loaded for ``device`` runs in ONNX Runtime: "auto" means yes on CPU when it is installed."""
    if engine not in ENGINES:
        raise ValueError(f"unknown inference engine {engine!r}; expected one of {', '.join(ENGINES)}")
    if engine == "torch" or device.type != "cpu":
        return False
    if not onnxruntime_available():
        if engine == "onnxruntime":
            raise RuntimeError("inference engine onnxruntime requested but the onnxruntime package is not installed")
        LOG.warning("onnxruntime is not installed: models run in torch (slower on CPU)")
        return False
    return True


def export_onnx(module: nn.Module, example: torch.Tensor, output_names: Sequence[str]) -> bytes:
    """``module`` (eval mode, on the CPU) as an ONNX model with a dynamic batch axis, in memory.

    The TorchScript-based exporter (it needs only the ``onnx`` package, not onnxscript): it exports these plain
    convolutional networks exactly (checked against torch's outputs in tests/test_onnx_engine.py). Its deprecation
    warning is silenced here, not globally."""
    if module.training:
        raise RuntimeError("export_onnx needs eval mode")
    buffer = io.BytesIO()
    axes = {name: {0: "batch"} for name in ("input", *output_names)}
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), buffer, input_names=["input"],  # type: ignore[arg-type]
                          output_names=list(output_names), dynamic_axes=axes, opset_version=OPSET, dynamo=False)
    return buffer.getvalue()


class OnnxModel:
    """One exported network in an ONNX Runtime session: float32 NCHW array in, named float32 arrays out."""

    def __init__(self, model: bytes, output_names: Sequence[str]) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # the process's CPU budget (worker.threads), as torch's
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # No busy-waiting after a run: ONNX Runtime's pool threads otherwise spin on the cores that the next steps
        # (post-processing, result encoding on the results lane, the intake) need (docs/benchmarks.md).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        self.output_names = list(output_names)

    def __call__(self, inputs: np.ndarray) -> dict[str, np.ndarray]:
        outputs = self.session.run(self.output_names, {"input": np.ascontiguousarray(inputs, dtype=np.float32)})
        return dict(zip(self.output_names, outputs, strict=True))


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pneumo-node" / "onnx"


def _cache_name(checkpoint_sha256: str, example: torch.Tensor, output_names: Sequence[str]) -> str:
    shape = "x".join(map(str, example.shape[1:]))
    tag = hashlib.sha256(f"{torch.__version__}|{OPSET}|{shape}|{','.join(output_names)}".encode()).hexdigest()
    return f"{checkpoint_sha256[:32]}-{tag[:12]}.onnx"


def _cached_export(module: nn.Module, example: torch.Tensor, output_names: Sequence[str],
                   checkpoint_sha256: str | None) -> bytes:
    """The export of ``module``: from the cache when the same checkpoint was exported the same way before."""
    if not checkpoint_sha256:
        return export_onnx(module, example, output_names)
    path = cache_dir() / _cache_name(checkpoint_sha256, example, output_names)
    try:
        model = path.read_bytes()
        os.utime(path)  # most recently used: the last to be pruned
        return model
    except OSError:
        pass
    model = export_onnx(module, example, output_names)
    try:  # atomically: another process loading the same model at the same time reads a whole file or none
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".part", delete=False) as tmp:
            tmp.write(model)
        os.replace(tmp.name, path)
    except OSError as exc:
        LOG.info("the ONNX export cache %s is not writable (%s): exporting at every start", path.parent,
                 type(exc).__name__)
    else:
        _prune(path.parent)
    return model


def _prune(folder: Path) -> None:
    """Remove all but the ``CACHE_KEEP`` most recently used exports (a process reading one that is removed meanwhile
    just exports again)."""
    try:
        exports = sorted(folder.glob("*.onnx"), key=lambda p: p.stat().st_mtime, reverse=True)
        for stale in exports[CACHE_KEEP:]:
            stale.unlink(missing_ok=True)
    except OSError:  # a file removed by another process meanwhile: pruned at the next export
        pass


def onnx_model_of(module: nn.Module, example: torch.Tensor, output_names: Sequence[str],
                  checkpoint_sha256: str | None = None) -> OnnxModel:
    """``module`` (the network loaded from the checkpoint whose file has ``checkpoint_sha256``) in ONNX Runtime: what
    the segmenter and the classifier do at load. Without the digest nothing is cached."""
    return OnnxModel(_cached_export(module.eval(), example, output_names, checkpoint_sha256), output_names)
