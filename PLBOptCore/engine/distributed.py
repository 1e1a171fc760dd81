"""Data-parallel training across processes (``torchrun --nproc_per_node N -m PLBOptCore train ...``).

torchrun starts one process per GPU and sets ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK`` and the
rendezvous variables; :func:`init_from_env` turns them into a process group (NCCL on CUDA, gloo on
the CPU) and a :class:`DistContext` that the trainer asks for every collective. Without those
variables (or with ``WORLD_SIZE=1``) the context is a single process and every collective returns
its input untouched, so a plain run does exactly what it did before distributed training existed.

Design (see ``Trainer``):

- Gradients are averaged with one flat all-reduce per subnet after ``backward`` instead of
  ``DistributedDataParallel``. Both subnets share one loss whose terms (triplet mining, bank
  pushes) run collectives of their own between forward and backward, validation runs on rank 0
  alone, and checkpoints hold plain module weights; a manual reduce keeps all of that simple and
  leaves the modules unwrapped.
- BatchNorm running statistics are averaged after every optimiser step, so all ranks hold
  identical state at every step boundary and any rank's weights equal rank 0's checkpoint.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist

# Ranks wait in a barrier while rank 0 validates whole CT volumes and writes checkpoints, which can
# outlast torch's 10-minute default; a dead rank is still noticed at once by torchrun.
COLLECTIVE_TIMEOUT = timedelta(minutes=60)


@dataclass
class DistContext:
    """Where this process stands in a data-parallel job.

    Attributes:
        rank: global rank, 0 = the process that writes files and logs.
        world_size: number of processes.
        local_rank: rank on this node (the CUDA device index).
        owns_group: this context created the process group and destroys it in :meth:`close`.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ synchronisation
    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank when ``flag`` is True on any rank (e.g. one rank got SIGTERM)."""
        if not self.enabled:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item() > 0)

    def mean_values(self, values: Dict[str, float], device: torch.device) -> Dict[str, float]:
        """Average a dict of floats over ranks (logged losses describe the whole global batch)."""
        if not self.enabled:
            return values
        keys = sorted(values)
        packed = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
        dist.all_reduce(packed)
        packed /= self.world_size
        return dict(zip(keys, packed.tolist()))

    def mean_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """A copy of ``tensor`` averaged over ranks (every rank gets the same result)."""
        if not self.enabled:
            return tensor
        averaged = tensor.clone()
        _average_flat([averaged], self.world_size)
        return averaged

    def average_gradients(self, module: torch.nn.Module) -> None:
        """Replace every gradient of ``module`` by its mean over ranks, in one flat all-reduce."""
        if not self.enabled:
            return
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        if grads:
            _average_flat(grads, self.world_size)

    def average_buffers(self, module: torch.nn.Module) -> None:
        """Average floating-point buffers (BatchNorm running mean/var) so ranks stay identical."""
        if not self.enabled:
            return
        buffers = [b for b in module.buffers() if b.is_floating_point()]
        if buffers:
            _average_flat(buffers, self.world_size)

    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Copy rank 0's parameters and buffers to every rank (start from one identical state)."""
        if not self.enabled:
            return
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=0)

    def broadcast_tensors(self, tensors: Sequence[torch.Tensor]) -> None:
        """Overwrite ``tensors`` in place with rank 0's values."""
        if not self.enabled:
            return
        for tensor in tensors:
            dist.broadcast(tensor, src=0)

    def gather_rows(self, features: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """All ranks' ``(n_r, D)`` features and ``(n_r,)`` long labels, concatenated in rank order.

        Row counts may differ between ranks. Labels travel as an extra float column (class ids
        and -1 are exact in float32), so one variable-size gather moves both.
        """
        if not self.enabled:
            return features, labels
        packed = torch.cat([features.detach().float(), labels.to(features.device).float().unsqueeze(1)], dim=1)
        counts = [torch.zeros(1, dtype=torch.long, device=packed.device) for _ in range(self.world_size)]
        dist.all_gather(counts, torch.tensor([packed.shape[0]], dtype=torch.long, device=packed.device))
        sizes = [int(c.item()) for c in counts]
        longest = max(sizes)
        padded = packed.new_zeros(longest, packed.shape[1])
        padded[: packed.shape[0]] = packed
        chunks = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(chunks, padded)
        rows = torch.cat([chunk[:size] for chunk, size in zip(chunks, sizes)])
        return rows[:, :-1].contiguous(), rows[:, -1].long()

    def close(self) -> None:
        """Destroy the process group if this context created it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def _average_flat(tensors: List[torch.Tensor], world_size: int) -> None:
    """In-place mean over ranks of same-dtype tensors through one flattened buffer."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for tensor in tensors:
        count = tensor.numel()
        tensor.copy_(flat[offset: offset + count].view_as(tensor))
        offset += count


def init_from_env(device: torch.device) -> DistContext:
    """Join the job torchrun started (idempotent), or describe a single process.

    The backend follows the training device: NCCL for CUDA, gloo for the CPU. An already
    initialised group (e.g. created by a caller) is used and left to its owner.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return DistContext()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    owns = False
    if not dist.is_initialized():
        if device.type == "cuda":
            # before init: NCCL binds each process to the GPU current at its first collective
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT)
        owns = True
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                       owns_group=owns)


def rank_device(device: torch.device, context: DistContext) -> torch.device:
    """Each rank trains on ``cuda:LOCAL_RANK``; CPU ranks share the CPU."""
    if context.enabled and device.type == "cuda":
        return torch.device("cuda", context.local_rank)
    return device


def rank_seed(seed: int, rank: int) -> int:
    """Seed of ``rank``'s own dropout masks and triplet mining draws; rank 0 keeps ``seed`` itself
    so a one-process job equals a plain run, other ranks get independent derived seeds."""
    if rank == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed), 0x5EED, int(rank)]).generate_state(1, dtype=np.uint32)[0])
