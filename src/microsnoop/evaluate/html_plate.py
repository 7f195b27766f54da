"""The plate page of report.html: plate map, dose response, maps of wells and cells, Z' / mAP / dose tables."""
from __future__ import annotations

import html
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..core.errors import MicrosnoopError
from .html_report import (CELL_SAMPLE_NAME, MONTAGE_HEIGHT, MONTAGE_TILES, SCORES, figure_html, natural_key,
                          page_html, palette, png_data_uri, table_html)

PLATE_FORMATS = ((8, 12), (16, 24), (32, 48))
CONTROL_LABELS = ("negative control", "positive control")


@dataclass
class PlateData:
    """A plate run folder, read back: well profiles with a key and a treatment label per well."""

    run_dir: Path
    report: dict[str, Any]
    settings: dict[str, Any]
    wells: pd.DataFrame
    feats: list[str]
    keys: np.ndarray            # one display key per well ("A01", or "plate A01" with several plates)
    labels: np.ndarray          # treatment label per well ("negative control", "RowBlock A-D, DoseIndex 5")
    fields: pd.DataFrame | None
    cells: pd.DataFrame | None
    cell_feats: list[str]


def table_file(run_dir: Path, settings: dict[str, Any], name: str) -> Path | None:
    ext = {"parquet": ".parquet", "h5": ".h5", "h5ad": ".h5ad"}.get(settings.get("fmt", "parquet"), ".parquet")
    for p in [run_dir / f"{name}{ext}", *sorted(run_dir.glob(f"{name}.*"))]:
        if p.exists():
            return p
    return None


def load_plate(run_dir: Path, rep: dict[str, Any]) -> PlateData:
    """Read the wells (and, when present, fields and the cell sample) of a plate run folder."""
    from ..profiling.table import feature_columns, read_embeddings

    s = dict(rep.get("provenance", {}).get("plate_settings", {}))
    plan = rep.get("provenance", {}).get("plan") or {}
    for key in ("controls", "positive", "treatment"):  # the resolved queries/columns, not "auto" or None
        if key in plan:
            s[key] = plan[key]
    wells_path = table_file(run_dir, s, "wells")
    if wells_path is None:
        raise MicrosnoopError("plate run folder has no wells table", run_dir)
    wells = read_embeddings(wells_path)
    feats = feature_columns(wells)
    wells = plain(wells)
    well_cols = [c for c in s.get("well", ["Metadata_Plate", "Metadata_Well"]) if c in wells.columns]
    if not well_cols:
        raise MicrosnoopError("the wells table has none of the run's well columns", wells_path)
    if len(well_cols) > 1 and "Metadata_Plate" in well_cols and wells["Metadata_Plate"].nunique() == 1:
        well_cols = [c for c in well_cols if c != "Metadata_Plate"]  # one plate: "A01" reads better
    keys = well_keys(wells, well_cols)
    labels = treatment_labels(wells, s, rep)
    fpath = table_file(run_dir, s, "fields")
    fields = plain(read_embeddings(fpath)) if fpath is not None else None
    cells, cell_feats = None, []
    if (run_dir / CELL_SAMPLE_NAME).exists():
        cells = read_embeddings(run_dir / CELL_SAMPLE_NAME)
        cell_feats = feature_columns(cells)
        cells = plain(cells)
        cells["_key"] = well_keys(cells, well_cols)
        lab = dict(zip(keys, labels))
        cells["_label"] = [lab.get(k, "?") for k in cells["_key"]]
    if fields is not None:
        fields["_key"] = well_keys(fields, well_cols)
    return PlateData(run_dir, rep, s, wells, feats, keys, labels, fields, cells, cell_feats)


def plain(df: pd.DataFrame) -> pd.DataFrame:
    """Categorical metadata (how .h5ad stores it) as plain values, so they sort and compare."""
    for c in df.columns:
        if isinstance(df[c].dtype, pd.CategoricalDtype):
            df[c] = df[c].astype(object)
    return df


def well_keys(df: pd.DataFrame, cols: list[str]) -> np.ndarray:
    return df[cols].astype(str).agg(" ".join, axis=1).to_numpy()


def short(col: str) -> str:
    return col.removeprefix("Metadata_")


