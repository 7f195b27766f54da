"""Core package: model, registry, engine invariances, CLI outputs, resume and bad input."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import microsnoop
from microsnoop.core.errors import MicrosnoopError
from conftest import embedding_parts
from microsnoop.models import create_model
from microsnoop.models.unet import MicrosnoopUNet

pytestmark = pytest.mark.filterwarnings("ignore:model 'random-init' is untrained")


def test_unet_shapes_and_widths():
    net = MicrosnoopUNet().eval()
    x = torch.randn(2, 1, 60, 44)
    assert net(x).shape == (2, 1, 60, 44)  # reconstruction keeps odd sizes (padded to /8 inside)
    feats = net.encoder(x)
    assert [f.shape[1] for f in feats] == [32, 64, 128, 256]
    assert [f.shape[-1] for f in feats] == [44, 22, 11, 5]
    assert net.embed(x).shape == (2, 256)


def test_random_init_is_seeded_and_warns():
    with pytest.warns(UserWarning, match="untrained"):
        a = create_model("random-init")
    b = create_model("random-init")
    assert a.sha256 == b.sha256 == microsnoop.models.get_spec("random-init").sha256
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(v, w), k


def test_cellpose_encoder_reproduces_grayscale_cellpose_path():
    """One-channel adapted first layer == Cellpose fed [x, 0], away from the border."""
    pytest.importorskip("scellseg")
    from microsnoop.models.cellpose import cellpose_weights_path
    from microsnoop.models.unet import Encoder

    raw = torch.load(cellpose_weights_path(), map_location="cpu", weights_only=True)
    two = Encoder(in_channels=2)
    two.load_state_dict({k[len("extractor.downsample."):]: v for k, v in raw.items()
                         if k.startswith("extractor.downsample.")})
    enc = create_model("cellpose-encoder")
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        ref = two.eval()(torch.cat([x, torch.zeros_like(x)], 1))[0]
        got = enc.net.encoder(x)[0]
    inner = (slice(None), slice(None), slice(2, -2), slice(2, -2))
    assert torch.allclose(got[inner], ref[inner], atol=1e-4)


def test_checksum_mismatch_is_refused(tmp_path):
    from microsnoop.models.checkpoints import load_checkpoint, save_checkpoint

    enc = create_model("random-init")
    path = tmp_path / "m.safetensors"
    digest = save_checkpoint(path, enc.net.state_dict(), enc.config)
    load_checkpoint(path, digest)
    with pytest.raises(MicrosnoopError, match="sha256 mismatch"):
        load_checkpoint(path, "0" * 64)
    again = create_model(str(path))
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(again(x), enc(x), atol=1e-6)


def test_batch_and_channel_invariance(yeast):
    imgs = np.load(yeast / "images.npy", mmap_mode="r")[:64]
    emb = microsnoop.embed(imgs, model="random-init", device="cpu", batch_size=64)
    assert emb.shape == (64, 512)
    alone = microsnoop.embed(imgs[17], model="random-init", device="cpu")
    assert np.abs(alone - emb[17]).max() < 1e-5
    # channel 0's vector does not depend on channel 1
    swapped = np.array(imgs[:4])
    swapped[:, 1] = imgs[10:14, 1]
    e2 = microsnoop.embed(swapped, model="random-init", device="cpu")
    assert np.abs(e2[:, :256] - emb[:4, :256]).max() < 1e-5
    assert np.abs(e2[:, 256:] - emb[:4, 256:]).max() > 1e-3


def test_mixed_sizes_embed_each_at_own_size(yeast):
    imgs = np.load(yeast / "images.npy", mmap_mode="r")
    mixed = [np.array(imgs[0]), np.array(imgs[1, :, 8:56, 4:60]), np.array(imgs[2, :, :10, :10])]
    out = microsnoop.embed(mixed, model="random-init", device="cpu", precision="fp32")
    assert out.shape == (3, 512) and np.isfinite(out).all()
    assert np.allclose(out[1], microsnoop.embed(mixed[1], model="random-init", device="cpu", precision="fp32")[0], atol=1e-5)
    # a 10x10 image is padded (centred zeros after normalisation) to the 16-px minimum
    from microsnoop.io.normalize import normalize_percentile

    padded = np.pad(normalize_percentile(mixed[2]), ((0, 0), (3, 3), (3, 3)))
    enc = create_model("random-init")
    with torch.no_grad():
        ref = enc(torch.from_numpy(padded)[:, None]).numpy().reshape(-1)
    assert np.allclose(out[2], ref, atol=1e-5)


@pytest.fixture(scope="module")
def yeast_outputs(yeast, tmp_path_factory):
    """The full yeast set embedded once to Parquet and once to HDF5 through the CLI entry point."""
    d = tmp_path_factory.mktemp("yeast_out")
    for name in ("out.parquet", "out.h5"):
        r = subprocess.run([sys.executable, "-m", "microsnoop", "embed", str(yeast / "images.npy"), "-o", str(d / name),
                            "--model", "random-init", "--device", "cpu", "--chunk-size", "512", "--precision", "bf16"],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    return d


def test_yeast_parquet_and_h5(yeast_outputs, yeast):
    meta, x, prov = embedding_parts(yeast_outputs / "out.parquet")
    assert x.shape == (1642, 512)
    src_meta = pd.read_csv(yeast / "metadata.csv")
    for col in src_meta.columns:
        assert (meta[col].astype(str).to_numpy() == src_meta[col].astype(str).to_numpy()).all(), col
    import pyarrow.parquet as pq

    cols = pq.read_schema(yeast_outputs / "out.parquet").names
    assert cols[:len(src_meta.columns) + 1] == ["Metadata_Index", *src_meta.columns]
    assert cols[-512:][:2] == ["GFP_protein_emb_000", "GFP_protein_emb_001"] and cols[-1] == "RFP_cytosol_emb_255"
    assert prov["channel_names"] == ["GFP_protein", "RFP_cytosol"]
    assert prov["model"] == "random-init" and len(prov["model_sha256"]) == 64
    assert prov["torch_version"] == torch.__version__ and "percentile" in prov["normalization"]
    import h5py

    with h5py.File(yeast_outputs / "out.h5") as fh:
        assert fh["embeddings"].shape == (1642, 512)
        assert np.array_equal(fh["embeddings"][:], x)
        assert np.array_equal(fh["inds"][:], np.arange(1642))
        assert [c.decode() for c in fh["chans"][:]] == ["GFP_protein", "RFP_cytosol"]
        assert json.loads(fh.attrs["provenance"])["model_sha256"] == prov["model_sha256"]


def test_resume_after_kill_matches_uninterrupted(yeast_subset, tmp_path):
    args = [sys.executable, "-m", "microsnoop", "embed", str(yeast_subset), "--model", "random-init",
            "--device", "cpu", "--chunk-size", "8", "--batch-size", "8"]
    full = tmp_path / "full.parquet"
    subprocess.run(args + ["-o", str(full)], check=True, capture_output=True)
    out = tmp_path / "killed.parquet"
    proc = subprocess.Popen(args + ["-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    part = tmp_path / "killed.parquet.partial"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(part.glob("chunk_*.npy"))) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(part.glob("chunk_*.npy")))
    assert 3 <= done < 12 and not out.exists()
    r = subprocess.run(args + ["-o", str(out)], capture_output=True, text=True)
    assert r.returncode == 2 and "--resume" in r.stderr  # refuses to silently restart
    subprocess.run(args + ["-o", str(out), "--resume"], check=True, capture_output=True)
    assert not part.exists()
    m1, x1, _ = embedding_parts(full)
    m2, x2, _ = embedding_parts(out)
    assert np.array_equal(x1, x2) and m1.equals(m2)


# ---- bad input: one-line error naming the file, exit 2, no output left behind ----

def _assert_refused(cli, args, out: Path, *needles: str):
    code, _, err = cli("embed", *args, "-o", out, "--model", "random-init", "--device", "cpu")
    assert code == 2, err
    line = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(line) == 1, err
    for n in needles:
        assert n in line[0], line[0]
    assert not out.exists()
    assert not out.with_name(out.name + ".partial").exists()


def test_corrupt_image_file(cli, tmp_path, yeast):
    import tifffile

    d = tmp_path / "imgs"
    d.mkdir()
    imgs = np.load(yeast / "images.npy", mmap_mode="r")
    tifffile.imwrite(d / "a.tif", np.array(imgs[0]))
    (d / "b.tif").write_bytes(b"II*\x00garbage that is not a tiff")
    _assert_refused(cli, [d], tmp_path / "o.parquet", "b.tif", "TIFF holds no image")


def test_channel_count_differs(cli, tmp_path, yeast):
    import tifffile

    d = tmp_path / "imgs"
    d.mkdir()
    imgs = np.load(yeast / "images.npy", mmap_mode="r")
    tifffile.imwrite(d / "a.tif", np.array(imgs[0]))
    tifffile.imwrite(d / "b.tif", np.array(imgs[1, :1]))
    _assert_refused(cli, [d], tmp_path / "o.parquet", "b.tif", "1 channels but the first image has 2")


def test_nan_pixels(cli, tmp_path, yeast):
    arr = np.load(yeast / "images.npy", mmap_mode="r")[:20].astype(np.float32)
    arr[13, 1, 5, 5] = np.nan
    np.save(tmp_path / "x.npy", arr)
    _assert_refused(cli, [tmp_path / "x.npy", "--chunk-size", "8"], tmp_path / "o.h5", "x.npy (image 13)", "NaN or inf")


def test_empty_image(cli, tmp_path):
    np.save(tmp_path / "empty.npy", np.zeros((3, 2, 0, 0), np.uint16))
    _assert_refused(cli, [tmp_path / "empty.npy"], tmp_path / "o.parquet", "empty.npy", "empty image")


def test_small_image_is_padded_not_refused(cli, tmp_path, yeast):
    small = np.array(np.load(yeast / "images.npy", mmap_mode="r")[:3, :, 20:30, 20:32])
    np.save(tmp_path / "small.npy", small)
    code, _, err = cli("embed", tmp_path / "small.npy", "-o", tmp_path / "s.parquet", "--model", "random-init")
    assert code == 0, err
    _, x, _ = embedding_parts(tmp_path / "s.parquet")
    assert x.shape == (3, 512) and np.isfinite(x).all()


def test_missing_manifest_column(cli, tmp_path, shared_data):
    plate = shared_data / "plates" / "bbbc013"
    df = pd.read_csv(plate / "manifest.csv").head(2)
    df["FileName_GFP"] = [str(plate / f) for f in df["FileName_GFP"]]
    df.drop(columns=["FileName_DNA"]).to_csv(tmp_path / "m.csv", index=False)
    _assert_refused(cli, [tmp_path / "m.csv", "--path-columns", "FileName_GFP,FileName_DNA"], tmp_path / "o.parquet",
                    "m.csv", "missing column(s) FileName_DNA")


def test_existing_output_needs_overwrite(cli, tmp_path, yeast_subset):
    out = tmp_path / "o.parquet"
    out.write_text("precious")
    code, _, err = cli("embed", yeast_subset, "-o", out, "--model", "random-init")
    assert code == 2 and "already exists" in err and "--overwrite" in err
    assert out.read_text() == "precious"
    code, _, err = cli("embed", yeast_subset, "-o", out, "--model", "random-init", "--overwrite")
    assert code == 0, err
    assert embedding_parts(out)[1].shape == (96, 512)


def test_manifest_input_real_plate(cli, tmp_path, shared_data):
    plate = shared_data / "plates" / "bbbc013"
    df = pd.read_csv(plate / "manifest.csv").head(3)
    df["FileName_GFP"] = [str(plate / f) for f in df["FileName_GFP"]]
    df["FileName_DNA"] = [str(plate / f) for f in df["FileName_DNA"]]
    df.to_csv(tmp_path / "m.csv", index=False)
    code, _, err = cli("embed", tmp_path / "m.csv", "-o", tmp_path / "o.parquet", "--model", "random-init",
                       "--channels", "DNA,GFP")
    assert code == 0, err
    meta, x, prov = embedding_parts(tmp_path / "o.parquet")
    assert x.shape == (3, 512) and list(meta["Metadata_Well"]) == ["A01", "A02", "A03"]
    assert prov["channel_names"] == ["DNA", "GFP"]


def test_manifest_relative_paths_resolve_against_the_csv_folder(tmp_path, shared_data, monkeypatch):
    """The plate's own manifest (file names relative to it), opened through a relative CSV path, and a
    copy one folder up whose PathName_ columns are relative folders: both find the same files."""
    import os
    import shutil

    from microsnoop.io import open_source

    plate = tmp_path / "data" / "plate"
    plate.mkdir(parents=True)
    src = shared_data / "plates" / "bbbc013"
    df = pd.read_csv(src / "manifest.csv").head(2)
    for f in list(df["FileName_GFP"]) + list(df["FileName_DNA"]):
        (plate / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src / f, plate / f)
    df.to_csv(plate / "manifest.csv", index=False)
    up = df.assign(PathName_GFP="plate", PathName_DNA="plate")
    up.to_csv(tmp_path / "data" / "up.csv", index=False)
    monkeypatch.chdir(tmp_path)
    a = open_source(Path("data/plate/manifest.csv"), channels=["DNA", "GFP"])
    b = open_source(Path("data") / "up.csv", channels=["DNA", "GFP"])
    want = [[Path("data/plate") / d, Path("data/plate") / g] for d, g in zip(df["FileName_DNA"], df["FileName_GFP"])]
    assert [[Path(os.path.normpath(p)) for p in grp] for grp in a.files] == want
    assert [[Path(os.path.normpath(p)) for p in grp] for grp in b.files] == want
    assert all(p.exists() for grp in a.files for p in grp)


def test_inspect_reports_problems(cli, tmp_path, yeast):
    import tifffile

    d = tmp_path / "imgs"
    d.mkdir()
    imgs = np.load(yeast / "images.npy", mmap_mode="r")
    tifffile.imwrite(d / "a.tif", np.array(imgs[0]))
    tifffile.imwrite(d / "b.tif", np.array(imgs[1, :1]))
    code, out, _ = cli("inspect", d)
    assert code == 2 and "b.tif" in out and "problems: 1" in out
    code, out, _ = cli("inspect", yeast / "images.npy")
    assert code == 0 and "images: 1642" in out and "Metadata_Protein: 5 groups" in out


def test_atomic_outputs_get_the_umask_mode_not_mkstemp_private(tmp_path):
    import os

    from microsnoop.io.atomic import atomic_path

    old = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "out.txt") as tmp:
            tmp.write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "out.txt").stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16])
def test_integer_percentiles_equal_numpy_bit_for_bit(dtype):
    """The partial-sort percentiles of integer images are numpy's linear-method percentiles of the
    float32 copy exactly (same order statistics, numpy's interpolation), incl. the q >= 0.5 branch."""
    from microsnoop.io.normalize import normalize_percentile, row_percentiles

    info = np.iinfo(dtype)
    rng = np.random.default_rng(7)
    imgs = rng.integers(max(info.min, -3000), min(info.max, 60000) + 1, size=(5, 2, 37, 29)).astype(dtype)
    imgs[0, 1] = 9  # a constant plane -> zeros
    flat = imgs.reshape(10, -1)
    for q in ([1.0, 99.0], [0.0, 50.0, 100.0], [37.5, 62.5]):
        want = np.percentile(flat.astype(np.float32), q, axis=1)
        np.testing.assert_array_equal(row_percentiles(flat, q), want)
    lo, hi = np.percentile(flat.astype(np.float32), [1.0, 99.0], axis=1)
    scale = np.where(hi - lo > 0, hi - lo, 1.0).astype(np.float32)
    want = ((flat.astype(np.float32) - lo[:, None].astype(np.float32)) / scale[:, None]).reshape(imgs.shape)
    want[0, 1] = 0.0
    np.testing.assert_array_equal(normalize_percentile(imgs), want)
