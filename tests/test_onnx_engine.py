"""The ONNX Runtime engine computes what torch computes: the bundled checkpoints, exported at load the way the node
loads them, against the torch models on real shared radiographs (and a batch, for the dynamic batch axis)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from ai.classifier import PneumoconiosisClassifier
from ai.models import CLASSIFIER, LUNG_UNET, model_path
from ai.normalise import NormalisedImage, normalise
from ai.onnx_engine import export_onnx, onnx_model_of, use_onnxruntime
from ai.segment import LungSegmenter, model_input
from train.datasets import data_dir, read_lung_masks, stratified_split


@pytest.fixture(scope="module")
def inputs() -> np.ndarray:
    """Two real held-out films (Montgomery, Shenzhen) as the segmenter's (N, 256, 256) inputs, plus noise."""
    root = data_dir() / "cxr-lung-masks"
    if not (root / "labels.csv").exists():
        pytest.fail(f"no lung-mask data under {root}: set PNEUMO_DATA_DIR to the shared data folder")
    test = stratified_split(read_lung_masks(root), 2026)["test"]
    chosen = [next(s for s in test if s.source == source) for source in ("montgomery", "shenzhen")]
    films = [model_input(NormalisedImage(normalise(s.image_path).pixels, None, "png", ["picture"]), 256)[0]
             for s in chosen]
    return np.stack([*films, np.random.default_rng(0).random((256, 256), dtype=np.float32)])


def test_segmenter_in_onnxruntime_matches_torch(inputs):
    cpu = torch.device("cpu")
    reference = LungSegmenter(model_path(LUNG_UNET), cpu, engine="torch")
    onnx = LungSegmenter(model_path(LUNG_UNET), cpu, engine="auto")
    assert (reference.engine, onnx.engine) == ("torch", "onnxruntime")
    expected, got = reference.probabilities(inputs), onnx.probabilities(inputs)
    assert got.shape == expected.shape and got.dtype == np.float32
    assert np.abs(got - expected).max() < 1e-3
    assert np.mean((got > 0.5) != (expected > 0.5)) < 1e-5  # at most a pixel on the mask's edge may flip


def test_classifier_in_onnxruntime_matches_torch(inputs):
    cpu = torch.device("cpu")
    reference = PneumoconiosisClassifier(model_path(CLASSIFIER), cpu, engine="torch")
    onnx = PneumoconiosisClassifier(model_path(CLASSIFIER), cpu, engine="onnxruntime")
    assert onnx.engine == "onnxruntime" and onnx.onnx is not None
    size = reference.input_size
    x = torch.nn.functional.interpolate(torch.from_numpy(inputs[:, None]), size=(size, size), mode="bilinear")
    with torch.inference_mode():
        expected = reference.model.forward_with_feature_map(x)
    got = onnx.onnx(x.numpy())
    for name in ("binary", "profusion", "feature_map"):
        scale = float(expected[name].abs().max())
        assert np.abs(got[name] - expected[name].numpy()).max() <= 1e-4 * max(scale, 1.0), name
    assert np.array_equal(torch.sigmoid(expected["binary"]).numpy() >= reference.threshold,
                          1 / (1 + np.exp(-got["binary"])) >= onnx.threshold)


def test_engine_choice():
    cpu = torch.device("cpu")
    assert use_onnxruntime("auto", cpu) and use_onnxruntime("onnxruntime", cpu)
    assert not use_onnxruntime("torch", cpu)
    assert not use_onnxruntime("auto", torch.device("cuda"))  # no CUDA build of ONNX Runtime: torch on GPUs
    with pytest.raises(ValueError, match="unknown inference engine"):
        use_onnxruntime("tensorrt", cpu)
    with pytest.raises(RuntimeError, match="eval mode"):
        export_onnx(torch.nn.BatchNorm2d(1).train(), torch.zeros(1, 1, 4, 4), ("y",))


def test_export_cache_is_keyed_by_the_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    checkpoint = tmp_path / "model.pt"
    torch.manual_seed(0)
    first = torch.nn.Conv2d(1, 2, 3)
    torch.save(first.state_dict(), checkpoint)
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()  # what ai.checkpoint.load reports
    x = np.random.default_rng(1).random((2, 1, 8, 8), dtype=np.float32)
    example = torch.zeros(1, 1, 8, 8)
    with torch.inference_mode():
        expected = first(torch.from_numpy(x)).numpy()
    assert np.allclose(onnx_model_of(first, example, ("y",), digest)(x)["y"], expected, atol=1e-6)
    cached = list((tmp_path / "cache" / "pneumo-node" / "onnx").glob("*.onnx"))
    assert len(cached) == 1
    assert np.allclose(onnx_model_of(first, example, ("y",), digest)(x)["y"], expected, atol=1e-6)  # from cache

    second = torch.nn.Conv2d(1, 2, 3)  # a retrained checkpoint: a new export, never the stale one
    torch.save(second.state_dict(), checkpoint)
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    with torch.inference_mode():
        retrained = second(torch.from_numpy(x)).numpy()
    assert np.allclose(onnx_model_of(second, example, ("y",), digest)(x)["y"], retrained, atol=1e-6)
    assert len(list(cached[0].parent.glob("*.onnx"))) == 2

    monkeypatch.setenv("XDG_CACHE_HOME", str(checkpoint))  # not a folder: no cache, still a working model
    assert np.allclose(onnx_model_of(second, example, ("y",), digest)(x)["y"], retrained, atol=1e-6)


def test_export_cache_keeps_only_the_most_recently_used(tmp_path, monkeypatch):
    from ai.onnx_engine import CACHE_KEEP, cache_dir

    def digest(k: int) -> str:
        return hashlib.sha256(str(k).encode()).hexdigest()

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    module, example = torch.nn.Conv2d(1, 1, 1), torch.zeros(1, 1, 4, 4)
    onnx_model_of(module, example, ("y",), "0" * 64)  # the model in use, exported first
    for k in range(1, CACHE_KEEP + 3):  # retrained checkpoints, one after another
        onnx_model_of(module, example, ("y",), "0" * 64)  # used again: touched, so it survives the pruning
        onnx_model_of(module, example, ("y",), digest(k))
    names = {p.name[:32] for p in cache_dir().glob("*.onnx")}
    assert len(names) == CACHE_KEEP
    assert {"0" * 32, digest(CACHE_KEEP + 2)[:32]} <= names and digest(1)[:32] not in names
