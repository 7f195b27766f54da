"""Benchmark report: report.json (one record per set x model x protocol), report.md, figures, rich tables.

Everything but the timing fields (``wall_s``, ``embed_s``) is a deterministic function of the
images, the models and the protocols, so two runs give identical reports apart from timings.
"""
from __future__ import annotations

import json
import platform
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ..io.atomic import atomic_path
from .benchmark import TIMING_KEYS, BenchmarkRun, SetResult, safe_name
from .protocols import sort_labels, zscore

PLOT_SEED = 0


def environment() -> dict[str, Any]:
    import sklearn
    import torch

    from ..core.version import __version__ as microsnoop_version

    return {"microsnoop": microsnoop_version, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "scikit-learn": sklearn.__version__, "machine": platform.machine()}


def cell(records: list[dict[str, Any]]) -> str:
    """``acc / F1`` (knn) or ``acc ± sd / F1`` (mlp_cv); ``-`` where nothing was scored."""
    if not records:
        return "-"
    r = records[0]
    if r["accuracy"] != r["accuracy"]:  # NaN
        return "n/a"
    if r["protocol"] == "mlp_cv":
        return f"{r['accuracy']:.3f}±{r.get('accuracy_sd', 0.0):.3f} / {r['macro_f1']:.3f}"
    return f"{r['accuracy']:.3f} / {r['macro_f1']:.3f}"


def set_tables(run_records: list[dict[str, Any]], datasets: dict[str, dict[str, Any]],
               models: list[str]) -> list[tuple[str, list[str], list[list[str]]]]:
    """Per set: (title, header, rows) with rows = models, columns = protocols, then timings."""
    tables = []
    for ds, info in datasets.items():
        cols = info["protocols"]
        header = ["model", *cols, "embed s", "score s"]
        rows = []
        for m in models:
            recs = [r for r in run_records if r["dataset"] == ds and r["model"] == m]
            if not recs:
                continue
            row = [m] + [cell([r for r in recs if r["column"] == c]) for c in cols]
            row += [f"{recs[0]['embed_s']:.0f}", f"{sum(r['wall_s'] for r in recs):.0f}"]
            rows.append(row)
        tables.append((ds, header, rows))
    return tables


def set_section(ds: str, summary: str, header: list[str], rows: list[list[str]], skips: list[str],
                skip_title: str | None = None) -> list[str]:
    """Markdown lines of one set: heading, one-line summary, score table, skipped models.

    Parameters
    ----------
    ds : str
        The set's name (the heading).
    summary : str
        One line under the heading.
    header, rows
        The score table (:func:`markdown_table`); none when ``rows`` is empty.
    skips : list of str
        Bullet lines for the models skipped on this set.
    skip_title : str, optional
        A line put above the skipped models.

    Returns
    -------
    list of str
        The section's lines, ending with a blank line.
    """
    lines = [f"## {ds}", "", summary, ""]
    if rows:
        lines += [markdown_table(header, rows), ""]
    if skips:
        lines += ([skip_title, ""] if skip_title else []) + skips + [""]
    return lines


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(map(esc, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(esc, r)) + " |" for r in rows]
    return "\n".join(lines)


def embedding_2d(X: np.ndarray, method: str) -> tuple[np.ndarray, str]:
    """2-D map of z-scored features: UMAP (seeded) after PCA to 50, or PCA when UMAP is unavailable."""
    from sklearn.decomposition import PCA

    Z = zscore(X)
    n_comp = int(min(50, Z.shape[0] - 1, Z.shape[1]))
    P = PCA(n_components=n_comp, random_state=PLOT_SEED).fit_transform(Z) if n_comp >= 2 else np.c_[Z, Z][:, :2]
    if method == "umap" and len(Z) > 15:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                import umap

                return umap.UMAP(n_neighbors=15, min_dist=0.1, random_state=PLOT_SEED).fit_transform(P), "UMAP"
        except ImportError:
            pass
    return P[:, :2], "PCA"


