"""Superpixels of an unlabeled volume (PLBOpt Algorithm 1 line 6, section III-A).

The paper segments each image into superpixels with SLIC and divides the number of pixels by 50 to
get the number of segments. We compute them once per unlabeled volume in preprocessing (the image
does not change during training, so neither do its superpixels) and cache them with the volume.

Every method except ``slic3d`` works on axial slices (the paper's setting: 2D superpixels), with
``n_segments = H*W // divisor`` per slice. ``slic3d`` computes supervoxels with the same *average
size* (``divisor`` voxels each, i.e. ``n_segments = Z*H*W // divisor``), so the refinement sees
regions of comparable volume whichever variant is chosen.

Parameters of the methods that do not take a segment count (our choices, calibrated on synthetic
abdominal-like slices of 128² and 256² with ``divisor`` in 25..200 to land within about ±40 % of
``H*W/divisor``):

- ``quickshift``: ``kernel_size = max(1, sqrt(divisor)/8)``, ``max_dist = sqrt(divisor)/2``,
  ``ratio = 1`` (intensities in [0,1] against pixel distances, so space dominates, as for SLIC with
  a small compactness the regions still follow strong edges).
- ``felzenszwalb``: ``scale = 0.5``, ``sigma = 0.5``, ``min_size = max(1, divisor // 4)``: on CT the
  count is governed by ``min_size`` (small components are merged into their neighbours, ending up at
  about ``4*min_size`` ≈ ``divisor`` pixels).
- ``watershed``: compact watershed (``compactness`` as given) on the Sobel gradient of the slice,
  seeded with ``n_segments`` markers on a regular grid (scikit-image's ``markers=int``).
"""

from __future__ import annotations

from typing import Callable, Dict

import numpy as np
from scipy import ndimage
from skimage.filters import sobel
from skimage.segmentation import felzenszwalb, quickshift, slic, watershed

from ..config import SUPERPIXEL_METHODS
from ..errors import ConfigError


def _slic_2d(image: np.ndarray, n_segments: int, divisor: int, compactness: float) -> np.ndarray:
    return slic(image, n_segments=n_segments, compactness=compactness, channel_axis=None, start_label=0)


def _quickshift_2d(image: np.ndarray, n_segments: int, divisor: int, compactness: float) -> np.ndarray:
    # quickshift needs a channel axis; colour conversion is meaningless for CT intensities
    return quickshift(image[..., None], ratio=1.0, kernel_size=max(1.0, np.sqrt(divisor) / 8.0),
                      max_dist=np.sqrt(divisor) / 2.0, convert2lab=False, channel_axis=-1)


def _felzenszwalb_2d(image: np.ndarray, n_segments: int, divisor: int, compactness: float) -> np.ndarray:
    return felzenszwalb(image, scale=0.5, sigma=0.5, min_size=max(1, divisor // 4), channel_axis=None)


def _watershed_2d(image: np.ndarray, n_segments: int, divisor: int, compactness: float) -> np.ndarray:
    return watershed(sobel(image), markers=n_segments, compactness=compactness)


_SLICE_METHODS: Dict[str, Callable[[np.ndarray, int, int, float], np.ndarray]] = {
    "slic": _slic_2d,
    "quickshift": _quickshift_2d,
    "felzenszwalb": _felzenszwalb_2d,
    "watershed": _watershed_2d,
}


def noise_sigma(volume_zyx: np.ndarray) -> float:
    """Standard deviation of the image noise of a (Z, Y, X) volume, per axial slice (Immerkær 1996).

    The slice is filtered with Immerkær's 3×3 mask ``[[1,-2,1],[-2,4,-2],[1,-2,1]]``, which cancels
    every linear intensity trend, so only noise and edges remain; white noise of std σ leaves
    values of std 6σ. The median absolute value (×1.4826) ignores the few edge voxels; voxels at
    the volume's minimum or maximum (clipped air, fat or bone carry no noise) and their neighbours
    are left out.
    """
    volume = np.asarray(volume_zyx, dtype=np.float32)
    mask = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], dtype=np.float32)[None]
    response = ndimage.convolve(volume, mask, mode="nearest")
    unclipped = (volume > volume.min()) & (volume < volume.max())
    usable = ndimage.minimum_filter(unclipped, size=(1, 3, 3))
    if not usable.any():
        return 0.0
    return float(1.4826 * np.median(np.abs(response[usable])) / 6.0)


def _sequential(labels: np.ndarray) -> np.ndarray:
    """Relabel arbitrary ids to 0..n-1, keeping their order."""
    _, inverse = np.unique(labels, return_inverse=True)
    return inverse.reshape(labels.shape).astype(np.int64)


def compute_superpixels(volume_zyx: np.ndarray, method: str = "slic", divisor: int = 50,
                        compactness: float = 0.1) -> np.ndarray:
    """Superpixel ids of a normalised volume.

    Args:
        volume_zyx: float image (Z, Y, X), intensities normalised to [0, 1].
        method: ``slic`` | ``slic3d`` | ``quickshift`` | ``felzenszwalb`` | ``watershed``.
        divisor: average superpixel size in pixels (voxels for ``slic3d``); the paper uses 50.
        compactness: SLIC / compact-watershed compactness (on [0, 1] intensities).

    Returns:
        int32 (Z, Y, X) ids ``0..n-1``, unique across the whole volume (slices never share an id).
    """
    if method not in SUPERPIXEL_METHODS:
        raise ConfigError(f"superpixel_method must be one of {SUPERPIXEL_METHODS}, got {method!r}")
    if int(divisor) < 1:
        raise ConfigError(f"superpixel_divisor must be >= 1, got {divisor}")
    volume = np.asarray(volume_zyx, dtype=np.float64)
    if volume.ndim != 3:
        raise ValueError(f"compute_superpixels expects a (Z, Y, X) volume, got shape {volume.shape}")
    divisor = int(divisor)
    if method == "slic3d":
        n_segments = max(1, volume.size // divisor)
        labels = slic(volume, n_segments=n_segments, compactness=compactness, channel_axis=None, start_label=0)
        return _sequential(labels).astype(np.int32)

    segment = _SLICE_METHODS[method]
    n_segments = max(1, volume.shape[1] * volume.shape[2] // divisor)
    out = np.empty(volume.shape, dtype=np.int64)
    offset = 0
    for z in range(volume.shape[0]):
        ids = _sequential(segment(volume[z], n_segments, divisor, compactness))
        out[z] = ids + offset  # offset per slice: ids stay unique across the volume
        offset += int(ids.max()) + 1
    if offset > np.iinfo(np.int32).max:
        raise ValueError(f"{offset} superpixels do not fit int32; raise superpixel_divisor")
    return out.astype(np.int32)
