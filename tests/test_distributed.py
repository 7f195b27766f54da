"""torchrun scale-out: 2 CPU ranks (gloo) give the single-process output; a killed run resumes from its shards."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from microsnoop.embed import embed_source
from microsnoop.embed.distributed import finished_chunks
from conftest import embedding_parts
from microsnoop.io import open_source

pytestmark = pytest.mark.filterwarnings("ignore:model 'random-init' is untrained")


def torchrun(args: list[str], nproc: int = 2) -> list[str]:
    # the launcher module of the running interpreter (the `torchrun` script may belong to another env);
    # --standalone: a private rendezvous on a free port, so parallel CI jobs do not collide
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "microsnoop", "embed", *map(str, args)]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.pop("WORLD_SIZE", None)
    e.pop("RANK", None)
    e["OMP_NUM_THREADS"] = "1"
    return e


def descendants(pid: int) -> list[int]:
    """Child processes, recursively (torchrun starts its ranks in their own sessions)."""
    try:
        kids = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
    return [d for k in kids for d in (k, *descendants(k))]


@pytest.fixture(scope="module")
def single(yeast_subset, tmp_path_factory) -> Path:
    """The single-process reference, run in-process (96 real yeast cells, 2 channels, chunks of 8)."""
    out = tmp_path_factory.mktemp("single") / "single.parquet"
    embed_source(open_source(yeast_subset), out, model="random-init", device="cpu", precision="fp32", chunk_size=8,
                 command="test")
    return out


def _same(a: Path, b: Path) -> None:
    m1, x1, _ = embedding_parts(a)
    m2, x2, p2 = embedding_parts(b)
    assert x1.shape == x2.shape == (96, 512)
    assert m1.equals(m2)  # merged in input order
    assert np.abs(x1 - x2).max() < 1e-6
    assert p2["world_size"] == 2


def test_two_gloo_ranks_equal_single_process(yeast_subset, single, tmp_path):
    out = tmp_path / "two.parquet"
    r = subprocess.run(torchrun([yeast_subset, "-o", out, "--model", "random-init", "--device", "cpu", "--precision", "fp32",
                                 "--chunk-size", "8"]), capture_output=True, text=True, env=env(), timeout=120)
    assert r.returncode == 0, "\n".join(ln for ln in r.stderr.splitlines() if "error" in ln.lower())[-3000:]
    assert not out.with_name(out.name + ".partial").exists()
    _same(single, out)


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the rank processes through /proc (Linux)")
def test_killed_two_rank_run_resumes_without_recomputing(yeast_subset, single, tmp_path):
    out = tmp_path / "killed.parquet"
    part = out.with_name(out.name + ".partial")
    args = [yeast_subset, "-o", out, "--model", "random-init", "--device", "cpu", "--precision", "fp32", "--chunk-size", "4",
            "--batch-size", "4"]
    proc = subprocess.Popen(torchrun(args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env())
    deadline = time.time() + 90
    while time.time() < deadline and (not part.exists() or len(finished_chunks(part)) < 4):
        time.sleep(0.05)
    for pid in [*descendants(proc.pid), proc.pid]:  # both ranks and the launcher, as a scheduler would
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    done = finished_chunks(part)
    assert 4 <= len(done) < 24 and not out.exists()
    # mark one finished shard: if the resumed run reuses it (rather than recomputing), the mark shows
    k0 = min(done)
    shard = part / f"chunk_{k0:06d}.npy"
    np.save(shard, np.load(shard) + 1000.0)
    r = subprocess.run(torchrun(args + ["--resume"]), capture_output=True, text=True, env=env(), timeout=120)
    assert r.returncode == 0, "\n".join(ln for ln in r.stderr.splitlines() if "error" in ln.lower())[-3000:]
    assert not part.exists()
    _, x1, _ = embedding_parts(single)
    _, x2, _ = embedding_parts(out)
    rows = slice(4 * k0, 4 * k0 + 4)
    assert np.abs(x2[rows] - 1000.0 - x1[rows]).max() < 1e-3
    keep = np.ones(len(x1), bool)
    keep[rows] = False
    assert np.abs(x2[keep] - x1[keep]).max() < 1e-6
