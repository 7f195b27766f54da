"""A whole plate end to end: manifest -> segment -> crop cells -> embed -> fields -> wells -> profiles -> report.

``run_plate`` takes a CellProfiler LoadData manifest (one row per field, ``FileName_<channel>`` and
``Metadata_*`` columns) and writes, into one output folder:

- ``cells.<fmt>`` (optional): one row per cell (field, cell id, centroid, bbox, area + features);
- ``fields.<fmt>``: the mean of each field's cell vectors;
- ``wells_raw.<fmt>``: fields averaged per well (``--well`` columns), before any normalisation;
- ``wells.<fmt>``: well profiles normalised and/or sphered against the negative-control wells;
- ``treatments.<fmt>``: those profiles averaged per treatment;
- ``report.html``: the same in a browser (plate map, dose response, maps, crops), with
  ``cells_sample.parquet`` (a few cells per field for its cell map) and ``previews/`` (crop montages);
- ``report.json`` / ``report.md``: Z' between negative and positive controls along the control
  direction, Spearman of that direction with the dose in each row block, mAP per treatment (copairs).

Every step (segmentation, cropping, model and its sha256, aggregation, normalisation, sphering with
its knee epsilon) is recorded in each output's provenance and in ``report.json``.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from ..errors import MicrosnoopError
from ..io.atomic import atomic_path
from ..profiling.aggregate import aggregate, aggregate_step
from ..profiling.pipeline import ProfileSettings, profile_frame
from ..profiling.table import feature_columns, select_rows, write_profiles

TREATMENT_CANDIDATES = (("Metadata_Treatment",), ("Metadata_Compound", "Metadata_Dose"),
                        ("Metadata_RowBlock", "Metadata_DoseIndex"), ("Metadata_DoseIndex",))


@dataclass
class PlateSettings:
    """Everything ``microsnoop plate`` can be told; recorded verbatim in the report."""

    channels: Sequence[str] | None = None             # channels to embed (default: all FileName_* columns)
    segment_channel: str = "DNA"
    segmenter: str = "cellpose"                       # cellpose | classical | masks | centres
    masks: str | None = None                          # segmenter masks: manifest column or folder of label images
    centres: str | None = None                        # segmenter centres: CSV with *_Location_Center_X/Y
    centre_size: int | None = None                    # crop side around each given centre (px)
    keep_border: bool = False                         # also crop cells touching the field's border
    preview: int = 4                                  # save a montage of this many crops per field (report.html)
    save_masks: bool = False                          # keep each field's label image (masks/<field>.tif)
    threads: int | None = None                        # torch CPU threads (None: all this process may use)
    segment_precision: str = "auto"                   # Cellpose network: auto (bf16 where native) | fp32 | bf16
    diameter: float | None = None
    mode: str = "crop"                                # crop | rescale | tile
    rescale_constant: float | None = None             # None: the crop module's default
    crop_size: int | None = None                      # Sta; None: the crop module's default
    max_cells: int | None = None                      # per field, seeded random subset (None: all)
    model: str | None = None
    batch_size: int = 64
    device: str = "auto"
    precision: str = "fp32"
    well: Sequence[str] = ("Metadata_Plate", "Metadata_Well")
    controls: str = 'Metadata_Control == "negative"'
    positive: str | None = 'Metadata_Control == "positive"'
    normalize: str | None = None
    sphere: bool = True
    sphere_by: Sequence[str] | None = ("Metadata_Plate",)
    treatment: Sequence[str] | None = None            # None: inferred from TREATMENT_CANDIDATES
    dose: str | None = "Metadata_DoseIndex"
    block: str | None = "Metadata_RowBlock"
    fmt: str = "parquet"
    save_cells: bool = False
    seed: int = 0
    map_null_size: int = 10000


@dataclass
class PlateResult:
    output: Path
    files: dict[str, Path]
    report: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)


def infer_treatment(df: pd.DataFrame, treatment: Sequence[str] | None) -> list[str]:
    if treatment:
        missing = [c for c in treatment if c not in df.columns]
        if missing:
            raise MicrosnoopError(f"treatment column(s) {', '.join(missing)} not in the manifest")
        return list(treatment)
    for cand in TREATMENT_CANDIDATES:
        if all(c in df.columns for c in cand):
            return list(cand)
    raise MicrosnoopError("cannot tell the treatment columns; pass --treatment (e.g. Metadata_Compound,Metadata_Dose)")


def profile_wells(fields: pd.DataFrame, feats: list[str], s: PlateSettings) -> dict[str, Any]:
    """Fields -> wells_raw -> wells (normalised/sphered) -> treatments, plus the plate metrics."""
    well = [c for c in s.well if c in fields.columns]
    if not well:
        raise MicrosnoopError(f"none of the well columns {', '.join(s.well)} is in the manifest")
    wells_raw = aggregate(fields, well, feats)
    steps = [aggregate_step(well, "mean", len(fields), len(wells_raw))]
    treatment = infer_treatment(wells_raw, s.treatment)
    ps = ProfileSettings(controls=s.controls, normalize=s.normalize, sphere=s.sphere, sphere_by=s.sphere_by,
                         treatment=treatment, features=feats)
    wells, treats, more = profile_frame(wells_raw, ps)
    steps += more
    report = evaluate_wells(wells, feats, s, treatment)
    return {"wells_raw": wells_raw, "wells": wells, "treatments": treats, "steps": steps, "report": report}


def evaluate_wells(wells: pd.DataFrame, feats: list[str], s: PlateSettings, treatment: list[str]) -> dict[str, Any]:
    from ..evaluate.plate import evaluate_plate

    neg = select_rows(wells, s.controls)
    if s.positive is None:
        return {"n_wells": len(wells), "note": "no positive controls given: Z' and dose Spearman not computed"}
    pos = select_rows(wells, s.positive)
    rep = evaluate_plate(wells, feats, neg, pos, dose=s.dose, block=s.block, treatment=treatment,
                         null_size=s.map_null_size)
    rep["treatment_columns"] = treatment
    return rep


def embed_fields(manifest: str | Path, s: PlateSettings, progress: Callable[[int], None] | None = None,
                 aux_dir: Path | None = None) -> tuple[pd.DataFrame | None, pd.DataFrame, list[str], dict[str, Any]]:
    """Segment, crop, embed every field: (per-cell frame or None, per-field frame, features, provenance).

    Delegates to :mod:`microsnoop.pipelines.fields`, which owns segmentation and cropping.
    """
    from . import fields as fields_mod

    return fields_mod.plate_fields(manifest, s, progress=progress, aux_dir=aux_dir)


def run_plate(manifest: str | Path, output: str | Path, settings: PlateSettings | None = None,
              overwrite: bool = False, command: str | None = None,
              progress: Callable[[int], None] | None = None) -> PlateResult:
    """The whole plate pipeline; returns the written files and the report dict."""
    s = settings or PlateSettings()
    output = Path(output)
    if (output / "report.json").exists() and not overwrite:
        raise MicrosnoopError("output folder already holds a finished run (use --overwrite to replace it)", output)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    # previews and masks are written to a staging folder and moved into the output only on success
    aux = output.parent / f".{output.name}.aux-partial" if (s.preview or s.save_masks) else None
    if aux is not None and aux.exists():
        shutil.rmtree(aux)
    try:
        cells, fields, feats, prov = embed_fields(manifest, s, progress, aux_dir=aux)
        timings["segment_crop_embed_s"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        res = profile_wells(fields, feats, s)
    except BaseException:
        if aux is not None and aux.exists():
            shutil.rmtree(aux)
        raise
    timings["profile_evaluate_s"] = time.perf_counter() - t1
    prov = {**prov, "plate_settings": _jsonable(asdict(s)), "profiling": res["steps"]}
    if command:
        prov["command"] = command
    ext = {"parquet": ".parquet", "h5": ".h5", "h5ad": ".h5ad"}[s.fmt]
    files: dict[str, Path] = {}
    output.mkdir(parents=True, exist_ok=True)
    tables = {"cells": cells if s.save_cells else None, "fields": fields, "wells_raw": res["wells_raw"],
              "wells": res["wells"], "treatments": res["treatments"]}
    for name, df in tables.items():
        if df is not None:
            files[name] = write_profiles(output / f"{name}{ext}", df, feats, {**prov, "level": name})
    timings["total_s"] = time.perf_counter() - t0
    report = {**res["report"], "model": prov.get("model"), "model_sha256": prov.get("sha256"),
              "n_fields": int(len(fields)), "n_cells": int(fields.get("Metadata_Count", pd.Series([0])).sum()),
              "timings": timings, "provenance": prov, "files": {k: str(v) for k, v in files.items()}}
    if aux is not None:
        for sub in ("previews", "masks"):
            if (aux / sub).exists():
                if (output / sub).exists():
                    shutil.rmtree(output / sub)
                (aux / sub).rename(output / sub)
                files[sub] = output / sub
        shutil.rmtree(aux, ignore_errors=True)
        report["files"] = {k: str(v) for k, v in files.items()}
    files["report_json"] = _write_text(output / "report.json", json.dumps(_jsonable(report), indent=1))
    files["report_md"] = _write_text(output / "report.md", render_markdown(report))
    from ..evaluate.html_report import plate_report_safely  # never fails the run: a warning at worst

    files.update(plate_report_safely(output, cells, feats))
    return PlateResult(output, files, report, timings)


def _write_text(path: Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def render_markdown(rep: dict[str, Any]) -> str:
    """A human-readable summary of the plate report."""
    lines = [f"# Plate report", "", f"- model: `{rep.get('model')}` (sha256 `{str(rep.get('model_sha256'))[:16]}`)",
             f"- fields: {rep.get('n_fields')}, cells: {rep.get('n_cells')}, wells: {rep.get('n_wells')} "
             f"({rep.get('n_negative')} negative, {rep.get('n_positive')} positive controls)"]
    if "z_prime" in rep:
        lines.append(f"- Z' (negative vs positive controls, along mean(pos) - mean(neg)): **{rep['z_prime']:.3f}**")
    for key, label in (("dose_spearman", "all wells of the block"), ("dose_spearman_series_only", "dose-series wells only")):
        for blk, r in rep.get(key, {}).items():
            lines.append(f"- Spearman(control-direction score, dose), row block {blk}, {label}: "
                         f"rho = {r['rho']:.3f} (p = {r['p']:.2g}, n = {r['n']})")
    if "mean_map" in rep:
        lines += ["", f"## mAP per treatment (copairs, replicates vs negative controls): mean {rep['mean_map']:.3f}, "
                  f"{rep['fraction_retrieved']:.0%} significant (corrected p < 0.05)", ""]
        tcols = rep.get("treatment_columns", [])
        lines.append("| " + " | ".join(tcols + ["mAP", "corrected p", "wells"]) + " |")
        lines.append("|" + "---|" * (len(tcols) + 3))
        for r in rep["map"]:
            lines.append("| " + " | ".join([str(r[c]) for c in tcols] + [f"{r['mean_average_precision']:.3f}",
                                                                        f"{r['corrected_p_value']:.3g}", str(r['n_wells'])]) + " |")
    t = rep.get("timings", {})
    if t:
        lines += ["", "## Timings", ""] + [f"- {k}: {v:.1f}" for k, v in t.items()]
    steps = rep.get("provenance", {}).get("profiling", [])
    if steps:
        lines += ["", "## Steps", ""] + [f"- {json.dumps(_jsonable(st))}" for st in steps]
    return "\n".join(lines) + "\n"
