"""Mutual correction loss between the two subnets (PLBOpt eq. 9-10, Algorithm 1 line 11)."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

REDUCTIONS = ("mean_voxels", "mean_masked", "paper")


def discrepancy_mask(probs_a: torch.Tensor, probs_b: torch.Tensor, tau: float) -> torch.Tensor:
    """Eq. 9: 1 where exactly one subnet is confident (max softmax > τ), i.e. (H, L) or (L, H).

    Args:
        probs_a, probs_b: (B, C, ...) softmax probabilities.

    Returns:
        (B, ...) bool.
    """
    return (probs_a.amax(1) > tau) ^ (probs_b.amax(1) > tau)


def mutual_correction_loss(probs_a: torch.Tensor, probs_b: torch.Tensor, tau: float,
                           reduction: str = "mean_voxels", teacher: bool = False,
                           targets: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """Eq. 10: ``Σ_j C(j) ‖ŷA(j) − ŷB(j)‖²`` over the discrepant voxels, ``ŷ`` the softmax vectors.

    With ``teacher=False`` (eq. 10 as written) gradients flow into both inputs, so the confident
    subnet is pulled towards the unsure one as much as the other way round. With ``teacher=True``
    the confident subnet of each voxel is detached there: only the unsure subnet learns, from the
    confident one, which is what the correction is meant to do.

    Args:
        probs_a, probs_b: (B, C, ...) softmax probabilities of subnets A and B.
        tau: confidence threshold.
        teacher: detach the confident side of each discrepant voxel.
        targets: optional (B, ...) long labels of A and B (their refined pseudo labels); where a
            subnet is the confident one, its one-hot label replaces its probabilities, so the unsure
            subnet is pulled towards the refined label (as MCF's corrected target) rather than
            towards the confident softmax. Needs ``teacher=True``: a label carries no gradient.
        reduction: ``"mean_voxels"`` (default) divides the sum by the number of voxels ``B·M``, so
            the loss is in [0, 2] whatever the patch size and λ_MC = 1 is a sensible weight;
            ``"mean_masked"`` divides by the number of discrepant voxels (MCF's normalisation:
            the loss no longer shrinks as the subnets agree on more voxels);
            ``"paper"`` divides by the batch size ``N = B`` as written in eq. 10 (it grows with the
            patch volume, ~10^6 voxels for DHC's 64×128×128 patches).

    Returns:
        scalar tensor.
    """
    if probs_a.shape != probs_b.shape:
        raise ValueError(f"mutual_correction_loss: shapes differ {tuple(probs_a.shape)} vs {tuple(probs_b.shape)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if targets is not None and not teacher:
        raise ValueError("mutual_correction_loss: targets need teacher=True (a label has no gradient)")
    mask = discrepancy_mask(probs_a, probs_b, tau)
    if teacher:
        a_teaches = (probs_a.amax(1, keepdim=True) > tau)
        teach_a, teach_b = probs_a.detach(), probs_b.detach()
        if targets is not None:
            classes = probs_a.shape[1]
            teach_a, teach_b = (torch.movedim(F.one_hot(t, classes), -1, 1).to(probs_a.dtype) for t in targets)
        probs_a = torch.where(a_teaches, teach_a, probs_a)
        probs_b = torch.where(a_teaches, probs_b, teach_b)
    total = (((probs_a - probs_b) ** 2).sum(1) * mask).sum()
    if reduction == "paper":
        return total / probs_a.shape[0]
    if reduction == "mean_masked":
        return total / mask.sum().clamp(min=1)
    return total / mask.numel()
