"""Profiling maths: aggregation, per-plate normalisation (pycytominer's definitions), ZCA-cor sphering
on controls, and the plate metrics (Z', dose Spearman, copairs mAP, NSC/NSCB)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from microsnoop.core.errors import MicrosnoopError
from microsnoop.evaluate.plate import (control_scores, dose_spearman, evaluate_plate, map_per_treatment, nsc_nscb,
                                       z_prime)
from microsnoop.profiling.aggregate import aggregate
from microsnoop.profiling.normalize import normalize
from microsnoop.profiling.sphere import fit_sphering, knee_epsilon, sphere
from microsnoop.profiling.table import write_profiles
from conftest import profile_parts

CTRL = 'Metadata_Control == "negative"'


def _plate_frame(n_per_plate: int = 40, d: int = 6, seed: int = 0) -> pd.DataFrame:
    """Two plates with a plate offset and scale, half negative controls; correlated features."""
    rng = np.random.default_rng(seed)
    rows = []
    for p, (shift, scale) in enumerate([(0.0, 1.0), (3.0, 2.5)]):
        mix = rng.normal(size=(d, d))
        x = rng.normal(size=(n_per_plate, d)) @ mix * scale + shift
        ctrl = np.array(["negative", "treated"] * (n_per_plate // 2))
        x[ctrl == "treated", 0] += 4.0
        for i in range(n_per_plate):
            rows.append({"Metadata_Plate": f"P{p}", "Metadata_Well": f"W{i:02d}", "Metadata_Control": ctrl[i],
                         **{f"DNA_emb_{j:03d}": x[i, j] for j in range(d)}})
    return pd.DataFrame(rows)


def test_aggregate_mean_median_keeps_constant_metadata():
    df = pd.DataFrame({"Metadata_Well": ["A1", "A1", "A2", "A2", "A2"],
                       "Metadata_Dose": [1, 1, 2, 2, 2],
                       "Metadata_Cell": [1, 2, 1, 2, 3],
                       "GFP_emb_000": [1.0, 3.0, 0.0, 10.0, 2.0],
                       "GFP_emb_001": [2.0, 2.0, 5.0, 5.0, 8.0]})
    mean = aggregate(df, ["Metadata_Well"])
    assert list(mean["Metadata_Well"]) == ["A1", "A2"]
    assert list(mean["Metadata_Dose"]) == [1, 2]          # constant within wells: kept
    assert "Metadata_Cell" not in mean.columns             # varies within wells: dropped
    assert list(mean["Metadata_Count"]) == [2, 3]
    np.testing.assert_allclose(mean["GFP_emb_000"], [2.0, 4.0])
    np.testing.assert_allclose(mean["GFP_emb_001"], [2.0, 6.0])
    med = aggregate(df, ["Metadata_Well"], operation="median")
    np.testing.assert_allclose(med["GFP_emb_000"], [2.0, 2.0])
    only = aggregate(df, ["Metadata_Dose"], features=["GFP_emb_001"])
    assert "GFP_emb_000" not in only.columns and list(only["GFP_emb_001"]) == [2.0, 6.0]
    with pytest.raises(MicrosnoopError, match="Metadata_Plate"):
        aggregate(df, ["Metadata_Plate"])


@pytest.mark.parametrize("method", ["standardize", "mad_robustize"])
def test_normalize_matches_pycytominer_per_plate(method):
    from pycytominer import normalize as pcm_normalize

    df = _plate_frame()
    feats = [c for c in df.columns if "_emb_" in c]
    ours = normalize(df, method=method, samples=CTRL)
    for plate, sub in df.groupby("Metadata_Plate"):
        ref = pcm_normalize(sub.reset_index(drop=True), features=feats,
                            meta_features=["Metadata_Plate", "Metadata_Well", "Metadata_Control"],
                            samples="Metadata_Control == 'negative'", method=method)
        mine = ours[ours["Metadata_Plate"] == plate][feats].to_numpy()
        np.testing.assert_allclose(mine, ref[feats].to_numpy(), rtol=1e-5, atol=1e-5)
    # per plate: each plate's controls are centred on 0 by their own statistics
    for _, sub in ours[ours["Metadata_Control"] == "negative"].groupby("Metadata_Plate"):
        centre = sub[feats].mean() if method == "standardize" else sub[feats].median()
        np.testing.assert_allclose(centre, 0, atol=1e-5)


def test_sphering_whitens_controls_and_uses_their_mean():
    df = _plate_frame(n_per_plate=200, d=6)
    df = df[df["Metadata_Plate"] == "P0"].reset_index(drop=True)
    feats = [c for c in df.columns if "_emb_" in c]
    out, fits = sphere(df, CTRL, epsilon=1e-9)
    ctrl = out[out["Metadata_Control"] == "negative"][feats].to_numpy(np.float64)
    corr = np.corrcoef(ctrl, rowvar=False)
    np.testing.assert_allclose(corr, np.eye(len(feats)), atol=1e-4)
    np.testing.assert_allclose(ctrl.mean(axis=0), 0, atol=1e-5)          # centred on the controls' mean
    np.testing.assert_allclose(ctrl.std(axis=0, ddof=1), 1, atol=1e-3)
    # treated rows do not influence the fit: moving them leaves the controls' output unchanged
    moved = df.copy()
    moved.loc[moved["Metadata_Control"] == "treated", feats] += 100.0
    out2, _ = sphere(moved, CTRL, epsilon=1e-9)
    np.testing.assert_allclose(out2[out2["Metadata_Control"] == "negative"][feats], ctrl, atol=1e-5)
    treated = out[out["Metadata_Control"] == "treated"][feats].to_numpy()
    assert np.linalg.norm(treated.mean(axis=0)) > 1.0                   # the treatment effect stands out
    assert fits[0]["n_controls"] == 100


def test_sphering_matches_pycytominer_zca_cor():
    from pycytominer import normalize as pcm_normalize

    df = _plate_frame(n_per_plate=200, d=6)
    feats = [c for c in df.columns if "_emb_" in c]
    ours, _ = sphere(df, CTRL, by=None, epsilon=1e-12)                  # global fit, as pycytominer does
    ref = pcm_normalize(df, features=feats, meta_features=["Metadata_Plate", "Metadata_Well", "Metadata_Control"],
                        samples="Metadata_Control == 'negative'", method="spherize", spherize_method="ZCA-cor",
                        spherize_epsilon=1e-12)
    np.testing.assert_allclose(ours[feats].to_numpy(), ref[feats].to_numpy(), rtol=1e-4, atol=1e-4)


def test_knee_regularisation_on_rank_deficient_controls():
    rng = np.random.default_rng(1)
    # 16 controls, 64 features, 3 strong nuisance directions: the knee sits right after them
    basis = rng.normal(size=(3, 64))
    x = rng.normal(size=(16, 3)) * [20, 15, 10] @ basis + 0.3 * rng.normal(size=(16, 64))
    sph = fit_sphering(x, "knee")
    eps, k = knee_epsilon(sph.eigenvalues)
    assert 2 <= k <= 5 and eps == sph.epsilon
    assert sph.eigenvalues[-1] < eps < sph.eigenvalues[0] / 10
    z = sph.transform(x)
    assert np.isfinite(z).all() and np.abs(z.mean(axis=0)).max() < 1e-8
    with pytest.raises(MicrosnoopError, match="full-rank"):
        fit_sphering(x, 0.0)


def test_plate_metrics_on_a_simulated_dose_series():
    rng = np.random.default_rng(2)
    rows = []
    for block in ("A-D", "E-H"):
        for dose in range(11):
            n = 8 if dose == 0 else 4
            for r in range(n):
                ctrl = "negative" if dose == 0 else "positive" if dose == 10 else "dose_series"
                v = rng.normal(size=8) * 0.3
                v[:2] += dose * 0.5
                rows.append({"Metadata_RowBlock": block, "Metadata_DoseIndex": dose, "Metadata_Control": ctrl,
                             **{f"GFP_emb_{j:03d}": v[j] for j in range(8)}})
    wells = pd.DataFrame(rows)
    feats = [c for c in wells.columns if "_emb_" in c]
    neg = (wells["Metadata_Control"] == "negative").to_numpy()
    pos = (wells["Metadata_Control"] == "positive").to_numpy()
    scores = control_scores(wells[feats].to_numpy(), neg, pos)
    assert z_prime(scores[pos], scores[neg]) > 0.5
    rho = dose_spearman(scores, wells["Metadata_DoseIndex"], wells["Metadata_RowBlock"])
    assert set(rho) == {"A-D", "E-H"} and min(r["rho"] for r in rho.values()) > 0.9
    table = map_per_treatment(wells, feats, ["Metadata_RowBlock", "Metadata_DoseIndex"], neg, null_size=2000)
    assert len(table) == 20 and table["n_wells"].eq(4).all()
    high = table[table["Metadata_DoseIndex"].astype(int) >= 6]["mean_average_precision"]
    assert high.min() > 0.9                                              # strong doses retrieve their replicates
    rep = evaluate_plate(wells, feats, neg, pos, null_size=2000)
    assert rep["n_wells"] == len(wells) and rep["z_prime"] == pytest.approx(z_prime(scores[pos], scores[neg]))
    assert z_prime(np.array([10.0, 10.2]), np.array([0.0, 0.2])) == pytest.approx(1 - 3 * 2 * np.std([0, .2], ddof=1) / 10)


def test_nsc_nscb_excludes_same_compound_and_batch():
    # two MOAs, two compounds each, two batches; batch effect dominates within a MOA's compounds
    x = np.array([[1, 0, 0], [1, 0, .1], [1, .1, 0], [1, .1, .1], [0, 1, 0], [0, 1, .1], [.1, 1, 0], [.1, 1, .1]])
    df = pd.DataFrame({"Metadata_moa": list("aaaabbbb"), "Metadata_Compound": ["c1", "c1", "c2", "c2", "c3", "c3", "c4", "c4"],
                       "Metadata_Batch": ["b1", "b2"] * 4})
    df[["F_emb_000", "F_emb_001", "F_emb_002"]] = x
    res = nsc_nscb(df, ["F_emb_000", "F_emb_001", "F_emb_002"], "Metadata_moa", "Metadata_Compound", "Metadata_Batch")
    assert res == {"NSC": 1.0, "NSCB": 1.0}
    df.loc[[2, 3], ["F_emb_000", "F_emb_001"]] = [[0, 1], [0, 1]]       # c2 now looks like MOA b
    res = nsc_nscb(df, ["F_emb_000", "F_emb_001", "F_emb_002"], "Metadata_moa", "Metadata_Compound", "Metadata_Batch")
    assert res["NSC"] < 1.0


@pytest.mark.parametrize("suffix", [".parquet", ".h5", ".h5ad"])
def test_profiles_round_trip(tmp_path, suffix):
    df = _plate_frame(n_per_plate=4, d=3)
    feats = [c for c in df.columns if "_emb_" in c]
    path = write_profiles(tmp_path / f"p{suffix}", df, feats, {"steps": [{"step": "x"}]})
    back, names, prov = profile_parts(path)
    assert names == feats and prov["steps"] == [{"step": "x"}]
    np.testing.assert_allclose(back[feats].to_numpy(), df[feats].to_numpy(), rtol=1e-6)
    assert list(back["Metadata_Well"].astype(str)) == list(df["Metadata_Well"])


def test_profile_cli_sphere_and_treatments(tmp_path, cli):
    rng = np.random.default_rng(3)
    rows = []
    for well in range(24):
        ctrl = "negative" if well < 12 else "treated"
        for field in range(2):
            v = rng.normal(size=8) + (3.0 if ctrl == "treated" else 0.0)
            rows.append({"Metadata_Plate": "P1", "Metadata_Well": f"W{well:02d}", "Metadata_Field": field,
                         "Metadata_Control": ctrl, "Metadata_Dose": 0 if ctrl == "negative" else 1 + well % 3,
                         **{f"DNA_emb_{j:03d}": v[j] for j in range(8)}})
    df = pd.DataFrame(rows)
    feats = [c for c in df.columns if "_emb_" in c]
    src = write_profiles(tmp_path / "fields.parquet", df, feats, {"model": "m"})
    out = tmp_path / "wells.parquet"
    code, _, err = cli("profile", src, "-o", out, "--aggregate", "Metadata_Plate,Metadata_Well", "--normalize",
                       "mad_robustize", "--sphere", "--treatment", "Metadata_Dose")
    assert code == 0, err
    wells, names, prov = profile_parts(out)
    assert len(wells) == 24 and names == feats and prov["model"] == "m"
    assert [st["step"] for st in prov["profiling"]] == ["aggregate", "normalize", "sphere", "aggregate"]
    assert prov["profiling"][2]["fits"][0]["n_controls"] == 12
    np.testing.assert_allclose(wells[wells["Metadata_Control"] == "negative"][feats].mean(), 0, atol=1e-5)
    treat, _, _ = profile_parts(tmp_path / "wells.treatments.parquet")
    assert sorted(treat["Metadata_Dose"]) == [0, 1, 2, 3]
    code, _, err = cli("profile", src, "-o", tmp_path / "x.parquet", "--sphere", "--controls", "Metadata_Nope == 1")
    assert code == 2 and "Metadata_Nope" in err
