"""Bidirectional copy-paste between labeled and unlabeled patches (BCP, Bai et al., CVPR 2023).

With ``labeled_copy_paste`` the subnets never see a patch whole: each labeled patch shows a box of
an unlabeled patch, and each unlabeled patch a box of a labeled one, so labels and pseudo labels
are learned side by side in the same images and the unlabeled images' context is learned with
ground truth in it. Each voxel keeps the target of the patch it came from: its label where a
labeled patch annotates it, else the (refined) pseudo label of the clean unlabeled patch's pass.

Box, as BCP's code (``context_mask``): every side 2/3 of the patch's side (8/27 of its volume), at
a uniform random position, one box per seen patch. Pairing: labeled patch ``i`` shows unlabeled
patch ``i mod B_u``, unlabeled patch ``j`` shows labeled patch ``j mod B_l``. DHC has no
copy-paste; see docs/METHOD.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch

from .perturb import fill_random_box, per_voxel, scaled_sides

BOX_SIDE = 2 / 3


def copy_paste_boxes(count: int, shape: Tuple[int, int, int], generator: torch.Generator) -> torch.Tensor:
    """(count, Z, Y, X) boolean boxes with every side ``round(2/3 · side)`` (at least 1), each at a
    uniform random position."""
    masks = torch.zeros((count,) + tuple(shape), dtype=torch.bool)
    for mask in masks:
        fill_random_box(mask, scaled_sides(shape, BOX_SIDE), generator)
    return masks


@dataclass
class CopyPaste:
    """The boxes of one step's copy-paste.

    Attributes:
        n_labeled: B_l, the labeled patches, which come first in a batch.
        box: (B_l + B_u, Z, Y, X) where seen patch ``b`` shows its partner of the other kind.
    """

    n_labeled: int
    box: torch.Tensor

    def mix(self, labeled: torch.Tensor, unlabeled: torch.Tensor) -> torch.Tensor:
        """Values of the seen patches from the values of their sources.

        Args:
            labeled: (B_l, ..., Z, Y, X); unlabeled: (B_u, ..., Z, Y, X), same dtype and device.

        Returns:
            (B_l + B_u, ..., Z, Y, X): labeled patch ``i`` with unlabeled patch ``i mod B_u`` inside
            its box, then unlabeled patch ``j`` with labeled patch ``j mod B_l`` inside its box.
        """
        n_l, n_u = labeled.shape[0], unlabeled.shape[0]
        box = per_voxel(self.box, labeled)
        into_labeled = unlabeled[torch.arange(n_l, device=unlabeled.device) % n_u]
        into_unlabeled = labeled[torch.arange(n_u, device=labeled.device) % n_l]
        return torch.cat([torch.where(box[:n_l], into_labeled, labeled),
                          torch.where(box[n_l:], into_unlabeled, unlabeled)])

    def from_labeled(self) -> torch.Tensor:
        """(B_l + B_u, Z, Y, X) bool: the seen voxels that come from a labeled patch."""
        n_u = self.box.shape[0] - self.n_labeled
        shape = tuple(self.box.shape[1:])
        return self.mix(torch.ones((self.n_labeled,) + shape, dtype=torch.bool),
                        torch.zeros((n_u,) + shape, dtype=torch.bool))

    def targets(self, truth: torch.Tensor, seen: torch.Tensor, clean: torch.Tensor,
                annotated: torch.Tensor) -> torch.Tensor:
        """Each seen voxel's target: ``truth`` where a labeled patch annotates it; a labeled patch's
        unannotated voxel (sparse labels) keeps ``seen``, the prediction of the seen patches; a voxel
        of an unlabeled patch takes ``clean`` of that patch, moved to where it is seen.

        Args:
            truth, seen: (B_l + B_u, ..., Z, Y, X) per seen voxel; clean: (B_u, ..., Z, Y, X) of the
            clean unlabeled patches; annotated: (B_l + B_u, Z, Y, X) bool, seen voxels with a label.
        """
        placed = self.mix(seen[:self.n_labeled], clean)  # right on the unlabeled patches' voxels only
        return torch.where(per_voxel(annotated, seen), truth,
                           torch.where(per_voxel(self.from_labeled(), seen), seen, placed))


def copy_paste(n_labeled: int, n_unlabeled: int, shape: Tuple[int, int, int], generator: torch.Generator) -> CopyPaste:
    """One step's boxes (drawn from ``generator``) for B_l labeled then B_u unlabeled patches of ``shape``."""
    return CopyPaste(n_labeled, copy_paste_boxes(n_labeled + n_unlabeled, shape, generator))
