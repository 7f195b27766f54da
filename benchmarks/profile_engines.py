"""Where the encoder's time goes, before (PyTorch eager, the folded bf16 module) and after (OpenVINO bf16).

    PYTHONPATH=src python benchmarks/profile_engines.py [--size 224] [--batch 20] [--top 12]

Before: ``torch.profiler`` self CPU time per operator over one batch of real planes. After:
OpenVINO's per-node performance counters (``PERF_COUNT``) for the same batch, grouped by node type
(and the kernel it ran: e.g. ``brgconv_avx512_amx`` for AMX convolutions). Both tables are shares
of the measured total, with the batch's images/s, so the two runs can be compared.
"""
from __future__ import annotations

import argparse
import os
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def planes(size: int, n: int) -> np.ndarray:
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from throughput import real_images

    from microsnoop.io.normalize import normalize_percentile

    return normalize_percentile(real_images(size, n))[:, 0]


def torch_profile(x: np.ndarray, model: str, top: int) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from microsnoop.embed import Embedder

    emb = Embedder(model, device="cpu", precision="bf16", engine="torch")
    emb.encode_planes(x[:2])
    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        emb.encode_planes(x)
    wall = time.perf_counter() - t
    rows = sorted(((e.key, e.self_cpu_time_total, e.count) for e in prof.key_averages()), key=lambda r: -r[1])
    total = sum(r[1] for r in rows) or 1
    print(f"\nBEFORE - PyTorch eager bf16 (torch {torch.__version__}): {len(x) / wall:.1f} img/s under the profiler")
    print("| operator | calls | self CPU ms | share |\n|---|---|---|---|")
    for key, us, n in rows[:top]:
        print(f"| {key} | {n} | {us / 1e3:.1f} | {us / total:.0%} |")


def openvino_profile(x: np.ndarray, model: str, top: int) -> None:
    import openvino as ov
    import torch

    from microsnoop.embed import Embedder
    from microsnoop.embed.fused import fast_module

    emb = Embedder(model, device="cpu", precision="fp32", engine="torch")
    mod = fast_module(emb.encoder, emb.device, "fp32")[0]
    example = torch.from_numpy(x[:1, None]).float()
    m = ov.convert_model(mod, example_input=example)
    m.reshape([-1, 1, *x.shape[1:]])
    compiled = ov.Core().compile_model(m, "CPU", {"INFERENCE_PRECISION_HINT": "bf16", "PERF_COUNT": True,
                                                  "INFERENCE_NUM_THREADS": torch.get_num_threads(),
                                                  "PERFORMANCE_HINT": "LATENCY"})
    req = compiled.create_infer_request()
    inp = np.ascontiguousarray(x[:, None])
    req.infer({0: inp})
    t = time.perf_counter()
    req.infer({0: inp})
    wall = time.perf_counter() - t
    agg: dict[tuple, list] = defaultdict(lambda: [0.0, 0])
    for p in req.get_profiling_info():
        if p.status != p.Status.EXECUTED:
            continue
        a = agg[(p.node_type, p.exec_type)]
        a[0] += p.real_time.total_seconds() * 1e3
        a[1] += 1
    total = sum(v[0] for v in agg.values()) or 1
    print(f"\nAFTER - OpenVINO {ov.__version__} bf16: {len(x) / wall:.1f} img/s with counters on")
    print("| node type | kernel | nodes | ms | share |\n|---|---|---|---|---|")
    for (node, kern), (ms, n) in sorted(agg.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"| {node} | {kern} | {n} | {ms:.1f} | {ms / total:.0%} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=20)
    ap.add_argument("--model", default="random-init")
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    from microsnoop.embed.engine import configure_threads

    configure_threads()
    x = planes(args.size, args.batch)
    print(f"{args.batch} real planes of {args.size} px; load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    torch_profile(x, args.model, args.top)
    openvino_profile(x, args.model, args.top)
    print(f"load average at end {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
