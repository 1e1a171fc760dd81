"""DHC's class weighting (DistDW, DiffDW) and its weighted losses (``xmed-lab/DHC``, MICCAI 2023).

Formulas follow ``code/train_dhc.py`` and ``code/utils/loss.py`` of the reference code:

- ``DistDW`` (subnet B): weights from the class distribution, initialised from labeled-volume
  histograms and tracked by EMA on the argmax histogram of B's unlabeled predictions. The most
  frequent class (background) gets weight 0.
- ``DiffDW`` (subnet A): weights from the learning difficulty, i.e. EMAs of Dice increases
  ("learn") and decreases ("unlearn") and of ``1 - Dice`` on the labeled patches.
- Weights are in ``[0, C]`` (``C`` = classes including background). ``weighted_dice_ce_loss`` is
  nnU-Net's DC_and_CE with those weights on both terms; ``weighted_ce_loss`` is the CPS term.

Sparse annotation: a negative target value (the preprocessed ignore label, -1) marks a voxel nobody
annotated; it adds nothing to CE, Dice or DiffDW's statistics (nnU-Net v2's ignore label).

The weight trackers hold only tensors (``state_dict`` is safe for ``torch.load(weights_only=True)``)
and follow the device of their inputs. Their updates never build autograd graphs.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Union

import torch
import torch.nn.functional as F

_EPS = 1e-8
UNANNOTATED_TARGET = -1  # the target value of an unannotated voxel (data.preprocess.UNANNOTATED)


def _ema(current: torch.Tensor, past: torch.Tensor, momentum: float) -> torch.Tensor:
    """DHC's ``EMA(cur, past, m) = m * past + (1 - m) * cur``."""
    return momentum * past + (1.0 - momentum) * current


def _cal_weights(counts: torch.Tensor) -> torch.Tensor:
    """DHC ``DistDW._cal_weights``: ``P = (n.max()+1e-8)/(n+1e-8)``; ``log(P)/log(P).max()``, in [0, 1].

    A class absent from ``counts`` gets the largest ``log P`` and thus weight 1, the most
    frequent class weight 0.
    """
    p = (counts.max() + _EPS) / (counts + _EPS)
    log_p = torch.log(p)
    return log_p / log_p.max()


