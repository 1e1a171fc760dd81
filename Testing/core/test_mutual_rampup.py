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


def test_mutual_correction_mean_over_the_discrepant_voxels():
    # the same three masked distances as above, divided by the 3 discrepant voxels (MCF)
    total = 0.18 + 0.18 + 0.405
    assert mutual_correction_loss(A, B, 0.8, reduction="mean_masked").item() == pytest.approx(total / 3)
    assert mutual_correction_loss(A, A, 0.8, reduction="mean_masked").item() == 0.0  # no discrepant voxel


def test_mutual_correction_towards_the_confident_subnets_refined_label():
    # discrepant voxels: (0,1) A confident, label 1 (refined away from A's argmax 0);
    # (0,2) and (1,2) B confident, labels 1 and 0. Targets elsewhere do not matter.
    labels_a = torch.tensor([[0, 1, 0, 0], [1, 0, 0, 1]])
    labels_b = torch.tensor([[0, 0, 1, 0], [1, 0, 0, 1]])
    # B at (0,1) = [0.6, 0.4] against one-hot [0, 1]: 0.36 + 0.36; A at (0,2) = [0.4, 0.6] against
    # [0, 1]: 0.16 + 0.16; A at (1,2) = [0.5, 0.5] against [1, 0]: 0.25 + 0.25
    total = 0.72 + 0.32 + 0.5
    loss = mutual_correction_loss(A, B, 0.8, teacher=True, targets=(labels_a, labels_b), reduction="mean_masked")
    assert loss.item() == pytest.approx(total / 3)
    with pytest.raises(ValueError):
        mutual_correction_loss(A, B, 0.8, targets=(labels_a, labels_b))  # a label cannot take a gradient
