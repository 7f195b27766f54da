"""Regenerate ``docs/benchmarks.md``: every shared benchmark set x every registered model.

    python -m microsnoop.evaluate.refresh [--data ../shared/data] [--model NAME ...] [--report-dir DIR]

Embeddings are cached in the report folder (default ``~/.cache/microsnoop/benchmarks``), so after a
new model is registered only that model is embedded; a model whose optional package is missing is
listed as skipped with its install hint instead of failing the refresh.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any, Sequence

from ..errors import MicrosnoopError
from ..io.atomic import atomic_path
from .benchmark import BenchmarkRun
from .report import markdown_table, set_tables

REPO_ROOT = Path(__file__).resolve().parents[3]
DOCS_PATH = REPO_ROOT / "docs" / "benchmarks.md"
COMMAND = "python -m microsnoop.evaluate.refresh"


def default_data_dir() -> Path:
    """``$MICROSNOOP_DATA``, else ``../shared/data`` beside the repository (where CI and dev machines keep it)."""
    env = os.environ.get("MICROSNOOP_DATA")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


def default_report_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "microsnoop" / "benchmarks"


def find_sets(data_dir: Path) -> list[Path]:
    bench = data_dir / "benchmarks"
    sets = sorted(p.parent for p in bench.glob("*/dataset.json"))
    if not sets:
        raise MicrosnoopError("no benchmark sets (benchmarks/*/dataset.json) found; pass --data or set "
                              "MICROSNOOP_DATA", bench)
    return sets


def machine() -> str:
    """CPU model and core count (and the GPU when one was used): timings mean nothing without it."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    desc = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    if torch.cuda.is_available():
        desc += f", GPU {torch.cuda.get_device_name(0)}"
    return desc


def dataset_notes(sets: Sequence[Path]) -> list[str]:
    lines = []
    for s in sets:
        info = json.loads((s / "dataset.json").read_text())
        src = info.get("source", {})
        paper = src.get("paper") if isinstance(src, dict) else None
        lines.append(f"- **{info.get('name', s.name)}** ({info.get('kind')}, {info.get('n_images')} images, "
                     f"channels {', '.join(info.get('channels', []))}; label `{info.get('label')}`)"
                     + (f": {paper}" if paper else "") + f". Licence: {info.get('license', 'see dataset.json')}")
    return lines


SEMANTICS = """\
## How the numbers are made

- Every channel is percentile-normalised and embedded separately; vectors are concatenated in channel order.
- **knn**: features z-scored over the whole set (constant features -> 0), cosine similarity, majority vote of
  `k` neighbours, a tie going to the tied class whose member is nearest. `loo` = leave-one-out (the cell itself
  excluded); `train->test` = neighbours from `Metadata_Split == train`, scored on `test`. `!Well` etc. =
  `exclude_same`: a neighbour sharing that column's value with the query is not used. A `subset`
  (shown as `{values}`) restricts both the scored cells and the neighbours. A `[Column]` suffix = label override.
- **mlp_cv**: stratified k-fold (seeded; `grp X` = StratifiedGroupKFold, a group never spans train and test),
  scikit-learn `MLPClassifier(max_iter=1000, random_state=seed)` on features standardised on each training fold;
  mean accuracy ± SD (ddof=1) over folds / mean macro-F1.
- Cells: `accuracy / macro-F1`. `embed s` = wall seconds to embed the set (recorded when it was embedded;
  cached embeddings keep their original time), `score s` = all protocols of the set, both on the machine below.
  On a shared CPU these timings vary with the load (2-3x); compare them as rough ratios.
- Sets of kind `fields` need the whole-field pipeline; where it is absent they are listed as skipped.
"""


def trained_cell(info: dict[str, Any]) -> str:
    if not info["trained"]:
        return "no (floor)"
    return "yes" if info.get("weights", "learned") == "learned" else "no weights (fixed features)"


