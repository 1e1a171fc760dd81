"""Segmentation metrics in millimetres: Dice, ASD, ASSD, HD95 (medpy conventions, numpy/scipy only).

Surfaces: the surface of a binary mask is ``mask XOR binary_erosion(mask, S)`` with ``S`` the
6-connectivity cross (``generate_binary_structure(3, 1)``, medpy's default ``connectivity=1``),
and voxels on the array border count as surface (erosion pads with 0). Distances from each surface
voxel to the nearest surface voxel of the other mask come from ``distance_transform_edt`` with
``sampling=spacing``, so they are in mm for a ``(Z, Y, X)`` spacing.

- ``asd(pred, gt)``: mean over PRED surface voxels of the distance to the GT surface (one-sided,
  medpy ``asd(result, reference)``, the number DHC reports).
- ``assd``: mean of the union of both directed distance sets, i.e.
  ``(Σ d(pred→gt) + Σ d(gt→pred)) / (|S_pred| + |S_gt|)`` (the standard definition and medpy ≥ 0.5;
  medpy 0.4 averaged the two one-sided ASDs instead, which weighs a small surface like a big one).
- ``hd95``: 95th percentile (numpy linear interpolation) of the union of both directed distance
  sets (medpy ``hd95``).

Empty masks (DHC's cases, with NaN instead of DHC's 128-voxel placeholder, which has no meaning
in mm): both empty → Dice 1 and distances 0; exactly one empty → Dice 0 and distances NaN. Callers
exclude NaN from distance means and count those cases separately (``evaluate`` reports them as
``n_missing``); the Dice 0 stays in the Dice mean.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

SURFACE_STRUCTURE = ndimage.generate_binary_structure(3, 1)
METRIC_NAMES = ("dice", "asd", "assd", "hd95")


def dice(pred_mask: np.ndarray, gt_mask: np.ndarray) -> float:
    """Dice ``2|P∩G| / (|P| + |G|)`` of two boolean masks of equal shape; 1.0 when both are empty."""
    pred_mask, gt_mask = _as_bool_pair(pred_mask, gt_mask)
    total = int(pred_mask.sum()) + int(gt_mask.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred_mask, gt_mask).sum()) / total


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


def hd95(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float]) -> float:
    """95th percentile Hausdorff distance (mm) over both directed surface distance sets together."""
    empty = _empty_case(pred, gt)
    if empty is not None:
        return empty
    both = np.concatenate([surface_distances(pred, gt, spacing), surface_distances(gt, pred, spacing)])
    return float(np.percentile(both, 95))


def compute_case_metrics(pred_labels: np.ndarray, gt_labels: np.ndarray, num_classes: int,
                         spacing: Sequence[float]) -> Dict[int, Dict[str, float]]:
    """Per foreground class metrics of one case.

    ``pred_labels``, ``gt_labels``: integer label maps ``(Z, Y, X)`` of equal shape; ``spacing``:
    ``(Z, Y, X)`` mm. Returns ``{c: {"dice", "asd", "assd", "hd95"}}`` for ``c = 1..num_classes-1``
    (floats; distances NaN when exactly one of the two masks is empty, see module docstring).
    Each directed distance set is computed once and shared by ASD, ASSD and HD95.
    """
    pred_labels, gt_labels = np.asarray(pred_labels), np.asarray(gt_labels)
    if pred_labels.shape != gt_labels.shape:
        raise ValueError(f"prediction shape {pred_labels.shape} differs from ground truth {gt_labels.shape}")
    results: Dict[int, Dict[str, float]] = {}
    for c in range(1, int(num_classes)):
        p, g = pred_labels == c, gt_labels == c
        empty = _empty_case(p, g)
        if empty is not None:
            results[c] = {"dice": dice(p, g), "asd": empty, "assd": empty, "hd95": empty}
            continue
        d_pg = surface_distances(p, g, spacing)
        both = np.concatenate([d_pg, surface_distances(g, p, spacing)])
        results[c] = {
            "dice": dice(p, g),
            "asd": float(d_pg.mean()),
            "assd": float(both.mean()),
            "hd95": float(np.percentile(both, 95)),
        }
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
