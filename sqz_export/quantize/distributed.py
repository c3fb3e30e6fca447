"""One quantization run over several processes through torch.distributed (torchrun), or one process.

``torchrun --nproc-per-node N sqz-export quantize ...`` starts N copies; each takes a contiguous
share of the calibration windows, the per-block statistics are summed with ``all_reduce`` (so every
rank holds the same, final statistics of a block), the block's quantization batches are dealt out
to the ranks with the least work so far, and rank 0 gathers the packed layers and writes the
checkpoint. gloo serves CPUs, NCCL CUDA devices; torchrun's rendezvous options (``--nnodes``,
``--rdzv-endpoint``) span machines.

Summation order is the only difference from one process: a rank's windows are summed in order, then
the ranks' partial sums are added by ``all_reduce``, so statistics can differ from a one-process run
in the last bits of fp32 (tests/test_streaming.py shows by how much, and that the checkpoint's
indices and LUTs agree).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import torch

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Group:
    """The processes of one run: this one's rank and their number (1 = no torch.distributed)."""

    rank: int = 0
    world: int = 1

    @property
    def leader(self) -> bool:
        """Rank 0 writes every output; the others only compute."""
        return self.rank == 0

    def windows(self, count: int) -> range:
        """This rank's contiguous share of ``count`` calibration windows (sizes differ by at most one)."""
        start = self.rank * count // self.world
        return range(start, (self.rank + 1) * count // self.world)

    def sum_(self, tensors: list[torch.Tensor]) -> None:
        """In-place sum over ranks (one collective per tensor, in list order on every rank)."""
        if self.world == 1:
            return
        import torch.distributed as dist

        for tensor in tensors:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)

    def gather(self, value: Any) -> list[Any] | None:
        """Every rank's ``value`` on rank 0 (rank order), None elsewhere."""
        if self.world == 1:
            return [value]
        import torch.distributed as dist

        received: list[Any] | None = [None] * self.world if self.leader else None
        dist.gather_object(value, received, dst=0)
        return received

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        box = [value if self.leader else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


SINGLE = Group()


def from_environment(device: str) -> Group:
    """The group torchrun describes in the environment (WORLD_SIZE, RANK, MASTER_ADDR...), joined now;
    a single process when WORLD_SIZE is absent or 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    import torch.distributed as dist

    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    if not dist.is_initialized():
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    group = Group(rank=dist.get_rank(), world=dist.get_world_size())
    logger.info("rank %d of %d (%s)", group.rank, group.world, backend)
    return group


def device_for(group: Group, device: str) -> str:
    """Each rank of a multi-GPU run computes on its own GPU (torchrun's LOCAL_RANK)."""
    if group.world > 1 and device == "cuda":
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return device


def shutdown(group: Group) -> None:
    """Leaves the group together: every rank waits at a barrier (the others for rank 0's checkpoint
    write), then destroys it. A rank that destroyed gloo's group while rank 0 still used it was seen to
    abort at exit ("terminate called without an active exception", exit -6) in the two-process test."""
    if group.world > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
