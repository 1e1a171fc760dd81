"""Mutual correction loss (eq. 9-10) and the sigmoid ramp-up of the loss weights."""

import math

import pytest
import torch

from PLBOptCore.method.mutual import discrepancy_mask, mutual_correction_loss
from PLBOptCore.method.rampup import sigmoid_rampup


def _probs(rows):
    """(B, C, N) tensor from per-batch lists of per-voxel probability vectors."""
    return torch.tensor(rows, dtype=torch.float32).transpose(1, 2).contiguous()


# batch of 2, 4 voxels, 2 classes; τ = 0.8
A = _probs([[[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.6, 0.4]],
            [[0.1, 0.9], [0.5, 0.5], [0.5, 0.5], [0.2, 0.8]]])
B = _probs([[[0.9, 0.1], [0.6, 0.4], [0.1, 0.9], [0.5, 0.5]],
            [[0.0, 1.0], [0.5, 0.5], [0.95, 0.05], [0.3, 0.7]]])


def test_discrepancy_mask_eq9():
    # (H,H) (H,L) (L,H) (L,L) | (H,H) (L,L) (L,H) (L,L with 0.8 == τ counted as low)
    assert discrepancy_mask(A, B, 0.8).int().tolist() == [[0, 1, 1, 0], [0, 0, 1, 0]]


def test_mutual_correction_loss_hand_values():
    # masked squared distances: (0.3² + 0.3²) = 0.18, 0.18, and (0.45² + 0.45²) = 0.405
    total = 0.18 + 0.18 + 0.405
    loss = mutual_correction_loss(A, B, 0.8)
    assert loss.item() == pytest.approx(total / 8)  # default: mean over B·M voxels
    assert mutual_correction_loss(A, B, 0.8, reduction="paper").item() == pytest.approx(total / 2)  # / N
    assert mutual_correction_loss(A, A, 0.8).item() == 0.0
    with pytest.raises(ValueError):
        mutual_correction_loss(A, B, 0.8, reduction="sum")


def test_mutual_correction_gradients_reach_both_subnets():
    logits_a = torch.log(A).clone().requires_grad_(True)
    logits_b = torch.log(B.clamp_min(1e-6)).clone().requires_grad_(True)
    loss = mutual_correction_loss(logits_a.softmax(1), logits_b.softmax(1), 0.8)
    loss.backward()
    grad_a, grad_b = logits_a.grad.abs().sum(1), logits_b.grad.abs().sum(1)
    mask = discrepancy_mask(A, B, 0.8)
    assert (grad_a[mask] > 0).all() and (grad_b[mask] > 0).all()
    assert (grad_a[~mask] == 0).all() and (grad_b[~mask] == 0).all()  # only discrepant voxels


def test_sigmoid_rampup_values():
    assert sigmoid_rampup(0, 100) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(50, 100) == pytest.approx(math.exp(-1.25))
    assert sigmoid_rampup(75, 100) == pytest.approx(math.exp(-5 * 0.0625))
    assert sigmoid_rampup(100, 100) == 1.0 and sigmoid_rampup(250, 100) == 1.0
    assert sigmoid_rampup(-3, 100) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(7, 0) == 1.0
    with pytest.raises(ValueError):
        sigmoid_rampup(1, -1)
