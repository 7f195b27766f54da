"""Pre-flight for ``microsnoop plate``: every option that can fail is checked against the plate's
metadata before a single field is segmented, and the defaults that depend on the data set (treatment
columns, negative and positive controls) are inferred here, from common ``Metadata_*`` names.

The result, a :class:`PlatePlan`, carries the opened image source (a LoadData manifest or an
OME-Zarr HCS plate, optionally joined with a plate map), the resolved columns and queries, and the
warnings for steps that will be skipped (e.g. sphering with fewer than 4 negative-control wells), so
a user learns in seconds what the run will and will not do.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from ..core.errors import MicrosnoopError
from ..profiling.table import select_rows

FORMATS = ("parquet", "h5", "h5ad")
NORMALIZE_METHODS = ("standardize", "mad_robustize")
MIN_SPHERE_CONTROLS = 4          # knee_epsilon needs 3 non-zero eigenvalues: 4 control wells that differ

# treatment = a perturbation column (+ a dose column when there is one); names compared after
# "Metadata_", case-insensitively. BBBC013's row block + dose index is kept as the last resort.
PERTURBATION_NAMES = ("treatment", "compound", "compound_name", "pert_iname", "pert_id", "broad_sample",
                      "perturbation", "drug", "gene", "gene_symbol", "sirna", "orf", "moa_compound")
DOSE_NAMES = ("dose", "concentration", "conc", "mmoles_per_liter", "dose_um", "concentration_um", "pert_dose",
              "dose_index", "doseindex")
LEGACY_TREATMENTS = (("Metadata_RowBlock", "Metadata_DoseIndex"), ("Metadata_DoseIndex",))
# a column whose values say "negative control"
NEGATIVE_WORDS = ("negative", "neg", "dmso", "mock", "vehicle", "untreated", "negcon", "neg_control",
                  "negative_control", "control_negative", "empty")
POSITIVE_WORDS = ("positive", "pos", "poscon", "pos_control", "positive_control", "control_positive")
CONTROL_COLUMN_HINTS = ("control", "role", "type", "treatment", "compound", "pert", "sample", "category")


@dataclass
class PlatePlan:
    """What a plate run will do, resolved from the settings and the plate's metadata."""

    source: Any                                   # ManifestSource or OmeZarrPlateSource, channels selected
    embed_channels: list[str]
    segment_channels: list[str]                   # [] (no segmentation), [nucleus] or [cytoplasm, nucleus]
    well: list[str]
    controls: str | None
    positive: str | None
    treatment: list[str] | None
    sphere: bool
    normalize: str | None
    warnings: list[str] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def n_fields(self) -> int:
        return len(self.source)


def _short(name: str) -> str:
    return re.sub(r"^metadata_", "", name.lower())


def infer_treatment(columns: Sequence[str], given: Sequence[str] | None) -> list[str] | None:
    """The treatment columns: ``given`` (checked), else a perturbation column plus a dose column
    (``Metadata_Compound`` + ``Metadata_Concentration``, ``Metadata_pert_iname`` + ``Metadata_mmoles_per_liter``...),
    else BBBC013's ``Metadata_RowBlock`` + ``Metadata_DoseIndex``; None when nothing fits."""
    cols = list(columns)
    if given:
        missing = [c for c in given if c not in cols]
        if missing:
            raise MicrosnoopError(f"--treatment column(s) {', '.join(missing)} not in the plate's metadata "
                                  f"(columns: {', '.join(c for c in cols if c.startswith('Metadata_'))})")
        return list(given)
    by_short = {_short(c): c for c in cols if c.startswith("Metadata_")}
    pert = next((by_short[n] for n in PERTURBATION_NAMES if n in by_short), None)
    dose = next((by_short[n] for n in DOSE_NAMES if n in by_short), None)
    if pert:
        return [pert] + ([dose] if dose else [])
    for cand in LEGACY_TREATMENTS:
        if all(c in cols for c in cand):
            return list(cand)
    return None


