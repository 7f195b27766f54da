"""Joining torchrun's process group: one helper for ``embed`` and ``train`` (core layer).

``torchrun --nproc_per_node=N -m microsnoop CMD ...`` starts N copies of the CLI with RANK,
WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT set. ``init`` joins the group they describe (gloo on
CPU, NCCL when the rank uses a GPU) and is a no-op for a single process, so the same code runs with
and without torchrun. ``core.device.local_device`` gives each rank on a node its own GPU (``cuda:LOCAL_RANK``).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch

from .errors import MicrosnoopError


@dataclass(frozen=True)
class Dist:
    """This process's place in the group: global rank, world size, rank on its node."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def owns(self, chunk: int) -> bool:
        return chunk % self.world == self.rank


def env_dist() -> Dist:
    """Rank and world size from torchrun's environment (1 process when absent)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return Dist()
    return Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def current() -> Dist:
    """The group this process is already in (e.g. one a caller initialised), else torchrun's environment."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return Dist(torch.distributed.get_rank(), torch.distributed.get_world_size(),
                    int(os.environ.get("LOCAL_RANK", torch.distributed.get_rank())))
    return env_dist()


def init(device: torch.device | None = None, timeout_h: float = 24.0) -> Dist:
    """Join the process group torchrun set up (no-op for one process). gloo on CPU, NCCL on CUDA.

    Parameters
    ----------
    device : torch.device, optional
        This rank's device; a CUDA device selects NCCL and becomes the current CUDA device.
    timeout_h : float
        How long a collective may wait for the slowest rank (embed's barriers wait for a rank's
        whole share of the work, hence the long default).

    Returns
    -------
    Dist
        Rank, world size and local rank (world 1 when not under torchrun).
    """
    d = env_dist()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return current()  # a caller (a test, a notebook with its own group) already joined
    if d.world == 1 or not torch.distributed.is_available():
        return Dist()
    cuda = device is not None and device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=timeout_h))
    return current()


def barrier(d: Dist) -> None:
    """Wait for every rank (no-op for one process)."""
    if d.world > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier()


def finish(d: Dist) -> None:
    """Leave the process group we joined (torchrun expects a clean exit)."""
    if d.world > 1 and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def gather_objects(d: Dist, obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank (``[obj]`` for one process)."""
    if d.world <= 1 or not torch.distributed.is_initialized():
        return [obj]
    out: list[Any] = [None] * d.world
    torch.distributed.all_gather_object(out, obj)
    return out


def mean_over_ranks(d: Dist, values: torch.Tensor) -> torch.Tensor:
    """Element-wise mean of a tensor over all ranks (the tensor itself for one process)."""
    if d.world <= 1 or not torch.distributed.is_initialized():
        return values
    values = values.clone()
    torch.distributed.all_reduce(values)
    return values / d.world
