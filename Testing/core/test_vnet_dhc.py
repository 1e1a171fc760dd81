"""VNet (DHC architecture) and DHC class weighting / losses, checked against hand-computed values."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F

from PLBOptCore.method.dhc import DiffDW, DistDW, weighted_ce_loss, weighted_dice_ce_loss
from PLBOptCore.nets.vnet import VNet


# ---------------------------------------------------------------------------------------- VNet
def _expected_vnet_parameters(f: int, num_classes: int, in_channels: int = 1) -> int:
    """Parameter count from the architecture description (conv weights + biases + BN affine)."""
    def conv3(i, o):  # Conv3d k3 with bias + BatchNorm3d (weight, bias)
        return 27 * i * o + o + 2 * o

    def block(n, i, o):
        return conv3(i, o) + (n - 1) * conv3(o, o)

    def resample(i, o):  # (Transposed) Conv3d k2 s2 with bias + BatchNorm3d
        return 8 * i * o + o + 2 * o

    encoder = (block(1, in_channels, f) + resample(f, 2 * f) + block(2, 2 * f, 2 * f) + resample(2 * f, 4 * f)
               + block(3, 4 * f, 4 * f) + resample(4 * f, 8 * f) + block(3, 8 * f, 8 * f)
               + resample(8 * f, 16 * f) + block(3, 16 * f, 16 * f))
    decoder = (resample(16 * f, 8 * f) + block(3, 8 * f, 8 * f) + resample(8 * f, 4 * f) + block(3, 4 * f, 4 * f)
               + resample(4 * f, 2 * f) + block(2, 2 * f, 2 * f) + resample(2 * f, f) + block(1, f, f))
    return encoder + decoder + f * num_classes + num_classes


def test_vnet_parameter_count_base32():
    # DHC's Synapse network: 32 filters, 14 classes. 37,778,126 = the formula above worked out by hand.
    assert _expected_vnet_parameters(32, 14) == 37_778_126
    with torch.device("meta"):  # no memory or init cost for 38M parameters
        model = VNet(in_channels=1, num_classes=14, base_filters=32)
    n = sum(p.numel() for p in model.parameters())
    print(f"VNet(base_filters=32, num_classes=14): {n:,} parameters")
    assert n == 37_778_126
    with torch.device("meta"):
        small = VNet(num_classes=3, base_filters=8, projection_dim=5)
    head = (8 * 8 + 8) + (8 * 5 + 5)
    assert sum(p.numel() for p in small.parameters()) == _expected_vnet_parameters(8, 3) + head


def test_vnet_output_shapes():
    torch.manual_seed(0)
    model = VNet(in_channels=1, num_classes=3, base_filters=4)
    x = torch.randn(2, 1, 16, 32, 16)
    logits, features = model(x)
    assert logits.shape == (2, 3, 16, 32, 16)
    assert features.shape == (2, 4, 16, 32, 16)

    projected = VNet(in_channels=1, num_classes=3, base_filters=4, projection_dim=6)
    logits, features = projected(x)
    assert logits.shape == (2, 3, 16, 32, 16)
    assert features.shape == (2, 6, 16, 32, 16)


def test_vnet_rejects_sizes_not_divisible_by_16():
    with pytest.raises(ValueError, match="divisible by 16"):
        VNet(num_classes=2, base_filters=4)(torch.zeros(1, 1, 16, 24, 16))


def test_vnet_skips_are_additive():
    f = 4
    model = VNet(num_classes=2, base_filters=f)
    # Concatenated skips would double each decoder block's input width.
    for up, block, width in (("block_five_up", "block_six", 8 * f), ("block_six_up", "block_seven", 4 * f),
                             ("block_seven_up", "block_eight", 2 * f), ("block_eight_up", "block_nine", f)):
        assert getattr(model, up)[0].out_channels == width
        assert getattr(model, block)[0].in_channels == width
    # Stage counts 1,2,3,3,3 | 3,3,2,1 (each stage = conv, BN, ReLU).
    stages = [len(getattr(model, name)) // 3 for name in
              ("block_one", "block_two", "block_three", "block_four", "block_five",
               "block_six", "block_seven", "block_eight", "block_nine")]
    assert stages == [1, 2, 3, 3, 3, 3, 3, 2, 1]
    assert sum(isinstance(m, torch.nn.Dropout3d) for m in model.modules()) == 1


def test_vnet_dropout_only_in_train_mode():
    torch.manual_seed(0)
    model = VNet(num_classes=2, base_filters=4, dropout=True)
    x = torch.randn(2, 1, 16, 16, 16)  # batch 2: train-mode BN needs >1 value at the 1³ bottleneck
    model.eval()
    with torch.no_grad():
        a_logits, a_feat = model(x)
        b_logits, b_feat = model(x)
    assert torch.equal(a_logits, b_logits) and torch.equal(a_feat, b_feat)

    model.train()
    with torch.no_grad():
        c_logits, _ = model(x)
        d_logits, _ = model(x)
    assert not torch.allclose(c_logits, d_logits)

    no_dropout = VNet(num_classes=2, base_filters=4, dropout=False).train()
    with torch.no_grad():
        assert torch.equal(no_dropout(x)[0], no_dropout(x)[0])


def test_vnet_init_and_backward():
    torch.manual_seed(0)
    model = VNet(num_classes=2, base_filters=8)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    w = model.block_five[3].weight  # Conv3d 128→128, k3: fan_in 3456
    assert w.std().item() == pytest.approx(math.sqrt(2.0 / (128 * 27)), rel=0.03)
    logits, features = model(torch.randn(2, 1, 16, 16, 16))
    (logits.mean() + features.mean()).backward()
    assert model.block_one[0].weight.grad is not None


# -------------------------------------------------------------------------------------- DistDW
def _logits_from_labels(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, Z, Y, X) labels → (B, C, Z, Y, X) logits whose argmax is ``labels``."""
    return 5.0 * F.one_hot(labels, num_classes).movedim(-1, 1).float()


