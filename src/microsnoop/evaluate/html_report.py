"""One self-contained HTML report per run (``microsnoop report RUN_DIR``), for a browser with no network.

Plotly draws every figure (its JavaScript is inlined once, about 4.8 MB); images (crop montages,
benchmark PNGs) are inlined as base64 PNGs, so the file can be mailed to a colleague and opened
anywhere.

- **Plate runs** (``microsnoop plate``): a plate-layout heat map of a chosen score (control-direction
  score, cells embedded, cells found, the treatment's mAP), dose-response plots per row block /
  treatment series, 2-D maps (UMAP, PCA when umap-learn is missing) of the well profiles and of a
  sample of cells coloured by treatment, and the Z', mAP and dose-correlation tables. Hovering a well
  (on any plot) shows its crop montage (the run's ``previews/``) beside the plots.
- **Benchmark runs** (``microsnoop benchmark``): the score tables, a bar chart per set, the maps and
  confusion matrices (interactive from ``figures/*_plotdata.json``, else the PNGs).

``plate`` and ``benchmark`` call :func:`write_html_report_safely` at their end: a failure to render
the report is a warning, never a failed run.
"""
from __future__ import annotations

import base64
import html
import io
import json
import re
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from ..core.errors import MicrosnoopError
from ..io.atomic import atomic_path

