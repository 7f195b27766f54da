"""A whole plate end to end: manifest -> segment -> crop cells -> embed -> fields -> wells -> profiles -> report.

This workflow chains the layers: the field loop (:mod:`microsnoop.pipelines.plate_fields`), then
profiling (aggregate, normalise, sphere), then the plate metrics and reports (:mod:`microsnoop.evaluate`).

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

The input is a LoadData manifest or an OME-Zarr HCS plate (with ``metadata``, a plate map). Options
are checked against the plate's metadata before any field is processed; finished fields are kept as
they finish and each table is written as soon as it exists, so a later failure loses nothing and
``resume`` continues; ``shard``/``merge`` split the fields over processes (see
:mod:`microsnoop.pipelines.fieldstore`).
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

from ..core.errors import MicrosnoopError
from ..embed import defaults
from ..io.atomic import atomic_path
from ..profiling.aggregate import aggregate, aggregate_step
from ..profiling.table import select_rows, write_profiles

STAGES = ("cells", "fields", "wells_raw", "wells", "treatments")
EXTENSIONS = {"parquet": ".parquet", "h5": ".h5", "h5ad": ".h5ad"}


@dataclass
class PlateSettings:
    """Everything ``microsnoop plate`` can be told; recorded verbatim in the report."""

    channels: Sequence[str] | None = None             # channels to embed (default: all the plate's channels)
    segment_channel: str = "DNA"                      # the nucleus channel
    cyto_channel: str | None = None                   # whole cells: cytoplasm/membrane channel, with the nucleus
    segmenter: str = "cellpose"                       # cellpose | classical | masks | centres
    masks: str | None = None                          # segmenter masks: manifest column or folder of label images
    centres: str | None = None                        # segmenter centres: CSV with *_Location_Center_X/Y
    centre_size: int | None = None                    # crop side around each given centre (px)
    keep_border: bool = False                         # also crop cells touching the field's border
    preview: int = 4                                  # save a montage of this many crops per field (report.html)
    save_masks: bool = False                          # keep each field's label image (masks/<field>.tif)
    threads: int | None = None                        # torch CPU threads (None: all this process may use)
    segment_precision: str = "auto"                   # Cellpose network: auto (bf16 where native) | fp32 | bf16
    engine: str = "auto"                              # CPU inference engine: auto | torch | openvino | onnxruntime
    diameter: float | None = None
    mode: str = "crop"                                # crop | rescale | tile
    rescale_constant: float | None = None             # None: the crop module's default
    crop_size: int | None = None                      # Sta; None: the crop module's default
    max_cells: int | None = None                      # per field, seeded random subset (None: all)
    model: str | None = None
    batch_size: int | None = defaults.BATCH_SIZE     # the embedding defaults of embed/defaults.py
    device: str = defaults.DEVICE
    precision: str = defaults.PRECISION
    metadata: str | None = None                       # plate map CSV joined on the wells (OME-Zarr plates)
    well: Sequence[str] = ("Metadata_Plate", "Metadata_Well")
    controls: str | None = None                       # None: inferred (a column saying negative/DMSO/mock)
    positive: str | None = "auto"                     # "auto": inferred (a column saying positive); None: none
    normalize: str | None = None
    sphere: bool = True
    sphere_by: Sequence[str] | None = ("Metadata_Plate",)
    treatment: Sequence[str] | None = None            # None: inferred (compound/treatment + dose/concentration)
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
    """Treatment columns of ``df``: given (checked) or inferred; a clear error when none can be told."""
    from .plate_checks import infer_treatment as infer

    cols = infer(df.columns, treatment)
    if cols is None:
        raise MicrosnoopError("cannot tell the treatment columns; pass --treatment (e.g. Metadata_Compound,Metadata_Dose)")
    return cols


def profile_wells(fields: pd.DataFrame, feats: list[str], s: PlateSettings, plan: Any = None,
                  on_stage: Callable[[str, pd.DataFrame, list[dict]], None] | None = None) -> dict[str, Any]:
    """Fields -> wells_raw -> wells (normalised/sphered) -> treatments, plus the plate metrics.

    Each table is handed to ``on_stage`` as soon as it exists. Steps the plate cannot support (sphering
    with too few controls, metrics without positive controls or treatments) are skipped with a warning
    in ``warnings`` rather than aborting the run; ``plan`` (a :class:`~.plate_checks.PlatePlan`) holds
    the resolved columns, else they are resolved here."""
    from ..profiling.normalize import normalize, normalize_step
    from ..profiling.sphere import sphere, sphere_step
    from .plate_checks import check_columns

    plan = plan or check_columns(fields, s)
    warns: list[str] = []
    wells_raw = aggregate(fields, plan.well, feats)
    steps = [aggregate_step(plan.well, "mean", len(fields), len(wells_raw))]
    if on_stage:
        on_stage("wells_raw", wells_raw, steps)
    wells = wells_raw
    if plan.normalize:
        by = [c for c in ("Metadata_Plate",) if c in wells.columns] or None
        wells = normalize(wells, plan.normalize, samples=plan.controls, by=by, features=feats)
        steps.append(normalize_step(plan.normalize, plan.controls, by, int(select_rows(wells, plan.controls).sum())))
    if plan.sphere:
        by = [c for c in (s.sphere_by or []) if c in wells.columns] or None
        try:
            wells, fits = sphere(wells, samples=plan.controls, by=by, features=feats, epsilon="knee")
            steps.append(sphere_step(plan.controls, by, "knee", fits))
        except MicrosnoopError as exc:
            warns.append(f"sphering skipped ({exc}); wells are profiled unsphered")
    if on_stage:
        on_stage("wells", wells, steps)
    treats = None
    if plan.treatment:
        treats = aggregate(wells, plan.treatment, feats)
        steps.append(aggregate_step(plan.treatment, "mean", len(wells), len(treats)))
        if on_stage:
            on_stage("treatments", treats, steps)
    report = evaluate_wells(wells, feats, s, plan, warns)
    return {"wells_raw": wells_raw, "wells": wells, "treatments": treats, "steps": steps, "report": report,
            "warnings": warns}


def evaluate_wells(wells: pd.DataFrame, feats: list[str], s: PlateSettings, plan: Any,
                   warns: list[str] | None = None) -> dict[str, Any]:
    """Plate metrics that the plate supports; what it cannot support is a warning, never an abort."""
    from ..evaluate.plate import evaluate_plate, map_per_treatment

    warns = warns if warns is not None else []
    rep: dict[str, Any] = {"n_wells": int(len(wells)), "treatment_columns": plan.treatment,
                           "controls": plan.controls, "positive": plan.positive}
    if plan.controls is None:
        rep["note"] = "no negative controls: plate metrics not computed"
        return rep
    neg = select_rows(wells, plan.controls)
    rep["n_negative"] = int(neg.sum())
    try:
        if plan.positive is not None:
            pos = select_rows(wells, plan.positive, "--positive")
            rep.update(evaluate_plate(wells, feats, neg, pos, dose=s.dose, block=s.block, treatment=plan.treatment,
                                      null_size=s.map_null_size))
            rep["treatment_columns"] = plan.treatment
        else:
            rep["note"] = "no positive controls: Z' and dose Spearman not computed"
            if plan.treatment:
                try:
                    table = map_per_treatment(wells, feats, plan.treatment, neg, null_size=s.map_null_size)
                except MicrosnoopError:
                    raise
                except Exception as exc:  # copairs: e.g. UnpairedException when no treatment has replicates
                    raise MicrosnoopError(f"mAP not computed ({type(exc).__name__}: {exc})") from None
                rep["map"] = table.to_dict(orient="records")
                rep["mean_map"] = float(table["mean_average_precision"].mean())
                rep["fraction_retrieved"] = float(table["below_corrected_p"].mean())
    except MicrosnoopError as exc:
        warns.append(f"plate metrics incomplete: {exc}")
    if "map_error" in rep:
        warns.append(f"mAP not computed: {rep['map_error']}")
    return rep


def _stage_file(output: Path, name: str, fmt: str) -> Path:
    return output / f"{name}{EXTENSIONS[fmt]}"


def _check_output(output: Path, fmt: str, overwrite: bool, resume: bool) -> None:
    """Refuse to mix a new run with an earlier one's results unless told (--resume or --overwrite)."""
    if overwrite or resume or not output.exists():
        return
    if (output / "report.json").exists():
        raise MicrosnoopError("output folder already holds a finished run (use --overwrite to replace it, or "
                              "--resume to reuse its fields)", output)
    found = [n for n in STAGES if _stage_file(output, n, fmt).exists()]
    if found:
        raise MicrosnoopError(f"output folder holds finished stages of an earlier run ({', '.join(found)}); use "
                              f"--resume to reuse them or --overwrite to start over", output)