def treatment_labels(wells: pd.DataFrame, s: dict[str, Any], rep: dict[str, Any]) -> np.ndarray:
    """"negative control" / "positive control" for the control wells, else the treatment columns' values."""
    from ..profiling.table import select_rows

    tcols = [c for c in (rep.get("treatment_columns") or s.get("treatment") or []) if c in wells.columns]
    if tcols:
        lab = wells[tcols].astype(str).apply(lambda r: ", ".join(f"{short(c)} {r[c]}" for c in tcols), axis=1)
        lab = lab.to_numpy(dtype=object)
    else:
        lab = np.array(["all wells"] * len(wells), dtype=object)
    for query, name in ((s.get("controls"), CONTROL_LABELS[0]), (s.get("positive"), CONTROL_LABELS[1])):
        if query:
            lab[select_rows(wells.reset_index(drop=True), query)] = name
    return lab


def label_order(labels: np.ndarray) -> list[str]:
    uniq = set(map(str, labels))
    return [c for c in CONTROL_LABELS if c in uniq] + sorted(uniq - set(CONTROL_LABELS), key=natural_key)


# ------------------------------------------------------------------------------------------- scores

def well_scores(d: PlateData) -> dict[str, np.ndarray]:
    """Per-well values the plate map can show, aligned with ``d.wells`` (missing ones are left out)."""
    out: dict[str, np.ndarray] = {}
    cs = d.report.get("control_scores")
    if cs is not None and len(cs) == len(d.wells):
        out["control"] = np.asarray(cs, dtype=float)
    if d.fields is not None:
        for name, col in (("cells", "Metadata_Count"), ("found", "Metadata_CellsFound")):
            if col in d.fields.columns:
                per = d.fields.groupby("_key")[col].sum()
                out[name] = np.array([per.get(k, np.nan) for k in d.keys], dtype=float)
    tcols = d.report.get("treatment_columns") or []
    if d.report.get("map") and tcols and all(c in d.wells.columns for c in tcols):
        m = {tuple(str(r[c]) for c in tcols): r["mean_average_precision"] for r in d.report["map"]}
        tk = d.wells[tcols].astype(str).itertuples(index=False, name=None)
        out["map"] = np.array([m.get(tuple(t), np.nan) for t in tk], dtype=float)
    return out


def row_index(v: Any) -> float:
    s = str(v).strip()
    if s.isdigit():
        return int(s) - 1
    if s.isalpha():
        n = 0
        for ch in s.upper():
            n = n * 26 + (ord(ch) - 64)
        return n - 1
    return np.nan


def well_positions(df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray] | None:
    """0-based (row, column) of every well, from Metadata_Row/Column or a well name like B07; None if unknown."""
    if "Metadata_Row" in df.columns and "Metadata_Column" in df.columns:
        rows = df["Metadata_Row"].map(row_index)
        cols = pd.to_numeric(df["Metadata_Column"], errors="coerce") - 1
    elif "Metadata_Well" in df.columns:
        m = df["Metadata_Well"].astype(str).str.extract(r"^\s*([A-Za-z]+)\s*0*(\d+)\s*$")
        rows, cols = m[0].map(row_index), pd.to_numeric(m[1], errors="coerce") - 1
    else:
        return None
    if rows.isna().any() or cols.isna().any() or (rows < 0).any() or (cols < 0).any():
        return None
    return rows.to_numpy(int), cols.to_numpy(int)


def row_name(i: int) -> str:
    s = ""
    i += 1
    while i:
        i, r = divmod(i - 1, 26)
        s = chr(65 + r) + s
    return s


# ------------------------------------------------------------------------------------------ figures