def test_distdw_init_weights_hand_computed():
    # n = [1000, 100, 10, 0]: P = n_max / n = [1, 10, 100, ~1e11]; the absent class normalises.
    dist = DistDW(num_classes=4)
    w = dist.init_weights(torch.tensor([1000.0, 100.0, 10.0, 0.0]))
    log_max = math.log((1000 + 1e-8) / 1e-8)
    expected = [0.0, 4 * math.log(10) / log_max, 4 * math.log(100) / log_max, 4.0]
    assert w.tolist() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert w[0].item() == 0.0  # the most frequent class (background) gets weight 0

    w3 = DistDW(num_classes=3).init_weights([1000, 100, 10])
    assert w3.tolist() == pytest.approx([0.0, 1.5, 3.0], rel=1e-5, abs=1e-6)  # 3·[0, ln10, ln100]/ln100


def test_distdw_update_ema_hand_computed():
    dist = DistDW(num_classes=3, momentum=0.99)
    dist.init_weights([1000, 100, 10])  # [0, 1.5, 3]
    labels = torch.tensor([0] * 8 + [1] * 2 + [2] * 4).reshape(1, 2, 7, 1)  # counts [8, 2, 4]
    w = dist.update(_logits_from_labels(labels, 3))
    # current = 3·log([1, 4, 2]) / log 4 = [0, 3, 1.5]; EMA 0.99·past + 0.01·current
    assert w.tolist() == pytest.approx([0.0, 0.99 * 1.5 + 0.01 * 3.0, 0.99 * 3.0 + 0.01 * 1.5], rel=1e-5, abs=1e-6)
    assert w[0].item() == 0.0


# -------------------------------------------------------------------------------------- DiffDW
def _hand_dice(pred, target, c):
    tp = sum(1 for p, t in zip(pred, target) if p == c and t == c)
    fp = sum(1 for p, t in zip(pred, target) if p == c and t != c)
    fn = sum(1 for p, t in zip(pred, target) if p != c and t == c)
    return (2 * tp + 1e-8) / (2 * tp + fp + fn + 1e-8 + 1e-8)