def _word_rows(meta: pd.DataFrame, words: Sequence[str]) -> list[tuple[str, str]]:
    """(column, value) pairs of Metadata_* columns holding one of ``words`` (case-insensitive), control-like
    column names first."""
    hits = []
    for c in meta.columns:
        if not c.startswith("Metadata_") or meta[c].dtype.kind in "iufb":
            continue
        for v in pd.unique(meta[c].dropna().astype(str)):
            if v.strip().lower() in words:
                hits.append((c, v))
    hits.sort(key=lambda cv: (not any(h in cv[0].lower() for h in CONTROL_COLUMN_HINTS), cv[0]))
    return hits


def _query(column: str, value: str) -> str:
    quoted = f'"{value}"' if '"' not in value else f"'{value}'"
    return f"{column} == {quoted}"


def _word_query(meta: pd.DataFrame, words: Sequence[str], none_note: str) -> tuple[str | None, str]:
    """A query for the first Metadata_* column with a value among ``words``, and how it was chosen."""
    hits = _word_rows(meta, words)
    if not hits:
        return None, none_note
    col, val = hits[0]
    return _query(col, val), f"inferred from {col} = {val!r}"


def _given_query(meta: pd.DataFrame, given: str, option: str) -> tuple[str, str]:
    """A user's query, checked to select at least one row (errors name ``option``)."""
    if int(select_rows(meta, given, option).sum()) == 0:
        raise MicrosnoopError(f"{option} {given!r} selects no well of the plate")
    return given, "given"


def infer_controls(meta: pd.DataFrame, given: str | None) -> tuple[str | None, str]:
    """The negative-control query: ``given`` (must select rows), else the first Metadata_* column with a
    value such as negative/DMSO/mock; returns (query or None, how it was chosen)."""
    if given:
        return _given_query(meta, given, "--controls")
    return _word_query(meta, NEGATIVE_WORDS, "no column says negative/DMSO/mock")


def infer_positive(meta: pd.DataFrame, given: str | None) -> tuple[str | None, str]:
    """The positive-control query: ``"auto"`` infers it (a column saying positive), ``None``/'' means none."""
    if given is None or str(given).strip() == "":
        return None, "none given"
    if given != "auto":
        return _given_query(meta, given, "--positive")
    return _word_query(meta, POSITIVE_WORDS, "no column says positive")


def open_plate_source(path: str | Path, plate_map: str | Path | None = None) -> Any:
    """A LoadData manifest (.csv) or an OME-Zarr HCS plate (folder), with ``plate_map`` joined on its wells."""
    from ..io.omezarr import OmeZarrPlateSource, is_ome_zarr_plate
    from ..io.readers import ManifestSource

    path = Path(path).absolute()
    if not path.exists():
        raise MicrosnoopError("file not found", path)
    if path.is_dir():
        if not is_ome_zarr_plate(path):
            raise MicrosnoopError("a folder given to plate must be an OME-Zarr HCS plate (NGFF 'plate' metadata)",
                                  path)
        src = OmeZarrPlateSource(path)
    elif path.suffix.lower() == ".csv":
        src = ManifestSource(path)
    else:
        raise MicrosnoopError("plate input must be a LoadData manifest (.csv) or an OME-Zarr plate folder", path)
    if plate_map is not None:
        src.metadata = join_plate_map(src.metadata, Path(plate_map))
    return src


def join_plate_map(meta: pd.DataFrame, plate_map: Path) -> pd.DataFrame:
    """Add a plate map's columns to every field of its well: joined on Metadata_Plate + Metadata_Well
    when both have a plate column, else on Metadata_Well; every well of the plate must be in the map."""
    from ..io.readers import read_csv

    if not plate_map.exists():
        raise MicrosnoopError("plate map not found", plate_map)
    pm = read_csv(plate_map)
    pm = pm[[c for c in pm.columns if c.startswith("Metadata_")]]
    if "Metadata_Well" not in pm.columns:
        raise MicrosnoopError("plate map has no Metadata_Well column", plate_map)
    keys = [k for k in ("Metadata_Plate", "Metadata_Well") if k in pm.columns and k in meta.columns]
    pm = pm.drop_duplicates(subset=keys)
    for k in keys:
        pm[k] = pm[k].astype(str)
    left = meta.copy()
    for k in keys:
        left[k] = left[k].astype(str)
    extra = [c for c in pm.columns if c not in keys]
    left = left.drop(columns=[c for c in extra if c in left.columns])
    out = left.merge(pm, on=keys, how="left", indicator=True)
    missing = sorted(set(map(tuple, out.loc[out["_merge"] != "both", keys].astype(str).to_numpy())))
    if missing:
        raise MicrosnoopError(f"{len(missing)} well(s) of the plate are not in the plate map (joined on "
                              f"{', '.join(keys)}), e.g. {'/'.join(missing[0])}", plate_map)
    return out.drop(columns="_merge")