def run_plate(manifest: str | Path, output: str | Path, settings: PlateSettings | None = None,
              overwrite: bool = False, command: str | None = None,
              progress: Callable[[int], None] | None = None, resume: bool = False,
              shard: str | tuple[int, int] | None = None, merge: bool = False,
              on_plan: Callable[[Any], None] | None = None) -> PlateResult:
    """The whole plate pipeline; returns the written files and the report dict.

    Every option is checked against the plate's metadata first (:func:`.plate_checks.check_plate`).
    Finished fields are kept in ``<output>.partial/`` as they finish (``resume`` continues from them);
    ``fields``/``cells`` and ``wells_raw`` are written to ``output`` as soon as they exist, so a later
    failure leaves them in place. ``shard`` (``"i/n"``) computes only every n-th field from the i-th and
    stops; ``merge`` then assembles the plate from the shards' fields (computing none). ``on_plan`` is
    called with the checked plan before any field is processed (the CLI prints its warnings)."""
    from ..pipelines.fieldstore import parse_shard

    s = settings or PlateSettings()
    output = Path(output)
    shard_t = parse_shard(shard) if isinstance(shard, str) or shard is None else shard
    if shard_t is not None and merge:
        raise MicrosnoopError("--shard and --merge are separate steps: run each shard, then --merge once")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    # ---- 1. pre-flight: everything that can fail, on metadata only
    _check_output(output, s.fmt, overwrite, resume or merge or shard_t is not None)
    plan, opts, embedder, state = _preflight(manifest, s)
    timings["checks_s"] = time.perf_counter() - t0
    if on_plan:
        on_plan(plan)
    # ---- 2. fields: each kept as it finishes
    t1 = time.perf_counter()
    run = _FieldRun(plan, s, opts, embedder, state, output)
    got = run.fields(progress, overwrite, resume, shard_t, merge)
    if got is None:
        return _shard_result(output, run.store, plan, shard_t)
    cells, fields, feats, prov = got
    timings["segment_crop_embed_s"] = time.perf_counter() - t1
    prov = {**prov, "plate_settings": _jsonable(asdict(s)), "plan": _plan_record(plan)}
    if command:
        prov["command"] = command
    files = run.write_fields(cells, fields, feats, prov)
    # ---- 3. wells, treatments, metrics: each table written as it exists; what cannot run is a warning
    t2 = time.perf_counter()
    res = _profile_stage(fields, feats, s, plan, output, prov, files)
    timings["profile_evaluate_s"] = time.perf_counter() - t2
    prov = {**prov, "profiling": res["steps"]}
    timings["total_s"] = time.perf_counter() - t0
    report = {**res["report"], "model": prov.get("model"), "model_sha256": prov.get("sha256"),
              "n_fields": int(len(fields)), "n_cells": int(fields.get("Metadata_Count", pd.Series([0])).sum()),
              "warnings": list(plan.warnings) + res["warnings"], "timings": timings, "provenance": prov,
              "files": {k: str(v) for k, v in files.items()}}
    files["report_json"] = _write_text(output / "report.json", json.dumps(_jsonable(report), indent=1))
    files["report_md"] = _write_text(output / "report.md", render_markdown(report))
    from ..evaluate.html_report import plate_report_safely  # never fails the run: a warning at worst

    files.update(plate_report_safely(output, cells, feats))
    if run.store.exists():
        shutil.rmtree(run.store.folder, ignore_errors=True)
    return PlateResult(output, files, report, timings)


