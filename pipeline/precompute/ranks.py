"""A build sharded over processes started by torchrun:

    torchrun --nproc-per-node N --no-python saescope build <the usual options>

Each rank reads a contiguous share of the corpus's sequences into its own accumulators; the
ranks send their state to rank 0 one at a time, which merges them (merging equals one run over
the whole corpus), then evaluates and writes the database. Host objects travel over gloo (the
state is on the host once a pass is over); NCCL is the device backend on GPUs.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from saescope.pipeline.precompute.accumulators import FeatureAccumulators

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rank:
    """This process's place among torchrun's: RANK, WORLD_SIZE, LOCAL_RANK."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def writes(self) -> bool:
        """Rank 0 merges, evaluates and writes."""
        return self.rank == 0

    def share(self, n_sequences: int) -> range:
        """The contiguous sequences this rank reads."""
        return range(
            self.rank * n_sequences // self.world_size,
            (self.rank + 1) * n_sequences // self.world_size,
        )


SINGLE_PROCESS = Rank(0, 1, 0)


def rank_from_environment() -> Rank:
    """The rank torchrun gave this process, or the single process's."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return SINGLE_PROCESS
    return Rank(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))


def join(rank: Rank, device: str) -> str:
    """Joins the process group (torchrun's rendezvous: MASTER_ADDR, MASTER_PORT); returns the
    device of this rank: a bare `cuda` becomes the rank's local GPU."""
    if rank.world_size == 1:
        return device
    if device == "cuda":
        device = f"cuda:{rank.local_rank}"
    on_gpu = device.startswith("cuda")
    if on_gpu:
        torch.cuda.set_device(device)
    dist.init_process_group("cpu:gloo,cuda:nccl" if on_gpu else "gloo")
    logger.info("rank %d of %d on %s", rank.rank, rank.world_size, device)
    return device


def merged_on_rank_zero(
    rank: Rank, accumulators: FeatureAccumulators
) -> FeatureAccumulators | None:
    """Every rank's accumulators merged on rank 0 (None on the others), one rank at a time so
    rank 0 holds at most two states."""
    if rank.world_size == 1:
        return accumulators
    accumulators.to_host()
    if not rank.writes:
        dist.send_object_list([accumulators], dst=0, device=torch.device("cpu"))
        return None
    for source in range(1, rank.world_size):
        received: list[FeatureAccumulators | None] = [None]
        dist.recv_object_list(received, src=source, device=torch.device("cpu"))
        assert received[0] is not None
        accumulators.merge(received[0])
    return accumulators


def leave(rank: Rank) -> None:
    if rank.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()
