"""A strong view of the unlabeled patches: intensity jitter and CutMix (FixMatch, CPS + CutMix, UniMatch).

With ``unlabeled_strong_view`` the unlabeled patches' pseudo labels come from a pass on the clean
patches, and the subnets learn them on a perturbed copy, so a target is never the prediction it
trains. The perturbation keeps every voxel in place (no warp), so a target is mixed exactly as its
image: ``mix`` applies the image's CutMix to pseudo labels, confidences and probabilities alike.

Ranges, chosen before any run: nnU-Net's default brightness (×U(0.75, 1.25)), contrast (around the
patch mean, ×U(0.75, 1.25)) and Gaussian noise (variance U(0, 0.1)), always applied, on images
normalised to unit spread (z-scores); a CutMix box of U(0.25, 0.5) of the patch volume, as the CPS
code's ``cutmix_mask_prop_range``, from the next unlabeled patch of the batch. DHC has no
perturbation; see docs/METHOD.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch

BRIGHTNESS = (0.75, 1.25)
CONTRAST = (0.75, 1.25)
NOISE_VARIANCE = (0.0, 0.1)
CUTMIX_VOLUME = (0.25, 0.5)


def _uniform(bounds: Tuple[float, float], count: int, generator: torch.Generator) -> torch.Tensor:
    low, high = bounds
    return low + (high - low) * torch.rand(count, generator=generator)


def adjust_intensity(x: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor, sigma: torch.Tensor,
                     noise: torch.Tensor) -> torch.Tensor:
    """Per patch: brightness ``x·b``, then contrast ``(x·b − m)·c + m`` around that patch's mean
    ``m``, then ``+ σ·noise``.

    Args:
        x: (B, 1, Z, Y, X) patches; brightness, contrast, sigma: (B,) per patch; noise: like ``x``.
    """
    shape = (-1,) + (1,) * (x.dim() - 1)
    bright = x * brightness.view(shape)
    mean = bright.mean(dim=tuple(range(1, x.dim())), keepdim=True)
    return (bright - mean) * contrast.view(shape) + mean + sigma.view(shape) * noise


def jitter_intensity(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """:func:`adjust_intensity` with brightness, contrast and noise variance drawn per patch.

    Args:
        x: (B, 1, Z, Y, X) patches; generator: a CPU generator (the draws of one step).

    Returns:
        (B, 1, Z, Y, X) perturbed patches, on ``x``'s device and dtype.
    """
    count = x.shape[0]
    brightness = _uniform(BRIGHTNESS, count, generator).to(x)
    contrast = _uniform(CONTRAST, count, generator).to(x)
    sigma = _uniform(NOISE_VARIANCE, count, generator).sqrt().to(x)
    noise = torch.randn(x.shape, generator=generator).to(x)
    return adjust_intensity(x, brightness, contrast, sigma, noise)


def per_voxel(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A (B, Z, Y, X) ``mask`` on ``like``'s device, viewed to broadcast against ``like`` (B, ..., Z, Y, X)."""
    return mask.to(like.device).view(mask.shape[:1] + (1,) * (like.dim() - 4) + mask.shape[1:])


def scaled_sides(shape: Sequence[int], scale: float) -> List[int]:
    """Each side of ``shape`` times ``scale``, rounded, at least 1."""
    return [max(1, round(size * scale)) for size in shape]


def fill_random_box(mask: torch.Tensor, sides: Sequence[int], generator: torch.Generator) -> None:
    """Set a cuboid of ``sides`` at a uniform random position inside ``mask`` (Z, Y, X) to True."""
    starts = [int(torch.randint(size - side + 1, (1,), generator=generator)) for size, side in zip(mask.shape, sides)]
    mask[tuple(slice(start, start + side) for start, side in zip(starts, sides))] = True


def cutmix_boxes(count: int, shape: Tuple[int, int, int], generator: torch.Generator) -> torch.Tensor:
    """(count, Z, Y, X) boolean boxes: each covers a fraction U(0.25, 0.5) of the patch, with every
    side the patch's side × fraction^(1/3) (rounded, at least 1), at a uniform random position."""
    masks = torch.zeros((count,) + tuple(shape), dtype=torch.bool)
    fractions = _uniform(CUTMIX_VOLUME, count, generator)
    for mask, fraction in zip(masks, fractions.tolist()):
        fill_random_box(mask, scaled_sides(shape, fraction ** (1 / 3)), generator)
    return masks


@dataclass
class StrongView:
    """A strong view of a batch of unlabeled patches, and the CutMix that made it.

    Attributes:
        image: (B, 1, Z, Y, X) perturbed patches.
        box: (B, Z, Y, X) where patch ``b`` shows patch ``(b + 1) % B`` (all False when B = 1).
    """

    image: torch.Tensor
    box: torch.Tensor

    def mix(self, target: torch.Tensor) -> torch.Tensor:
        """``target`` (B, ..., Z, Y, X) of the clean patches, mixed as the image was: inside patch b's
        box, patch b + 1's values."""
        return torch.where(per_voxel(self.box, target), target.roll(-1, dims=0), target)


def strong_view(x: torch.Tensor, generator: torch.Generator) -> StrongView:
    """Jitter each patch's intensity (:func:`jitter_intensity`), then paste a box of the next
    patch's jittered image into it (CutMix; none with one patch).

    Args:
        x: (B, 1, Z, Y, X) clean unlabeled patches; generator: a CPU generator.
    """
    jittered = jitter_intensity(x, generator)
    box = cutmix_boxes(x.shape[0], tuple(x.shape[2:]), generator)
    if x.shape[0] == 1:
        box.zero_()
    view = StrongView(jittered, box)
    view.image = view.mix(jittered)
    return view