def _preflight(manifest: str | Path, s: PlateSettings) -> tuple[Any, Any, Any, dict[str, Any]]:
    """The checked plan, field options, embedder and the state every field depends on."""
    from ..embed import Embedder
    from ..pipelines.plate_fields import field_state, plate_field_options, user_cells
    from .plate_checks import check_plate

    opts = plate_field_options(s)
    plan = check_plate(manifest, s, opts)
    user_cells(plan, s, opts)
    embedder = Embedder(s.model, device=s.device, precision=s.precision, batch_size=s.batch_size,
                        threads=getattr(s, "threads", None), engine=getattr(s, "engine", "auto"))
    return plan, opts, embedder, field_state(plan, s, opts, embedder)


class _FieldRun:
    """The fields stage of one plate run: computed into the field store, or reused from a finished run."""

    def __init__(self, plan: Any, s: PlateSettings, opts: Any, embedder: Any, state: dict[str, Any], output: Path):
        from ..pipelines.fieldstore import FieldStore

        self.plan, self.s, self.opts, self.embedder, self.state, self.output = plan, s, opts, embedder, state, output
        self.store = FieldStore(output.parent / f"{output.name}.partial")
        self.reused = False

    def fields(self, progress: Callable[[int], None] | None, overwrite: bool, resume: bool,
               shard_t: tuple[int, int] | None, merge: bool) -> tuple[Any, pd.DataFrame, list[str], dict] | None:
        """(cells, fields, feature names, provenance), or None when this was one shard of the plate."""
        from ..pipelines.fieldstore import shard_fields
        from ..pipelines.plate_fields import assemble_plate, plate_diameter, plate_fields

        plan, store = self.plan, self.store
        if (resume or merge) and not store.exists():
            reused = _reusable_fields(self.output, self.s, self.state)
            if reused is not None:
                self.reused = True
                return reused
        store.open(self.state, resume=resume or merge or shard_t is not None,
                   overwrite=overwrite and shard_t is None and not merge, output=self.output)
        todo = [] if merge else shard_fields(plan.n_fields, shard_t)
        try:
            diameter_note = plate_diameter(plan, self.opts, store, str(self.embedder.device)) if todo or merge else None
            fe = plate_fields(plan, self.s, self.opts, self.embedder, store, todo, progress)
        except BaseException as exc:
            _keep_or_drop(store, exc)
            raise
        if shard_t is not None:
            return None
        cells, fields, feats, prov = assemble_plate(plan, store, fe, self.embedder, diameter_note)
        prov["fields_state"] = self.state
        return cells, fields, feats, prov

    def write_fields(self, cells: pd.DataFrame | None, fields: pd.DataFrame, feats: list[str],
                     prov: dict[str, Any]) -> dict[str, Path]:
        """Write cells/fields (or name the reused ones), after removing an earlier run's later stages."""
        output, s = self.output, self.s
        ext = EXTENSIONS[s.fmt]
        output.mkdir(parents=True, exist_ok=True)
        for name in STAGES[2:]:                 # later stages are recomputed: never leave an earlier run's behind
            _stage_file(output, name, s.fmt).unlink(missing_ok=True)
        for name in ("report.json", "report.md"):
            (output / name).unlink(missing_ok=True)
        files: dict[str, Path] = {}
        if self.reused:
            files.update({n: _stage_file(output, n, s.fmt) for n in ("cells", "fields")
                          if _stage_file(output, n, s.fmt).exists()})
            return files
        if s.save_cells and cells is not None:
            files["cells"] = write_profiles(output / f"cells{ext}", cells, feats, {**prov, "level": "cells"})
        files["fields"] = write_profiles(output / f"fields{ext}", fields, feats, {**prov, "level": "fields"})
        files.update(_move_aux(self.store, output))
        return files