REPORT_NAME = "report.html"
CELL_SAMPLE_NAME = "cells_sample.parquet"
CELLS_PER_FIELD = 16          # cells per field kept for the report's cell map
MONTAGE_HEIGHT = 66           # px: montage rows are scaled to this height (a 64 px crop + its frame)
MONTAGE_TILES = 4             # crops per well shown on hover
SCORES = {"control": "control-direction score", "cells": "cells embedded", "found": "cells found",
          "map": "mAP of the well's treatment"}

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 2em 2em 2em;color:#222;max-width:1200px}
body.with-montage{margin-right:330px}
h1{font-size:1.6em}h2{font-size:1.25em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table.tbl{border-collapse:collapse;font-size:.85em;margin:.5em 0 1em}
table.tbl th,table.tbl td{border:1px solid #ccc;padding:3px 8px;text-align:right}
table.tbl th{background:#f3f3f3}table.tbl td:first-child,table.tbl th:first-child{text-align:left}
.note{color:#666;font-size:.85em}.figs img{max-width:100%;margin:4px 0}
#montage{position:fixed;right:12px;top:12px;width:300px;background:#fff;border:1px solid #bbb;padding:8px;
 font-size:.85em;box-shadow:0 1px 4px rgba(0,0,0,.15)}#montage img{width:100%;image-rendering:pixelated;display:none}
details pre{font-size:.75em;white-space:pre-wrap;background:#f7f7f7;padding:.5em}
"""

HOVER_JS = """
function microsnoopHover(gd){
  var imgs=null;
  gd.on('plotly_hover',function(ev){
    if(imgs===null){var el=document.getElementById('montage-data');imgs=el?JSON.parse(el.textContent):{};}
    var p=ev.points[0],k=(p.data.type==='heatmap')?p.text:p.customdata;
    if(Array.isArray(k))k=k[0];
    if(k===undefined||k===null||k==='')return;
    var box=document.getElementById('montage');
    box.querySelector('.well').textContent=k;
    var img=box.querySelector('img');
    if(imgs[k]){img.src=imgs[k];img.style.display='block';}else{img.removeAttribute('src');img.style.display='none';}
  });
}
"""


# --------------------------------------------------------------------------------------- entry points

def write_html_report(run_dir: str | Path, output: str | Path | None = None, score: str = "control") -> Path:
    """Render ``RUN_DIR/report.html`` (or ``output``) from a plate or benchmark run folder.

    Parameters
    ----------
    run_dir
        A folder written by ``microsnoop plate`` or ``microsnoop benchmark`` (it holds ``report.json``).
    output
        The HTML file to write (default ``RUN_DIR/report.html``).
    score
        Plates: the score the plate map opens on (``control``, ``cells``, ``found`` or ``map``); the
        others are one click away in the map's menu.

    Returns
    -------
    Path
        The written HTML file.
    """
    try:
        import plotly  # noqa: F401
    except ImportError:
        raise MicrosnoopError("report.html needs plotly: pip install 'microsnoop[report]'") from None
    run_dir = Path(run_dir)
    rep_path = run_dir / "report.json"
    if not rep_path.exists():
        raise MicrosnoopError("not a plate or benchmark run folder: no report.json", run_dir)
    if score not in SCORES:
        raise MicrosnoopError(f"--score must be one of {', '.join(SCORES)}, not '{score}'")
    try:
        rep = json.loads(rep_path.read_text())
    except json.JSONDecodeError as exc:
        raise MicrosnoopError(f"invalid JSON: {exc}", rep_path) from None
    if "records" in rep and "datasets" in rep:
        from .html_benchmark import benchmark_page

        page = benchmark_page(run_dir, rep)
    elif "n_wells" in rep:
        from .html_plate import plate_page

        page = plate_page(run_dir, rep, score)
    else:
        raise MicrosnoopError("report.json is neither a plate nor a benchmark report", rep_path)
    out = Path(output) if output else run_dir / REPORT_NAME
    with atomic_path(out) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return out


def write_html_report_safely(run_dir: str | Path, **kwargs: Any) -> Path | None:
    """:func:`write_html_report`, but a failure is a warning (the run's results are already written)."""
    try:
        return write_html_report(run_dir, **kwargs)
    except Exception as exc:  # noqa: BLE001 - a report must never fail the run it describes
        warnings.warn(f"report.html not written ({type(exc).__name__}: {exc}); "
                      f"retry with `microsnoop report {run_dir}`", UserWarning, stacklevel=2)
        return None


def plate_report_safely(run_dir: str | Path, cells: pd.DataFrame | None, features: Sequence[str]) -> dict[str, Path]:
    """What ``run_plate`` calls last: keep a sample of cells for the cell map, then write report.html.

    Never raises: problems are warnings. Returns the files written (``cells_sample``, ``report_html``).
    """
    files: dict[str, Path] = {}
    try:
        sample = save_cell_sample(cells, features, run_dir)
        if sample is not None:
            files["cells_sample"] = sample
    except Exception as exc:  # noqa: BLE001
        warnings.warn(f"{CELL_SAMPLE_NAME} not written ({type(exc).__name__}: {exc})", UserWarning, stacklevel=2)
    page = write_html_report_safely(run_dir)
    if page is not None:
        files["report_html"] = page
    return files


def save_cell_sample(cells: pd.DataFrame | None, features: Sequence[str], run_dir: str | Path,
                     per_field: int = CELLS_PER_FIELD) -> Path | None:
    """The first ``per_field`` embedded cells of every field (those the crop montage shows come first).

    Parameters
    ----------
    cells
        The plate's per-cell frame (``Metadata_FieldIndex`` + features); None writes nothing.
    features
        Feature columns.
    run_dir
        The run folder; the sample goes to ``cells_sample.parquet``.
    per_field
        Cells kept per field.

    Returns
    -------
    Path or None
        The written file, or None when there were no cells (whole-field modes).
    """
    from ..profiling.table import write_profiles

    if cells is None or len(cells) == 0 or "Metadata_FieldIndex" not in cells.columns:
        return None
    sample = cells.groupby("Metadata_FieldIndex", sort=False).head(per_field).reset_index(drop=True)
    prov = {"level": "cells_sample", "note": f"first {per_field} embedded cells of each field, for report.html"}
    return write_profiles(Path(run_dir) / CELL_SAMPLE_NAME, sample, list(features), prov, fmt="parquet")


# ------------------------------------------------------------------------------------------ page shell

def page_html(title: str, body: list[str], montages: dict[str, str] | None = None) -> str:
    """The whole document: Plotly's JavaScript once, the hover handler, the montage box and the body."""
    from plotly.offline import get_plotlyjs

    head = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
            f"<style>{CSS}</style>", f"<script type='text/javascript'>{get_plotlyjs()}</script>",
            f"<script type='text/javascript'>{HOVER_JS}</script></head>"]
    extra = ["<body>" if montages is None else "<body class='with-montage'>"]
    if montages is not None:
        data = json.dumps(montages).replace("</", "<\\/")
        extra += [f"<script type='application/json' id='montage-data'>{data}</script>",
                 "<div id='montage'><b>Hover a well or a cell</b><div class='well'></div><img alt='crops'>"
                 "<div class='note'>crops of the well: each tile is one cell, its channels side by side</div></div>"]
    return "\n".join(head + extra + body + ["</body></html>"])


def figure_html(fig: Any, div_id: str, hover: bool = False) -> str:
    """One Plotly figure as a <div> (no JavaScript library: the page carries it once)."""
    import plotly.io as pio

    post = "microsnoopHover(document.getElementById('{plot_id}'));" if hover else None
    return pio.to_html(fig, include_plotlyjs=False, full_html=False, div_id=div_id, post_script=post,
                       config={"displaylogo": False, "responsive": True})


def table_html(df: pd.DataFrame, table_id: str, digits: int = 3) -> str:
    """A DataFrame as an escaped HTML table; floats to ``digits`` significant digits."""
    out = df.copy()
    for c in out.columns:
        if pd.api.types.is_float_dtype(out[c]):
            out[c] = out[c].map(lambda v: "" if pd.isna(v) else f"{v:.{digits}g}" if abs(v) < 1e-3 and v != 0
                                else f"{v:.{digits}f}")
    return out.to_html(index=False, table_id=table_id, classes="tbl", border=0, escape=True, na_rep="")


def png_data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def natural_key(s: str) -> list[Any]:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", str(s))]


def palette(labels: Sequence[str]) -> dict[str, str]:
    from plotly.colors import qualitative

    colours = qualitative.Dark24 + qualitative.Light24
    return {lab: colours[i % len(colours)] for i, lab in enumerate(labels)}

