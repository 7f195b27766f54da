"""Throughput and memory of the embedding engine on this machine, in one run.

    python benchmarks/throughput.py            # full run (~10 min on 2 cores)
    python benchmarks/throughput.py --quick    # smaller counts, for a smoke test

Prints (1) end-to-end images/s of ``microsnoop embed`` (the library call the CLI makes: read the
.npy, normalise, encode, write Parquet; process start-up excluded) for 64, 96 and 224 px
single-channel real images, (2) images/s of a plain fp32 forward of the paper's encoder
(Microsnoop U-Net, NCHW, ``torch.no_grad``: the original tool's reference speed) and the ratio,
(3) encoder GFLOP/s (FlopCounterMode) against a measured fp32/bf16 ``torch.matmul`` peak,
(4) peak RSS of a subprocess embedding 2k and of one embedding 20k images of 64x64 (VmHWM, and
ru_maxrss where there is no /proc; measured first, while this parent process is still small),
(5) the inference engines side by side (``--engines``): PyTorch eager (the folded bf16 module of
embed/fused.py), ``torch.compile`` (inductor) of that module, OpenVINO and ONNX Runtime (embed/backends.py),
encoder-only images/s on the same normalised real planes, alternated in one run, with each one's
ratio to eager, share of the bf16 matmul peak and worst cosine to the fp32 reference. End-to-end
runs are given for the default engine (``auto``) and for ``--engine torch`` (the path before engines).

Inputs are real: yeast_pci GFP cells (64 px) and crops of the Coelho nucleus fields (96, 224 px),
repeated to the image counts needed; only the pixel content is reused, not computed results.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "benchmarks"
warnings.filterwarnings("ignore", message="model 'random-init' is untrained")


def real_images(size: int, n: int) -> np.ndarray:
    """(n, 1, size, size) uint16/uint8 real images: yeast cells at 64 px, Coelho field crops above."""
    if size <= 64:
        cells = np.load(SHARED / "yeast_pci" / "images.npy", mmap_mode="r")
        base = np.array(cells[:, :1, :size, :size])
    else:
        fields = np.array(np.load(SHARED / "coelho2009_nuclei_fields" / "images.npy", mmap_mode="r"))
        h, w = fields.shape[-2:]
        crops = [fields[:, :, y:y + size, x:x + size] for y in range(0, h - size + 1, size // 2)
                 for x in range(0, w - size + 1, size // 2)]
        base = np.concatenate(crops)
    reps = -(-n // len(base))
    return np.ascontiguousarray(np.concatenate([base] * reps)[:n])


def write_input(folder: Path, images: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "images.npy", images)
    return folder / "images.npy"


def matmul_peak(dtype_name: str, n: int = 2048, reps: int = 10) -> float:
    """GFLOP/s of the best of ``reps`` n x n matmuls: the machine's practical compute ceiling."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.matmul(a, b)
    best = min(_timed(lambda: torch.matmul(a, b)) for _ in range(reps))
    return 2 * n ** 3 / best / 1e9