def _profile_stage(fields: pd.DataFrame, feats: list[str], s: PlateSettings, plan: Any, output: Path,
                   prov: dict[str, Any], files: dict[str, Path]) -> dict[str, Any]:
    """Wells, treatments and metrics, each table written to ``files`` as it exists."""
    ext = EXTENSIONS[s.fmt]

    def on_stage(name: str, df: pd.DataFrame, steps: list[dict]) -> None:
        files[name] = write_profiles(output / f"{name}{ext}", df, feats, {**prov, "profiling": steps, "level": name})

    try:
        return profile_wells(fields, feats, s, plan, on_stage)
    except MicrosnoopError as exc:
        done = ", ".join(p.name for p in files.values())
        raise MicrosnoopError(f"{exc} (finished stages kept in {output}: {done}; fix it and rerun with --resume)") from None


def _reusable_fields(output: Path, s: PlateSettings, state: dict[str, Any]
                     ) -> tuple[pd.DataFrame | None, pd.DataFrame, list[str], dict[str, Any]] | None:
    """A finished run's fields (and cells) when they were made with the same state: --resume reuses them."""
    from ..profiling.table import feature_columns, read_embeddings

    fpath = _stage_file(output, "fields", s.fmt)
    if not fpath.exists():
        return None
    fields = read_embeddings(fpath)
    feats, prov = feature_columns(fields), fields.attrs["microsnoop"]
    if _jsonable(prov.get("fields_state")) != _jsonable(state):
        return None
    cells = None
    if s.save_cells:
        cpath = _stage_file(output, "cells", s.fmt)
        if not cpath.exists():
            return None
        cells = read_embeddings(cpath)
    prov = {k: v for k, v in prov.items() if k not in ("level", "profiling", "plate_settings", "plan", "command")}
    return cells, fields, feats, prov


