"""Classifier building blocks on tiny synthetic inputs: focal losses against hand-computed values, the ResNet-34's
shapes and ImageNet initialisation, the lung crop's geometry, Grad-CAM's hygiene, the class activation map
against Grad-CAM, the folded inference form and the ILO zone split.

Fast on purpose (a few seconds on two cores): nothing is trained and no real weights are needed.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.models import resnet34

from ai.explain import ZONES, class_activation_map, grad_cam, zone_scores
from ai.lung_crop import lung_crop
from ai.resnet import IMAGENET_FILE, PneumoconiosisNet, build_resnet34
from train.losses import focal_loss_binary, focal_loss_multiclass


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def net() -> PneumoconiosisNet:
    torch.manual_seed(0)
    return PneumoconiosisNet()


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# --- focal loss --------------------------------------------------------------------------------------------------

def test_focal_binary_matches_hand_computed_values():
    logits = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    targets = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    p = [_sigmoid(0.5), _sigmoid(-1.0), _sigmoid(2.0)]
    p_t = [p[0], 1 - p[1], 1 - p[2]]
    alpha_t = [0.25, 0.75, 0.75]
    expected = [-a * (1 - q) ** 2 * math.log(q) for a, q in zip(alpha_t, p_t, strict=True)]
    got = focal_loss_binary(logits, targets, alpha=0.25, gamma=2.0, reduction="none")
    assert got.tolist() == pytest.approx(expected, rel=1e-12)
    assert focal_loss_binary(logits, targets).item() == pytest.approx(sum(expected) / 3, rel=1e-12)
    assert focal_loss_binary(logits, targets, reduction="sum").item() == pytest.approx(sum(expected), rel=1e-12)


def test_focal_binary_without_focusing_or_weighting_is_bce():
    logits = torch.tensor([0.3, -2.0, 4.0, -0.1])
    targets = torch.tensor([1.0, 1.0, 0.0, 0.0])
    assert focal_loss_binary(logits, targets, alpha=None, gamma=0.0).item() == pytest.approx(
        F.binary_cross_entropy_with_logits(logits, targets).item(), rel=1e-6)


def test_focal_multiclass_matches_hand_computed_values():
    rows = [[1.0, 0.0, -1.0, 0.5], [0.2, 0.1, 2.0, -0.3]]
    targets = [0, 3]
    alpha = [0.1, 0.2, 0.3, 0.4]
    expected = []
    for row, t in zip(rows, targets, strict=True):
        p_t = math.exp(row[t]) / sum(math.exp(v) for v in row)
        expected.append(-alpha[t] * (1 - p_t) ** 2 * math.log(p_t))
    logits = torch.tensor(rows, dtype=torch.float64)
    tgt = torch.tensor(targets)
    got = focal_loss_multiclass(logits, tgt, alpha=alpha, gamma=2.0, reduction="none")
    assert got.tolist() == pytest.approx(expected, rel=1e-12)
    scalar = focal_loss_multiclass(logits, tgt, alpha=0.5, gamma=2.0, reduction="none")
    unweighted = [e / alpha[t] for e, t in zip(expected, targets, strict=True)]
    assert scalar.tolist() == pytest.approx([0.5 * u for u in unweighted], rel=1e-12)
    with pytest.raises(ValueError):
        focal_loss_multiclass(logits, tgt, alpha=[1.0, 1.0])


def test_focal_multiclass_without_focusing_or_weighting_is_cross_entropy():
    logits = torch.tensor([[1.0, 0.0, -1.0, 0.5], [0.2, 0.1, 2.0, -0.3], [3.0, -3.0, 0.0, 0.0]])
    targets = torch.tensor([2, 3, 0])
    assert focal_loss_multiclass(logits, targets, alpha=None, gamma=0.0).item() == pytest.approx(
        F.cross_entropy(logits, targets).item(), rel=1e-6)


def test_focal_losses_stay_finite_for_confident_logits():
    logits = torch.tensor([200.0, -200.0], requires_grad=True)
    loss = focal_loss_binary(logits, torch.tensor([0.0, 1.0])) + focal_loss_binary(logits, torch.tensor([1.0, 0.0]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    multi = torch.tensor([[300.0, -300.0, 0.0, 0.0]], requires_grad=True)
    loss = focal_loss_multiclass(multi, torch.tensor([1])) + focal_loss_multiclass(multi, torch.tensor([0]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(multi.grad).all()


# --- model -------------------------------------------------------------------------------------------------------

def test_forward_shapes(net):
    with torch.no_grad():
        out = net.eval()(torch.rand(2, 1, 128, 128))
    assert set(out) == {"binary", "profusion"}
    assert out["binary"].shape == (2,)
    assert out["profusion"].shape == (2, 4)
    assert net.init == "scratch" and net.in_channels == 1


def test_one_channel_init_from_imagenet_state_dict(tmp_path, monkeypatch):
    reference = resnet34(weights=None).state_dict()
    path = tmp_path / "imagenet.pth"
    torch.save(reference, path)
    model, init = build_resnet34(1, imagenet_weights=path)
    assert init == f"imagenet:{path}"
    assert model.conv1.weight.shape == (64, 1, 7, 7)
    assert torch.equal(model.conv1.weight.detach(), reference["conv1.weight"].mean(dim=1, keepdim=True))
    assert torch.equal(model.layer4[2].conv2.weight.detach(), reference["layer4.2.conv2.weight"])

    # The torch hub cache is searched under torchvision's own file name; an empty cache means scratch.
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    assert build_resnet34(1)[1] == "scratch"
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    cached = tmp_path / "hub" / "checkpoints" / IMAGENET_FILE
    path.rename(cached)
    net = PneumoconiosisNet.create()
    assert net.init == f"imagenet:{cached}"
    assert torch.equal(net.trunk.conv1.weight.detach(), reference["conv1.weight"].mean(dim=1, keepdim=True))
    assert build_resnet34(1, search_cache=False)[1] == "scratch"

    with pytest.raises(FileNotFoundError):
        build_resnet34(1, imagenet_weights=tmp_path / "missing.pth")


# --- lung crop ---------------------------------------------------------------------------------------------------

def _two_lungs() -> tuple[np.ndarray, np.ndarray]:
    """200 x 300 image; right lung rows 40-159, cols 50-119; left lung rows 60-179, cols 170-249."""
    labels = np.zeros((200, 300), dtype=np.uint8)
    labels[40:160, 50:120] = 1
    labels[60:180, 170:250] = 2
    return np.ones((200, 300), dtype=np.float32), labels


def _model_pixel(geometry, row: float, col: float) -> tuple[int, int]:
    top, left = geometry.box[:2]
    scale_r, scale_c = geometry.letterbox.scale
    off_r, off_c = geometry.letterbox.offset
    return int((row - top + 0.5) * scale_r + off_r), int((col - left + 0.5) * scale_c + off_c)


def test_lung_crop_box_margin_and_aspect():
    image, labels = _two_lungs()
    crop, geometry = lung_crop(image, labels, size=64, margin=0.05)
    # Lung box rows 40-179 (140 high), cols 50-249 (200 wide): 5 % is 7 rows and 10 columns.
    assert geometry.box == (33, 40, 187, 260)
    assert geometry.source_shape == (200, 300)
    assert crop.shape == (64, 64) and crop.dtype == np.float32
    assert geometry.letterbox.content_shape == (45, 64)  # 154 x 220 scaled by 64 / 220, aspect kept
    assert crop[geometry.letterbox.offset[0] - 1].max() == 0.0  # letterbox padding is black
    assert crop[32, 32] == 1.0

    # Near the image edge the margin is clipped.
    edge = np.zeros_like(labels)
    edge[0:100, 0:50] = 1
    edge[0:100, 60:300] = 2
    _, clipped = lung_crop(image, edge, size=64, margin=0.1)
    assert clipped.box == (0, 0, 110, 300)

    with pytest.raises(ValueError):
        lung_crop(image, np.zeros_like(labels), size=64)


def test_lung_crop_suppresses_outside_the_dilated_mask():
    image, labels = _two_lungs()
    plain, geometry = lung_crop(image, labels, size=64, suppress_outside=False)
    suppressed, same = lung_crop(image, labels, size=64, suppress_outside=True)
    assert same == geometry
    between = _model_pixel(geometry, 100, 145)  # 25 columns from either lung, beyond the 10-pixel halo
    inside = _model_pixel(geometry, 100, 85)
    halo = _model_pixel(geometry, 100, 124)  # 5 columns beyond the right lung: kept
    assert plain[between] == 1.0 and suppressed[between] == 0.0
    assert plain[inside] == suppressed[inside] == 1.0
    assert suppressed[halo] == 1.0


def test_crop_geometry_maps_back_to_the_native_grid():
    image, labels = _two_lungs()
    _, geometry = lung_crop(image, labels, size=256)
    native = np.zeros(labels.shape, dtype=np.float32)
    native[80:120, 60:100] = 1.0
    top, left, bottom, right = geometry.box
    at_size = geometry.letterbox.to_model(native[top:bottom, left:right])
    back = geometry.to_source(at_size)
    assert back.shape == labels.shape and back.dtype == np.float32
    rows = np.flatnonzero((back > 0.5).any(axis=1))
    cols = np.flatnonzero((back > 0.5).any(axis=0))
    assert abs(rows[0] - 80) <= 1 and abs(rows[-1] - 119) <= 1
    assert abs(cols[0] - 60) <= 1 and abs(cols[-1] - 99) <= 1
    outside = np.ones(labels.shape, dtype=bool)
    outside[top:bottom, left:right] = False
    full = geometry.to_source(np.ones((256, 256), dtype=np.float32))
    assert full[outside].max() == 0.0 and full[~outside].min() == pytest.approx(1.0)


# --- explanations ------------------------------------------------------------------------------------------------

def test_grad_cam_shape_range_and_no_leftovers(net):
    net.train()
    x = torch.rand(1, 1, 64, 64)
    for head in ("binary", "profusion"):
        cam = grad_cam(net, x, head=head)
        assert cam.shape == (64, 64) and cam.dtype == np.float32
        assert cam.min() >= 0.0 and cam.max() <= 1.0
        assert cam.max() in (0.0, pytest.approx(1.0))
    assert all(m.training for m in net.modules())
    assert all(len(m._forward_hooks) == 0 and len(m._backward_hooks) == 0 for m in net.modules())
    assert all(p.grad is None for p in net.parameters())

    net.eval()
    saved = net.binary.weight.detach().clone()
    with torch.no_grad():
        net.binary.weight.zero_()  # no gradient reaches layer4: the map must be all zeros, not NaN
    try:
        cam = grad_cam(net, x)
    finally:
        with torch.no_grad():
            net.binary.weight.copy_(saved)
    assert not net.training
    assert np.array_equal(cam, np.zeros((64, 64), dtype=np.float32))


def _with_random_batch_norm_statistics(seed: int) -> PneumoconiosisNet:
    """A fresh net whose batch norms hold non-trivial running statistics and affine terms, as trained ones do
    (the defaults, mean 0 and variance 1, would make folding them an identity and the test blind)."""
    torch.manual_seed(seed)
    model = PneumoconiosisNet()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.1, 0.1)
        model.binary.weight.normal_()  # evidence of both signs, so the maps are not all zeros
    return model.eval()


def test_class_activation_map_equals_grad_cam_for_the_binary_head():
    """GAP + one linear layer: Grad-CAM's weights are the head's weights over the number of positions, so after
    the peak normalisation the two maps are the same (the node computes the cheap one)."""
    model = _with_random_batch_norm_statistics(1)
    for seed in range(3):
        x = torch.rand(1, 1, 96, 96, generator=torch.Generator().manual_seed(seed))
        with torch.inference_mode():
            out = model.forward_with_feature_map(x)
        cam = class_activation_map(out["feature_map"], model.binary.weight[0], (96, 96))
        reference = grad_cam(model, x, head="binary")
        assert cam.shape == (96, 96) and cam.dtype == np.float32
        assert np.abs(cam - reference).max() < 1e-4
        assert cam.max() == pytest.approx(1.0) and cam.min() >= 0.0
    silent = class_activation_map(out["feature_map"], torch.zeros(512), (96, 96))  # no evidence: zeros, not NaN
    assert np.array_equal(silent, np.zeros((96, 96), dtype=np.float32))
    with pytest.raises(ValueError):
        class_activation_map(out["feature_map"], torch.zeros(4), (96, 96))


def test_folded_channels_last_net_computes_the_same_outputs():
    reference = _with_random_batch_norm_statistics(2)
    folded = _with_random_batch_norm_statistics(2).fuse_for_inference().to(memory_format=torch.channels_last)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        expected = reference.forward_with_feature_map(x)
        got = folded.forward_with_feature_map(x.contiguous(memory_format=torch.channels_last))
    for key in ("binary", "profusion", "feature_map"):
        assert torch.allclose(got[key], expected[key], rtol=1e-4, atol=1e-4), key
    assert torch.equal(reference(x)["binary"], expected["binary"])  # forward and the feature-map form agree
    with pytest.raises(RuntimeError):
        PneumoconiosisNet().train().fuse_for_inference()


def test_zone_scores_use_each_lungs_own_thirds():
    labels = np.zeros((90, 40), dtype=np.uint8)
    labels[10:40, 5:15] = 1  # right lung: 30 rows, thirds 10-19, 20-29, 30-39
    labels[20:80, 20:30] = 2  # left lung: 60 rows, thirds 20-39, 40-59, 60-79
    heat = np.zeros(labels.shape, dtype=np.float32)
    heat[10:20, 5:15] = 1.0
    heat[0:10] = 1.0  # outside both lungs: ignored
    scores = zone_scores(heat, labels)
    assert tuple(scores) == ZONES
    assert scores == {"right_upper": 1.0, "right_middle": 0.0, "right_lower": 0.0,
                      "left_upper": 0.0, "left_middle": 0.0, "left_lower": 0.0}

    heat = np.zeros(labels.shape, dtype=np.float32)
    heat[20:40, 20:30] = 1.0  # the left lung's upper third (the right lung's middle and lower rows)
    heat[60:80, 20:25] = 0.5  # half of the left lower third at 0.5
    scores = zone_scores(heat, labels)
    assert scores["left_upper"] == 1.0 and scores["left_middle"] == 0.0
    assert scores["left_lower"] == pytest.approx(0.25)
    assert scores["right_middle"] == scores["right_lower"] == 0.0

    only_right = np.where(labels == 2, 0, labels).astype(np.uint8)
    assert zone_scores(heat, only_right)["left_upper"] == 0.0