def plate_map_figure(d: PlateData, scores: dict[str, np.ndarray], pos: tuple[np.ndarray, np.ndarray],
                     sel: np.ndarray, default: str, title: str) -> Any:
    """Heat map in the plate's layout; a menu switches the score; N / P mark the control wells."""
    import plotly.graph_objects as go

    r, c = pos[0][sel], pos[1][sel]
    R, C = next(((a, b) for a, b in PLATE_FORMATS if r.max() < a and c.max() < b), (r.max() + 1, c.max() + 1))
    ys, xs = [row_name(i) for i in range(R)], list(range(1, C + 1))
    text = np.full((R, C), "", dtype=object)
    lab = np.full((R, C), "", dtype=object)
    text[r, c], lab[r, c] = d.keys[sel], d.labels[sel]
    grids = {}
    for name, v in scores.items():
        z = np.full((R, C), np.nan)
        z[r, c] = v[sel]
        grids[name] = np.where(np.isfinite(z), z, None).tolist()
    tmpl = lambda n: "<b>%{text}</b><br>%{customdata}<br>" + SCORES[n] + ": %{z:.3f}<extra></extra>"  # noqa: E731
    fig = go.Figure(go.Heatmap(z=grids[default], x=xs, y=ys, text=text.tolist(), customdata=lab.tolist(),
                               hovertemplate=tmpl(default), colorscale="Viridis", xgap=2, ygap=2,
                               colorbar={"title": {"text": SCORES[default], "side": "right"}}))
    marks = [(i, "N") for i in np.flatnonzero(d.labels[sel] == CONTROL_LABELS[0])]
    marks += [(i, "P") for i in np.flatnonzero(d.labels[sel] == CONTROL_LABELS[1])]
    if marks:
        fig.add_trace(go.Scatter(x=[int(c[i]) + 1 for i, _ in marks], y=[ys[r[i]] for i, _ in marks],
                                 text=[m for _, m in marks], mode="text", hoverinfo="skip", showlegend=False,
                                 textfont={"color": "white", "size": 11}))
    buttons = [{"label": SCORES[n], "method": "restyle",
                "args": [{"z": [grids[n]], "hovertemplate": tmpl(n), "colorbar.title.text": SCORES[n]}, [0]]}
               for n in scores]
    fig.update_layout(title=title, height=90 + 40 * R, width=min(1100, 160 + 56 * C), margin={"t": 90},
                      yaxis={"autorange": "reversed", "scaleanchor": "x", "constrain": "domain"},
                      xaxis={"side": "top", "dtick": 1}, plot_bgcolor="#eee",
                      updatemenus=[{"buttons": buttons, "active": list(scores).index(default), "x": 1.0,
                                    "y": 1.2, "xanchor": "right", "yanchor": "bottom"}])
    return fig


def dose_figure(d: PlateData, scores: dict[str, np.ndarray]) -> Any | None:
    """Control-direction score and mAP against the dose, one curve per row block (or treatment series)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    dose = d.settings.get("dose")
    if "control" not in scores or not dose or dose not in d.wells.columns:
        return None
    x = pd.to_numeric(d.wells[dose], errors="coerce")
    if x.isna().all():
        return None
    block = d.settings.get("block")
    tcols = [t for t in (d.report.get("treatment_columns") or []) if t != dose and t in d.wells.columns]
    gcols = [block] if block and block in d.wells.columns else tcols
    groups = d.wells[gcols].astype(str).agg(" ".join, axis=1) if gcols else pd.Series(["all"] * len(d.wells))
    names = sorted(groups.unique(), key=natural_key)
    col = palette(names)
    fig = make_subplots(1, 2, subplot_titles=["control-direction score of each well", "mAP of each treatment"])
    symbols = np.where(d.labels == CONTROL_LABELS[0], "x", np.where(d.labels == CONTROL_LABELS[1], "diamond", "circle"))
    for g in names:
        m = (groups == g).to_numpy() & x.notna().to_numpy()
        y = scores["control"][m]
        fig.add_trace(go.Scatter(x=x[m], y=y, mode="markers", name=f"{g}", legendgroup=g, customdata=d.keys[m],
                                 text=d.labels[m], marker={"color": col[g], "symbol": symbols[m], "size": 8},
                                 hovertemplate="<b>%{customdata}</b><br>%{text}<br>score %{y:.3f}<extra></extra>"),
                      1, 1)
        mean = pd.Series(y).groupby(x[m].to_numpy()).mean()
        fig.add_trace(go.Scatter(x=mean.index, y=mean.values, mode="lines", legendgroup=g, showlegend=False,
                                 line={"color": col[g]}, hoverinfo="skip"), 1, 1)
    rows = [r for r in d.report.get("map", []) if dose in r]
    for g in names:
        pts = [r for r in rows if " ".join(str(r.get(c)) for c in gcols) == g] if gcols else rows
        pts = sorted(((float(r[dose]), r["mean_average_precision"]) for r in pts
                      if re.fullmatch(r"-?[\d.]+", str(r[dose]))))
        if pts:
            fig.add_trace(go.Scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="lines+markers",
                                     legendgroup=g, showlegend=False, marker={"color": col[g]}, name=g,
                                     hovertemplate=g + ", dose %{x}: mAP %{y:.3f}<extra></extra>"), 1, 2)
    fig.update_xaxes(title_text=dose.removeprefix("Metadata_"))
    fig.update_yaxes(title_text="score (0 = negative controls)", row=1, col=1)
    fig.update_yaxes(title_text="mAP", range=[0, 1.05], row=1, col=2)
    fig.update_layout(height=420, title="Dose response (x: negative control, diamond: positive control)",
                      legend={"title": {"text": ", ".join(map(short, gcols)) or "wells"}})
    return fig


def maps_figure(d: PlateData) -> tuple[Any, str]:
    """2-D maps of the well profiles and of the sampled cells, coloured by treatment; (figure, method)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from .report import embedding_2d

    xy, used = embedding_2d(d.wells[d.feats].to_numpy(np.float32), "umap")
    panels = [("wells", xy, d.keys, d.labels, None)]
    if d.cells is not None and len(d.cells) >= 3:
        cxy, cused = embedding_2d(d.cells[d.cell_feats].to_numpy(np.float32), "umap")
        cid = d.cells.get("Metadata_CellId", pd.Series(range(len(d.cells)))).astype(str).to_numpy()
        panels.append(("cells", cxy, d.cells["_key"].to_numpy(), d.cells["_label"].to_numpy(), cid))
    titles = [f"{len(d.wells)} wells: {used} of the well profiles"]
    if len(panels) > 1:
        titles.append(f"{len(d.cells)} cells (a sample per field): {cused} of their embeddings")
    fig = make_subplots(1, len(panels), subplot_titles=titles, horizontal_spacing=0.06)
    order = label_order(np.concatenate([p[3] for p in panels]))
    col = palette(order)
    for j, (kind, pts, keys, labels, cid) in enumerate(panels, start=1):
        for lab in order:
            m = labels == lab
            if not m.any():
                continue
            extra = ("<br>cell %{text}" if cid is not None else "")
            fig.add_trace(go.Scatter(
                x=pts[m, 0], y=pts[m, 1], mode="markers", name=lab, legendgroup=lab, showlegend=j == 1,
                customdata=keys[m], text=cid[m] if cid is not None else None,
                marker={"color": col[lab], "size": 9 if kind == "wells" else 5, "opacity": 0.85},
                hovertemplate="<b>%{customdata}</b><br>" + html.escape(lab) + extra + "<extra></extra>"), 1, j)
    fig.update_xaxes(showticklabels=False)
    fig.update_yaxes(showticklabels=False)
    fig.update_layout(height=520, title="Maps coloured by treatment (hover a point to see its well's cells)",
                      legend={"title": {"text": "treatment"}})
    return fig, used