def _timed(f) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def encoder_gflop(size: int) -> float:
    """FLOPs of one (1, 1, size, size) encoder forward (convolutions; FlopCounterMode convention: 2/MAC)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from microsnoop.models import create_model

    enc = create_model("random-init")
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        enc(torch.zeros(1, 1, size, size))
    return fc.get_total_flops() / 1e9


def model_gflops(model: str, sizes: Sequence[int]) -> dict[int, float]:
    """Encoder GFLOP ``model``'s default head spends on one size x size plane, per size: one forward per input
    scale (``scales=1+1.5`` costs 1 + 1.5^2 = 3.25 forwards), so a multi-scale head's share of the peak is not
    understated. The model is built once."""
    from microsnoop.models import create_model
    from microsnoop.models.heads import scaled_size

    scales = getattr(create_model(model), "scales", (1.0,))
    return {n: sum(encoder_gflop(scaled_size(n, s)) for s in scales) for n in sizes}


def end_to_end(path: Path, out: Path, precision: str, batch_size: int | None,
               model: str = "random-init", engine: str = "auto") -> tuple[float, str]:
    """images/s of embed_source (what `microsnoop embed` runs) on an .npy -> .parquet."""
    from microsnoop.embed import Embedder, embed_source
    from microsnoop.io import open_source

    src = open_source(path)
    emb = Embedder(model, device="cpu", precision=precision, batch_size=batch_size, engine=engine)
    t = time.perf_counter()
    embed_source(src, out, chunk_size=1024, overwrite=True, embedder=emb, command="benchmark")
    return len(src) / (time.perf_counter() - t), emb.precision


def reference_forward(images: np.ndarray, batch_size: int) -> float:
    """images/s of the plain fp32 encoder forward (NCHW, no_grad) on pre-normalised planes."""
    import torch

    from microsnoop.io.normalize import normalize_percentile
    from microsnoop.models import create_model

    enc = create_model("random-init").eval()
    x = torch.from_numpy(normalize_percentile(images))
    with torch.no_grad():
        enc(x[:2])
        t = time.perf_counter()
        for s in range(0, len(x), batch_size):
            enc(x[s:s + batch_size])
    return len(x) / (time.perf_counter() - t)


def engine_embedders(model: str, precision: str, engines: list[str]) -> dict:
    """name -> (Embedder, set-up seconds) for each engine; ``compile`` = torch.compile of the eager module."""
    import torch

    from microsnoop.embed import Embedder

    out = {}
    for name in engines:
        t = time.perf_counter()
        try:
            emb = Embedder(model, device="cpu", precision=precision, engine="torch" if name in ("eager", "compile") else name)
            if name == "compile":
                emb._module = torch.compile(emb.module, dynamic=False)
        except Exception as exc:  # noqa: BLE001 - a missing engine is a row saying so, not a crash
            print(f"  engine {name}: unavailable ({type(exc).__name__}: {exc})", file=sys.stderr, flush=True)
            continue
        out[name] = [emb, time.perf_counter() - t]
    return out


def engine_rows(model: str, precision: str, engines: list[str], sizes: dict[int, int], repeats: int,
                peaks: dict[str, float]) -> list[tuple]:
    """Encoder-only images/s per engine and size on the same real planes, alternated; best of ``repeats``."""
    from microsnoop.embed import Embedder
    from microsnoop.embed.backends import cosine_rows
    from microsnoop.io.normalize import normalize_percentile

    embs = engine_embedders(model, precision, engines)
    ref = Embedder(model, device="cpu", precision="fp32", engine="torch")
    rows = []
    for size, n in sizes.items():
        planes = normalize_percentile(real_images(size, n))[:, 0]
        want = ref.encode_planes(planes[:8])
        best, cos = {}, {}
        for name, (emb, _) in embs.items():  # first call: export / compile / validate at this size (cached after)
            t = time.perf_counter()
            got = emb.encode_planes(planes[:8])
            embs[name][1] += time.perf_counter() - t
            cos[name] = float(cosine_rows(got, want).min())
        for r in range(repeats):
            for name in (list(embs) if r % 2 == 0 else list(embs)[::-1]):
                t = time.perf_counter()
                embs[name][0].encode_planes(planes)
                best[name] = max(best.get(name, 0.0), n / (time.perf_counter() - t))
        gf = encoder_gflop(size)
        base = best.get("eager") or next(iter(best.values()))
        for name, ips in best.items():
            runs = embs[name][0].engine if name not in ("eager", "compile") else "torch"
            rows.append((size, name, runs, ips, ips / base, gf * ips / peaks["bf16"], cos[name], embs[name][1]))
            print_engine_rows(rows[-1:], header=len(rows) == 1)  # as measured: a long run may be cut short
        print(f"  engines measured at {size} px; load {os.getloadavg()[0]:.2f}", file=sys.stderr, flush=True)
    return rows


def print_engine_rows(rows: list[tuple], header: bool = True) -> None:
    if not header:
        for size, name, runs, ips, ratio, frac, cos, setup in rows:
            print(f"| {size} px | {name} | {runs} | {ips:.1f} | {ratio:.2f}x | {frac:.0%} | {cos:.6f} | {setup:.0f} |",
                  flush=True)
        return
    print("| size | engine | runs as | encoder img/s | vs eager | of bf16 matmul peak | min cosine to fp32 | "
          "set-up s (export+compile+validate, all sizes so far) |")
    print("|---|---|---|---|---|---|---|---|")
    for size, name, runs, ips, ratio, frac, cos, setup in rows:
        print(f"| {size} px | {name} | {runs} | {ips:.1f} | {ratio:.2f}x | {frac:.0%} | {cos:.6f} | {setup:.0f} |")


def rss_child(path: str, out: str) -> None:
    """Run in a subprocess: embed, then print the peak RSS (MiB) as JSON."""
    from microsnoop.embed import embed_source
    from microsnoop.io import open_source

    t = time.perf_counter()
    embed_source(open_source(path), out, model="random-init", device="cpu", precision="auto", chunk_size=1024,
                 overwrite=True, command="benchmark")
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_rss_mib": vm_hwm_kib() / 1024 or kib / 1024, "ru_maxrss_mib": kib / 1024,
                      "seconds": time.perf_counter() - t}))


def vm_hwm_kib() -> float:
    """This process's own peak RSS (Linux VmHWM). ru_maxrss is not enough on its own: Linux carries
    the parent's RSS at fork into the child's ru_maxrss across exec, so a child of a big benchmark
    process would report the parent's size; VmHWM belongs to the new address space only."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1])
    except OSError:
        pass
    return 0.0


