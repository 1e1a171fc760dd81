"""Segmentation metrics in millimetres: Dice, ASD, ASSD, HD95 (numpy/scipy only).

Surfaces: the surface of a binary mask is ``mask XOR binary_erosion(mask, S)`` with ``S`` the
6-connectivity cross (``generate_binary_structure(3, 1)``, medpy's default ``connectivity=1`` and
MONAI's edges), and voxels on the array border count as surface (erosion pads with 0). Distances
from each surface voxel to the nearest surface voxel of the other mask come from
``distance_transform_edt`` with ``sampling=spacing``, so they are in mm for a ``(Z, Y, X)`` spacing.

- ``asd(pred, gt)``: mean over PRED surface voxels of the distance to the GT surface (one-sided,
  medpy ``asd(result, reference)``, the number DHC reports).
- ``assd``: mean of the union of both directed distance sets, i.e.
  ``(Σ d(pred→gt) + Σ d(gt→pred)) / (|S_pred| + |S_gt|)`` (the standard definition and medpy ≥ 0.5;
  medpy 0.4 averaged the two one-sided ASDs instead, which weighs a small surface like a big one).
- ``hd95``, two conventions (``HD95_CONVENTIONS``):
  ``pooled`` (default): 95th percentile (numpy linear interpolation) of the union of both directed
  distance sets (medpy ``hd95``, used by DHC-style tables);
  ``max``: the larger of the two directed 95th percentiles (MONAI
  ``HausdorffDistanceMetric(percentile=95)``; DeepMind's surface-distance takes the same maximum
  but weighs surface elements by their area, so its values differ slightly).

Empty masks, per class (``compute_case_metrics``):

- absent from both prediction and GT (``EMPTY_CONVENTIONS``): ``ignore`` (default) scores nothing
  (NaN, left out of every mean; nnU-Net v2); ``perfect`` scores Dice 1 and distances 0, included in
  the means (DHC's evaluation and earlier PLBOpt versions; MONAI ``DiceMetric(ignore_empty=False)``);
  ``ignore-gt`` scores nothing either, and also leaves out a class predicted where the GT has none
  (every metric NaN: MONAI ``DiceMetric(ignore_empty=True)``, which scores a case only where its GT
  holds the class).
- present in exactly one (under ``ignore-gt``: only in the GT): Dice 0; the distances follow
  ``MISSING_CONVENTIONS``: ``diagonal``
  (default) = the diagonal of the image in mm, the largest distance the image allows, so missing
  an organ is never better than segmenting it badly (BraTS-style; DHC used a fixed 128-voxel
  placeholder); ``inf`` = infinity (MONAI), which makes the class mean infinite; ``skip`` = NaN,
  left out of the distance means (earlier PLBOpt versions; missing an organ then improves the mean).

The standalone ``asd``/``assd``/``hd95`` return 0 for two empty masks and NaN for one.

Sparse ground truth (nnU-Net v2's ignore label): :func:`annotated_only` gives both maps background
where the ground truth is ``ignore``, so those voxels add no TP, FP or FN to any class, as nnU-Net's
``compute_metrics`` masks them; the surface distances are then those of the annotated part.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

SURFACE_STRUCTURE = ndimage.generate_binary_structure(3, 1)
METRIC_NAMES = ("dice", "asd", "assd", "hd95")
EMPTY_CONVENTIONS = ("ignore", "perfect", "ignore-gt")
MISSING_CONVENTIONS = ("diagonal", "inf", "skip")
HD95_CONVENTIONS = ("pooled", "max")
# The order of averaging over cases and classes (``PLBOptCore.evaluate``): ``classes`` = each class's
# mean over cases, then the mean over classes (nnU-Net v2's foreground mean, DHC; MONAI
# ``reduction="mean_batch"`` then the mean of that vector); ``cases`` = each case's mean over its
# scored classes, then the mean over the cases with any (MONAI's default ``reduction="mean"``).
AVERAGE_CONVENTIONS = ("classes", "cases")
# What a class is, per case, as far as empty masks go (``compute_case_metrics``' "empty" entry).
EMPTY_STATUSES = ("none", "both", "prediction", "ground_truth")


def dice(pred_mask: np.ndarray, gt_mask: np.ndarray) -> float:
    """Dice ``2|P∩G| / (|P| + |G|)`` of two boolean masks of equal shape; 1.0 when both are empty."""
    pred_mask, gt_mask = _as_bool_pair(pred_mask, gt_mask)
    total = int(pred_mask.sum()) + int(gt_mask.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred_mask, gt_mask).sum()) / total


def annotated_only(pred_labels: np.ndarray, gt_labels: np.ndarray, ignore_label: Optional[int]
                   ) -> Tuple[np.ndarray, np.ndarray]:
    """``(pred, gt)`` with background (0) wherever ``gt_labels == ignore_label``: the voxels nobody
    annotated then count for no foreground class. Unchanged when ``ignore_label`` is None."""
    if ignore_label is None:
        return pred_labels, gt_labels
    annotated = gt_labels != ignore_label
    return np.where(annotated, pred_labels, 0), np.where(annotated, gt_labels, 0)


def surface(mask: np.ndarray) -> np.ndarray:
    """Boolean surface voxels of a 3D boolean mask (``mask XOR erosion`` with the 6-connectivity cross)."""
    mask = np.asarray(mask, dtype=bool)
    return mask ^ ndimage.binary_erosion(mask, structure=SURFACE_STRUCTURE, iterations=1)


def surface_distances(a: np.ndarray, b: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Distances (mm) from every surface voxel of ``a`` to the nearest surface voxel of ``b``.

    Both masks must be non-empty. Works on the bounding box of ``a | b`` plus one voxel: every
    surface voxel and every nearest surface point lies inside it, so the result equals the
    full-volume computation at a fraction of the cost on large CT volumes.
    """
    a, b = _as_bool_pair(a, b)
    if not a.any() or not b.any():
        raise ValueError("surface distances need two non-empty masks")
    box = _bounding_box(a | b, margin=1)
    a, b = a[box], b[box]
    distance_to_b = ndimage.distance_transform_edt(~surface(b), sampling=_spacing(spacing, a.ndim))
    return distance_to_b[surface(a)]


