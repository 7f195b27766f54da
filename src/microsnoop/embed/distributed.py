"""Scale-out of ``embed`` under torchrun: which chunks this rank embeds, and the progress journal.

``torchrun --nproc_per_node=N -m microsnoop embed IN -o OUT`` starts N copies of the CLI with
RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR set. Each rank embeds chunks ``k`` with ``k % world == rank``
(interleaved, so a sorted input's slow images are spread over ranks), writes each chunk as its own
shard file ``OUT.partial/chunk_NNNNNN.npy`` atomically and appends a line to its journal
``OUT.partial/journal.rankR.jsonl``. Rank 0 waits for all ranks, then merges the shards in input
order into OUT. A killed run restarted with ``--resume`` (any number of ranks) skips every chunk
whose shard and journal line exist. Multi-node runs need ``OUT`` on a filesystem all nodes share.
The process group only carries barriers: gloo on CPU, NCCL when the ranks use GPUs. Joining it is
``microsnoop.core.distributed`` (shared with ``train``), re-exported here for existing imports.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..core.distributed import Dist, barrier, env_dist, finish, init  # noqa: F401  re-exported (embed.run uses them)

JOURNAL_GLOB = "journal.rank*.jsonl"


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
