"""The classifier's bfloat16 path (ai/precision.py): which precision runs where, and that an answer near a decision
always comes from float32, so that the decisions are float32's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydicom import dcmread

import ai.classifier
import ai.precision
from ai.classifier import PneumoconiosisClassifier
from ai.lung_crop import classifier_input
from ai.models import CLASSIFIER, lung_segmenter, model_path
from ai.normalise import decode_pixels, normalise_dataset
from ai.precision import CATEGORY_GUARD, PROBABILITY_GUARD, near_decision, resolve_precision

from .support.data import CHEST_UNCOMPRESSED as CHEST

CPU = torch.device("cpu")


@pytest.mark.parametrize(("hardware", "device", "expected"), [
    ("AMX", "cpu", "bf16"), ("AVX-512 BF16", "cpu", "bf16"), (None, "cpu", "fp32"),
    ("AMX", "cuda", "fp32"), ("AVX-512 BF16", "cuda", "fp32"), (None, "cuda", "fp32")])
def test_auto_is_bfloat16_only_on_a_cpu_with_bfloat16_instructions(monkeypatch, hardware, device, expected):
    monkeypatch.setattr(ai.precision, "bfloat16_hardware", lambda: hardware)
    assert resolve_precision("auto", torch.device(device)) == expected
    assert resolve_precision("fp32", torch.device(device)) == "fp32"
    assert resolve_precision("bf16", torch.device(device)) == "bf16"


@pytest.mark.parametrize(("amx", "avx512_bf16", "expected"), [
    (True, True, "AMX"), (True, False, "AMX"), (False, True, "AVX-512 BF16"), (False, False, None)])
def test_bfloat16_hardware_reads_torchs_cpu_probes(monkeypatch, amx, avx512_bf16, expected):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    assert ai.precision.bfloat16_hardware() == expected


def test_a_torch_without_the_probes_means_no_bfloat16_instructions(monkeypatch):
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    assert ai.precision.bfloat16_hardware() is None
    assert resolve_precision("auto", CPU) == "fp32"


def test_an_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="unknown precision 'fp16'"):
        resolve_precision("fp16", CPU)


@pytest.mark.parametrize(("probability", "categories", "near"), [
    (0.80, [0.1, 0.1, 0.7, 0.1], False),  # far from the threshold, one category well ahead
    (0.50 + PROBABILITY_GUARD * 0.99, [0.1, 0.1, 0.7, 0.1], True),  # inside the probability guard, above
    (0.50 - PROBABILITY_GUARD * 0.99, [0.7, 0.1, 0.1, 0.1], True),  # ... and below
    (0.50 + PROBABILITY_GUARD * 1.01, [0.7, 0.1, 0.1, 0.1], False),
    (0.90, [0.05, 0.05, 0.45, 0.45 - CATEGORY_GUARD * 0.99], True),  # two categories nearly tied
    (0.90, [0.05, 0.05, 0.5, 0.5 - CATEGORY_GUARD * 1.01], False),
])
def test_near_decision(probability, categories, near):
    assert near_decision(probability, 0.5, categories) is near


@pytest.fixture(scope="module")
def crop_inputs():
    ds = dcmread(CHEST)
    image = normalise_dataset(ds, decode_pixels(ds))
    return image, lung_segmenter("cpu").segment([image])[0].labels


@pytest.fixture(scope="module")
def classifiers():
    path = model_path(CLASSIFIER)
    return (PneumoconiosisClassifier(path, CPU, precision="fp32"),
            PneumoconiosisClassifier(path, CPU, precision="bf16"))


def test_an_answer_far_from_every_decision_comes_from_bfloat16_close_to_float32(monkeypatch, crop_inputs,
                                                                                 classifiers):
    fp32, bf16 = classifiers
    monkeypatch.setattr(ai.classifier, "near_decision", lambda *_: False)
    exact, fast = fp32.classify(*crop_inputs), bf16.classify(*crop_inputs)
    assert (exact.precision, fast.precision) == ("fp32", "bf16")
    assert fast.probability != exact.probability  # it did run in bfloat16
    assert abs(fast.probability - exact.probability) < PROBABILITY_GUARD / 2
    assert np.abs(np.subtract(fast.category_probabilities, exact.category_probabilities)).max() < CATEGORY_GUARD / 4
    lungs = crop_inputs[1] > 0
    assert np.corrcoef(fast.heat_map[lungs], exact.heat_map[lungs])[0, 1] > 0.99


def test_the_bfloat16_weights_give_exactly_what_autocast_gives_for_the_float32_model(crop_inputs, classifiers):
    fp32, bf16 = classifiers
    assert fp32.bf16_model is None  # no second copy of the weights where bfloat16 never runs
    x, _ = classifier_input(*crop_inputs, bf16.input_size, bf16.margin, bf16.suppress_outside)
    with torch.inference_mode():
        stored = bf16._run_bf16(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cast = bf16.model.forward_with_feature_map(bf16._tensor(x))
    assert stored.keys() == cast.keys()
    for name in cast:
        assert stored[name].dtype == cast[name].dtype == torch.bfloat16
        assert torch.equal(stored[name], cast[name]), name


def test_an_answer_near_a_decision_is_float32s_exactly(monkeypatch, crop_inputs, classifiers):
    fp32, bf16 = classifiers
    exact = fp32.classify(*crop_inputs)
    # the threshold moved onto this image's probability: the bfloat16 answer must not stand
    monkeypatch.setattr(bf16, "threshold", exact.probability)
    guarded = bf16.classify(*crop_inputs)
    assert guarded.precision == "fp32"
    assert guarded.probability == exact.probability
    assert guarded.category_probabilities == exact.category_probabilities
    assert np.array_equal(guarded.heat_map, exact.heat_map) and guarded.zones == exact.zones
    assert bf16.probabilities(*crop_inputs)[2] == "fp32"
