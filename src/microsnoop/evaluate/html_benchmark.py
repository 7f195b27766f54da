"""The benchmark page of report.html: score tables, a score chart, maps and confusion matrices per set."""
from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .benchmark import safe_name
from .html_report import figure_html, natural_key, page_html, palette, png_data_uri, table_html


def scores_figure(ds: str, records: list[dict[str, Any]], models: list[str], columns: list[str]) -> Any | None:
    """Accuracy of every model (x) under every protocol (bars), with the fold SD of mlp_cv as error bars."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for col in columns:
        recs = {r["model"]: r for r in records if r["dataset"] == ds and r["column"] == col}
        ms = [m for m in models if m in recs and recs[m]["accuracy"] == recs[m]["accuracy"]]
        if not ms:
            continue
        sd = [recs[m].get("accuracy_sd") for m in ms]
        fig.add_trace(go.Bar(x=ms, y=[recs[m]["accuracy"] for m in ms], name=col,
                             customdata=[recs[m]["macro_f1"] for m in ms],
                             error_y={"type": "data", "array": [v or 0 for v in sd], "visible": any(sd)},
                             hovertemplate="%{x}<br>" + html.escape(col) + "<br>accuracy %{y:.3f}, "
                                           "macro-F1 %{customdata:.3f}<extra></extra>"))
    if not fig.data:
        return None
    fig.update_layout(barmode="group", height=380, title=f"{ds}: accuracy per model and protocol",
                      yaxis={"range": [0, 1.02], "title": {"text": "accuracy"}}, legend={"orientation": "h", "y": -0.25})
    return fig


def map_figure(data: dict[str, Any]) -> Any:
    import plotly.graph_objects as go

    from .protocols import sort_labels

    m = data["map"]
    labels = np.asarray(m["labels"])
    order = sort_labels(labels)
    col = palette(order)
    fig = go.Figure()
    x, y = np.asarray(m["x"]), np.asarray(m["y"])
    for lab in order:
        sel = labels == lab
        fig.add_trace(go.Scattergl(x=x[sel], y=y[sel], mode="markers", name=lab,
                                   marker={"size": 5, "color": col[lab], "opacity": 0.8},
                                   hovertemplate=html.escape(lab) + "<extra></extra>"))
    fig.update_layout(height=450, title=f"{data['model']}: {m['method']} of z-scored embeddings",
                      xaxis={"showticklabels": False}, yaxis={"showticklabels": False},
                      legend={"title": {"text": data["label"].removeprefix("Metadata_")}})
    return fig


def confusion_figure(data: dict[str, Any]) -> Any | None:
    """One row-normalised confusion matrix per protocol, side by side (hover: counts)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    cms = [c for c in data["confusions"] if c["labels"]]
    if not cms:
        return None
    titles = [f"{c['column']}<br>acc {fmt(c['accuracy'])}, F1 {fmt(c['macro_f1'])}" for c in cms]
    fig = make_subplots(1, len(cms), subplot_titles=titles, horizontal_spacing=0.12)
    for j, c in enumerate(cms, start=1):
        counts = np.asarray(c["counts"], float)
        frac = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        fig.add_trace(go.Heatmap(z=frac, x=c["labels"], y=c["labels"], customdata=counts, zmin=0, zmax=1,
                                 colorscale="Blues", showscale=j == len(cms),
                                 hovertemplate="true %{y}<br>predicted %{x}<br>%{z:.2f} (%{customdata:.0f} images)"
                                               "<extra></extra>"), 1, j)
        fig.update_yaxes(autorange="reversed", title_text="true" if j == 1 else None, row=1, col=j)
        fig.update_xaxes(title_text="predicted", row=1, col=j)
    n = max(len(c["labels"]) for c in cms)
    fig.update_layout(height=max(380, 120 + 22 * n), margin={"t": 90},
                      title=f"{data['dataset']} x {data['model']}: confusion (rows sum to 1)")
    return fig


def fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def set_section(run_dir: Path, ds: str, info: dict[str, Any], rep: dict[str, Any], models: list[str], k: int) -> list[str]:
    from .report import set_tables

    body = [f"<h2>{html.escape(ds)}</h2>",
            f"<p class='note'>{info.get('n_images')} images, {html.escape(str(info.get('kind')))}, label "
            f"<code>{html.escape(str(info.get('label')))}</code>. Cells: knn accuracy / macro-F1; mlp_cv mean "
            f"accuracy ± SD over folds / macro-F1.</p>"]
    for _, header, rows in set_tables(rep["records"], {ds: info}, models):
        if rows:
            body.append(table_html(pd.DataFrame(rows, columns=header), f"scores-{k}"))
    body += [f"<p class='note'>skipped {html.escape(s['model'])}: {html.escape(s['reason'])}</p>"
             for s in rep.get("skipped", []) if s["dataset"] == ds]
    fig = scores_figure(ds, rep["records"], models, info.get("protocols", []))
    if fig is not None:
        body.append(figure_html(fig, f"chart-{k}"))
    for i, m in enumerate(models):
        body += model_figures(run_dir / "figures", ds, m, f"{k}-{i}")
    return body


def model_figures(fig_dir: Path, ds: str, model: str, tag: str) -> list[str]:
    """The set x model map and confusion matrices: interactive from the plot data, else the PNGs."""
    base = f"{safe_name(ds)}__{safe_name(model)}"
    data_path = fig_dir / f"{base}_plotdata.json"
    data = json.loads(data_path.read_text()) if data_path.exists() else None
    out = []
    if data is not None and data.get("map"):
        out.append(figure_html(map_figure(data), f"map-{tag}"))
    if data is not None:
        fig = confusion_figure(data)
        if fig is not None:
            out.append(figure_html(fig, f"confusion-{tag}"))
    if data is None:  # an older run: show its PNG figures
        for png in sorted(fig_dir.glob(f"{base}_*.png")):
            out.append(f"<div class='figs'><img alt='{html.escape(png.stem)}' src='{png_data_uri(png.read_bytes())}'></div>")
    if out:
        out.insert(0, f"<h3>{html.escape(model)}</h3>")
    return out


def benchmark_page(run_dir: Path, rep: dict[str, Any]) -> str:
    """The whole benchmark report page (HTML text)."""
    models = list(rep.get("models", {}))
    body = [f"<h1>Benchmark report: {html.escape(run_dir.resolve().name)}</h1>",
            f"<p class='note'>microsnoop benchmark in <code>{html.escape(str(run_dir.resolve()))}</code>: "
            f"{len(rep['datasets'])} set(s) x {len(models)} model(s). PNG figures for papers are in "
            f"<code>figures/</code>.</p>"]
    for k, (ds, info) in enumerate(sorted(rep["datasets"].items(), key=lambda kv: natural_key(kv[0]))):
        body += set_section(run_dir, ds, info, rep, models, k)
    skips = [s for s in rep.get("skipped", []) if s["dataset"] == "*"]
    if skips:
        body += ["<h2>Skipped models</h2>", table_html(pd.DataFrame(skips)[["model", "reason"]], "skipped")]
    mt = pd.DataFrame([[m, i.get("sha256", "")[:16], i.get("dim_per_channel"), i.get("description")]
                       for m, i in rep.get("models", {}).items()], columns=["model", "sha256", "dim / channel",
                                                                             "description"])
    body += ["<h2>Models</h2>", table_html(mt, "models-table"), "<h2>Environment</h2>",
             "<pre>" + html.escape(json.dumps({"settings": rep.get("settings"), "environment": rep.get("environment")},
                                              indent=1)) + "</pre>"]
    return page_html(f"Benchmark report: {run_dir.resolve().name}", body)
