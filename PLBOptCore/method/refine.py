"""Superpixel entropy voting: refinement of pseudo labels (PLBOpt eq. 1-2, Algorithm 1 line 7).

For every superpixel ``S`` and every foreground class ``c`` (background is never a "pseudo-label
mask" of its own) we split ``S`` by the pseudo label into

    M_int  = S ∩ {ŷ = c}        M_comp = S \\ {ŷ = c}

and compute ``p(k|M) = mean softmax over M`` (normalised to sum 1) and an entropy (natural log,
``0 log 0 = 0``), one of two readings of eq. 1-2 (``entropy=``):

- ``"binary"`` (default): the entropy of the mask's own class against the rest,
  ``H(M) = -p log p - (1-p) log(1-p)`` with ``p = p(c|M)``. The paper describes one pseudo-label
  mask ŷ, i.e. a two-class problem, where both readings agree.
- ``"multiclass"``: ``H(M) = -Σ_k p(k|M) log p(k|M)`` over all C classes, eq. 1 as printed. With
  several organs this calls a region "uncertain" when it merely mixes two *confident* classes (a
  superpixel's complement holding background and a neighbouring organ has a mean near (½, ½)),
  and whole superpixels are then given to ``c``. Measured on the phantom demo (3 test cases, a
  trained run, SLIC H×W/50, τ = 0.5): no refinement 0.746 mean Dice, ``multiclass`` 0.604,
  ``binary`` 0.772.

Then

- **contract** ``(S, c)`` when ``H(int) > τ`` and ``H(int) > H(comp)``,
- **expand**   ``(S, c)`` when ``H(comp) > τ`` and ``H(comp) > H(int)``,
- no decision when either region is empty (its entropy is undefined): only superpixels that
  straddle the boundary of ``c`` can move that boundary, which is what the paper describes.

Multi-class rule (the paper only describes one mask; our choice, deterministic):

- all decisions are computed from the *original* pseudo label, for all ``(S, c)`` at once;
- **expand** ``(S, c)``: the voxels of ``M_comp`` become ``c``, so the whole superpixel becomes
  ``c`` (the certain side absorbs the uncertain side). If several classes expand in the same
  superpixel, the one whose ``M_int`` has the lowest entropy wins (ties: smallest class id);
- **contract** ``(S, c)``: the voxels of ``M_int`` take ``argmax_{k≠c} p(k|M_int)``, the class the
  model itself ranks next over that region (background in the two-class case, i.e. the mask
  shrinks). The ``M_int`` regions of different classes are disjoint, so contractions never
  compete with each other;
- an expansion in a superpixel overrides every contraction in it (both say that the contracted
  voxels are uncertain; the expansion also says which certain class they belong to).

Voxels without a superpixel (id -1, e.g. padding) are never read or changed.
"""

from __future__ import annotations

from typing import Tuple

import torch


def region_entropy(prob_sums: torch.Tensor) -> torch.Tensor:
    """Entropy of summed class probabilities (eq. 1-2).

    Args:
        prob_sums: (..., C) sums of softmax vectors over a region (any positive scale).

    Returns:
        (...) entropy in nats of the normalised mean ``p = s / Σ s``; NaN where the region is empty.
    """
    p = prob_sums / prob_sums.sum(-1, keepdim=True)
    return -torch.xlogy(p, p).sum(-1)