def shown_args(argv: Sequence[str]) -> list[str]:
    """The command's arguments minus machine-local paths (report cache, docs target)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--report-dir", "--docs"):
            skip = True
        elif not a.startswith(("--report-dir=", "--docs=")):
            out.append(a)
    return out


def render_docs(run: BenchmarkRun, sets: Sequence[Path], data_dir: Path, argv: Sequence[str]) -> str:
    models = list(run.models)
    lines = ["# Benchmarks", "",
             "Generated by `" + " ".join([COMMAND, *shown_args(argv)]) + "` on "
             + _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC") + ".", "",
             f"Machine: {machine()}; device `{', '.join(run.settings.get('devices_used') or [run.settings['device']])}`, precision `{run.settings['precision']}`.",
             "Every registered model x every set under `benchmarks/` of the shared data "
             f"(`{data_dir.name if data_dir.name != 'data' else '../shared/data'}`).", "",
             "Regenerate after registering or retraining a model (cached embeddings are reused):", "",
             "```bash", COMMAND, "```", ""]
    for ds, header, rows in set_tables(run.records, run.datasets, models):
        info = run.datasets[ds]
        lines += [f"## {ds}", "", f"{info['n_images']} images, label `{info['label']}`.", ""]
        if rows:
            lines += [markdown_table(header, rows), ""]
        skips = [f"- {s['model']}: {s['reason']}" for s in run.skipped if s["dataset"] == ds]
        if skips:
            lines += ["Skipped:", "", *skips, ""]
    model_skips = [s for s in run.skipped if s["dataset"] == "*"]
    if model_skips:
        lines += ["## Models not run", "", *[f"- {s['model']}: {s['reason']}" for s in model_skips], ""]
    lines += ["## Models", "", markdown_table(
        ["model", "sha256", "features / channel", "trained", "description"],
        [[m, f"`{i['sha256'][:16]}`", str(i["dim_per_channel"]), trained_cell(i),
          i["description"]] for m, i in run.models.items()]), "", SEMANTICS, "## Data", "", *dataset_notes(sets), ""]
    return "\n".join(lines)


def refresh(data_dir: Path | None = None, models: Sequence[str] | None = None, report_dir: Path | None = None,
            docs_path: Path = DOCS_PATH, device: str = "cpu", precision: str = "fp32", plot: str = "umap",
            argv: Sequence[str] = ()) -> Path:
    """Benchmark every set with every (or the given) model(s) and rewrite the docs page."""
    from ..models import list_models
    from . import benchmark_and_report

    data_dir = Path(data_dir) if data_dir else default_data_dir()
    sets = find_sets(data_dir)
    models = list(models) if models else [s.name for s in list_models()]
    report_dir = Path(report_dir) if report_dir else default_report_dir()
    run, paths = benchmark_and_report(sets, models, report_dir, plot=plot, device=device, precision=precision,
                                      skip_missing_models=True, notify=lambda m: print(m, file=sys.stderr))
    docs_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(docs_path) as tmp:
        tmp.write_text(render_docs(run, sets, data_dir, argv))
    os.chmod(docs_path, 0o644)
    print(f"wrote {docs_path} (full report: {paths['md']})", file=sys.stderr)
    return docs_path


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=None, help="shared data folder (default: $MICROSNOOP_DATA or ../shared/data)")
    ap.add_argument("--model", action="append", default=None, help="model to run (repeat; default: every registered model)")
    ap.add_argument("--report-dir", type=Path, default=None, help="report + embedding cache (default: ~/.cache/microsnoop/benchmarks)")
    ap.add_argument("--docs", type=Path, default=DOCS_PATH, help="page to write (default: docs/benchmarks.md)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--plot", default="umap", choices=["umap", "pca", "none"])
    args = ap.parse_args(argv)
    try:
        refresh(args.data, args.model, args.report_dir, args.docs, args.device, args.precision, args.plot, argv)
    except MicrosnoopError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
