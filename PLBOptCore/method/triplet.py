"""Confidence-level triplet loss with memory banks (PLBOpt eq. 3-8, Algorithm 1 lines 8-10).

Our reading of section III-B (the authors published no code; every choice is documented in
``docs/METHOD.md``):

- **Levels (eq. 3)**: the voxels of a batch are split into ``k`` levels by the confidence of their
  pseudo label (max softmax) at the batch quantiles ``1/k, 2/k, ...``: level 0 = least confident.
  Quantiles rather than fixed bins in ``[1/C, 1]`` because a trained network puts nearly every voxel
  above 0.9, which would leave the lower fixed bins empty; quantiles keep every level populated
  while preserving the order ``c(ŷ_i) < c(ŷ_j)`` for ``i < j``.
- **Boundary / internal**: a boundary voxel has a different pseudo label in its 6-neighbourhood; an
  internal voxel is a *foreground* voxel that is not boundary (the eroded organ interior).
  Background interior is excluded: it is most of the patch and far from any organ, so it would only
  supply trivial negatives.
- **Domain**: same confidence level and same pseudo class. Anchors are foreground boundary voxels;
  positives are boundary voxels and negatives internal voxels of the anchor's class and level.
- **Mining (eq. 4-6)**: cosine similarity on the features; hard positive = most similar boundary
  feature other than the anchor itself (eq. 5), hard negative = least similar internal feature
  (eq. 6), as the equations are written (``mining="paper"``, the default). Note that this pairs the
  *easiest* positive with the *easiest* negative, so the hinge is often already satisfied;
  ``mining="hardest"`` is the usual batch-hard variant (least similar positive, most similar
  negative). Both are searched in the current batch (gradients flow) plus the memory banks
  (detached).
- **Banks (eq. 7)**: one positive (boundary) and one negative (internal) FIFO bank *per level*, each
  of capacity ``C``, entries tagged with their class; they receive the L2-normalised, detached
  features of the current step's sampled candidates *after* the loss is computed, so the batch is
  never compared with a copy of itself.
- **Loss (eq. 8)** on L2-normalised features (so ``‖a−b‖² = 2 − 2 cos`` ∈ [0, 4] and the margin α
  has a fixed meaning), averaged over anchors instead of the paper's sum so that its scale does not
  depend on ``max_anchors`` or on how many boundary voxels a batch has.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

MINING = ("paper", "hardest")


class MemoryBank:
    """FIFO queue of detached feature vectors with an integer tag each (eq. 7).

    Args:
        capacity: maximum number of entries ``C``; pushing beyond it drops the oldest entries.
        dim: feature dimension ``D``.
    """

    def __init__(self, capacity: int, dim: int):
        if capacity < 1 or dim < 1:
            raise ValueError(f"MemoryBank needs capacity >= 1 and dim >= 1, got {capacity}, {dim}")
        self.capacity = int(capacity)
        self.dim = int(dim)
        self._features = torch.zeros(self.capacity, self.dim)
        self._labels = torch.full((self.capacity,), -1, dtype=torch.long)
        self._next = 0  # ring-buffer slot of the next write
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def push(self, features: torch.Tensor, labels: Optional[torch.Tensor] = None) -> None:
        """Append (N, D) features (stored detached, float32, on their device) and (N,) long tags
        (default -1); when full, the oldest entries are replaced."""
        if features.dim() != 2 or features.shape[1] != self.dim:
            raise ValueError(f"MemoryBank.push expects (N, {self.dim}) features, got {tuple(features.shape)}")
        features = features.detach().float()
        if labels is None:
            labels = torch.full((features.shape[0],), -1, dtype=torch.long, device=features.device)
        labels = labels.detach().long().to(features.device)
        if features.shape[0] > self.capacity:  # only the newest `capacity` entries would survive
            features, labels = features[-self.capacity:], labels[-self.capacity:]
        n = features.shape[0]
        if n == 0:
            return
        if self._features.device != features.device:
            self._features = self._features.to(features.device)
            self._labels = self._labels.to(features.device)
        slots = (self._next + torch.arange(n, device=features.device)) % self.capacity
        self._features[slots] = features
        self._labels[slots] = labels
        self._next = (self._next + n) % self.capacity
        self._count = min(self.capacity, self._count + n)

    def _order(self) -> torch.Tensor:
        start = self._next - self._count
        return (start + torch.arange(self._count, device=self._features.device)) % self.capacity

    def features(self) -> torch.Tensor:
        """(n, D) stored features, oldest first."""
        return self._features[self._order()]

    def labels(self) -> torch.Tensor:
        """(n,) tags of :meth:`features`, same order."""
        return self._labels[self._order()]

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """Tensors only (``torch.load(weights_only=True)``): entries oldest first."""
        return {"features": self.features().cpu(), "labels": self.labels().cpu()}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        features, labels = state["features"], state["labels"]
        if features.dim() != 2 or features.shape[1] != self.dim or labels.shape != features.shape[:1]:
            raise ValueError(f"memory bank state has features {tuple(features.shape)} and labels "
                             f"{tuple(labels.shape)}; expected (n, {self.dim}) and (n,)")
        if features.shape[0] > self.capacity:
            raise ValueError(f"memory bank state holds {features.shape[0]} entries, capacity is {self.capacity}")
        device = self._features.device
        self._features = torch.zeros(self.capacity, self.dim, device=device)
        self._labels = torch.full((self.capacity,), -1, dtype=torch.long, device=device)
        self._next = self._count = 0
        self.push(features.to(device), labels.to(device))


def confidence_levels(confidence: torch.Tensor, k: int) -> torch.Tensor:
    """Split voxels into ``k`` confidence levels at the batch quantiles (eq. 3).

    Level ``i`` holds the voxels ranked ``[i·n/k, (i+1)·n/k)`` by confidence over the whole batch;
    values equal to a threshold go to the upper level.

    Args:
        confidence: (B, Z, Y, X) max softmax of the pseudo label.
        k: number of levels.

    Returns:
        (B, Z, Y, X) long in ``[0, k)``, 0 = least confident.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    flat = confidence.reshape(-1)
    ranks = ((torch.arange(1, k) * flat.numel()) // k).tolist()
    # k-1 selections (linear time) instead of a full sort; torch.quantile has an input size limit
    thresholds = torch.stack([flat.kthvalue(rank + 1).values for rank in ranks]) if ranks else flat[:0]
    return torch.bucketize(confidence.contiguous(), thresholds.contiguous(), right=True)


def boundary_internal_masks(pseudo: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Boundary and internal voxels of a label map: neighbours compared along each axis.

    Args:
        pseudo: (B, Z, Y, X) long labels.

    Returns:
        boundary (B, Z, Y, X) bool: a 6-neighbour (inside the patch) has another label;
        internal (B, Z, Y, X) bool: foreground (label > 0) and not boundary.
    """
    boundary = torch.zeros_like(pseudo, dtype=torch.bool)
    for axis in (1, 2, 3):  # a voxel pair that differs along an axis marks both of its voxels
        n = pseudo.shape[axis]
        differs = pseudo.narrow(axis, 1, n - 1) != pseudo.narrow(axis, 0, n - 1)
        boundary.narrow(axis, 1, n - 1).logical_or_(differs)
        boundary.narrow(axis, 0, n - 1).logical_or_(differs)
    return boundary, (pseudo > 0) & ~boundary


def triplet_hinge(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor,
                  margin: float) -> torch.Tensor:
    """Per-anchor term of eq. 8, ``[‖a − p‖² − ‖a − n‖² + α]_+``; inputs (N, D), output (N,)."""
    d_pos = (anchor - positive).pow(2).sum(1)
    d_neg = (anchor - negative).pow(2).sum(1)
    return F.relu(d_pos - d_neg + margin)


def triplet_loss(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor,
                 margin: float) -> torch.Tensor:
    """Eq. 8 averaged over anchors (mean, not the paper's sum: see the module docstring).

    Args:
        anchor, positive, negative: (N, D) features (the caller L2-normalises them).
        margin: α.

    Returns:
        scalar; a graph-connected zero when ``N == 0``.
    """
    if anchor.shape[0] == 0:
        return anchor.sum() * 0.0
    return triplet_hinge(anchor, positive, negative, margin).mean()


def mine_pairs(anchor: torch.Tensor, anchor_cls: torch.Tensor, positives: torch.Tensor,
               positive_cls: torch.Tensor, negatives: torch.Tensor, negative_cls: torch.Tensor,
               num_self: int, mining: str = "paper") -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Positive and negative of every anchor within its domain (same class; eq. 4-6).

    Args:
        anchor: (A, D) unit vectors; anchor_cls (A,) class ids.
        positives: (P, D) unit boundary vectors; positive_cls (P,).
        negatives: (Q, D) unit internal vectors; negative_cls (Q,).
        num_self: anchor ``i`` is positive ``i`` for ``i < num_self`` and may not be its own positive.
        mining: ``"paper"``: argmax cosine over positives (eq. 5), argmin over negatives (eq. 6);
            ``"hardest"``: argmin over positives, argmax over negatives.

    Returns:
        ok (A,) bool (a positive and a negative exist), positive index (A,), negative index (A,).
    """
    if mining not in MINING:
        raise ValueError(f"mining must be one of {MINING}, got {mining!r}")
    ok = torch.zeros(anchor.shape[0], dtype=torch.bool, device=anchor.device)
    p_index = torch.zeros(anchor.shape[0], dtype=torch.long, device=anchor.device)
    n_index = torch.zeros_like(p_index)
    # cosine of unit vectors (eq. 4); a sign flip turns every selection into an argmax
    sign_p, sign_n = (1.0, -1.0) if mining == "paper" else (-1.0, 1.0)
    # One class at a time: each anchor is compared with its own class only, a sixth of the
    # all-pairs work a class mask would need.
    for cls in anchor_cls.unique().tolist():
        rows = (anchor_cls == cls).nonzero().squeeze(1)
        cand_p = (positive_cls == cls).nonzero().squeeze(1)
        cand_n = (negative_cls == cls).nonzero().squeeze(1)
        if cand_p.numel() == 0 or cand_n.numel() == 0:
            continue
        anchors = anchor[rows]
        score_p = sign_p * (anchors @ positives[cand_p].T)
        # an anchor that is also a positive (row i < num_self) may not pick itself
        selves = rows < num_self
        own_rows, own_ids = selves.nonzero().squeeze(1), rows[selves]
        own_cols = torch.searchsorted(cand_p, own_ids).clamp_max(cand_p.numel() - 1)
        is_own = cand_p[own_cols] == own_ids
        score_p[own_rows[is_own], own_cols[is_own]] = float("-inf")
        best_p, p_best = score_p.max(1)
        _, n_best = (sign_n * (anchors @ negatives[cand_n].T)).max(1)
        ok[rows] = torch.isfinite(best_p)
        p_index[rows], n_index[rows] = cand_p[p_best], cand_n[n_best]
    return ok, p_index, n_index


def _sample(count: int, limit: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """A random order of ``range(count)`` from ``generator``, truncated to ``limit``."""
    order = torch.randperm(count, generator=generator, device=generator.device)
    return order[:limit].to(device)


class ConfidenceTripletLoss:
    """Triplet loss over confidence levels with per-level positive/negative memory banks.

    Use one instance per subnet (its banks hold that subnet's features).

    Args:
        levels: ``k`` confidence levels.
        capacity: capacity ``C`` of each bank (there are ``2k`` banks).
        dim: feature dimension ``F``.
        margin: α of eq. 8 (on L2-normalised features, where squared distances lie in [0, 4]).
        max_anchors: anchors sampled per level and step.
        max_candidates: boundary and internal voxels sampled per level and step (searched, then
            pushed to the banks).
        mining: ``"paper"`` = eq. 5-6 as written (most similar positive, least similar negative);
            ``"hardest"`` = least similar positive, most similar negative.
        share: optional ``(features (n, D), labels (n,)) -> (features, labels)`` applied to every
            bank update before it is pushed; data-parallel training passes an all-gather so every
            rank's banks receive all ranks' candidates and stay identical.
    """

    def __init__(self, levels: int = 3, capacity: int = 4096, dim: int = 32, margin: float = 0.5,
                 max_anchors: int = 256, max_candidates: int = 2048, mining: str = "paper",
                 share: Optional[Callable[[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]] = None):
        if levels < 1 or max_anchors < 1 or max_candidates < 1:
            raise ValueError("levels, max_anchors and max_candidates must be >= 1")
        if mining not in MINING:
            raise ValueError(f"mining must be one of {MINING}, got {mining!r}")
        self.mining = mining
        self.levels = int(levels)
        self.dim = int(dim)
        self.margin = float(margin)
        self.max_anchors = int(max_anchors)
        self.max_candidates = int(max_candidates)
        self.share = share
        self.positive = [MemoryBank(capacity, dim) for _ in range(self.levels)]
        self.negative = [MemoryBank(capacity, dim) for _ in range(self.levels)]

    def __call__(self, features: torch.Tensor, pseudo: torch.Tensor, confidence: torch.Tensor,
                 generator: torch.Generator) -> torch.Tensor:
        """Mine triplets, return the mean eq. 8 loss, then push this step's candidates to the banks.

        Args:
            features: (B, F, Z, Y, X) decoder features (with gradients).
            pseudo: (B, Z, Y, X) long pseudo labels (refined or not).
            confidence: (B, Z, Y, X) max softmax of the pseudo labels.
            generator: source of the anchor/candidate sampling (derived from (seed, step)).

        Returns:
            scalar tensor; ``features.sum() * 0`` when there is no complete triplet.
        """
        dim = features.shape[1]
        if dim != self.dim or features.shape[2:] != pseudo.shape[1:] or confidence.shape != pseudo.shape:
            raise ValueError(f"ConfidenceTripletLoss(dim={self.dim}): features {tuple(features.shape)}, "
                             f"pseudo {tuple(pseudo.shape)}, confidence {tuple(confidence.shape)} do not match")
        boundary, internal = boundary_internal_masks(pseudo)
        boundary = (boundary & (pseudo > 0)).reshape(-1)  # background has no internal voxels
        internal = internal.reshape(-1)
        level = confidence_levels(confidence, self.levels).reshape(-1)
        flat_features = features.flatten(2)  # (B, F, S)
        flat_labels = pseudo.reshape(-1)
        spatial = flat_features.shape[2]

        def gather(index: torch.Tensor) -> torch.Tensor:  # flat voxel index (n,) → (n, F) unit vectors
            return F.normalize(flat_features[index // spatial, :, index % spatial], dim=1)

        hinges: List[torch.Tensor] = []
        updates = []
        for lv in range(self.levels):
            bnd = (boundary & (level == lv)).nonzero().squeeze(1)
            inn = (internal & (level == lv)).nonzero().squeeze(1)
            # anchors are the first max_anchors of the same random order as the boundary
            # candidates, so anchor i is candidate i (excluded from its own positive search)
            bnd = bnd[_sample(bnd.numel(), max(self.max_anchors, self.max_candidates), generator, bnd.device)]
            inn = inn[_sample(inn.numel(), self.max_candidates, generator, inn.device)]
            anchors, cand_b = bnd[: self.max_anchors], bnd[: self.max_candidates]
            f_b, f_i = gather(cand_b), gather(inn)
            if anchors.numel():
                hinges.append(self._level_hinges(lv, gather(anchors), flat_labels[anchors],
                                                 f_b, flat_labels[cand_b], f_i, flat_labels[inn]))
            updates.append((lv, f_b, flat_labels[cand_b], f_i, flat_labels[inn]))

        with torch.no_grad():  # eq. 7, after the loss: the banks never hold the current batch twice
            for lv, fb, lb, fi, li in updates:
                if self.share is not None:
                    (fb, lb), (fi, li) = self.share(fb, lb), self.share(fi, li)
                self.positive[lv].push(fb, lb)
                self.negative[lv].push(fi, li)
        hinge = torch.cat(hinges) if hinges else features.new_zeros(0)
        if hinge.numel() == 0:
            return features.sum() * 0.0
        return hinge.mean()

    def _level_hinges(self, lv: int, anchor: torch.Tensor, anchor_cls: torch.Tensor,
                      boundary: torch.Tensor, boundary_cls: torch.Tensor,
                      internal: torch.Tensor, internal_cls: torch.Tensor) -> torch.Tensor:
        """Per-anchor hinge of eq. 8 for one level; anchors without a positive or a negative in
        their domain are dropped.

        Shapes: anchor (A, F) with anchor i == boundary i for i < min(A, P); boundary (P, F);
        internal (Q, F); ``*_cls`` the matching (n,) class ids. Returns (A',) hinge values.
        """
        bank_p, bank_n = self.positive[lv], self.negative[lv]
        pos = torch.cat([boundary, bank_p.features().to(boundary)])
        pos_cls = torch.cat([boundary_cls, bank_p.labels().to(boundary_cls.device)])
        neg = torch.cat([internal, bank_n.features().to(internal)])
        neg_cls = torch.cat([internal_cls, bank_n.labels().to(internal_cls.device)])

        ok, p_index, n_index = mine_pairs(anchor, anchor_cls, pos, pos_cls, neg, neg_cls,
                                          boundary.shape[0], self.mining)
        return triplet_hinge(anchor[ok], pos[p_index[ok]], neg[n_index[ok]], self.margin)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """Bank contents, tensors only, keys ``positive.<level>.features`` / ``.labels`` etc."""
        state: Dict[str, torch.Tensor] = {}
        for name, banks in (("positive", self.positive), ("negative", self.negative)):
            for lv, bank in enumerate(banks):
                for key, value in bank.state_dict().items():
                    state[f"{name}.{lv}.{key}"] = value
        return state

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        for name, banks in (("positive", self.positive), ("negative", self.negative)):
            for lv, bank in enumerate(banks):
                bank.load_state_dict({key: state[f"{name}.{lv}.{key}"] for key in ("features", "labels")})
