"""Sigmoid-shaped ramp-up of the unsupervised loss weights (Laine & Aila; PLBOpt eq. 11, DHC)."""

from __future__ import annotations

import math


def sigmoid_rampup(current: float, length: float) -> float:
    """``exp(-5 (1 - t/L)^2)`` with ``t = clip(current, 0, L)``; 1.0 when ``L == 0`` (no ramp).

    Args:
        current: progress (step or epoch) in the same unit as ``length``.
        length: ramp length, ``>= 0``.
    """
    if length < 0:
        raise ValueError(f"ramp-up length must be >= 0, got {length}")
    if length == 0:
        return 1.0
    phase = 1.0 - min(max(float(current), 0.0), float(length)) / float(length)
    return math.exp(-5.0 * phase * phase)
