"""Training patches: deterministic random crops with class-aware foreground oversampling, and
torch augmentation that moves image, label and superpixels together."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..method.superpixels import noise_sigma
from .preprocess import Preprocessed

# Patch centres are drawn from at most this many voxels per class and case: bounds memory on large
# organs (a liver has millions of voxels) while small organs keep all theirs.
MAX_INDICES_PER_CLASS = 20000
# Centres of the other patches of a sparsely annotated case are drawn from at most this many of its
# annotated voxels (an even stride keeps every annotated slice represented).
MAX_ANNOTATED_INDICES = 200000


def class_indices(label_zyx: np.ndarray, num_classes: int,
                  max_per_class: int = MAX_INDICES_PER_CLASS) -> Dict[int, np.ndarray]:
    """Flat voxel indices of each foreground class ``1..num_classes-1`` present in ``label_zyx``
    (unannotated voxels, label < 0, belong to no class).

    One sort of the foreground voxels instead of one full-volume pass per class. Classes with more
    than ``max_per_class`` voxels keep an evenly strided subset, which still covers the whole organ.
    """
    flat = label_zyx.ravel()
    fg = np.flatnonzero((flat > 0) & (flat < num_classes))
    values = flat[fg]
    order = np.argsort(values, kind="stable")
    fg, values = fg[order], values[order]
    classes, starts, counts = np.unique(values, return_index=True, return_counts=True)
    out = {}
    for c, s, n in zip(classes, starts, counts):
        idx = fg[s:s + n]
        if n > max_per_class:
            idx = idx[np.linspace(0, n - 1, max_per_class).astype(np.int64)]
        out[int(c)] = idx
    return out


def annotated_indices(label_zyx: np.ndarray, max_count: int = MAX_ANNOTATED_INDICES) -> Optional[np.ndarray]:
    """Flat indices of the annotated voxels (label >= 0) of a sparsely annotated label, an evenly
    strided subset of at most ``max_count``; None when every voxel is annotated (or none is)."""
    flat = label_zyx.ravel()
    if not (flat < 0).any():  # the common, fully annotated case: no index array of the whole volume
        return None
    annotated = np.flatnonzero(flat >= 0)
    if not annotated.size:
        return None
    if annotated.size > max_count:
        annotated = annotated[np.linspace(0, annotated.size - 1, max_count).astype(np.int64)]
    return annotated


def centred_padding(shape: Sequence[int], patch: Sequence[int]) -> List[Tuple[int, int]]:
    """(before, after) padding per axis that centres a volume of ``shape`` in a ``patch`` where the
    volume is smaller (``m = patch - shape``: ``m // 2`` before, the rest after), zero elsewhere.

    This is *the* layout of a small volume: inference pads with it, and training crops place the
    volume anywhere from flush-left to flush-right, this centred placement included.
    """
    missing = np.maximum(np.asarray(patch, dtype=np.int64) - np.asarray(shape, dtype=np.int64), 0)
    return [(int(m) // 2, int(m) - int(m) // 2) for m in missing]


def pad_to_patch(array: np.ndarray, patch: Sequence[int], value: float) -> np.ndarray:
    """``array`` (Z, Y, X) padded with ``value`` to at least ``patch`` in the centred layout."""
    padding = centred_padding(array.shape, patch)
    return np.pad(array, padding, constant_values=value) if any(sum(p) for p in padding) else array


def _pad_for_crops(array: Optional[np.ndarray], patch: Tuple[int, int, int], value: float) -> Optional[np.ndarray]:
    """Pad each axis shorter than the patch by its shortfall ``m`` on *both* sides, so a crop start
    in ``[0, m]`` puts the volume at any offset in the patch (a translation the network must not
    rely on), with the centred inference layout at start ``m - m // 2``."""
    if array is None:
        return None
    missing = np.maximum(np.array(patch) - np.array(array.shape), 0)
    if not missing.any():
        return array
    return np.pad(array, [(m, m) for m in missing], constant_values=value)


class PatchSampler:
    """Batches of patches from preprocessed cases, reproducible from ``(seed, step)``.

    Each patch picks a case uniformly; with probability ``foreground_oversample`` (and if the case
    has foreground) it is centred near a voxel of a foreground class chosen uniformly among the
    classes present in that case, so rare small organs are seen as often as large ones; otherwise
    it is a uniform random crop, or, in a sparsely annotated case (label -1 where not annotated),
    a patch centred near an annotated voxel of any class, so that no labeled patch falls where
    nothing is annotated (nnU-Net v2 does the same). An axis shorter than the patch is padded
    (image with the volume's minimum, label 0, superpixels -1) so that crops place the volume at
    every offset inside the patch, the centred layout of :func:`pad_to_patch` (inference) among
    them. ``stream`` separates samplers sharing a seed (labeled vs unlabeled).
    """

    def __init__(self, cases: Sequence[Preprocessed], patch_size: Sequence[int], batch_size: int, num_classes: int,
                 foreground_oversample: float, augment: bool, seed: int, stream: int = 0,
                 flip_axes: str = "zyx", rotate90: bool = True):
        if not cases:
            raise ValueError("PatchSampler needs at least one case")
        self.patch = tuple(int(p) for p in patch_size)
        if len(self.patch) != 3:
            raise ValueError(f"patch_size must have 3 values (Z, Y, X), got {patch_size}")
        self.batch_size = int(batch_size)
        self.foreground_oversample = float(foreground_oversample)
        self.augment = augment
        self.flip_axes, self.rotate90 = flip_axes, rotate90
        self.seed, self.stream = int(seed), int(stream)
        self._images: List[np.ndarray] = []
        self._labels: List[Optional[np.ndarray]] = []
        self._superpixels: List[Optional[np.ndarray]] = []
        self._foreground: List[Dict[int, np.ndarray]] = []
        self._annotated: List[Optional[np.ndarray]] = []  # None: fully annotated (or unlabeled)
        # noise level of each volume, for refinement's homogeneity test (cached with the superpixels)
        self._noise = [0.0 if case.superpixels is None else case.noise_sigma if case.noise_sigma is not None
                       else noise_sigma(case.image) for case in cases]
        for case in cases:
            self._images.append(_pad_for_crops(case.image, self.patch, float(case.image.min())))
            label = _pad_for_crops(case.label, self.patch, 0)
            self._labels.append(label)
            self._superpixels.append(_pad_for_crops(case.superpixels, self.patch, -1))
            self._foreground.append(class_indices(label, num_classes) if label is not None else {})
            self._annotated.append(annotated_indices(label) if label is not None else None)

    def _start(self, index: int, rng: np.random.Generator) -> np.ndarray:
        """Corner (Z, Y, X) of the next patch in case ``index``."""
        shape, patch = np.array(self._images[index].shape), np.array(self.patch)
        high = shape - patch
        foreground = self._foreground[index]
        if rng.random() < self.foreground_oversample and foreground:
            classes = sorted(foreground)
            voxels = foreground[classes[rng.integers(len(classes))]]
        elif self._annotated[index] is not None:
            voxels = self._annotated[index]
        else:
            return rng.integers(0, high + 1)
        centre = np.array(np.unravel_index(voxels[rng.integers(len(voxels))], shape))
        # the voxel lands anywhere in the central half of the patch, not always dead centre
        jitter = rng.integers(-(patch // 4), patch // 4 + 1)
        return np.clip(centre - patch // 2 + jitter, 0, high)

    def sample(self, step: int) -> Dict[str, torch.Tensor]:
        """The batch of ``step``: ``image`` (B,1,Z,Y,X) float32, ``label`` (B,Z,Y,X) int64 (zeros if
        unlabeled, -1 where not annotated), ``superpixels`` (B,Z,Y,X) int64 (-1 where none),
        ``noise_sigma`` (B,) float32 (the volume's image noise level, 0 without superpixels)."""
        rng = np.random.default_rng([self.seed, int(step), self.stream])
        shape = (self.batch_size,) + self.patch
        image = np.empty((self.batch_size, 1) + self.patch, dtype=np.float32)
        label = np.zeros(shape, dtype=np.int64)
        superpixels = np.full(shape, -1, dtype=np.int64)
        cases = rng.integers(len(self._images), size=self.batch_size)
        noise = torch.tensor([self._noise[int(index)] for index in cases], dtype=torch.float32)
        for b, index in enumerate(cases):
            start = self._start(int(index), rng)
            box = tuple(slice(s, s + p) for s, p in zip(start, self.patch))
            image[b, 0] = self._images[index][box]
            if self._labels[index] is not None:
                label[b] = self._labels[index][box]
            if self._superpixels[index] is not None:
                superpixels[b] = self._superpixels[index][box]
        batch = {"image": torch.from_numpy(image), "label": torch.from_numpy(label),
                 "superpixels": torch.from_numpy(superpixels), "noise_sigma": noise}
        if self.augment:
            generator = torch.Generator().manual_seed(int(rng.integers(2**63 - 1)))
            batch = augment_batch(batch, generator, self.flip_axes, self.rotate90)
        return batch


GEOMETRIC_KEYS = ("image", "label", "superpixels")


def augment_batch(batch: Dict[str, torch.Tensor], generator: torch.Generator, flip_axes: str = "zyx",
                  rotate90: bool = True) -> Dict[str, torch.Tensor]:
    """Random flips along the ``flip_axes`` (any of "z", "y", "x") and 90° rotations in the Y-X plane
    (if ``rotate90`` and Y == X), the same for ``image`` (B,1,Z,Y,X), ``label`` and ``superpixels``
    (B,Z,Y,X) of a sample; then an intensity scale in [0.9, 1.1] and shift in [-0.1, 0.1] on the
    image only (``noise_sigma`` (B,), if present, scales with it). Other keys pass unchanged. The
    random draws do not depend on the options, so switching one off leaves the others' draws
    unchanged."""
    image = batch["image"]
    square = rotate90 and image.shape[-1] == image.shape[-2]
    allowed = torch.tensor([axis in flip_axes for axis in "zyx"])
    out: Dict[str, List[torch.Tensor]] = {key: [] for key in GEOMETRIC_KEYS if key in batch}
    scales = []
    for b in range(image.shape[0]):
        flips = (torch.rand(3, generator=generator) < 0.5) & allowed
        turns = int(torch.randint(0, 4, (1,), generator=generator))
        turns = turns if square else 0
        scale = 0.9 + 0.2 * torch.rand(1, generator=generator)
        shift = 0.2 * torch.rand(1, generator=generator) - 0.1
        scales.append(scale)
        dims = [d for d, flip in zip((-3, -2, -1), flips.tolist()) if flip]
        for key in out:
            x = batch[key][b]
            if dims:
                x = torch.flip(x, dims)
            if turns:
                x = torch.rot90(x, turns, dims=(-2, -1))
            out[key].append(x * scale + shift if key == "image" else x)
    result = dict(batch)
    result.update({key: torch.stack(values).contiguous() for key, values in out.items()})
    if "noise_sigma" in batch:
        result["noise_sigma"] = batch["noise_sigma"] * torch.cat(scales)
    return result
