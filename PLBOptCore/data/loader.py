"""Training batches through a torch ``DataLoader``: patches are cropped and augmented in worker
processes while the GPU trains, without giving up the ``(seed, step)`` reproducibility of resume.

The dataset is indexed by step: item ``i`` is the batch of step ``first_step + i``, drawn by
:meth:`PatchSampler.sample`, which is deterministic in ``(seed, step)`` whichever process calls it.
The loader keeps the order (no shuffling, in-order delivery), so 0 or N workers train on
bit-identical batches.
"""

from __future__ import annotations

from typing import Dict, Iterator, Optional

import torch
from torch.utils.data import DataLoader, Dataset

from .sampling import PatchSampler

Batch = Dict[str, Dict[str, torch.Tensor]]


class StepBatches(Dataset):
    """Steps ``first_step .. stop_step - 1``; item ``i`` = ``{"labeled": ..., "unlabeled": ...}``,
    each a :meth:`PatchSampler.sample` dict (``image`` (B,1,Z,Y,X) float32, ``label`` and
    ``superpixels`` (B,Z,Y,X) int64); ``unlabeled`` only when there is an unlabeled sampler."""

    def __init__(self, labeled: PatchSampler, unlabeled: Optional[PatchSampler], first_step: int, stop_step: int) -> None:
        self.labeled, self.unlabeled = labeled, unlabeled
        self.first_step, self.stop_step = int(first_step), int(stop_step)

    def __len__(self) -> int:
        return self.stop_step - self.first_step

    def __getitem__(self, index: int) -> Batch:
        step = self.first_step + int(index)
        batch = {"labeled": self.labeled.sample(step)}
        if self.unlabeled is not None:
            batch["unlabeled"] = self.unlabeled.sample(step)
        return batch


class StepLoader:
    """Hands out the batch of any step, read ahead by ``num_workers`` processes.

    Steps are expected in increasing order (the training loop); asking for another step (a
    resumed run, a benchmark restarting at 0) starts a new pass from that step.

    Args:
        labeled, unlabeled: the samplers (unlabeled None for supervised runs).
        stop_step: one past the last step to read ahead (the run's ``iterations``).
        num_workers: 0 = sample in this process when asked.
        pin_memory: page-locked batches for asynchronous host-to-GPU copies (CUDA only).
        prefetch_factor: batches each worker prepares ahead.
    """

    def __init__(self, labeled: PatchSampler, unlabeled: Optional[PatchSampler], stop_step: int, num_workers: int = 0,
                 pin_memory: bool = False, prefetch_factor: int = 2) -> None:
        self.labeled, self.unlabeled = labeled, unlabeled
        self.stop_step = int(stop_step)
        self.num_workers, self.pin_memory, self.prefetch_factor = int(num_workers), pin_memory, prefetch_factor
        self._batches: Optional[Iterator[Batch]] = None
        self._next_step = -1

    def batch(self, step: int) -> Batch:
        """The batch of ``step`` (see :class:`StepBatches`)."""
        if self._batches is None or step != self._next_step:
            self._batches = iter(self._loader(step))
        self._next_step = step + 1
        return next(self._batches)

    def close(self) -> None:
        """Stop the worker processes (a new pass starts them again)."""
        self._batches = None

    def _loader(self, first_step: int) -> DataLoader:
        dataset = StepBatches(self.labeled, self.unlabeled, first_step, max(self.stop_step, first_step + 1))
        workers = self.num_workers
        # batch_size=None: each item already is a batch. The loader's own generator: creating an
        # iterator draws a base seed, which must not consume the global torch RNG that seeds dropout.
        return DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers, pin_memory=self.pin_memory,
                          prefetch_factor=self.prefetch_factor if workers else None,
                          generator=torch.Generator().manual_seed(0))