def check_plate(path: str | Path, s: Any, opts: Any) -> PlatePlan:
    """Every check that can fail, on metadata only; returns the plan or raises one MicrosnoopError.

    ``s`` is a ``PlateSettings``, ``opts`` its checked ``FieldOptions``."""
    if s.fmt not in FORMATS:
        raise MicrosnoopError(f"unknown --format '{s.fmt}' (choose {', '.join(FORMATS)})")
    if s.normalize is not None and s.normalize not in NORMALIZE_METHODS:
        raise MicrosnoopError(f"unknown --normalize '{s.normalize}' (choose {', '.join(NORMALIZE_METHODS)})")
    src = open_plate_source(path, getattr(s, "metadata", None))
    meta = src.metadata
    available = list(getattr(src, "all_channel_names", src.channel_names))
    src.all_channel_names = available
    embed_ch = list(s.channels) if s.channels else available
    missing = [c for c in embed_ch if c not in available]
    if missing:
        raise MicrosnoopError(f"--channels {', '.join(missing)}: not a channel of the plate (channels: "
                              f"{', '.join(available)})", src.path)
    if len(set(embed_ch)) != len(embed_ch):
        raise MicrosnoopError(f"--channels lists a channel twice: {','.join(embed_ch)}")
    seg_chs = _segment_channels(s, opts, available, src)
    if s.preview < 0:
        raise MicrosnoopError("--preview must be >= 0")
    plan = check_columns(meta, s, src.path)
    plan.source = select_channels(src, list(dict.fromkeys(embed_ch + seg_chs)))
    plan.embed_channels, plan.segment_channels = embed_ch, seg_chs
    return plan


def check_columns(meta: pd.DataFrame, s: Any, where: Any = None) -> PlatePlan:
    """The metadata half of the checks (wells, controls, treatment, sphering feasibility) on any frame of
    fields or wells; a plan without an image source."""
    warnings: list[str] = []
    notes: dict[str, Any] = {}
    well = [c for c in s.well if c in meta.columns]
    if not well:
        raise MicrosnoopError(f"none of the well columns {', '.join(s.well)} is in the plate's metadata", where)
    # wells keep only the metadata constant within each well: queries and treatments must use those
    grouped = meta.groupby(well, dropna=False)
    varying = [c for c in meta.columns if c.startswith("Metadata_") and c not in well
               and bool((grouped[c].nunique(dropna=False) > 1).any())]
    for flag, cols in (("--treatment", s.treatment or []),):
        bad = [c for c in cols if c in varying]
        if bad:
            raise MicrosnoopError(f"{flag} column(s) {', '.join(bad)} vary within a well, so well profiles cannot "
                                  f"keep them", where)
    wmeta = meta.drop(columns=varying).drop_duplicates(subset=well).reset_index(drop=True)
    for flag, q in (("--controls", s.controls), ("--positive", None if s.positive == "auto" else s.positive)):
        used = [c for c in varying if q and re.search(rf"\b{re.escape(c)}\b", q)]
        if used:
            raise MicrosnoopError(f"{flag} {q!r} uses {', '.join(used)}, which varies within a well (wells keep "
                                  f"only columns constant within a well)", where)
    controls, notes["controls"] = infer_controls(wmeta, s.controls)
    positive, notes["positive"] = infer_positive(wmeta, s.positive)
    if controls is None and (s.normalize or s.sphere):
        raise MicrosnoopError("cannot tell the negative controls (no Metadata_* column says negative, DMSO or "
                              "mock); pass --controls, e.g. --controls 'Metadata_Compound == \"DMSO\"', or use "
                              "--no-sphere without --normalize", where)
    treatment = infer_treatment(wmeta.columns, s.treatment)
    if treatment is None:
        warnings.append("no treatment columns (no Metadata_* column named like compound/treatment or dose/"
                        "concentration; pass --treatment): treatments table and mAP skipped")
    sphere = bool(s.sphere)
    if sphere:
        n_min, batch = _fewest_control_wells(wmeta, controls, well, s.sphere_by)
        if n_min < MIN_SPHERE_CONTROLS:
            sphere = False
            warnings.append(f"sphering skipped: {n_min} negative-control well(s){batch}, it needs at least "
                            f"{MIN_SPHERE_CONTROLS} (wells are profiled unsphered)")
    if positive is None and controls is not None:
        warnings.append("no positive controls (" + notes["positive"] + "; pass --positive): Z' and the dose "
                        "response are not computed")
    return PlatePlan(None, [], [], well, controls, positive, treatment, sphere, s.normalize, warnings, notes)