def asd(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float]) -> float:
    """One-sided average surface distance (mm): mean over PRED surface of the distance to GT surface."""
    empty = _empty_case(pred, gt)
    return empty if empty is not None else float(surface_distances(pred, gt, spacing).mean())


def assd(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float]) -> float:
    """Average symmetric surface distance (mm): mean over the surface voxels of both masks."""
    empty = _empty_case(pred, gt)
    if empty is not None:
        return empty
    return float(np.concatenate([surface_distances(pred, gt, spacing), surface_distances(gt, pred, spacing)]).mean())


def hd95(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float], convention: str = "pooled") -> float:
    """95th percentile Hausdorff distance (mm); ``convention`` ``pooled`` or ``max`` (module docstring)."""
    empty = _empty_case(pred, gt)
    if empty is not None:
        return empty
    return _hd95(surface_distances(pred, gt, spacing), surface_distances(gt, pred, spacing), convention)


def _hd95(d_pg: np.ndarray, d_gp: np.ndarray, convention: str) -> float:
    if convention == "pooled":
        return float(np.percentile(np.concatenate([d_pg, d_gp]), 95))
    if convention == "max":
        return float(max(np.percentile(d_pg, 95), np.percentile(d_gp, 95)))
    raise ValueError(f"hd95 convention must be one of {HD95_CONVENTIONS}, got {convention!r}")


def both_empty_metrics(empty: str = "ignore") -> Dict[str, object]:
    """Metrics of a class absent from prediction and GT under the ``empty`` convention."""
    if empty not in EMPTY_CONVENTIONS:
        raise ValueError(f"empty convention must be one of {EMPTY_CONVENTIONS}, got {empty!r}")
    scores = dict.fromkeys(METRIC_NAMES, math.nan) if empty != "perfect" else {"dice": 1.0, "asd": 0.0,
                                                                               "assd": 0.0, "hd95": 0.0}
    return {**scores, "empty": "both"}


