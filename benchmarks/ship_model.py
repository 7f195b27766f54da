"""Turn a training run's ``model.safetensors`` into a shipped fp16 weights file and check it.

    python benchmarks/ship_model.py RUN/model.safetensors NAME [--cells ../shared/data/benchmarks/bbbc021_dmso_vs_cycloheximide]

Writes ``src/microsnoop/models/weights/NAME.safetensors`` (fp16, the run's config and training record in
the header), prints its size and sha256 (for ``models/pretrained.py``), and the lowest cosine between the
fp16 file's and the fp32 run file's vectors on real cells (must be >= 0.999).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from microsnoop.embed.engine import Embedder
from microsnoop.models import create_model
from microsnoop.models.checkpoints import load_checkpoint, save_checkpoint

WEIGHTS = Path(__file__).resolve().parents[1] / "src" / "microsnoop" / "models" / "weights"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_model", type=Path)
    ap.add_argument("name")
    ap.add_argument("--cells", type=Path,
                    default=Path(__file__).resolve().parents[2] / "shared/data/benchmarks/bbbc021_dmso_vs_cycloheximide")
    args = ap.parse_args()
    state, header, _ = load_checkpoint(args.run_model)
    info = {k: v for k, v in header.items() if k not in ("config", "format")}
    out = WEIGHTS / f"{args.name}.safetensors"
    digest = save_checkpoint(out, state, header["config"], dtype=torch.float16, **info)
    print(f"{out}: {out.stat().st_size / 2**20:.1f} MiB, sha256 {digest}")
    cells = np.asarray(np.load(args.cells / "images.npy", mmap_mode="r")[:64])
    a = Embedder(create_model(str(args.run_model)), device="cpu", precision="fp32").embed(cells)
    b = Embedder(create_model(str(out)), device="cpu", precision="fp32").embed(cells)
    dim = a.shape[1] // cells.shape[1]
    a, b = a.reshape(-1, dim), b.reshape(-1, dim)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    print(f"fp16 vs fp32 run weights, {len(a)} channel vectors of real cells: min cosine {cos.min():.6f}")


if __name__ == "__main__":
    main()