def select_channels(src: Any, channels: list[str]) -> Any:
    """The source reading only ``channels`` (in this order), metadata (with any plate map) kept."""
    if hasattr(src, "select"):
        src.select(channels)
        return src
    from ..io.readers import ManifestSource

    meta = src.metadata
    out = ManifestSource(src.path, channels=channels)
    out.all_channel_names = list(getattr(src, "all_channel_names", src.channel_names))
    out.metadata = meta
    return out


def _segment_channels(s: Any, opts: Any, available: list[str], src: Any) -> list[str]:
    """The channels the segmenter reads: none, [nucleus], or [cytoplasm, nucleus] (whole cells)."""
    if opts.mode != "crop" or opts.segmenter == "centres":
        return []
    for flag, ch in (("--segment-channel", s.segment_channel), ("--cyto-channel", getattr(s, "cyto_channel", None))):
        if ch is not None and ch not in available:
            raise MicrosnoopError(f"{flag} {ch} is not a channel of the plate (channels: {', '.join(available)})",
                                  src.path)
    cyto = getattr(s, "cyto_channel", None)
    if cyto is None:
        return [s.segment_channel]
    if opts.segmenter != "cellpose":
        raise MicrosnoopError(f"--cyto-channel (whole-cell segmentation) needs --segmenter cellpose, not "
                              f"{opts.segmenter}")
    if cyto == s.segment_channel:
        raise MicrosnoopError(f"--cyto-channel and --segment-channel are both {cyto}; whole cells need a "
                              f"cytoplasm/membrane channel and the nucleus channel")
    return [cyto, s.segment_channel]


def _fewest_control_wells(meta: pd.DataFrame, controls: str | None, well: list[str],
                          sphere_by: Sequence[str] | None) -> tuple[int, str]:
    """The smallest number of distinct negative-control wells in any sphering batch, and the batch's name."""
    if controls is None:
        return 0, ""
    ctrl = meta[select_rows(meta, controls)]
    by = [c for c in (sphere_by or []) if c in meta.columns]
    if not by:
        return int(len(ctrl.drop_duplicates(subset=well))), ""
    def key(k: Any) -> tuple:
        return tuple(k) if isinstance(k, tuple) else (k,)

    counts = {key(k): len(g.drop_duplicates(subset=well)) for k, g in ctrl.groupby(by, dropna=False)}
    batches = [key(k) for k, _ in meta.groupby(by, dropna=False)]
    worst = min(batches, key=lambda b: counts.get(b, 0))
    return int(counts.get(worst, 0)), f" in batch {'/'.join(map(str, worst))}"


def manifest_channels_note(src: Any) -> dict[str, Any]:
    """Where the channel names came from, for the report."""
    kind = type(src).__name__
    return {"input_kind": "ome-zarr plate" if kind == "OmeZarrPlateSource" else "LoadData manifest",
            "channels_available": list(getattr(src, "all_channel_names", src.channel_names))}


__all__ = ["PlatePlan", "check_plate", "check_columns", "infer_treatment", "infer_controls", "infer_positive", "open_plate_source",
           "join_plate_map", "select_channels"]