def plot_embedding(sr: SetResult, path: Path, method: str) -> tuple[np.ndarray, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xy, used = embedding_2d(sr.X, method)
    labels = sr.metadata[sr.label].astype(str).to_numpy()
    fig, ax = plt.subplots(figsize=(5.5, 4.5), dpi=110)
    cmap = plt.get_cmap("tab10" if len(set(labels)) <= 10 else "tab20")
    for i, lab in enumerate(sort_labels(labels)):
        sel = labels == lab
        ax.scatter(xy[sel, 0], xy[sel, 1], s=4, alpha=0.7, color=cmap(i % cmap.N), label=lab, linewidths=0)
    ax.set_title(f"{sr.dataset}\n{sr.model}: {used} of z-scored embeddings", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(title=sr.label.removeprefix("Metadata_"), fontsize=7, title_fontsize=8, markerscale=3,
              loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})
    plt.close(fig)
    return xy, used


def plot_confusions(sr: SetResult, path: Path) -> None:
    """One row-normalised confusion matrix per protocol, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import confusion_matrix

    n = len(sr.results)
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.6), dpi=110, squeeze=False)
    for ax, (column, res, _) in zip(axes[0], sr.results):
        labs = res.labels
        cm = confusion_matrix(res.y_true, res.y_pred, labels=labs).astype(float)
        cm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
        ax.imshow(cm, vmin=0, vmax=1, cmap="Blues")
        for (i, j), v in np.ndenumerate(cm):
            if len(labs) <= 8:
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v > 0.5 else "black")
        short = [lab if len(lab) <= 14 else lab[:13] + '…' for lab in labs]
        ax.set_xticks(range(len(labs)), short, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(labs)), short, fontsize=7)
        ax.set_xlabel("predicted", fontsize=8)
        ax.set_ylabel("true", fontsize=8)
        ax.set_title(f"{column}\nacc {res.accuracy:.3f}, F1 {res.macro_f1:.3f}", fontsize=8)
    fig.suptitle(f"{sr.dataset} x {sr.model}", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})
    plt.close(fig)


def save_plot_data(sr: SetResult, xy: tuple[np.ndarray, str] | None, path: Path) -> None:
    """The 2-D map (points and labels) and row-normalised confusion matrices as JSON, for report.html."""
    from sklearn.metrics import confusion_matrix

    out: dict[str, Any] = {"dataset": sr.dataset, "model": sr.model, "label": sr.label, "confusions": []}
    if xy is not None:
        out["map"] = {"method": xy[1], "x": np.round(xy[0][:, 0], 4).tolist(), "y": np.round(xy[0][:, 1], 4).tolist(),
                      "labels": sr.metadata[sr.label].astype(str).tolist()}
    for column, res, _ in sr.results:
        cm = confusion_matrix(res.y_true, res.y_pred, labels=res.labels)
        out["confusions"].append({"column": column, "labels": [str(lab) for lab in res.labels], "counts": cm.tolist(),
                                  "accuracy": _finite(res.accuracy), "macro_f1": _finite(res.macro_f1)})
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(out))
    path.chmod(0o644)


def _finite(v: float) -> float | None:
    return float(v) if np.isfinite(v) else None


def report_dict(run: BenchmarkRun) -> dict[str, Any]:
    return {"records": run.records, "datasets": run.datasets, "models": run.models, "skipped": run.skipped,
            "settings": run.settings, "environment": environment()}


def strip_timings(report: dict[str, Any]) -> dict[str, Any]:
    """The report without timing fields: what two runs must agree on exactly."""
    out = json.loads(json.dumps(report))
    for r in out["records"]:
        for k in TIMING_KEYS:
            r.pop(k, None)
    return out


def write_report(run: BenchmarkRun, report_dir: str | Path, plot: str = "umap",
                 notify: Any = None) -> dict[str, Path]:
    """Write report.json, report.md and the figures; returns their paths."""
    report_dir = Path(report_dir)
    fig_dir = report_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    figures: dict[tuple[str, str], list[Path]] = {}
    for sr in run.set_results:
        base = f"{safe_name(sr.dataset)}__{safe_name(sr.model)}"
        paths, xy = [], None
        if plot != "none":
            paths.append(fig_dir / f"{base}_{plot}.png")
            xy = plot_embedding(sr, paths[-1], plot)
        if sr.results:
            paths.append(fig_dir / f"{base}_confusion.png")
            plot_confusions(sr, paths[-1])
        figures[(sr.dataset, sr.model)] = paths
        save_plot_data(sr, xy, fig_dir / f"{base}_plotdata.json")  # what report.html draws interactively
    report = report_dict(run)
    json_path = report_dir / "report.json"
    with atomic_path(json_path) as tmp:
        tmp.write_text(json.dumps(report, indent=1) + "\n")
    md_path = report_dir / "report.md"
    with atomic_path(md_path) as tmp:
        tmp.write_text(markdown_report(run, figures, report_dir))
    for p in [json_path, md_path, *(f for fs in figures.values() for f in fs)]:
        p.chmod(0o644)  # atomic_path's temporary files are private (0600); a report is meant to be shared
    from .html_report import write_html_report_safely  # never fails the run: a warning at worst

    html_path = write_html_report_safely(report_dir)
    return {"json": json_path, "md": md_path, **({"html": html_path} if html_path else {})}


def markdown_report(run: BenchmarkRun, figures: dict[tuple[str, str], list[Path]], report_dir: Path) -> str:
    models = list(run.models)
    lines = ["# microsnoop benchmark", "",
             "Cells: knn `accuracy / macro-F1`; mlp_cv `mean accuracy ± SD over folds / mean macro-F1`. "
             "`embed s` = seconds to embed the set (from the cache when reused), `score s` = all protocols.", ""]
    for ds, header, rows in set_tables(run.records, run.datasets, models):
        info = run.datasets[ds]
        skips = [f"- skipped {s['model']}: {s['reason']}" for s in run.skipped if s["dataset"] == ds]
        lines += set_section(ds, f"{info['n_images']} images, {info['kind']}, label `{info['label']}`", header, rows,
                             skips)
        for m in models:
            for p in figures.get((ds, m), []):
                lines.append(f"![{ds} {m} {p.stem.rsplit('_', 1)[-1]}]({p.relative_to(report_dir).as_posix()})")
        lines.append("")
    model_skips = [s for s in run.skipped if s["dataset"] == "*"]
    if model_skips:
        lines += ["## Skipped models", ""] + [f"- {s['model']}: {s['reason']}" for s in model_skips] + [""]
    lines += ["## Models", "", markdown_table(["model", "sha256", "dim / channel", "description"],
                                              [[m, i["sha256"][:16], str(i["dim_per_channel"]), i["description"]]
                                               for m, i in run.models.items()]), ""]
    return "\n".join(lines)


def rich_tables(run: BenchmarkRun) -> list[Any]:
    """The per-set tables as rich Tables for the console."""
    from rich.table import Table

    out = []
    for ds, header, rows in set_tables(run.records, run.datasets, list(run.models)):
        t = Table(title=ds, title_justify="left")
        for h in header:
            t.add_column(h, overflow="fold")
        for r in rows:
            t.add_row(*r)
        for s in run.skipped:
            if s["dataset"] == ds:
                t.add_row(s["model"], *(["skipped"] + [""] * (len(header) - 2)))
        out.append(t)
    return out
