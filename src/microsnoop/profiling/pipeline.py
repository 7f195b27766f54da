"""``microsnoop profile``: aggregate -> normalise -> sphere -> aggregate per treatment, on a file.

The steps run in that order (each optional) on an embeddings/profiles file, and every step is
appended to the output's provenance (``profiling`` list) after the input's own provenance.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from ..core.errors import MicrosnoopError
from .aggregate import aggregate, aggregate_step
from .normalize import normalize, normalize_step
from .sphere import sphere, sphere_step
from .table import (check_finite_features, feature_columns, is_feature_column, read_embeddings, select_rows,
                    write_profiles)


@dataclass
class ProfileSettings:
    """What ``profile`` does; the defaults sphere per plate on negative controls, the paper's recipe."""

    controls: str | None = 'Metadata_Control == "negative"'
    aggregate: Sequence[str] | None = None          # before normalising (e.g. cells/fields -> wells)
    aggregate_method: str = "mean"
    normalize: str | None = None                    # standardize | mad_robustize
    normalize_by: Sequence[str] | None = ("Metadata_Plate",)
    sphere: bool = False
    sphere_by: Sequence[str] | None = ("Metadata_Plate",)  # None/empty: one global fit
    sphere_epsilon: float | str = "knee"
    treatment: Sequence[str] | None = None          # after sphering: aggregate per treatment
    features: Sequence[str] | None = None
    steps: list[dict[str, Any]] = field(default_factory=list)


def _present(df: pd.DataFrame, by: Sequence[str] | None) -> list[str] | None:
    """Batch columns that exist (a file without ``Metadata_Plate`` is one batch). Any other batch column
    that is missing is an error: silently fitting one global transform instead would be a wrong result."""
    if not by:
        return None
    missing = [c for c in by if c not in df.columns and c != "Metadata_Plate"]
    if missing:
        raise MicrosnoopError(f"batch column(s) {', '.join(missing)} not in the profiles (--sphere-by / normalize by); "
                              f"metadata columns are {', '.join(c for c in df.columns if not is_feature_column(c))}")
    kept = [c for c in by if c in df.columns]
    return kept or None


def profile_frame(df: pd.DataFrame, s: ProfileSettings) -> tuple[pd.DataFrame, pd.DataFrame | None, list[dict]]:
    """Run the steps on a frame; returns (well-level profiles, treatment profiles or None, step records)."""
    feats = feature_columns(df, s.features)
    check_finite_features(df, feats)
    if s.controls is not None:
        from .query import check_query

        check_query(s.controls)
    steps: list[dict[str, Any]] = []
    if s.aggregate:
        n = len(df)
        df = aggregate(df, s.aggregate, feats, operation=s.aggregate_method)
        steps.append(aggregate_step(s.aggregate, s.aggregate_method, n, len(df)))
    if (s.normalize or s.sphere) and s.controls is None:
        raise MicrosnoopError("normalising or sphering needs --controls (a query selecting negative controls)")
    n_ctrl = int(select_rows(df, s.controls).sum()) if s.controls else 0
    if s.controls and n_ctrl == 0:
        raise MicrosnoopError(f"no profiles match the controls {s.controls!r}")
    if s.normalize:
        by = _present(df, s.normalize_by)
        df = normalize(df, s.normalize, samples=s.controls, by=by, features=feats)
        steps.append(normalize_step(s.normalize, s.controls, by, n_ctrl))
    if s.sphere:
        by = _present(df, s.sphere_by)
        df, fits = sphere(df, samples=s.controls, by=by, features=feats, epsilon=s.sphere_epsilon)
        steps.append(sphere_step(s.controls, by, s.sphere_epsilon, fits))
    treat = None
    if s.treatment:
        treat = aggregate(df, s.treatment, feats, operation=s.aggregate_method)
        steps.append(aggregate_step(s.treatment, s.aggregate_method, len(df), len(treat)))
    return df, treat, steps


def treatment_path(output: Path) -> Path:
    return output.with_name(output.stem + ".treatments" + output.suffix)


def run_profile(input: str | Path, output: str | Path, settings: ProfileSettings, overwrite: bool = False,
                command: str | None = None) -> dict[str, Path]:
    """Profile an embeddings file; writes ``output`` (and ``<output>.treatments.<ext>`` with a treatment level)."""
    from ..io.atomic import check_output_path
    from ..io.writers import format_for

    output = Path(output)
    format_for(output)
    check_output_path(output)
    if output.exists() and not overwrite:
        raise MicrosnoopError("output already exists (use --overwrite to replace it)", output)
    if settings.treatment:
        tpath = check_output_path(treatment_path(output), option="treatments output")
        if tpath.exists() and not overwrite:
            raise MicrosnoopError("treatments output already exists (use --overwrite to replace it)", tpath)
    if Path(input).resolve() == output.resolve() or (settings.treatment and
                                                     Path(input).resolve() == treatment_path(output).resolve()):
        raise MicrosnoopError("output would overwrite the input; choose another --output", output)
    df = read_embeddings(input)
    feats, prov = feature_columns(df), df.attrs["microsnoop"]
    if settings.features is None:
        settings.features = feats
    wells, treat, steps = profile_frame(df, settings)
    prov = {**prov, "profiling": list(prov.get("profiling", [])) + steps, "profiling_input": str(input)}
    if command:
        prov["profiling_command"] = command
    check_finite_features(wells, settings.features, output)
    if treat is not None:
        check_finite_features(treat, settings.features, treatment_path(output))
    out = {"profiles": write_profiles(output, wells, settings.features, prov)}
    if treat is not None:
        out["treatments"] = write_profiles(treatment_path(output), treat, settings.features, prov)
    return out
