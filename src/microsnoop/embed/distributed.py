"""Scale-out under torchrun: which chunks this rank embeds, barriers, and the progress journal.

``torchrun --nproc_per_node=N -m microsnoop embed IN -o OUT`` starts N copies of the CLI with
RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR set. Each rank embeds chunks ``k`` with ``k % world == rank``
(interleaved, so a sorted input's slow images are spread over ranks), writes each chunk as its own
shard file ``OUT.partial/chunk_NNNNNN.npy`` atomically and appends a line to its journal
``OUT.partial/journal.rankR.jsonl``. Rank 0 waits for all ranks, then merges the shards in input
order into OUT. A killed run restarted with ``--resume`` (any number of ranks) skips every chunk
whose shard and journal line exist. Multi-node runs need ``OUT`` on a filesystem all nodes share.
The process group only carries barriers: gloo on CPU, NCCL when the ranks use GPUs.
"""
from __future__ import annotations

import datetime
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

JOURNAL_GLOB = "journal.rank*.jsonl"


@dataclass(frozen=True)
class Dist:
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


def init(device: torch.device | None = None, timeout_h: float = 24.0) -> Dist:
    """Join the process group torchrun set up (no-op for one process). gloo on CPU, NCCL on CUDA.

    The timeout is long because a barrier waits for the slowest rank's whole share of the work."""
    d = env_dist()
    if d.world == 1 or not torch.distributed.is_available():
        return Dist()
    if not torch.distributed.is_initialized():
        cuda = device is not None and device.type == "cuda"
        if cuda:
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if cuda else "gloo",
                                             timeout=datetime.timedelta(hours=timeout_h))
    return Dist(torch.distributed.get_rank(), torch.distributed.get_world_size(), d.local_rank)


def barrier(d: Dist) -> None:
    if d.world > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier()


def finish(d: Dist) -> None:
    """Leave the process group we joined (torchrun expects a clean exit)."""
    if d.world > 1 and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def journal_path(work: Path, d: Dist) -> Path:
    return work / f"journal.rank{d.rank}.jsonl"


def record(work: Path, d: Dist, chunk: int, start: int, stop: int, digest: str | None = None) -> None:
    """Append one line after a shard is renamed into place (and fsynced); fsync so a kill cannot lose it.

    ``digest``: sha256 of the input bytes the chunk was embedded from, checked on ``--resume``."""
    line = json.dumps({"chunk": chunk, "start": start, "stop": stop, "rank": d.rank, "world": d.world,
                       "input_sha256": digest})
    with open(journal_path(work, d), "a") as fh:
        fh.write(line + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def finished_chunks(work: Path) -> set[int]:
    """Chunks every journal lists (a torn last line from a kill is ignored)."""
    return set(finished_digests(work))


def finished_digests(work: Path) -> dict[int, str | None]:
    """Finished chunk -> sha256 of its input bytes (None in journals written without one)."""
    done: dict[int, str | None] = {}
    for p in sorted(work.glob(JOURNAL_GLOB)):
        try:
            text = p.read_text(errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            try:
                rec = json.loads(line)
                done[int(rec["chunk"])] = rec.get("input_sha256")
            except (ValueError, KeyError, TypeError, AttributeError):
                continue
    return done
