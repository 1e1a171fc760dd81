"""Mean teachers (Tarvainen & Valpola 2017): an exponential moving average of a subnet's weights.

With ``teacher_ema_decay`` set, each DHC subnet has a teacher whose predictions give the unlabeled
patches' pseudo labels (CPS targets, refinement, triplet levels) in place of the subnet's own: an
average over recent weights, which UA-MT and BCP use for their targets. DHC itself has no teacher.
"""

from __future__ import annotations

import torch
from torch import nn


def teacher_decay(decay: float, step: int) -> float:
    """The decay of the update after step ``step`` (0-based): ``min(decay, 1 - 1/(step + 1))``, so
    the teacher is the subnet itself after the first step and averages more steps as they accrue
    (mean teacher's warm-up), until ``decay``.

    >>> teacher_decay(0.99, 0), teacher_decay(0.99, 3), teacher_decay(0.99, 1000)
    (0.0, 0.75, 0.99)
    """
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"teacher decay must be in [0, 1), got {decay}")
    return min(decay, 1.0 - 1.0 / (step + 1))


@torch.no_grad()
def update_teacher(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """``θ_teacher ← decay·θ_teacher + (1 − decay)·θ_student`` for every parameter; buffers
    (BatchNorm's running statistics) are copied from the student, as the mean teacher's code does.

    Both modules must have the same architecture (``teacher`` is a copy of ``student``).
    """
    for mean, current in zip(teacher.parameters(), student.parameters()):
        mean.lerp_(current, 1.0 - decay)
    for mean, current in zip(teacher.buffers(), student.buffers()):
        mean.copy_(current)
