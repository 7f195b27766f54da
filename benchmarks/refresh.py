"""Regenerate ``docs/benchmarks.md``: every shared benchmark set x every registered model.

    python benchmarks/refresh.py [--data ../shared/data] [--model NAME ...] [--report-dir DIR]
    python benchmarks/refresh.py --peers-only [--peer-run runs/dino-vit ...]

A developer tool of this repository (it rewrites the repository's docs), so it lives in
``benchmarks/`` and not in the installed package: run it from a checkout, with microsnoop installed
(``pip install -e .``) or ``PYTHONPATH=src``.

Peer pretext methods (``dino-vit``, ``cytoself``, ``paired-inpainting``) are not shipped models: their
checkpoints live in run folders outside git. ``docs/peer_methods.json`` records, per method, how it was
trained and its last measured scores; the "Peer pretext methods" section is rendered from that file
(re-benchmarking each checkpoint that is present), so a regeneration keeps it even on a machine
without the run folders. ``--peer-run DIR`` adds or updates an entry from a finished training run;
``--peers-only`` rewrites just that section of the existing page.

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

from microsnoop.core.errors import MicrosnoopError
from microsnoop.io.atomic import atomic_path
from microsnoop.evaluate.benchmark import BenchmarkRun
from microsnoop.evaluate.report import markdown_table, set_section, set_tables

REPO_ROOT = Path(__file__).resolve().parents[1]  # this file is <repo>/benchmarks/refresh.py
DOCS_PATH = REPO_ROOT / "docs" / "benchmarks.md"
COMMAND = "python benchmarks/refresh.py"
PEERS_PATH = REPO_ROOT / "docs" / "peer_methods.json"
PEER_START, PEER_END = "<!-- peer-methods:start -->", "<!-- peer-methods:end -->"


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
    from microsnoop.io.readers import load_dataset_json

    lines = []
    for s in sets:
        info = load_dataset_json(s)
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
- Sets of kind `fields` go through the whole-field pipeline (`docs/fields.md`): Cellpose segmentation of the
  first channel (cached per set), the paper's cell-region crops (Sta 224, `--fields-max-cells` seeded cells per
  field), every crop embedded, the field vector = the mean of its cells; protocols score the field vectors.
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


def default_vs_baselines(run: BenchmarkRun, tol: float = 0.005) -> list[str]:
    """The default model's per-set mean accuracy minus every other model's, on the single-cell sets."""
    from microsnoop.models import default_model_name
    from microsnoop.evaluate.compare import compare, render

    default = default_model_name()
    cells = {ds for ds, info in run.datasets.items() if info.get("kind") == "single_cell"}
    recs = [r for r in run.records if r["dataset"] in cells]
    if default not in {r["model"] for r in recs}:
        return []
    rows = compare(recs, default, [m for m in run.models if m != default], tol)
    return [f"## Default model against the others", "",
            f"Per single-cell set, the mean of its protocol accuracies for `{default}` (the default) minus "
            f"each other model's; \"won or tied\" counts sets where the default is no more than {tol} below "
            f"(`microsnoop compare REPORT/report.json --model {default}`).", "",
            render(rows, default, tol), ""]


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
        skips = [f"- {s['model']}: {s['reason']}" for s in run.skipped if s["dataset"] == ds]
        lines += set_section(ds, f"{info['n_images']} images, label `{info['label']}`.", header, rows, skips, "Skipped:")
    lines += default_vs_baselines(run)
    model_skips = [s for s in run.skipped if s["dataset"] == "*"]
    if model_skips:
        lines += ["## Models not run", "", *[f"- {s['model']}: {s['reason']}" for s in model_skips], ""]
    lines += ["## Models", "", markdown_table(
        ["model", "sha256", "features / channel", "trained", "description"],
        [[m, f"`{i['sha256'][:16]}`", str(i["dim_per_channel"]), trained_cell(i),
          i["description"]] for m, i in run.models.items()]), "", SEMANTICS, "## Data", "", *dataset_notes(sets), ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- peer pretext methods
def _rel(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def peer_entry_from_run(run_dir: Path) -> dict[str, Any]:
    """How a run was trained (config.json, log.csv, the exported checkpoint's header) as a peer entry."""
    import csv

    from microsnoop.core.hashing import sha256_file
    from microsnoop.models.checkpoints import read_checkpoint_header

    run_dir = Path(run_dir)
    model = run_dir / "model.safetensors"
    if not model.exists():
        raise MicrosnoopError("run has no model.safetensors (unfinished?)", run_dir)
    cfg = json.loads((run_dir / "config.json").read_text())
    with open(run_dir / "log.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    header = read_checkpoint_header(model)
    keep = ("input_size", "batch_size", "lr", "warmup_steps", "precision_resolved", "label_column", "classify_channels",
            "layer", "pool", "split_value", "group_column", "momentum_teacher", "out_dim", "n_local", "teacher_temp",
            "cls_weight", "dim", "depth", "patch", "widths", "split", "local_codes", "global_codes", "seed")
    return {"method": cfg["method"], "checkpoint": _rel(model), "sha256": sha256_file(model),
            "data": _rel(Path(cfg["data"])) if not str(cfg["data"]).startswith("..") else cfg["data"],
            "split": cfg.get("split_value"), "steps": int(header.get("steps", len(rows))),
            "images_seen": int(header.get("images_seen", 0)), "wall_s": float(rows[-1]["elapsed_s"]) if rows else None,
            "final_loss": float(rows[-1]["loss"]) if rows else None, "hardware": machine(),
            "config": {k: cfg[k] for k in keep if k in cfg}, "dim_per_channel": None, "results": {}}


def load_peers(path: Path = PEERS_PATH) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {"methods": []}


def stale_status(status: str, why: str) -> str:
    """Status of a peer entry that could not be re-measured: keeps when it was last measured, says why not now."""
    last = status.split(" (", 1)[0] if status.startswith("measured ") else "recorded"
    return f"{last} (not re-run {_dt.date.today().isoformat()}: {why})"


def benchmark_peers(peers: dict[str, Any], sets: Sequence[Path], report_dir: Path, device: str, precision: str) -> None:
    """Re-score every peer checkpoint that is present (and unchanged) on the single-cell sets; update in place."""
    from microsnoop.core.hashing import sha256_file
    from microsnoop.evaluate import benchmark_and_report
    from microsnoop.evaluate.benchmark import load_set
    from microsnoop.evaluate.report import cell

    cells = [s for s in sets if load_set(s).kind == "single_cell"]
    for entry in peers["methods"]:
        path = REPO_ROOT / entry["checkpoint"] if not Path(entry["checkpoint"]).is_absolute() else Path(entry["checkpoint"])
        if not path.exists() or sha256_file(path) != entry["sha256"]:
            why = "checkpoint not on this machine" if not path.exists() else "checkpoint changed"
            entry["status"] = stale_status(entry.get("status", ""), why)
            continue
        run, _ = benchmark_and_report(cells, [str(path)], report_dir / "peers", plot="none", device=device,
                                      precision=precision, notify=lambda m: print(m, file=sys.stderr))
        enc = next(iter(run.models.values()))
        entry["dim_per_channel"] = enc["dim_per_channel"]
        entry["results"] = {}
        for ds, info in run.datasets.items():
            recs = [r for r in run.records if r["dataset"] == ds]
            entry["results"][ds] = {c: cell([r for r in recs if r["column"] == c]) for c in info["protocols"]}
            entry["results"][ds]["embed s"] = f"{recs[0]['embed_s']:.0f}" if recs else "-"
        entry["status"] = "measured " + _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def render_peers(peers: dict[str, Any]) -> str:
    """The "Peer pretext methods" section (between markers, so --peers-only can replace it alone)."""
    lines = [PEER_START, "## Peer pretext methods", "",
             "Other self-supervised recipes trained with `microsnoop train --method NAME` (see `docs/methods.md`), "
             "embedded and scored exactly like the models above (fp32, same protocols). Their checkpoints are run "
             "outputs, not shipped; `docs/peer_methods.json` records how each was trained and its last measured "
             "scores. **Short CPU runs**: these rows show the recipes work end to end at small scale, not what "
             "the methods reach when trained properly.", ""]
    methods = peers.get("methods", [])
    if not methods:
        return "\n".join(lines + ["No peer runs recorded yet.", "", PEER_END])
    sets = sorted({ds for e in methods for ds in e.get("results", {})})
    for ds in sets:
        cols = list(dict.fromkeys(c for e in methods for c in e.get("results", {}).get(ds, {})))
        rows = [[e["method"], *[e["results"].get(ds, {}).get(c, "-") for c in cols]] for e in methods if ds in e.get("results", {})]
        lines += [f"### {ds}", "", markdown_table(["method", *cols], rows), ""]
    rows = []
    for e in methods:
        tuned = " **(trained on this benchmark's train split)**" if e.get("tuned_on_benchmark") else ""
        wall = f"{e['wall_s'] / 60:.1f} min" if e.get("wall_s") else "-"
        rows.append([e["method"], f"`{e['data']}`" + (f" ({e['split']} split)" if e.get("split") else "") + tuned,
                     str(e["steps"]), str(e.get("images_seen", "-")), wall, e.get("hardware", "-"),
                     str(e.get("dim_per_channel") or "-"), f"`{e['sha256'][:16]}`", e.get("status", "")])
    lines += ["### How they were trained", "",
              "Wall time = the training loop's own clock (`log.csv`), on the hardware named; runs shared 2 CPU "
              "cores with other jobs, so treat times as upper bounds.", "", markdown_table(
        ["method", "data", "steps", "images seen", "wall time", "hardware", "features / channel", "sha256", "scores"], rows), ""]
    notes = [f"- **{e['method']}**: `{e['command']}`" + (f". {e['note']}" if e.get("note") else "")
             for e in methods if e.get("command")]
    if notes:
        lines += ["Commands and caveats:", "", *notes, ""]
    return "\n".join(lines + [PEER_END])


def replace_peer_section(page: str, section: str) -> str:
    if PEER_START in page and PEER_END in page:
        head, rest = page.split(PEER_START, 1)
        return head + section + rest.split(PEER_END, 1)[1]
    marker = "\n## Models\n"
    if marker in page:
        head, tail = page.split(marker, 1)
        return head + "\n" + section + "\n" + marker + tail
    return page.rstrip("\n") + "\n\n" + section + "\n"


def refresh_peers(data_dir: Path | None = None, report_dir: Path | None = None, docs_path: Path = DOCS_PATH,
                  peers_path: Path = PEERS_PATH, runs: Sequence[Path] = (), device: str = "cpu",
                  precision: str = "fp32", notes: dict[str, dict[str, Any]] | None = None) -> str:
    """Add/update peer entries from run folders, re-benchmark present checkpoints, write the json; return the section."""
    data_dir = Path(data_dir) if data_dir else default_data_dir()
    report_dir = Path(report_dir) if report_dir else default_report_dir()
    peers = load_peers(peers_path)
    for run_dir in runs:
        new = peer_entry_from_run(Path(run_dir))
        old = next((e for e in peers["methods"] if e["method"] == new["method"]), None)
        for k in ("command", "note", "tuned_on_benchmark"):
            if old and k in old:
                new.setdefault(k, old[k])
        peers["methods"] = [e for e in peers["methods"] if e["method"] != new["method"]] + [new]
    benchmark_peers(peers, find_sets(data_dir), report_dir, device, precision)
    with atomic_path(peers_path) as tmp:
        tmp.write_text(json.dumps(peers, indent=1, ensure_ascii=False) + "\n")
    os.chmod(peers_path, 0o644)
    return render_peers(peers)


def refresh(data_dir: Path | None = None, models: Sequence[str] | None = None, report_dir: Path | None = None,
            docs_path: Path = DOCS_PATH, device: str = "cpu", precision: str = "fp32", plot: str = "umap",
            argv: Sequence[str] = (), fields_options: dict[str, Any] | None = None) -> Path:
    """Benchmark every set with every (or the given) model(s) and rewrite the docs page."""
    from microsnoop.models import list_models
    from microsnoop.evaluate import benchmark_and_report

    data_dir = Path(data_dir) if data_dir else default_data_dir()
    sets = find_sets(data_dir)
    models = list(models) if models else [s.name for s in list_models()]
    report_dir = Path(report_dir) if report_dir else default_report_dir()
    run, paths = benchmark_and_report(sets, models, report_dir, plot=plot, device=device, precision=precision,
                                      skip_missing_models=True, notify=lambda m: print(m, file=sys.stderr),
                                      fields_options=fields_options)
    docs_path.parent.mkdir(parents=True, exist_ok=True)
    page = render_docs(run, sets, data_dir, argv)
    if PEERS_PATH.exists() and docs_path == DOCS_PATH:
        page = replace_peer_section(page, refresh_peers(data_dir, report_dir, docs_path, device=device, precision=precision))
    with atomic_path(docs_path) as tmp:
        tmp.write_text(page)
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
    ap.add_argument("--fields-max-cells", type=int, default=16,
                    help="sets of kind 'fields': cells embedded per field (seeded subset; default 16 keeps the refresh "
                         "to minutes on a 2-core CPU)")
    ap.add_argument("--fields-crop-size", type=int, default=None, help="sets of kind 'fields': Sta (default: 224)")
    ap.add_argument("--peers-only", action="store_true", help="only re-render the 'Peer pretext methods' section")
    ap.add_argument("--peer-run", action="append", type=Path, default=[], help="add/update a peer entry from a run folder")
    args = ap.parse_args(argv)
    try:
        if args.peers_only or args.peer_run:
            section = refresh_peers(args.data, args.report_dir, args.docs, runs=args.peer_run, device=args.device,
                                    precision=args.precision)
            if args.peers_only:
                page = args.docs.read_text() if args.docs.exists() else "# Benchmarks\n"
                with atomic_path(args.docs) as tmp:
                    tmp.write_text(replace_peer_section(page, section))
                print(f"wrote the peer section of {args.docs} and {PEERS_PATH}", file=sys.stderr)
                return 0
        refresh(args.data, args.model, args.report_dir, args.docs, args.device, args.precision, args.plot, argv,
                fields_options={"max_cells": args.fields_max_cells, "crop_size": args.fields_crop_size})
    except MicrosnoopError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
