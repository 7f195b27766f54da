"""The public Python API: same defaults and vectors as the CLI, labelled tables, one reader, untrained models,
profiling with pycytominer's argument names, numpydoc on every public function."""
from __future__ import annotations

import inspect
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import microsnoop
from microsnoop.embed import defaults

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def bbbc021_16(shared_data, tmp_path_factory) -> Path:
    """16 real BBBC021 cells (DNA/Tubulin/Actin, uint16) as images.npy + metadata.csv, with a metadata
    column whose name contains ``_emb_`` (it once broke reading the Parquet output back)."""
    src = shared_data / "benchmarks" / "bbbc021_dmso_vs_cycloheximide"
    d = tmp_path_factory.mktemp("bbbc021_16")
    x = np.asarray(np.load(src / "images.npy", mmap_mode="r")[::37][:16])
    np.save(d / "images.npy", x)
    meta = pd.read_csv(src / "metadata.csv").iloc[::37].head(16).reset_index(drop=True)
    meta["Metadata_emb_note"] = [f"note {i}" for i in range(len(meta))]
    meta.to_csv(d / "metadata.csv", index=False)
    (d / "dataset.json").write_text((src / "dataset.json").read_text())  # channel names DNA, Tubulin, Actin
    return d


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "microsnoop.cli", *args], capture_output=True, text=True, env=env,
                          timeout=600)


def test_api_and_cli_give_identical_vectors_with_default_options(bbbc021_16, tmp_path):
    """``microsnoop embed`` (its own process) and ``microsnoop.embed`` with no options: the same vectors,
    bit for bit (same defaults, same chunks and batches, so also the same bf16 kernels where auto picks bf16)."""
    out = tmp_path / "cli.parquet"
    res = _cli("embed", str(bbbc021_16 / "images.npy"), "-o", str(out))
    assert res.returncode == 0, res.stderr
    df = microsnoop.read_embeddings(out)
    cli_x = df[microsnoop.feature_columns(df)].to_numpy()
    api_x = microsnoop.embed(np.load(bbbc021_16 / "images.npy"))
    assert api_x.shape == cli_x.shape == (16, 3 * 1024)
    assert np.array_equal(api_x, cli_x)
    # both resolved the same precision from the shared default (bf16 on CPUs with native bf16, else fp32)
    assert df.attrs["microsnoop"]["precision"] in ("bf16", "fp32")
    assert df.attrs["microsnoop"]["precision"] == microsnoop.embed(
        np.load(bbbc021_16 / "images.npy")[:1], output="frame").attrs["microsnoop"]["precision"]


def test_cli_options_read_the_shared_defaults():
    """embed, plate and benchmark show the defaults of embed/defaults.py, and so does the API."""
    import typer.main

    from microsnoop.cli import app

    cmd = typer.main.get_command(app)
    want = {"device": defaults.DEVICE, "precision": defaults.PRECISION, "batch_size": defaults.BATCH_SIZE}
    for name in ("embed", "plate", "benchmark"):
        params = {p.name: p.default for p in cmd.commands[name].params}
        assert {k: params[k] for k in want} == want, name
    assert (defaults.DEVICE, defaults.PRECISION, defaults.BATCH_SIZE) == ("auto", "auto", None)
    for fn in (microsnoop.embed, microsnoop.embed_source):
        sig = inspect.signature(fn)
        assert {k: sig.parameters[k].default for k in want} == want, fn.__name__
    assert inspect.signature(microsnoop.embed_source).parameters["chunk_size"].default == defaults.CHUNK_SIZE