def image_diagonal(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Length (mm) of the diagonal of a ``(Z, Y, X)`` volume: the largest distance inside it."""
    return float(np.linalg.norm(np.asarray(shape, float) * np.asarray(_spacing(spacing, len(shape)))))


def compute_case_metrics(pred_labels: np.ndarray, gt_labels: np.ndarray, num_classes: int,
                         spacing: Sequence[float], empty: str = "ignore", missing: str = "diagonal",
                         hd95_convention: str = "pooled") -> Dict[int, Dict[str, object]]:
    """Per foreground class metrics of one case.

    Args:
        pred_labels, gt_labels: integer label maps ``(Z, Y, X)`` of equal shape.
        num_classes: C; classes ``1..C-1`` are scored.
        spacing: ``(Z, Y, X)`` mm.
        empty, missing, hd95_convention: the conventions of the module docstring.

    Returns:
        ``{c: {"dice", "asd", "assd", "hd95": float, "empty": status}}`` with status one of
        ``EMPTY_STATUSES`` (which mask is empty). Each directed distance set is computed once and
        shared by ASD, ASSD and HD95.
    """
    pred_labels, gt_labels = np.asarray(pred_labels), np.asarray(gt_labels)
    if pred_labels.shape != gt_labels.shape:
        raise ValueError(f"prediction shape {pred_labels.shape} differs from ground truth {gt_labels.shape}")
    if missing not in MISSING_CONVENTIONS:
        raise ValueError(f"missing convention must be one of {MISSING_CONVENTIONS}, got {missing!r}")
    if empty not in EMPTY_CONVENTIONS:
        raise ValueError(f"empty convention must be one of {EMPTY_CONVENTIONS}, got {empty!r}")
    missing_distance = {"diagonal": image_diagonal(gt_labels.shape, spacing), "inf": math.inf,
                        "skip": math.nan}[missing]
    results: Dict[int, Dict[str, object]] = {}
    for c in range(1, int(num_classes)):
        p, g = pred_labels == c, gt_labels == c
        has_pred, has_gt = bool(p.any()), bool(g.any())
        if not has_pred and not has_gt:
            results[c] = both_empty_metrics(empty)
        elif not has_gt and empty == "ignore-gt":  # predicted only: not scored (MONAI ignore_empty)
            results[c] = {**dict.fromkeys(METRIC_NAMES, math.nan), "empty": "ground_truth"}
        elif not has_pred or not has_gt:
            results[c] = {"dice": 0.0, **dict.fromkeys(("asd", "assd", "hd95"), missing_distance),
                          "empty": "prediction" if not has_pred else "ground_truth"}
        else:
            d_pg, d_gp = surface_distances(p, g, spacing), surface_distances(g, p, spacing)
            results[c] = {"dice": dice(p, g), "asd": float(d_pg.mean()),
                          "assd": float(np.concatenate([d_pg, d_gp]).mean()),
                          "hd95": _hd95(d_pg, d_gp, hd95_convention), "empty": "none"}
    return results


def _empty_case(pred: np.ndarray, gt: np.ndarray) -> Optional[float]:
    """Distance value fixed by the empty-mask convention, or None when both masks are non-empty."""
    has_pred, has_gt = bool(np.any(pred)), bool(np.any(gt))
    if has_pred and has_gt:
        return None
    return 0.0 if not has_pred and not has_gt else math.nan


def _as_bool_pair(a: np.ndarray, b: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {a.shape} vs {b.shape}")
    return a, b


def _spacing(spacing: Sequence[float], ndim: int) -> Tuple[float, ...]:
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != ndim or any(s <= 0 for s in spacing):
        raise ValueError(f"spacing must be {ndim} positive values (Z, Y, X), got {spacing}")
    return spacing


def _bounding_box(mask: np.ndarray, margin: int) -> Tuple[slice, ...]:
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        box.append(slice(max(int(idx[0]) - margin, 0), min(int(idx[-1]) + 1 + margin, mask.shape[axis])))
    return tuple(box)