def _class_counts(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Voxel count per class of an integer label tensor (any shape) → float32 ``(C,)``."""
    return torch.bincount(labels.reshape(-1).long(), minlength=num_classes)[:num_classes].float()


class DistDW:
    """Distribution-aware debiased weighting (DHC subnet B).

    ``init_weights(counts)`` sets ``w = C * _cal_weights(counts)`` from the labeled ground truth;
    ``update(logits)`` takes the argmax histogram ``n`` of the unlabeled logits and returns
    ``w = m * w + (1 - m) * C * _cal_weights(n)``. Until ``init_weights`` is called the weights are
    uniform ``C`` (DHC always initialises first).
    """

    def __init__(self, num_classes: int, momentum: float = 0.99) -> None:
        self.num_classes = int(num_classes)
        self.momentum = float(momentum)
        self.weights = torch.full((self.num_classes,), float(self.num_classes))

    @torch.no_grad()
    def init_weights(self, label_counts: Union[torch.Tensor, Sequence[float]]) -> torch.Tensor:
        """``label_counts (C,)``: GT voxel counts per class over all labeled volumes → weights ``(C,)``."""
        counts = torch.as_tensor(label_counts, dtype=torch.float32)
        if counts.shape != (self.num_classes,):
            raise ValueError(f"label_counts must have shape ({self.num_classes},), got {tuple(counts.shape)}")
        self.weights = self.num_classes * _cal_weights(counts)
        return self.weights

    @torch.no_grad()
    def update(self, logits_unlabeled: torch.Tensor) -> torch.Tensor:
        """``logits_unlabeled (B, C, Z, Y, X)`` → EMA-updated weights ``(C,)`` on the logits' device."""
        counts = _class_counts(logits_unlabeled.argmax(dim=1), self.num_classes)
        current = self.num_classes * _cal_weights(counts)
        self.weights = _ema(current, self.weights.to(current.device), self.momentum)
        return self.weights

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {"weights": self.weights.clone()}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        self.weights = _checked(state, "weights", self.num_classes).clone()


class DiffDW:
    """Difficulty-aware debiased weighting (DHC subnet A).

    Per call, with ``d`` the hard batch Dice per class (background included, smooth 1e-8, so a
    class absent from prediction and GT has ``d = 0.5``) and ``Δ = d - last_dice``::

        learn      = EMA(where(Δ > 0, Δ, 0)  * log(d / last_dice), learn)
        unlearn    = EMA(where(Δ <= 0, Δ, 0) * log(d / last_dice), unlearn)
        dice_weight = EMA(1 - d, dice_weight)
        diff = ((unlearn + 1e-8) / (learn + 1e-8)) ** (1/5)
        w = C * diff * dice_weight / max(diff * dice_weight)

    with ``EMA(cur, past) = m * past + (1 - m) * cur``. The EMAs start from DHC's initial state
    (``learn = unlearn = 0``, ``dice_weight = 1``, ``last_dice = 1e-8``), so the first update is
    ``learn = (1 - m) * cur`` and ``dice_weight = m + (1 - m)(1 - d)``. Initial weights are ``C``.
    """

    _STATE = ("weights", "last_dice", "learn", "unlearn", "dice_weight")

    def __init__(self, num_classes: int, momentum: float = 0.98) -> None:
        self.num_classes = int(num_classes)
        self.momentum = float(momentum)
        c = self.num_classes
        self.weights = torch.full((c,), float(c))
        self.last_dice = torch.full((c,), _EPS)
        self.learn = torch.zeros(c)
        self.unlearn = torch.zeros(c)
        self.dice_weight = torch.ones(c)

    @torch.no_grad()
    def update(self, logits_labeled: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``logits_labeled (B, C, Z, Y, X)``, ``target (B, Z, Y, X)`` int (< 0: not annotated, left
        out of the Dice) → new weights ``(C,)``."""
        device = logits_labeled.device
        for name in self._STATE:
            setattr(self, name, getattr(self, name).to(device))
        target = _squeeze_target(target, logits_labeled)
        d = _hard_batch_dice(logits_labeled.argmax(dim=1), target, self.num_classes)

        delta = d - self.last_dice
        log_ratio = torch.log(d / self.last_dice)
        zero = torch.zeros_like(delta)
        cur_learn = torch.where(delta > 0, delta, zero) * log_ratio
        cur_unlearn = torch.where(delta <= 0, delta, zero) * log_ratio
        self.last_dice = d
        m = self.momentum
        self.learn = _ema(cur_learn, self.learn, m)
        self.unlearn = _ema(cur_unlearn, self.unlearn, m)
        diff = ((self.unlearn + _EPS) / (self.learn + _EPS)) ** (1.0 / 5.0)
        self.dice_weight = _ema(1.0 - d, self.dice_weight, m)
        raw = diff * self.dice_weight
        self.weights = self.num_classes * raw / raw.max()
        return self.weights

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {name: getattr(self, name).clone() for name in self._STATE}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        for name in self._STATE:
            setattr(self, name, _checked(state, name, self.num_classes).clone())


def _checked(state: Dict[str, torch.Tensor], key: str, num_classes: int) -> torch.Tensor:
    value = state.get(key)
    if not isinstance(value, torch.Tensor) or value.shape != (num_classes,):
        raise ValueError(f"state entry {key!r} must be a tensor of shape ({num_classes},)")
    return value.float()


def _hard_batch_dice(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Dice per class of two label maps summed over the whole batch, nnU-Net SoftDiceLoss with
    ``smooth=1e-8`` on one-hot inputs: ``(2TP + s) / (2TP + FP + FN + s + 1e-8)`` → float32 ``(C,)``.
    Voxels whose target is negative (not annotated) are left out."""
    annotated = target >= 0
    pred, target = pred[annotated], target[annotated]
    tp = _class_counts(pred[pred == target], num_classes)
    fp = _class_counts(pred, num_classes) - tp
    fn = _class_counts(target, num_classes) - tp
    return (2 * tp + _EPS) / (2 * tp + fp + fn + _EPS + _EPS)


def _squeeze_target(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Accept ``(B, Z, Y, X)`` or DHC's ``(B, 1, Z, Y, X)`` targets; return ``(B, Z, Y, X)`` long."""
    if target.dim() == logits.dim():
        if target.shape[1] != 1:
            raise ValueError(f"target must be (B, Z, Y, X) or (B, 1, Z, Y, X), got {tuple(target.shape)}")
        target = target[:, 0]
    return target.long()


def weighted_ce_loss(logits: torch.Tensor, target: torch.Tensor,
                     weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Class-weighted cross entropy with PyTorch's weighted-mean semantics.

    ``logits (B, C, Z, Y, X)``, ``target (B, Z, Y, X)`` int, ``weights (C,)`` or None →
    ``Σ_i w[y_i]·l_i / Σ_i w[y_i]`` over the annotated voxels ``i`` (target ≥ 0; a negative target
    is not annotated and left out, as ``ignore_index``); plain mean when ``weights`` is None.
    Computed in float32 for AMP. Deviation from ``nn.CrossEntropyLoss`` only where ``Σ w[y_i] = 0``
    (e.g. DistDW's zero background weight on an all-background patch, or no annotated voxel):
    returns 0 instead of torch's NaN, so one such patch cannot poison the step.
    """
    target = _squeeze_target(target, logits)
    logits = logits.float()
    annotated = target >= 0
    if weights is None:
        per_voxel = F.cross_entropy(logits, target, ignore_index=UNANNOTATED_TARGET, reduction="none")
        denominator = annotated.sum()
    else:
        weights = weights.detach().to(device=logits.device, dtype=torch.float32)
        # w[y_i] * l_i, 0 where not annotated
        per_voxel = F.cross_entropy(logits, target, weight=weights, ignore_index=UNANNOTATED_TARGET, reduction="none")
        denominator = (weights[target.clamp_min(0)] * annotated).sum()
    return torch.where(denominator > 0, per_voxel.sum() / denominator.clamp_min(_EPS), per_voxel.sum() * 0.0)


def _soft_dice_per_class(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """nnU-Net SoftDiceLoss terms with ``batch_dice=True`` on ``softmax(logits)``.

    ``logits (B, C, Z, Y, X)``, ``target (B, Z, Y, X)`` → ``dc (C,)`` with
    ``dc_c = (2TP_c + smooth) / (2TP_c + FP_c + FN_c + smooth + 1e-8)``, sums over batch and the
    annotated voxels (target ≥ 0; nnU-Net's ``loss_mask`` of the ignore label).
    """
    target = _squeeze_target(target, logits)
    annotated = (target >= 0).unsqueeze(1)
    probs = torch.softmax(logits.float(), dim=1) * annotated
    # scatter into a float tensor: F.one_hot would allocate an int64 copy C times the volume;
    # an unannotated voxel scatters into class 0 and is then zeroed
    onehot = torch.zeros_like(probs).scatter_(1, target.clamp_min(0).unsqueeze(1), 1.0) * annotated
    axes = [0] + list(range(2, logits.dim()))
    tp = (probs * onehot).sum(dim=axes)
    fp = probs.sum(dim=axes) - tp
    fn = onehot.sum(dim=axes) - tp
    return (2 * tp + smooth) / (2 * tp + fp + fn + smooth + _EPS)


def weighted_dice_ce_loss(logits: torch.Tensor, target: torch.Tensor,
                          weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """DHC's ``DC_and_CE_loss(w_dc=w, w_ce=w)``: ``weighted_ce_loss + (-mean_{c>=1} w_c·dc_c)``.

    ``logits (B, C, Z, Y, X)``, ``target (B, Z, Y, X)`` int, ``weights (C,)`` or None (= ones).
    The Dice term is negative Dice (not 1 − Dice), excludes background, and — unlike CE — keeps
    the scale of ``w``. Returns a scalar tensor.
    """
    dc = _soft_dice_per_class(logits, target)[1:]
    if weights is not None:
        dc = dc * weights.detach().to(device=dc.device, dtype=dc.dtype)[1:]
    return weighted_ce_loss(logits, target, weights) - dc.mean()