def test_embed_returns_a_labelled_frame_and_anndata(bbbc021_16):
    x = np.load(bbbc021_16 / "images.npy")
    meta = pd.read_csv(bbbc021_16 / "metadata.csv")[["Metadata_Well", "Metadata_MoA"]].assign(Site=1)
    arr = microsnoop.embed(x, model="cellpose-encoder", precision="fp32")
    frame = microsnoop.embed(x, model="cellpose-encoder", precision="fp32", output="frame", metadata=meta,
                             channel_names=["DNA", "Tubulin", "Actin"])
    feats = microsnoop.feature_columns(frame)
    assert feats[0] == "DNA_emb_000" and feats[-1] == "Actin_emb_255" and len(feats) == 768
    assert list(frame.columns[:4]) == ["Metadata_Index", "Metadata_Well", "Metadata_MoA", "Metadata_Site"]
    assert frame["Metadata_Well"].tolist() == meta["Metadata_Well"].tolist()
    assert np.array_equal(frame[feats].to_numpy(), arr)
    prov = frame.attrs["microsnoop"]
    assert prov["model"] == "cellpose-encoder" and prov["channel_names"] == ["DNA", "Tubulin", "Actin"]

    adata = microsnoop.embed(x, model="cellpose-encoder", precision="fp32", output="anndata", metadata=meta)
    assert adata.shape == (16, 768) and list(adata.var_names[:2]) == ["ch0_emb_000", "ch0_emb_001"]
    assert np.array_equal(adata.X, arr)
    assert adata.obs["Metadata_MoA"].tolist() == meta["Metadata_MoA"].tolist()
    assert isinstance(adata.uns["microsnoop"], dict) and adata.uns["microsnoop"]["model"] == "cellpose-encoder"
    with pytest.raises(microsnoop.MicrosnoopError, match="unknown output 'table'"):
        microsnoop.embed(x[:1], model="cellpose-encoder", output="table")
    with pytest.raises(microsnoop.MicrosnoopError, match="2 channel names for images with 3 channels"):
        microsnoop.embed(x[:1], model="cellpose-encoder", output="frame", channel_names=["a", "b"])


@pytest.mark.parametrize("suffix", [".parquet", ".h5", ".h5ad"])
def test_one_reader_for_every_format_with_an_emb_named_metadata_column(bbbc021_16, tmp_path, cli, suffix):
    """read_embeddings gives one shape for every output; ``Metadata_emb_note`` stays metadata (it used to be
    taken for a feature column, and reading the Parquet back failed on its text); h5ad provenance is a dict."""
    out = tmp_path / f"o{suffix}"
    code, _, err = cli("embed", bbbc021_16 / "images.npy", "-o", out, "-m", "cellpose-encoder",
                       "--precision", "fp32")
    assert code == 0, err
    df = microsnoop.read_embeddings(out)
    feats = microsnoop.feature_columns(df)
    assert len(feats) == 768 and "Metadata_emb_note" not in feats
    assert df["Metadata_emb_note"].tolist() == [f"note {i}" for i in range(16)]
    assert df[feats].dtypes.unique().tolist() == [np.float32]
    prov = df.attrs["microsnoop"]
    assert prov["model"] == "cellpose-encoder" and prov["channel_names"] == ["DNA", "Tubulin", "Actin"]
    assert prov["channel_features"]["Actin"] == ["Actin_emb_000", "Actin_emb_255"]
    assert isinstance(prov["model_config"], dict) and prov["n_images"] == 16
    # the profiling steps run on what the reader returns, the note column carried through
    wells = microsnoop.aggregate(df, strata=["Metadata_Well"])
    assert "Metadata_emb_note" not in microsnoop.feature_columns(wells)
    if suffix == ".h5ad":
        import anndata as ad

        uns = ad.read_h5ad(out).uns["microsnoop"]
        assert isinstance(uns, dict) and uns["model"] == "cellpose-encoder"  # not a JSON string


def test_h5ad_provenance_round_trips_lists_of_records(tmp_path):
    """Profiling provenance holds lists of dicts (one per step), which h5ad cannot store as arrays."""
    from microsnoop.io.writers import write_embeddings

    prov = {"profiling": [{"step": "aggregate", "by": ["Metadata_Well"], "rows_in": 4},
                          {"step": "sphere", "epsilon": 0.5, "fits": [{"n_controls": 3, "batch": None}]}],
            "mixed": [1, "a"], "empty": [], "flag": True, "none": None}
    out = write_embeddings(tmp_path / "p.h5ad", pd.DataFrame({"Metadata_Well": ["A01", "A02"]}),
                           [np.ones((2, 2), np.float32)], ["DNA"], 2, prov)
    back = microsnoop.read_embeddings(out).attrs["microsnoop"]
    assert {k: back[k] for k in prov} == prov