def _keep_or_drop(store: Any, exc: BaseException) -> None:
    """After a failure in the fields stage: keep the finished fields (say where), or leave nothing."""
    n = len(store.done())
    if n == 0:
        shutil.rmtree(store.folder, ignore_errors=True)
    elif isinstance(exc, MicrosnoopError):
        msg = f"{exc.args[0]} ({n} finished field(s) kept in {store.folder}; fix it and rerun with --resume)"
        exc.args = (msg,)


def _shard_result(output: Path, store: Any, plan: Any, shard: tuple[int, int]) -> PlateResult:
    done = len(store.done())
    rep = {"shard": f"{shard[0] + 1}/{shard[1]}", "fields_done": done, "n_fields": plan.n_fields,
           "partial": str(store.folder), "warnings": list(plan.warnings),
           "next": "when every shard has finished, run the same command with --merge instead of --shard"}
    return PlateResult(output, {"partial": store.folder}, rep, {})


def _move_aux(store: Any, output: Path) -> dict[str, Path]:
    """Previews and masks live with the finished fields until the fields stage is complete."""
    files = {}
    for sub in ("previews", "masks"):
        src = store.folder / sub
        if src.exists():
            if (output / sub).exists():
                shutil.rmtree(output / sub)
            shutil.copytree(src, output / sub)
            files[sub] = output / sub
    return files


def _plan_record(plan: Any) -> dict[str, Any]:
    from .plate_checks import manifest_channels_note

    return {**manifest_channels_note(plan.source), "embed_channels": plan.embed_channels,
            "segment_channels": plan.segment_channels, "well": plan.well, "controls": plan.controls,
            "positive": plan.positive, "treatment": plan.treatment, "sphere": plan.sphere,
            "normalize": plan.normalize, "inferred": plan.notes}


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
             f"({rep.get('n_negative', 0)} negative, {rep.get('n_positive', 0)} positive controls)"]
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
    if rep.get("warnings"):
        lines += ["", "## Warnings (steps skipped or degraded)", ""] + [f"- {w}" for w in rep["warnings"]]
    plan = rep.get("provenance", {}).get("plan")
    if plan:
        lines += ["", "## Plate", "", f"- input: {plan.get('input_kind')}; channels embedded: "
                  f"{', '.join(plan.get('embed_channels', []))}; segmented on: "
                  f"{', '.join(plan.get('segment_channels', [])) or 'nothing (whole fields or given cells)'}",
                  f"- negative controls: `{plan.get('controls')}`; positive: `{plan.get('positive')}`; treatment: "
                  f"{plan.get('treatment')}; sphered: {plan.get('sphere')}"]
    t = rep.get("timings", {})
    if t:
        lines += ["", "## Timings", ""] + [f"- {k}: {v:.1f}" for k, v in t.items()]
    steps = rep.get("provenance", {}).get("profiling", [])
    if steps:
        lines += ["", "## Steps", ""] + [f"- {json.dumps(_jsonable(st))}" for st in steps]
    return "\n".join(lines) + "\n"
