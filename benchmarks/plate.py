"""Benchmark: the real BBBC013 plate end to end, one `microsnoop plate` command per model.

    PYTHONPATH=src python benchmarks/plate.py [--models default,handcrafted] [--out /tmp/plate_bench]
                                               [--segmenter cellpose] [--max-cells 64] [--crop-size 64]
                                               [--threads 1] [--no-share-masks]

Each model runs the documented command (timed as a subprocess, so the wall time is what a user
waits for, imports and model loading included):

    microsnoop plate ../shared/data/plates/bbbc013/manifest.csv -o OUT --model M --channels GFP,DNA \
        --segment-channel DNA --segmenter S --max-cells N --crop-size C

(the first model's run keeps its masks with --save-masks and the other models reuse them with
``--segmenter masks --masks FIRST/masks``, so the plate is segmented once; --no-share-masks
segments again per model), and the script prints, per model: number of well profiles, Z' (negative vs positive controls along
mean(pos) - mean(neg) of the sphered well profiles), Spearman of that score with
Metadata_DoseIndex in each row block, mAP per dose (copairs, replicates vs negative controls) and
the wall time. Results also go to OUT/summary.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT.parent / "shared" / "data" / "plates" / "bbbc013" / "manifest.csv"


def run_model(model: str, args: argparse.Namespace, masks: Path | None = None) -> dict:
    out = Path(args.out) / model
    seg = ["--segmenter", "masks", "--masks", str(masks)] if masks else ["--segmenter", args.segmenter]
    cmd = [sys.executable, "-m", "microsnoop", "plate", str(args.manifest), "-o", str(out), "--model", model,
           "--channels", "GFP,DNA", "--segment-channel", "DNA", *seg,
           "--crop-size", str(args.crop_size), "--precision", args.precision, "--device", "cpu", "--overwrite"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.share_masks and masks is None:
        cmd += ["--save-masks"]
    if args.max_cells:
        cmd += ["--max-cells", str(args.max_cells)]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    print("$ " + " ".join(cmd[1:]).replace(str(ROOT.parent), ".."), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{model}: microsnoop plate failed with exit code {proc.returncode}")
    rep = json.loads((out / "report.json").read_text())
    return {"model": rep.get("model", model), "model_sha256": rep.get("model_sha256"), "n_wells": rep["n_wells"],
            "n_cells": rep.get("n_cells"), "z_prime": rep["z_prime"], "dose_spearman": rep.get("dose_spearman"),
            "dose_spearman_series_only": rep.get("dose_spearman_series_only"), "mean_map": rep.get("mean_map"),
            "map": rep.get("map"), "fraction_retrieved": rep.get("fraction_retrieved"), "wall_s": wall,
            "timings": rep.get("timings"), "fields_timings_s": rep["provenance"].get("fields_timings_s"),
            "segmentation": rep["provenance"].get("segmentation"),
            "diameter_estimate": rep["provenance"].get("diameter_estimate"), "command": " ".join(cmd[1:]),
            "out": str(out)}


def print_summary(r: dict) -> None:
    ft = r.get("fields_timings_s") or {}
    print(f"\n== {r['model']} ==  wall time {r['wall_s']:.0f} s  ({r['n_cells']} cells; segmentation "
          f"{(r.get('segmentation') or {}).get('segmenter')} {ft.get('segment', float('nan')):.0f} s, "
          f"crop+embed {ft.get('crop_embed', float('nan')):.0f} s)")
    print(f"well profiles: {r['n_wells']}   Z' (neg vs pos): {r['z_prime']:.3f}   mean mAP: {r['mean_map']:.3f} "
          f"({r['fraction_retrieved']:.0%} treatments significant)")
    for blk, s in (r["dose_spearman"] or {}).items():
        s2 = (r["dose_spearman_series_only"] or {}).get(blk, {})
        print(f"Spearman(score, DoseIndex) block {blk}: {s['rho']:.3f} (all {s['n']} wells), "
              f"{s2.get('rho', float('nan')):.3f} (dose series only)")
    by_block: dict[str, dict[str, float]] = {}
    for row in r["map"] or []:
        by_block.setdefault(str(row["Metadata_RowBlock"]), {})[str(row["Metadata_DoseIndex"])] = row["mean_average_precision"]
    for blk, m in by_block.items():
        doses = sorted(m, key=int)
        print(f"mAP per dose, block {blk}: " + " ".join(f"{d}:{m[d]:.2f}" for d in doses))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", default=str(MANIFEST))
    ap.add_argument("--models", default="default,handcrafted")
    ap.add_argument("--out", default="/tmp/microsnoop_plate_bench")
    ap.add_argument("--segmenter", default="cellpose")
    ap.add_argument("--max-cells", type=int, default=64)
    ap.add_argument("--crop-size", type=int, default=64)
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per run (1 on a shared machine)")
    ap.add_argument("--no-share-masks", dest="share_masks", action="store_false",
                    help="segment again for every model (default: the first model saves its masks, the others reuse them)")
    args = ap.parse_args()
    if not Path(args.manifest).exists():
        raise SystemExit(f"plate not found at {args.manifest}")
    sys.path.insert(0, str(ROOT / "src"))
    from microsnoop.models import default_model_name

    models = [default_model_name() if m == "default" else m for m in args.models.split(",")]
    results = []
    masks = None
    for m in models:
        r = run_model(m, args, masks)
        if args.share_masks and masks is None:
            masks = Path(r["out"]) / "masks"
        print_summary(r)
        results.append(r)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "summary.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
