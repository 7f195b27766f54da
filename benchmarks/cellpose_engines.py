"""Cellpose segmentation per engine on real BBBC013 plate fields: speed ratio and mask agreement, in one run.

    PYTHONPATH=src python benchmarks/cellpose_engines.py [--fields 3] [--engines torch,openvino]
        [--plate ../shared/data/plates/bbbc013] [--channel DNA] [--repeats 2]

An engine may carry its own precision, ``NAME:PRECISION`` (e.g. ``--engines torch:fp32,torch,openvino``:
the fp32 torch path the issue's 12 s/field was measured with, today's bf16 torch path, OpenVINO).

For each field (the segment channel, 640 x 640 uint8) every engine segments it with the default
settings (precision auto) at one object diameter for the plate, as the plate command's segmentation
stage does (it estimates the size on a few fields, then fixes it): ``--diameter``, else estimated
by the first engine on the first field. The
engines are alternated field by field and repeat by repeat (the machine is shared: only ratios
measured in one run mean anything); each engine's best time per field is kept. Reported: seconds
per field for the whole segmentation and for one network pass (the part the engine
replaces, at the segmentation's scale), the speed-up over the first engine (today's torch path), and object F1 at IoU 0.5 of each
engine's masks against the first engine's (pooled over fields). The engines' one-off export and
compile time (cached on disk afterwards) is reported separately, not counted in the per-field time.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PLATE = ROOT.parent / "shared" / "data" / "plates" / "bbbc013"


def load_fields(plate: Path, channel: str, n: int) -> list[tuple[str, np.ndarray]]:
    """The first ``n`` fields of the plate's manifest, spread over its rows (controls and doses)."""
    import pandas as pd
    import tifffile

    man = pd.read_csv(plate / "manifest.csv")
    rows = man.iloc[np.linspace(0, len(man) - 1, n).round().astype(int)]
    return [(str(f), tifffile.imread(plate / f)) for f in rows[f"FileName_{channel}"]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--plate", type=Path, default=PLATE)
    ap.add_argument("--channel", default="DNA")
    ap.add_argument("--fields", type=int, default=3)
    ap.add_argument("--engines", default="torch,openvino", help="NAME[:PRECISION],... (first = the reference)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--diameter", type=float, default=None, help="object diameter (px); default: estimated once")
    args = ap.parse_args()
    if not (args.plate / "manifest.csv").exists():
        raise SystemExit(f"no plate at {args.plate} (needs manifest.csv)")

    import torch

    from microsnoop.embed.engine import configure_threads
    from microsnoop.segment.metrics import match_masks
    from microsnoop.segment.cellpose import CellposeSegmenter, run_network

    threads = configure_threads()
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    fields = load_fields(args.plate, args.channel, args.fields)
    print(f"{len(fields)} fields of {args.plate.name} ({args.channel}, {fields[0][1].shape}); torch {torch.__version__}, "
          f"{threads} threads; load average at start {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    segs, setup = {}, {}
    diameter = args.diameter
    for e in engines:
        t = time.perf_counter()
        name, _, prec = e.partition(":")
        segs[e] = CellposeSegmenter(precision=prec or args.precision, engine=name)
        if e != "torch":
            run_network(segs[e].runner, fields[0][1], 1.0, segs[e].precision)  # export/compile/validate (cached after)
        setup[e] = time.perf_counter() - t
        if diameter is None:
            diameter = segs[e].estimate_diameter(fields[0][1])
            print(f"  diameter estimated by {e} on the first field: {diameter:.1f} px", flush=True)
        print(f"  {e}: ready in {setup[e]:.1f} s (engine that runs: {segs[e].engine}, precision {segs[e].precision})",
              flush=True)
    for s in segs.values():
        s.diameter = diameter
    seg_t = {e: [np.inf] * len(fields) for e in engines}
    net_t = {e: [np.inf] * len(fields) for e in engines}
    masks: dict[str, list] = {e: [None] * len(fields) for e in engines}
    for r in range(args.repeats):
        for i, (_, img) in enumerate(fields):
            order = engines if (r + i) % 2 == 0 else engines[::-1]  # alternate who goes first
            for e in order:
                s = segs[e]
                t = time.perf_counter()
                run_network(s.runner, img, 30.0 / diameter, s.precision)
                net_t[e][i] = min(net_t[e][i], time.perf_counter() - t)
                print(f"    field {i} {e}: network pass {time.perf_counter() - t:.1f} s", flush=True)
                t = time.perf_counter()
                m = s(img)
                seg_t[e][i] = min(seg_t[e][i], time.perf_counter() - t)
                print(f"    field {i} {e}: segmentation {seg_t[e][i]:.1f} s, {int(m.max())} objects", flush=True)
                masks[e][i] = m
        print(f"  repeat {r + 1}/{args.repeats} done; load {os.getloadavg()[0]:.2f}", flush=True)
    base = engines[0]
    print()
    print(f"| engine | runs as | segmentation s/field | speed-up vs {base} | network pass s | "
          f"network speed-up | objects | F1@0.5 vs {base} | one-off set-up s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for e in engines:
        tp = fp = fn = 0
        for a, b in zip(masks[base], masks[e]):
            res = match_masks(a, b, 0.5)
            tp, fp, fn = tp + res.tp, fp + res.fp, fn + res.fn
        f1 = 2 * tp / max(1, 2 * tp + fp + fn)
        n_obj = sum(int(m.max()) for m in masks[e])
        st, nt = float(np.mean(seg_t[e])), float(np.mean(net_t[e]))
        print(f"| {e} | {segs[e].engine} | {st:.2f} | {np.mean(seg_t[base]) / st:.2f}x | {nt:.2f} | "
              f"{np.mean(net_t[base]) / nt:.2f}x | {n_obj} | {f1:.4f} | {setup[e]:.1f} |")
    print(f"load average at end {' '.join(f'{x:.2f}' for x in os.getloadavg())} (other users share these CPUs)")


if __name__ == "__main__":
    main()