def _hand_diffdw(steps, num_classes, m):
    """Plain-Python DiffDW (DHC train_dhc.py) over a list of (pred, target) label lists."""
    last = [1e-8] * num_classes
    learn = [0.0] * num_classes
    unlearn = [0.0] * num_classes
    dice_weight = [1.0] * num_classes
    weights = None
    for pred, target in steps:
        d = [_hand_dice(pred, target, c) for c in range(num_classes)]
        for c in range(num_classes):
            delta = d[c] - last[c]
            ratio = math.log(d[c] / last[c])
            learn[c] = m * learn[c] + (1 - m) * (delta * ratio if delta > 0 else 0.0)
            unlearn[c] = m * unlearn[c] + (1 - m) * (delta * ratio if delta <= 0 else 0.0)
            dice_weight[c] = m * dice_weight[c] + (1 - m) * (1 - d[c])
        last = d
        raw = [((unlearn[c] + 1e-8) / (learn[c] + 1e-8)) ** 0.2 * dice_weight[c] for c in range(num_classes)]
        weights = [num_classes * r / max(raw) for r in raw]
    return weights, last


def test_diffdw_two_updates_hand_computed():
    target = [0, 0, 0, 0, 1, 1, 2, 2]
    pred_1 = [0, 0, 0, 1, 1, 1, 2, 0]  # Dice [0.75, 0.8, 2/3]
    pred_2 = [0] * 8  # Dice drops: background 2/3, classes 1-2 ≈ 0 → "unlearning"
    diff = DiffDW(num_classes=3, momentum=0.98)
    assert diff.weights.tolist() == [3.0, 3.0, 3.0]
    t = torch.tensor(target).reshape(1, 2, 2, 2)
    for step, pred in enumerate((pred_1, pred_2), start=1):
        w = diff.update(_logits_from_labels(torch.tensor(pred).reshape(1, 2, 2, 2), 3), t)
        expected, dice = _hand_diffdw([(pred_1, target), (pred_2, target)][:step], 3, 0.98)
        assert diff.last_dice.tolist() == pytest.approx(dice, rel=1e-5)
        assert w.tolist() == pytest.approx(expected, rel=1e-4)
        assert max(w.tolist()) == pytest.approx(3.0)
    assert _hand_dice(pred_1, target, 0) == pytest.approx(0.75)


def test_diffdw_absent_class_has_dice_half_and_accepts_channel_target():
    diff = DiffDW(num_classes=3)
    labels = torch.tensor([0, 1, 1, 0, 0, 1, 0, 0]).reshape(1, 1, 2, 2, 2)  # class 2 absent everywhere
    diff.update(_logits_from_labels(labels[:, 0], 3), labels)
    assert diff.last_dice.tolist() == pytest.approx([1.0, 1.0, 0.5], rel=1e-6)


def test_weight_state_dict_round_trip_weights_only():
    labels = torch.tensor([0, 0, 1, 1, 2, 0, 1, 2]).reshape(1, 2, 2, 2)
    preds = [torch.tensor(p).reshape(1, 2, 2, 2) for p in ([0, 1, 1, 1, 2, 0, 0, 2], [0, 0, 1, 2, 2, 0, 1, 1])]

    for make, update in ((lambda: DiffDW(3), lambda o, p: o.update(_logits_from_labels(p, 3), labels)),
                         (lambda: DistDW(3), lambda o, p: o.update(_logits_from_labels(p, 3)))):
        original = make()
        if isinstance(original, DistDW):
            original.init_weights([50, 20, 5])
        update(original, preds[0])
        buffer = io.BytesIO()
        torch.save(original.state_dict(), buffer)
        buffer.seek(0)
        restored = make()
        restored.load_state_dict(torch.load(buffer, weights_only=True))
        assert torch.equal(update(original, preds[1]), update(restored, preds[1]))

    with pytest.raises(ValueError):
        DiffDW(3).load_state_dict({"weights": torch.ones(4)})


