"""End to end on 8 real wells of BBBC013: segment DNA -> crop -> embed GFP+DNA -> wells -> sphere -> report."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

# 4 negative (columns 1-2), 2 positive (column 12) and 2 replicate wells of one dose of the A-D series
WELLS = ["A01", "A02", "B01", "B02", "A12", "B12", "A06", "B06"]


@pytest.fixture(scope="module")
def plate8(shared_data, tmp_path_factory) -> Path:
    folder = shared_data / "plates" / "bbbc013"
    df = pd.read_csv(folder / "manifest.csv")
    df = df[df["Metadata_Well"].isin(WELLS)].copy()
    for ch in ("GFP", "DNA"):
        df[f"FileName_{ch}"] = [str(folder / f) for f in df[f"FileName_{ch}"]]
    out = tmp_path_factory.mktemp("plate8") / "manifest.csv"
    df.to_csv(out, index=False)
    return out


def test_plate_end_to_end_on_8_real_wells(plate8, tmp_path, cli):
    from conftest import profile_parts

    out = tmp_path / "run"
    code, _, err = cli("plate", plate8, "-o", out, "--model", "cellpose-encoder", "--channels", "GFP,DNA",
                       "--segment-channel", "DNA", "--segmenter", "classical", "--max-cells", "12",
                       "--crop-size", "64", "--precision", "bf16", "--device", "cpu", "--format", "h5ad",
                       "--save-cells")
    assert code == 0, err
    rep = json.loads((out / "report.json").read_text())
    assert rep["n_wells"] == 8 and rep["n_negative"] == 4 and rep["n_positive"] == 2
    assert np.isfinite(rep["z_prime"]) and rep["z_prime"] <= 1.0
    assert rep["treatment_columns"] == ["Metadata_RowBlock", "Metadata_DoseIndex"]
    steps = [st["step"] for st in rep["provenance"]["profiling"]]
    assert steps == ["aggregate", "sphere", "aggregate"]
    sph = rep["provenance"]["profiling"][1]
    assert sph["fits"][0]["n_controls"] == 4 and sph["fits"][0]["epsilon"] > 0
    assert rep["provenance"]["model"] == "cellpose-encoder"
    assert "Z'" in (out / "report.md").read_text()
    assert (out / "report.html").stat().st_size > 1e6        # rendered from .h5ad tables too (categorical metadata)

    cells, _, _ = profile_parts(out / "cells.h5ad")
    fields, feats, prov = profile_parts(out / "fields.h5ad")
    assert len(fields) == 8 and len(feats) == 512 and feats[0] == "GFP_emb_000" and feats[-1] == "DNA_emb_255"
    assert 8 < len(cells) <= 8 * 12
    # a field's vector is the mean of its cells' vectors
    w = fields["Metadata_Well"].astype(str).iloc[0]
    np.testing.assert_allclose(fields[feats].iloc[0], cells[cells["Metadata_Well"].astype(str) == w][feats].mean(),
                               rtol=1e-4, atol=1e-5)
    wells, _, _ = profile_parts(out / "wells.h5ad")
    neg = wells[wells["Metadata_Control"].astype(str) == "negative"][feats].to_numpy(np.float64)
    np.testing.assert_allclose(neg.mean(axis=0), 0, atol=1e-4)            # sphered on the negative controls
    import anndata as ad

    obs = ad.read_h5ad(out / "treatments.h5ad").obs
    assert {"Metadata_RowBlock", "Metadata_DoseIndex", "Metadata_Control"} <= set(obs.columns)
    assert len(obs) == 3                                                   # neg, pos, dose 5 of block A-D
