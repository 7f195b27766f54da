"""GPU readiness check (run by benchmarks/gpu_check.sh on a machine with a CUDA GPU).

1. embed: the shipped default model and random-init on real yeast cells, on CUDA in bf16 and fp16,
   against CPU fp32: every channel vector's cosine must be >= 0.999; prints img/s on CUDA.
2. train: a short run of every registered method on CUDA (bf16 autocast where supported), then the
   trained encoder embeds the same cells on CUDA (bf16/fp16) and on CPU fp32: cosine >= 0.999;
   prints training img/s.
3. with >= 2 GPUs: a 2-rank torchrun training (NCCL, SyncBatchNorm) must record world_size 2.

Exit status 0 when every check passes, 1 when one fails, 2 when there is no CUDA GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MIN_COSINE = 0.999


def cosine_per_channel(a: np.ndarray, b: np.ndarray, dim: int) -> float:
    """Smallest cosine over images and channels between (N, C * dim) embeddings."""
    a = a.reshape(len(a), -1, dim).astype(np.float64)
    b = b.reshape(len(b), -1, dim).astype(np.float64)
    num = (a * b).sum(-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    ok = den > 0
    return float((num[ok] / den[ok]).min()) if ok.any() else float("nan")


def check_embed(model: str, cells: np.ndarray, failures: list[str]) -> None:
    from microsnoop.embed.engine import Embedder

    ref_emb = Embedder(model, device="cpu", precision="fp32")
    ref = ref_emb.embed(cells)
    for precision in ("bf16", "fp16"):
        emb = Embedder(model, device="cuda", precision=precision)
        emb.embed(cells[:8])  # warm-up: kernels, cuDNN autotuning
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = emb.embed(cells)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        cos = cosine_per_channel(ref, out, ref_emb.dim)
        ok = cos >= MIN_COSINE and np.isfinite(out).all()
        print(f"embed {Path(str(model)).name:28s} cuda {precision}: {len(cells) / dt:9.1f} img/s, "
              f"min cosine vs cpu fp32 {cos:.6f} {'ok' if ok else 'FAIL'}")
        if not ok:
            failures.append(f"embed {model} {precision}: cosine {cos:.6f}")


def method_data(method: str) -> Path:
    from microsnoop.train.base import PretextMethod, get_method

    m = get_method(method)
    plain = type(m).load_pool is PretextMethod.load_pool  # folder/manifest of images, else a labelled set
    return DATA / "pretrain" if plain else DATA / "benchmarks" / "yeast_pci"


def check_training(steps: int, cells: np.ndarray, failures: list[str]) -> None:
    from microsnoop.train.base import list_methods
    from microsnoop.train.loop import train

    for spec in list_methods():
        with tempfile.TemporaryDirectory() as tmp:
            try:
                res = train(method_data(spec.name), Path(tmp) / "run", method=spec.name, device="cuda",
                            options={"steps": steps, "warmup_steps": 2, "checkpoint_every": steps, "workers": 2})
            except Exception as exc:  # report every method, then fail
                print(f"train {spec.name:20s} FAIL: {type(exc).__name__}: {exc}")
                failures.append(f"train {spec.name}: {exc}")
                continue
            ips = res["images_seen"] / max(res["wall_s"], 1e-9)
            ok = np.isfinite(res["final_loss"])
            print(f"train {spec.name:20s} cuda {res['precision']}: {ips:9.1f} img/s over {steps} steps, "
                  f"final loss {res['final_loss']:.4f} {'ok' if ok else 'FAIL'}")
            if not ok:
                failures.append(f"train {spec.name}: loss {res['final_loss']}")
            check_embed(res["model"], cells, failures)


def check_torchrun(steps: int, failures: list[str]) -> None:
    if torch.cuda.device_count() < 2:
        print("torchrun: 1 GPU visible, 2-rank NCCL check skipped")
        return
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "microsnoop",
               "train", "--data", str(DATA / "pretrain"), "-o", f"{tmp}/run", "--device", "cuda", "--steps", str(steps),
               "--warmup-steps", "2"]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True)
        config = json.loads(Path(tmp, "run", "config.json").read_text()) if r.returncode == 0 else {}
        ok = config.get("world_size") == 2 and config.get("sync_bn_used") is True
        print(f"torchrun 2 ranks (NCCL): rc {r.returncode}, world_size {config.get('world_size')}, "
              f"sync_bn {config.get('sync_bn_used')}, {time.perf_counter() - t0:.0f} s {'ok' if ok else 'FAIL'}")
        if not ok:
            failures.append("torchrun: " + r.stderr[-1000:])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=1024, help="yeast_pci cells embedded (real images)")
    ap.add_argument("--steps", type=int, default=30, help="training steps per method")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing checked", file=sys.stderr)
        return 2
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} x "
          f"{torch.cuda.get_device_name(0)}, bf16 {torch.cuda.is_bf16_supported()}")
    cells = np.load(DATA / "benchmarks" / "yeast_pci" / "images.npy", mmap_mode="r")[:args.cells]
    cells = np.ascontiguousarray(cells)
    failures: list[str] = []
    for model in ("random-init", os.environ.get("GPU_CHECK_MODEL", "microsnoop-unet-v1")):
        check_embed(model, cells, failures)
    check_training(args.steps, cells[:256], failures)
    check_torchrun(10, failures)
    print("ALL OK" if not failures else f"{len(failures)} FAILED: " + "; ".join(failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