def montages(d: PlateData) -> dict[str, str]:
    """Well key -> a small PNG (data URI) of the first crops of its first field's preview montage."""
    from PIL import Image

    from ..pipelines.fields import field_key

    prev = d.run_dir / "previews"
    if d.fields is None or not prev.is_dir():
        return {}
    prov = d.report.get("provenance", {})
    sta = (prov.get("field_mode") or {}).get("Sta")
    n_ch = len(prov.get("channels") or []) or 1
    out: dict[str, str] = {}
    meta = d.fields.drop(columns=["_key"])
    for i in range(len(d.fields)):
        key = d.fields["_key"].iat[i]
        path = prev / f"{field_key(meta.iloc[i], i)}.png"
        if key in out or not path.exists():
            continue
        with Image.open(path) as im:
            im = im.convert("L")
            if sta:  # the first row's first tiles (one tile = one cell, its channels side by side)
                th, tw = int(sta) + 2, n_ch * (int(sta) + 2)
                im = im.crop((0, 0, min(im.width, MONTAGE_TILES * tw), min(im.height, th)))
            if im.height > MONTAGE_HEIGHT:
                im = im.resize((max(1, round(im.width * MONTAGE_HEIGHT / im.height)), MONTAGE_HEIGHT),
                               Image.Resampling.LANCZOS)
            buf = io.BytesIO()
            im.save(buf, format="PNG", optimize=True)
        out[key] = png_data_uri(buf.getvalue())
    return out


def zprime_table(d: PlateData, scores: dict[str, np.ndarray]) -> pd.DataFrame:
    rep = d.report
    rows = [("Z' (negative vs positive controls, control direction)", rep.get("z_prime"))]
    if "control" in scores:
        for lab in CONTROL_LABELS:
            v = scores["control"][d.labels == lab]
            if len(v):
                rows += [(f"{lab}s: wells", len(v)), (f"{lab}s: mean score", float(v.mean())),
                         (f"{lab}s: SD of score", float(v.std(ddof=1)) if len(v) > 1 else np.nan)]
    rows += [("mean mAP over treatments", rep.get("mean_map")),
             ("treatments retrieved (corrected p < 0.05)", rep.get("fraction_retrieved")),
             ("wells", rep.get("n_wells")), ("fields", rep.get("n_fields")), ("cells embedded", rep.get("n_cells")),
             ("model", f"{rep.get('model')} (sha256 {str(rep.get('model_sha256'))[:16]})")]
    return pd.DataFrame([(k, fmt_value(v)) for k, v in rows if v is not None], columns=["metric", "value"])


