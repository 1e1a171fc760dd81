"""Mutual correction loss between the two subnets (PLBOpt eq. 9-10, Algorithm 1 line 11)."""

from __future__ import annotations

import torch

REDUCTIONS = ("mean_voxels", "paper")


def discrepancy_mask(probs_a: torch.Tensor, probs_b: torch.Tensor, tau: float) -> torch.Tensor:
    """Eq. 9: 1 where exactly one subnet is confident (max softmax > τ), i.e. (H, L) or (L, H).

    Args:
        probs_a, probs_b: (B, C, ...) softmax probabilities.

    Returns:
        (B, ...) bool.
    """
    return (probs_a.amax(1) > tau) ^ (probs_b.amax(1) > tau)


def mutual_correction_loss(probs_a: torch.Tensor, probs_b: torch.Tensor, tau: float,
                           reduction: str = "mean_voxels", teacher: bool = False) -> torch.Tensor:
    """Eq. 10: ``Σ_j C(j) ‖ŷA(j) − ŷB(j)‖²`` over the discrepant voxels, ``ŷ`` the softmax vectors.

    With ``teacher=False`` (eq. 10 as written) gradients flow into both inputs, so the confident
    subnet is pulled towards the unsure one as much as the other way round. With ``teacher=True``
    the confident subnet of each voxel is detached there: only the unsure subnet learns, from the
    confident one, which is what the correction is meant to do.

    Args:
        probs_a, probs_b: (B, C, ...) softmax probabilities of subnets A and B.
        tau: confidence threshold.
        teacher: detach the confident side of each discrepant voxel.
        reduction: ``"mean_voxels"`` (default) divides the sum by the number of voxels ``B·M``, so
            the loss is in [0, 2] whatever the patch size and λ_MC = 1 is a sensible weight;
            ``"paper"`` divides by the batch size ``N = B`` as written in eq. 10 (it grows with the
            patch volume, ~10^6 voxels for DHC's 64×128×128 patches).

    Returns:
        scalar tensor.
    """
    if probs_a.shape != probs_b.shape:
        raise ValueError(f"mutual_correction_loss: shapes differ {tuple(probs_a.shape)} vs {tuple(probs_b.shape)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    mask = discrepancy_mask(probs_a, probs_b, tau)
    if teacher:
        a_teaches = (probs_a.amax(1, keepdim=True) > tau)
        probs_a = torch.where(a_teaches, probs_a.detach(), probs_a)
        probs_b = torch.where(a_teaches, probs_b, probs_b.detach())
    total = (((probs_a - probs_b) ** 2).sum(1) * mask).sum()
    if reduction == "paper":
        return total / probs_a.shape[0]
    return total / mask.numel()