def peak_rss(work: Path, n: int) -> dict:
    path = write_input(work / f"rss{n}", real_images(64, n))
    cmd = [sys.executable, __file__, "--rss-child", str(path), str(work / f"rss{n}.parquet")]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small counts (smoke test; numbers are noisier)")
    ap.add_argument("--precision", default="auto", help="precision of the end-to-end runs (default auto)")
    ap.add_argument("--rss-child", nargs=2, metavar=("IN", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--skip-rss", action="store_true")
    ap.add_argument("--model", default="random-init",
                    help="model of the end-to-end runs, with its default head (e.g. the default model); the "
                         "reference is always the plain fp32 U-Net forward")
    ap.add_argument("--repeats", type=int, default=2, help="alternating repeats per size; the best of each is kept")
    ap.add_argument("--engines", default="eager,compile,openvino,onnxruntime",
                    help="engines compared encoder-only (eager, compile, openvino, onnxruntime; '' to skip)")
    ap.add_argument("--sizes", default="64,96,224", help="image sizes (px) to measure")
    ap.add_argument("--images", type=int, default=None, help="images per size (default: by size; --quick: fewer)")
    ap.add_argument("--skip-e2e", action="store_true", help="only the engine comparison")
    args = ap.parse_args()
    if args.rss_child:
        return rss_child(*args.rss_child)

    import torch

    from microsnoop.core.device import cpu_has_native_bf16
    from microsnoop.embed.engine import configure_threads

    threads = configure_threads()
    load = os.getloadavg()
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__} with {threads} threads, "
          f"native bf16: {cpu_has_native_bf16()}, CPU capability {torch.backends.cpu.get_cpu_capability()}; "
          f"load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    peaks = {p: matmul_peak(p) for p in ("fp32", "bf16")}
    print(f"torch.matmul 2048^3 peak: fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s")

    counts = {64: 256, 96: 128, 224: 32} if args.quick else {64: 1024, 96: 512, 224: 96}
    counts = {s: args.images or n for s, n in counts.items() if str(s) in args.sizes.split(",")}
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if engines:
        erows = engine_rows(args.model, "bf16" if args.precision == "auto" else args.precision, engines,
                            counts, args.repeats, peaks)
        print()
        print_engine_rows(erows)  # all rows again, together
        print(f"(load average after the engine comparison {' '.join(f'{x:.2f}' for x in os.getloadavg())})", flush=True)
    if args.skip_e2e:
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="msnoop-bench-") as tmp:
        work = Path(tmp)
        rss_line = ""
        if not args.skip_rss:
            small, big = (500, 5000) if args.quick else (2000, 20000)
            a, b = peak_rss(work, small), peak_rss(work, big)
            rss_line = (f"peak RSS (VmHWM of a fresh subprocess), 64x64 images, chunk 1024, precision auto: "
                        f"{small}: {a['peak_rss_mib']:.0f} MiB ({a['seconds']:.0f} s); {big}: "
                        f"{b['peak_rss_mib']:.0f} MiB ({b['seconds']:.0f} s); ratio "
                        f"{b['peak_rss_mib'] / a['peak_rss_mib']:.2f}x (target <= 1.5x)")
            print(f"  measured peak RSS", file=sys.stderr, flush=True)
        warm = write_input(work / "warm", real_images(64, 64))
        end_to_end(warm, work / "warm.parquet", args.precision, None, args.model)  # oneDNN/first-call set-up
        for size in counts:  # the engine's first use at each size (export + compile, cached on disk after)
            end_to_end(write_input(work / f"w{size}", real_images(size, 8)), work / "warm.parquet", args.precision,
                       None, args.model)
        head_gflop = model_gflops(args.model, list(counts))
        for size, n in counts.items():
            imgs = real_images(size, n)
            path = write_input(work / f"s{size}", imgs)
            # other users share the CPUs: alternate the two measurements and keep each one's best
            refs, e2es, olds = [], [], []
            for _ in range(args.repeats):
                refs.append(reference_forward(imgs, 64))
                e2e, prec = end_to_end(path, work / f"s{size}.parquet", args.precision, None, args.model)
                e2es.append(e2e)
                olds.append(end_to_end(path, work / f"s{size}.parquet", args.precision, None, args.model, "torch")[0])
            ref, e2e, old = max(refs), max(e2es), max(olds)
            gf, gm = encoder_gflop(size), head_gflop[size]  # reference: one pass; model: its scales
            peak = peaks["bf16" if prec == "bf16" else "fp32"]
            rows.append((size, n, e2e, prec, ref, e2e / ref, gm * e2e, gm * e2e / peak, gf * ref, gf * ref / peaks["fp32"],
                         old, gm * old / peak))
            print(f"  measured {size} px ({n} images)", file=sys.stderr, flush=True)
        print()
        print("| size | images | end-to-end img/s (engine auto) | precision | fp32 reference forward img/s | ratio | "
              "encoder GFLOP/s (e2e) | of matmul peak | reference GFLOP/s | of fp32 peak | "
              "end-to-end img/s --engine torch | of matmul peak | auto vs torch |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for size, n, e2e, prec, ref, ratio, g, gp, gr, grp, old, op in rows:
            print(f"| {size} px | {n} | {e2e:.1f} | {prec} | {ref:.1f} | {ratio:.2f}x | {g:.0f} | {gp:.0%} | "
                  f"{gr:.0f} | {grp:.0%} | {old:.1f} | {op:.0%} | {e2e / old:.2f}x |")
        later = {p: matmul_peak(p) for p in ("fp32", "bf16")}
        print(f"torch.matmul peak measured again at the end: fp32 {later['fp32']:.0f}, bf16 {later['bf16']:.0f} "
              f"GFLOP/s (the table uses the start's; compare the two to see how busy the machine was)")
        print(f"(encoder GFLOP per image, one pass: " + ", ".join(f"{s} px {encoder_gflop(s):.2f}" for s in counts)
              + f"; {args.model}'s head: " + ", ".join(f"{s} px {head_gflop[s]:.2f}" for s in counts) + ")")
        if rss_line:
            print(rss_line)
    load = os.getloadavg()
    print(f"load average at end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (other users share these CPUs)")


if __name__ == "__main__":
    main()
