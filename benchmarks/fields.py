"""Benchmark: whole fields on Coelho 2009 (97 real DNA fields, U2OS vs NIH3T3, hand-drawn nucleus masks).

    PYTHONPATH=src python benchmarks/fields.py [--set ../shared/data/benchmarks/coelho2009_nuclei_fields]
        [--segmenters cellpose,classical] [--models default] [--modes crop,rescale,tile] [--max-cells 32]
        [--report-dir /tmp/microsnoop_fields_bench] [--threads 1]

Prints two tables:

1. Segmentation against ``masks.npy``: cells found vs the hand count (total, mean absolute error per
   field, Pearson r of the per-field counts), and object F1 at IoU 0.5 (pooled over all fields, with
   precision and recall; plus the mean of per-field F1s) for each segmenter, with its time per field.
2. Field classification (cell line) per model and mode: the set's protocols (1-NN leave-one-out and
   5-fold MLP accuracy) on field vectors from ``microsnoop benchmark --fields-mode MODE``.

Segmentations and embeddings are cached in REPORT_DIR/cache exactly as ``microsnoop benchmark``
caches them (same keys), so the two share work and a rerun only re-scores.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SET = ROOT.parent / "shared" / "data" / "benchmarks" / "coelho2009_nuclei_fields"


def segmentation_table(set_dir: Path, segmenters: list[str], report_dir: Path) -> list[dict]:
    from microsnoop.evaluate.benchmark import load_set
    from microsnoop.segment.metrics import match_masks
    from microsnoop.pipelines.field_sets import segment_dataset

    bset = load_set(set_dir)
    truth = np.load(set_dir / "masks.npy", mmap_mode="r")
    channels = list(bset.info.get("channels") or ["ch0"])
    seg_i = channels.index("DNA") if "DNA" in channels else 0
    hand = np.array([len(np.unique(t)) - 1 for t in truth])
    rows = []
    for name in segmenters:
        t0 = time.perf_counter()
        labels, prov = segment_dataset(bset.images, name, None, seg_i, device="cpu",
                                       cache_dir=report_dir / "cache" / "segmentations", data_sha256=bset.data_sha256)
        wall = prov.get("wall_s", time.perf_counter() - t0)
        per = [match_masks(np.asarray(t), p) for t, p in zip(truth, labels)]
        tp, fp, fn = (sum(getattr(r, k) for r in per) for k in ("tp", "fp", "fn"))
        found = np.array([r.n_pred for r in per])
        rows.append({"segmenter": name, "n_fields": len(per), "cells_found": int(found.sum()),
                     "cells_hand": int(hand.sum()), "mae_per_field": float(np.abs(found - hand).mean()),
                     "count_pearson_r": float(np.corrcoef(found, hand)[0, 1]),
                     "f1_pooled": 2 * tp / (2 * tp + fp + fn), "precision": tp / max(tp + fp, 1),
                     "recall": tp / max(tp + fn, 1), "f1_mean_per_field": float(np.mean([r.f1 for r in per])),
                     "s_per_field": wall / len(per), "cached": "cached" in prov, "settings": prov})
    return rows


def accuracy_table(set_dir: Path, models: list[str], modes: list[str], report_dir: Path, max_cells: int | None,
                   segmenter: str | None, threads: int | None) -> list[dict]:
    from microsnoop.evaluate.benchmark import run_benchmark

    rows = []
    for mode in modes:
        opts = {"max_cells": max_cells if mode == "crop" else None, "segmenter": segmenter if mode == "crop" else None}
        t0 = time.perf_counter()
        run = run_benchmark([set_dir], models, report_dir, device="cpu", precision="bf16", fields_mode=mode,
                            fields_options=opts, threads=threads)
        for rec in run.records:
            rows.append({"mode": mode, **{k: rec[k] for k in ("model", "column", "accuracy", "macro_f1", "embed_s")},
                         "wall_s": time.perf_counter() - t0})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", default=str(SET))
    ap.add_argument("--segmenters", default="cellpose,classical")
    ap.add_argument("--models", default="default", help="comma-separated; '' to skip the accuracy table")
    ap.add_argument("--modes", default="crop,rescale,tile")
    ap.add_argument("--max-cells", type=int, default=32)
    ap.add_argument("--crop-segmenter", default=None, help="segmenter for crop mode (default cellpose)")
    ap.add_argument("--report-dir", default="/tmp/microsnoop_fields_bench")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    set_dir = Path(args.set)
    if not (set_dir / "masks.npy").exists():
        raise SystemExit(f"set with masks.npy not found at {set_dir}")
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    from microsnoop.models import default_model_name

    if args.threads:
        torch.set_num_threads(args.threads)
    report_dir = Path(args.report_dir)
    seg = segmentation_table(set_dir, [s for s in args.segmenters.split(",") if s], report_dir)
    print(f"\nSegmentation vs hand-drawn masks ({set_dir.name}, {seg[0]['n_fields'] if seg else 0} fields)")
    print(f"{'segmenter':<10} {'found':>6} {'hand':>6} {'MAE/field':>9} {'count r':>7} {'F1@0.5':>7} "
          f"{'prec':>6} {'recall':>6} {'F1 mean':>7} {'s/field':>7}")
    for r in seg:
        print(f"{r['segmenter']:<10} {r['cells_found']:>6} {r['cells_hand']:>6} {r['mae_per_field']:>9.2f} "
              f"{r['count_pearson_r']:>7.3f} {r['f1_pooled']:>7.3f} {r['precision']:>6.3f} {r['recall']:>6.3f} "
              f"{r['f1_mean_per_field']:>7.3f} {r['s_per_field']:>7.2f}{' (cached)' if r['cached'] else ''}")
    acc = []
    models = [default_model_name() if m == "default" else m for m in args.models.split(",") if m]
    if models:
        acc = accuracy_table(set_dir, models, [m for m in args.modes.split(",") if m], report_dir, args.max_cells,
                             args.crop_segmenter, args.threads)
        print(f"\nField classification (label {json.loads((set_dir / 'dataset.json').read_text())['label']})")
        print(f"{'model':<24} {'mode':<8} {'protocol':<28} {'accuracy':>8} {'macro F1':>8} {'embed s':>8}")
        for r in acc:
            print(f"{r['model']:<24} {r['mode']:<8} {r['column']:<28} {r['accuracy']:>8.3f} {r['macro_f1']:>8.3f} "
                  f"{r['embed_s']:>8.0f}")
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "fields_summary.json").write_text(json.dumps({"segmentation": seg, "accuracy": acc}, indent=1,
                                                               default=str))


if __name__ == "__main__":
    main()