def mask_entropy(prob_sums: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    """Binary entropy of class ``cls`` against the rest (the ``"binary"`` reading of eq. 1-2).

    Args:
        prob_sums: (..., C) sums of softmax vectors over a region.
        cls: (...) long, the class of the pseudo-label mask of each region.

    Returns:
        (...) entropy in nats (at most ln 2) of ``p = s_cls / Σ s``; NaN where the region is empty.
    """
    p = prob_sums.gather(-1, cls.unsqueeze(-1)).squeeze(-1) / prob_sums.sum(-1)
    return -(torch.xlogy(p, p) + torch.xlogy(1.0 - p, 1.0 - p))


ENTROPY_MODES = ("binary", "multiclass")


def _group_ids(superpixels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Compact ids of the (batch item, superpixel) pairs.

    Args:
        superpixels: (B, ...) long ids, -1 = none. Cropped patches carry large, sparse volume-wide ids.

    Returns:
        groups (N,) long in ``0..G-1`` for the flattened voxels, and real (G,) bool, False for the
        per-item "no superpixel" groups (id -1), which are kept as groups so that no boolean-mask
        gathers over the voxels are needed.
    """
    batch = superpixels.shape[0]
    ids = superpixels.reshape(batch, -1)
    valid = ids >= 0
    low = int(torch.where(valid, ids, torch.full_like(ids, torch.iinfo(torch.int64).max)).min())
    ids = torch.where(valid, ids - low + 1, torch.zeros_like(ids))  # 0 = none, 1.. = superpixels
    stride = int(ids.max()) + 1
    key = (ids + torch.arange(batch, device=ids.device).unsqueeze(1) * stride).reshape(-1)
    if batch * stride <= 4 * key.numel():
        # dense id range (the usual case): presence table + cumsum, O(N), far faster than a sort
        present = torch.bincount(key, minlength=batch * stride) > 0
        groups = (present.cumsum(0) - 1)[key]
        unique_keys = present.nonzero().squeeze(1)
    else:
        unique_keys, groups = torch.unique(key, return_inverse=True)
    return groups, unique_keys % stride != 0


def refine_pseudo_labels(probs: torch.Tensor, pseudo: torch.Tensor, superpixels: torch.Tensor,
                         tau: float, entropy: str = "binary") -> Tuple[torch.Tensor, float]:
    """Refine pseudo labels by superpixel entropy voting (see the module docstring for the rule).

    Vectorised: one ``index_add`` of the softmax vectors over (superpixel, pseudo class) pairs, then
    decisions for all (superpixel, class) pairs at once; no Python loop over superpixels or classes.

    Args:
        probs: (B, C, Z, Y, X) softmax probabilities.
        pseudo: (B, Z, Y, X) long pseudo labels in ``0..C-1``.
        superpixels: (B, Z, Y, X) long superpixel ids, -1 where there is none.
        tau: entropy threshold in nats.
        entropy: ``"binary"`` (mask class against the rest) or ``"multiclass"`` (eq. 1 over C classes).

    Returns:
        refined (B, Z, Y, X) long on the input device, and the fraction of voxels with a
        superpixel whose label changed.
    """
    if probs.dim() != 5 or pseudo.shape != probs.shape[:1] + probs.shape[2:] or superpixels.shape != pseudo.shape:
        raise ValueError(f"refine_pseudo_labels: probs (B,C,Z,Y,X) {tuple(probs.shape)}, pseudo "
                         f"{tuple(pseudo.shape)} and superpixels {tuple(superpixels.shape)} do not match")
    if entropy not in ENTROPY_MODES:
        raise ValueError(f"entropy must be one of {ENTROPY_MODES}, got {entropy!r}")
    batch, num_classes = probs.shape[:2]
    num_valid = int((superpixels >= 0).sum())
    if num_valid == 0:
        return pseudo.clone(), 0.0

    groups, real_group = _group_ids(superpixels)
    num_groups = real_group.numel()
    labels = pseudo.reshape(-1)
    # (N, C) in one converting copy; float64: entropies of region means are compared with τ and
    # with each other, and must not flip with the summation order
    voxel_probs = probs.reshape(batch, num_classes, -1).transpose(1, 2).to(torch.float64).reshape(-1, num_classes)

    # sums[g, k, :] = Σ softmax over voxels of group g whose pseudo label is k
    slot = groups * num_classes + labels
    sums = torch.zeros(num_groups * num_classes, num_classes, dtype=torch.float64, device=probs.device)
    sums.index_add_(0, slot, voxel_probs)
    sums = sums.view(num_groups, num_classes, num_classes)
    counts = torch.bincount(slot, minlength=num_groups * num_classes).view(num_groups, num_classes)

    # row c of a group is M_int of class c; M_comp of class c is the superpixel minus that row
    comp_sums = (sums.sum(1, keepdim=True) - sums).clamp_min(0.0)
    comp_counts = counts.sum(1, keepdim=True) - counts
    if entropy == "binary":
        mask_class = torch.arange(num_classes, device=probs.device).expand(num_groups, num_classes)
        h_int, h_comp = mask_entropy(sums, mask_class), mask_entropy(comp_sums, mask_class)  # (G, C)
    else:
        h_int, h_comp = region_entropy(sums), region_entropy(comp_sums)

    defined = (counts > 0) & (comp_counts > 0) & real_group.unsqueeze(1)
    defined[:, 0] = False  # background is not a pseudo-label mask
    contract = defined & (h_int > tau) & (h_int > h_comp)
    expand = defined & (h_comp > tau) & (h_comp > h_int)

    # contraction target: next most probable class over M_int
    own = torch.eye(num_classes, dtype=torch.bool, device=probs.device).unsqueeze(0)
    contract_to = sums.masked_fill(own, -1.0).argmax(-1)  # (G, C)
    # expansion winner: most certain M_int; argmin returns the first (smallest class) on ties
    expand_key = torch.where(expand, h_int, torch.full_like(h_int, float("inf")))
    winner = expand_key.argmin(1)
    has_expand = expand.any(1)

    new = torch.where(contract.view(-1)[slot], contract_to.view(-1)[slot], labels)
    new = torch.where(has_expand[groups], winner[groups], new)
    changed = int((new != labels).sum()) / num_valid  # only voxels with a superpixel can change
    return new.view_as(pseudo), changed
