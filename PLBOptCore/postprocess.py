"""Postprocessing: keep each class's largest connected component where the validation cases say so.

At the CPU scale most of what a network gets wrong on real images lies away from the organ
(``plbopt bench errors``: 83–84 % of the wrongly labelled voxels on LA and CHAOS are false
positives, mostly far from the organ), which no superpixel rule can fix but removing the class's
small islands does. nnU-Net v2 decides this postprocessing per class on its validation
predictions and applies it only where it improves the Dice; the left-atrium benchmark's test
scripts apply it to every prediction (their ``nms`` option). PLBOpt decides as nnU-Net does:

1. at each validation, the Trainer scores the ensemble's prediction of every validation case with
   and without the class's smaller components (:func:`largest_component_gain`) and stores the mean
   gain per class with the checkpoint (``largest_component_gain_validation``);
2. the Predictor keeps the largest component of the classes whose gain is above 0
   (:func:`largest_component_classes`) in every label map it writes, so ``plbopt predict``,
   ``refine``, exported models and the Slicer module's pseudo labels are postprocessed alike.

Components are 26-connected (voxels touching at a corner belong together), so only islands that
touch the organ nowhere are removed; removed voxels become background. A checkpoint without the
measurement (written before it existed, or without validation cases) removes nothing.
"""

from __future__ import annotations

from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from scipy import ndimage

from .metrics import annotated_only, dice

# 26-connectivity: islands that share no face, edge or corner with the kept component are removed
COMPONENT_STRUCTURE = ndimage.generate_binary_structure(3, 3)


def smaller_components(labels: np.ndarray, classes: Iterable[int]) -> np.ndarray:
    """Boolean (Z, Y, X) mask of the voxels of ``classes`` outside their class's largest
    26-connected component (what :func:`keep_largest_component` turns into background).

    Args:
        labels: (Z, Y, X) integer label map.
        classes: the class ids to postprocess (background 0 is never touched).
    """
    removed = np.zeros(labels.shape, dtype=bool)
    for c in classes:
        if c == 0:
            continue
        mask = labels == c
        box = ndimage.find_objects(mask.astype(np.uint8))
        if not box:  # the class is absent
            continue
        inside = mask[box[0]]
        components, count = ndimage.label(inside, structure=COMPONENT_STRUCTURE)
        if count <= 1:
            continue
        sizes = np.bincount(components.ravel())
        sizes[0] = 0  # not the class
        removed[box[0]] |= inside & (components != int(sizes.argmax()))
    return removed


def keep_largest_component(labels: np.ndarray, classes: Iterable[int]) -> np.ndarray:
    """A copy of ``labels`` (Z, Y, X) in which each class of ``classes`` keeps only its largest
    26-connected component; the voxels of its other components become background (0). Of two
    components of equal size the one ``scipy.ndimage.label`` numbers first is kept."""
    kept = np.array(labels, copy=True)
    kept[smaller_components(labels, classes)] = 0
    return kept


def largest_component_gain(prediction: np.ndarray, label: np.ndarray, num_classes: int,
                           unannotated: Optional[int] = None) -> List[float]:
    """Per foreground class 1..C-1, the Dice change of keeping only the class's largest component.

    Args:
        prediction: (Z, Y, X) predicted classes of a whole case (components are found on all of
            it, also where the ground truth is not annotated).
        label: (Z, Y, X) ground truth; ``unannotated`` marks voxels nobody labelled, which count
            for no class (as in validation).
        num_classes: C, background included.
    Returns:
        C-1 gains (kept Dice minus unpostprocessed Dice); 0 for a class with one component or none.
    """
    kept = keep_largest_component(prediction, range(1, num_classes))
    before, truth = annotated_only(prediction, label, unannotated)
    after, _ = annotated_only(kept, label, unannotated)
    return [dice(after == c, truth == c) - dice(before == c, truth == c) for c in range(1, num_classes)]


def largest_component_classes(validation_gain: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """(C,) bool: the classes whose largest component alone scored better on the validation cases
    (mean gain above 0, background never); None when the run measured nothing."""
    if validation_gain is None:
        return None
    chosen = torch.as_tensor(validation_gain, dtype=torch.float32) > 0
    chosen[0] = False
    return chosen


def class_ids(chosen: Optional[torch.Tensor]) -> Tuple[int, ...]:
    """The class ids set in a (C,) bool selection (none for None)."""
    if chosen is None:
        return ()
    return tuple(int(c) for c in torch.nonzero(chosen).flatten().tolist())


def postprocess_maps(labels: np.ndarray, confidence: np.ndarray,
                     classes: Sequence[int]) -> Tuple[np.ndarray, np.ndarray, int]:
    """Keep the largest component of ``classes`` in a label map and its confidence map.

    A removed voxel becomes background, and its confidence ``1 - p`` with ``p`` the removed class's
    probability: the most the network gave to any other class, so a removed island reads as
    uncertain in the review, not as a confident background.

    Args:
        labels: (Z, Y, X) integer label map; confidence: (Z, Y, X) float max-probability map.
    Returns:
        (labels, confidence, number of voxels removed); the inputs themselves when nothing is removed.
    """
    if not classes:
        return labels, confidence, 0
    removed = smaller_components(labels, classes)
    count = int(removed.sum())
    if not count:
        return labels, confidence, 0
    labels, confidence = np.array(labels, copy=True), np.array(confidence, copy=True)
    labels[removed] = 0
    confidence[removed] = 1.0 - confidence[removed]
    return labels, confidence, count
