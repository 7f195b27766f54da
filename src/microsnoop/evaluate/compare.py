"""Head-to-head summary of one model against baselines, from benchmark records.

    python -m microsnoop.evaluate.compare REPORT.json [REPORT.json ...] --model microsnoop-unet-v1 \
        [--baseline random-init --baseline cellpose-encoder ...] [--tol 0.005]

Why: a table of twenty accuracies does not say whether a new model is better. This reduces it the
way the model cards and the pretraining issue judge it: per set, the mean of the protocol
accuracies; per baseline, the per-set differences and on how many sets the model is no more than
``tol`` below the baseline ("wins or ties").
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from ..core.errors import MicrosnoopError


def set_means(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """model -> dataset -> mean accuracy over that set's protocols (records of the same set x model)."""
    acc: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r.get("accuracy") is not None:
            acc[r["model"]][r["dataset"]].append(float(r["accuracy"]))
    return {m: {d: sum(v) / len(v) for d, v in sets.items()} for m, sets in acc.items()}


def compare(records: Sequence[dict[str, Any]], model: str, baselines: Sequence[str] | None = None,
            tol: float = 0.005) -> list[dict[str, Any]]:
    """One row per baseline: per-set differences (model - baseline) and the count of sets won or tied."""
    means = set_means(records)
    if model not in means:
        raise MicrosnoopError(f"no records of model '{model}'; models: {', '.join(sorted(means))}")
    baselines = [b for b in (baselines or sorted(means)) if b != model]
    rows = []
    for b in baselines:
        if b not in means:
            raise MicrosnoopError(f"no records of baseline '{b}'")
        sets = sorted(set(means[model]) & set(means[b]))
        diff = {d: means[model][d] - means[b][d] for d in sets}
        rows.append({"baseline": b, "diff": diff, "wins_or_ties": sum(v >= -tol - 1e-9 for v in diff.values()),
                     "n_sets": len(sets)})
    return rows


def render(rows: list[dict[str, Any]], model: str, tol: float) -> str:
    sets = sorted({d for r in rows for d in r["diff"]})
    lines = [f"| {model} minus | " + " | ".join(sets) + f" | sets won or tied (>= -{tol}) |",
             "|---|" + "---|" * (len(sets) + 1)]
    for r in rows:
        cells = [f"{r['diff'][d]:+.3f}" if d in r["diff"] else "-" for d in sets]
        lines.append(f"| {r['baseline']} | " + " | ".join(cells) + f" | {r['wins_or_ties']} / {r['n_sets']} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Per-set mean accuracy differences of a model against baselines.")
    ap.add_argument("reports", nargs="+", type=Path, help="report.json files of `microsnoop benchmark`")
    ap.add_argument("--model", required=True)
    ap.add_argument("--baseline", action="append", help="repeatable (default: every other model in the reports)")
    ap.add_argument("--tol", type=float, default=0.005)
    args = ap.parse_args(argv)
    records = [r for p in args.reports for r in json.loads(p.read_text())["records"]]
    print(render(compare(records, args.model, args.baseline, args.tol), args.model, args.tol))


if __name__ == "__main__":
    main()