def test_create_model_pretrained_false_is_random_and_reproducible():
    trained = microsnoop.create_model("microsnoop-unet-v2")
    with pytest.warns(UserWarning, match="untrained"):
        untrained = microsnoop.create_model("microsnoop-unet-v2", pretrained=False)
    again = microsnoop.create_model("microsnoop-unet-v2", pretrained=False)
    a, b, c = trained.state_dict(), untrained.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    differ = [k for k in a if a[k].is_floating_point() and not np.allclose(a[k].numpy(), b[k].numpy())]
    assert len(differ) > len(a) // 2  # weights (not only buffers) are fresh
    assert all(np.array_equal(b[k].numpy(), c[k].numpy()) for k in b)  # seeded: the same every time
    assert untrained.sha256 != trained.sha256 and untrained.config["pretrained"] is False
    x = np.random.default_rng(0).random((2, 1, 64, 64)).astype(np.float32)
    assert not np.allclose(microsnoop.embed(x, untrained, precision="fp32"), microsnoop.embed(x, trained, precision="fp32"))
    cp = microsnoop.create_model("cellpose-encoder", pretrained=False)
    assert cp.sha256 != microsnoop.create_model("cellpose-encoder").sha256
    with pytest.raises(microsnoop.MicrosnoopError, match="no learned weights"):
        microsnoop.create_model("handcrafted", pretrained=False)


def _profiles() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"Metadata_Well": np.repeat(["A01", "A02", "B01", "B02"], 3),
                       "Metadata_Control": np.repeat(["negative", "negative", "treated", "treated"], 3)})
    feats = pd.DataFrame(rng.normal(size=(12, 4)).astype(np.float32), columns=[f"DNA_emb_{j:03d}" for j in range(4)])
    return pd.concat([df, feats], axis=1)


def test_profiling_is_exported_flat_with_pycytominer_names_and_old_names_deprecated():
    df = _profiles()
    ctrl = 'Metadata_Control == "negative"'
    assert microsnoop.aggregate is microsnoop.profiling.aggregate
    wells = microsnoop.aggregate(df, strata=["Metadata_Well"], operation="median")
    with pytest.warns(DeprecationWarning, match=r"aggregate\(by=...\) is deprecated; use strata="):
        old = microsnoop.aggregate(df, by=["Metadata_Well"], method="median")
    pd.testing.assert_frame_equal(wells, old)
    assert wells["Metadata_Count"].tolist() == [3, 3, 3, 3]
    norm = microsnoop.normalize(wells, samples=ctrl)
    with pytest.warns(DeprecationWarning, match="use samples="):
        pd.testing.assert_frame_equal(norm, microsnoop.normalize(wells, controls=ctrl))
    ctrl_rows = norm[norm["Metadata_Control"] == "negative"][microsnoop.feature_columns(norm)]
    assert np.allclose(ctrl_rows.mean(), 0, atol=1e-6)
    sph, fits = microsnoop.sphere(df, samples=ctrl, epsilon=0.1)
    with pytest.warns(DeprecationWarning):
        sph_old, _ = microsnoop.sphere(df, controls=ctrl, epsilon=0.1)
    pd.testing.assert_frame_equal(sph, sph_old)
    assert fits[0]["n_controls"] == 6
    with pytest.raises(TypeError, match="got both by= and strata="):
        microsnoop.aggregate(df, strata=["Metadata_Well"], by=["Metadata_Well"])
    # "all" (pycytominer's default) = every row
    pd.testing.assert_frame_equal(microsnoop.normalize(df, samples="all"), microsnoop.normalize(df, samples=None))


def test_every_public_function_has_numpydoc_parameters_and_returns():
    missing = []
    for name in microsnoop.__all__:
        obj = getattr(microsnoop, name)
        if callable(obj) and not isinstance(obj, type):
            doc = inspect.getdoc(obj) or ""
            if "Parameters\n----------" not in doc or "Returns\n-------" not in doc:
                missing.append(name)
    assert missing == []
    assert {"aggregate", "normalize", "sphere", "feature_columns", "read_embeddings", "embed"} <= set(microsnoop.__all__)


def test_readme_python_api_section_runs():
    """The README's Python API examples are doctests: a broken example fails CI."""
    import doctest

    readme = Path(__file__).resolve().parents[1] / "README.md"
    assert ">>> " in readme.read_text()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = doctest.testfile(str(readme), module_relative=False, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
                               verbose=False, report=True)
    assert res.attempted >= 8
    assert res.failed == 0