def fmt_value(v: Any) -> str:
    if isinstance(v, (float, np.floating)):
        return "" if not np.isfinite(v) else f"{v:.3f}"
    return str(v)


def dose_table(rep: dict[str, Any]) -> pd.DataFrame | None:
    rows = []
    allw, series = rep.get("dose_spearman", {}), rep.get("dose_spearman_series_only", {})
    for blk in sorted(set(allw) | set(series), key=natural_key):
        a, s = allw.get(blk, {}), series.get(blk, {})
        rows.append({"block": blk, "rho (all wells)": a.get("rho"), "p (all wells)": a.get("p"),
                     "n (all wells)": a.get("n"), "rho (dose series only)": s.get("rho"),
                     "p (dose series only)": s.get("p"), "n (dose series only)": s.get("n")})
    return pd.DataFrame(rows) if rows else None


def map_table(rep: dict[str, Any]) -> pd.DataFrame | None:
    if not rep.get("map"):
        return None
    df = pd.DataFrame(rep["map"])
    tcols = [c for c in rep.get("treatment_columns", []) if c in df.columns]
    df = df.iloc[sorted(range(len(df)), key=lambda i: [natural_key(df[c].iat[i]) for c in tcols])]
    df = df.rename(columns={c: short(c) for c in tcols} | {"mean_average_precision": "mAP", "p_value": "p",
                                                           "corrected_p_value": "corrected p",
                                                           "below_corrected_p": "significant", "n_wells": "wells"})
    return df


def plate_page(run_dir: Path, rep: dict[str, Any], score: str = "control") -> str:
    """The whole plate report page (HTML text)."""
    d = load_plate(run_dir, rep)
    scores = well_scores(d)
    body = [f"<h1>Plate report: {html.escape(str(run_dir.resolve().name))}</h1>",
            f"<p class='note'>microsnoop plate run in <code>{html.escape(str(run_dir.resolve()))}</code>; "
            f"model <code>{html.escape(str(rep.get('model')))}</code>. Hover a well on any plot to see its cells "
            f"(top right).</p>", "<h2>Summary and Z'</h2>", table_html(zprime_table(d, scores), "zprime-table")]
    pos = well_positions(d.wells)
    body.append("<h2>Plate map</h2>")
    if pos is None or not scores:
        body.append("<p class='note'>no plate layout (well names / row and column columns) or no score to map.</p>")
    else:
        default = score if score in scores else next(iter(scores))
        plates = d.wells["Metadata_Plate"].astype(str) if "Metadata_Plate" in d.wells.columns else pd.Series([""] * len(d.wells))
        for j, p in enumerate(sorted(plates.unique(), key=natural_key)):
            sel = (plates == p).to_numpy()
            fig = plate_map_figure(d, scores, pos, sel, default, f"Plate {p}" if p else "Plate")
            body.append(figure_html(fig, "plate-map" if j == 0 else f"plate-map-{j + 1}", hover=True))
    fig = dose_figure(d, scores)
    if fig is not None:
        body += ["<h2>Dose response</h2>", figure_html(fig, "dose-response", hover=True)]
    dt = dose_table(rep)
    if dt is not None:
        body += ["<p>Spearman correlation of the control-direction score with the dose, per row block:</p>",
                 table_html(dt, "dose-table")]
    body.append("<h2>Maps of the embeddings</h2>")
    fig, _ = maps_figure(d)
    body.append(figure_html(fig, "maps", hover=True))
    mt = map_table(rep)
    body.append("<h2>mAP per treatment</h2>")
    body.append(table_html(mt, "map-table") if mt is not None else
                f"<p class='note'>{html.escape(str(rep.get('map_error') or rep.get('note') or 'no mAP computed'))}</p>")
    body += ["<h2>Run details</h2>", "<details><summary>timings, settings and provenance</summary><pre>"
             + html.escape(json.dumps({k: rep.get(k) for k in ("timings", "provenance")}, indent=1, default=str))
             + "</pre></details>"]
    return page_html(f"Plate report: {run_dir.resolve().name}", body, montages(d))