# -------------------------------------------------------------------------------------- losses
def _two_voxel_example():
    # voxel 0: logits [0, 0] → p = [1/2, 1/2], target 1; voxel 1: logits [ln 3, 0] → p = [3/4, 1/4], target 0
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]]).reshape(1, 2, 1, 1, 2)
    target = torch.tensor([1, 0]).reshape(1, 1, 1, 2)
    return logits, target


def test_dice_ce_loss_hand_computed_unweighted():
    logits, target = _two_voxel_example()
    ce = (math.log(2.0) + math.log(4.0 / 3.0)) / 2
    # class 1: TP = 1/2, FP = 1/4, FN = 1/2 → dc = (2·½ + 1)/(2·½ + ¼ + ½ + 1 + 1e-8)
    dc1 = 2.0 / (2.75 + 1e-8)
    assert weighted_dice_ce_loss(logits, target).item() == pytest.approx(ce - dc1, rel=1e-6)


def test_dice_ce_loss_hand_computed_weighted():
    logits, target = _two_voxel_example()
    w = torch.tensor([0.5, 2.0])
    ce = (2.0 * math.log(2.0) + 0.5 * math.log(4.0 / 3.0)) / (2.0 + 0.5)  # Σ w_y l / Σ w_y
    dc1 = 2.0 / 2.75
    assert weighted_dice_ce_loss(logits, target, w).item() == pytest.approx(ce - 2.0 * dc1, rel=1e-6)


def test_weighted_ce_semantics():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 2, 4, 4, requires_grad=True)
    target = torch.randint(0, 4, (2, 2, 4, 4))
    w = torch.tensor([0.0, 1.0, 3.0, 0.5])
    reference = torch.nn.CrossEntropyLoss(weight=w)(logits, target)
    loss = weighted_ce_loss(logits, target, w)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
    # weighted mean: the overall scale of w cancels in CE (but not in the Dice term)
    assert weighted_ce_loss(logits, target, 7 * w).item() == pytest.approx(loss.item(), rel=1e-6)
    assert weighted_ce_loss(logits, target).item() == pytest.approx(F.cross_entropy(logits, target).item(), rel=1e-6)
    loss.backward()
    assert logits.grad is not None and w.grad is None

    # all voxels of a zero-weight class (DistDW background): 0 instead of torch's NaN
    zero = weighted_ce_loss(logits, torch.zeros_like(target), w)
    assert zero.item() == 0.0 and not torch.isnan(zero)


def test_dice_scale_matters_and_half_precision():
    torch.manual_seed(1)
    logits = torch.randn(2, 3, 2, 4, 4)
    target = torch.randint(0, 3, (2, 2, 4, 4))
    w = torch.tensor([1.0, 2.0, 0.5])
    ce_part = weighted_ce_loss(logits, target, w)
    dice_part_1 = weighted_dice_ce_loss(logits, target, w) - ce_part
    dice_part_2 = weighted_dice_ce_loss(logits, target, 2 * w) - ce_part
    assert dice_part_2.item() == pytest.approx(2 * dice_part_1.item(), rel=1e-5)
    half = weighted_dice_ce_loss(logits.half(), target, w)
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(weighted_dice_ce_loss(logits.half().float(), target, w).item(), rel=1e-5)


def test_projection_head_leaves_the_initialisation_unchanged():
    # With and without a head, the same seed gives the same trunk weights and leaves the random
    # stream where it was, so the next subnet is initialised identically too.
    def build(projection_dim):
        torch.manual_seed(3)
        model = VNet(num_classes=3, base_filters=4, projection_dim=projection_dim)
        return model, torch.rand(4)

    plain, after_plain = build(0)
    headed, after_headed = build(6)
    trunk = {k: v for k, v in headed.state_dict().items() if not k.startswith("projection.")}
    assert trunk.keys() == plain.state_dict().keys()
    for key, value in plain.state_dict().items():
        assert torch.equal(trunk[key], value), key
    assert torch.equal(after_plain, after_headed)
    assert headed.projection[0].weight.std() > 0  # the head itself is initialised (Kaiming, not zeros)
