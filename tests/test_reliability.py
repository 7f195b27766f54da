"""Reliability (issue 16): resume by content digest, damaged partial folders, checkpoint weight
digests, fsync of chunk files, the restricted query grammar, LZW TIFFs and the pixel limit."""
from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from badinput_data import Inputs, build_inputs
from microsnoop.core.errors import MicrosnoopError, MicrosnoopWarning


@pytest.fixture(scope="module")
def inputs(shared_data, tmp_path_factory) -> Inputs:
    return build_inputs(shared_data, tmp_path_factory.mktemp("relinputs"))


@pytest.fixture(scope="module")
def embedder():
    import torch

    from microsnoop.embed import Embedder

    threads = torch.get_num_threads()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        emb = Embedder("random-init", device="cpu", precision="fp32", threads=1)
    yield emb
    torch.set_num_threads(threads)


class Interrupt(BaseException):
    """Stands in for a kill: not a MicrosnoopError, so the partial folder is kept."""


def _interrupted(source, out: Path, embedder, after_chunks: int) -> None:
    from microsnoop.embed import embed_source

    calls = []

    def progress(n: int) -> None:
        calls.append(n)
        if len(calls) > after_chunks:  # the first call reports the chunks already done
            raise Interrupt

    with pytest.raises(Interrupt):
        embed_source(source, out, chunk_size=2, embedder=embedder, progress=progress)
    assert out.with_name(out.name + ".partial").is_dir() and not out.exists()


def _array_copy(inputs: Inputs, tmp: Path) -> Path:
    d = tmp / "a"
    shutil.copytree(inputs.arr.parent, d)
    return d / "images.npy"


def test_resume_refuses_changed_content_of_same_size_and_mtime(inputs, tmp_path, embedder):
    from microsnoop.embed import embed_source
    from microsnoop.io import open_source

    npy = _array_copy(inputs, tmp_path)
    out = tmp_path / "o.parquet"
    _interrupted(open_source(npy), out, embedder, after_chunks=2)
    st = npy.stat()
    arr = np.load(npy)
    arr[1, 0, 5, 5] += 1  # image 1 is in the finished chunk 0
    np.save(npy, arr)
    os.utime(npy, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert npy.stat().st_size == st.st_size and npy.stat().st_mtime_ns == st.st_mtime_ns
    part = out.with_name(out.name + ".partial")
    before = sorted(p.name for p in part.iterdir())
    with pytest.raises(MicrosnoopError, match=r"input of images 0-1 changed.*--overwrite"):
        embed_source(open_source(npy), out, chunk_size=2, embedder=embedder, resume=True)
    assert sorted(p.name for p in part.iterdir()) == before and not out.exists()  # nothing deleted or written


def test_resume_of_unchanged_input_is_bit_identical_and_digests_are_journalled(inputs, tmp_path, embedder):
    from microsnoop.embed import distributed as dist
    from microsnoop.embed import embed_source
    from conftest import embedding_parts
    from microsnoop.io import open_source

    npy = _array_copy(inputs, tmp_path)
    full = tmp_path / "full.parquet"
    embed_source(open_source(npy), full, chunk_size=2, embedder=embedder)
    out = tmp_path / "o.parquet"
    src = open_source(npy)
    _interrupted(src, out, embedder, after_chunks=2)
    digests = dist.finished_digests(out.with_name(out.name + ".partial"))
    assert digests == {0: src.content_digest(0, 2), 1: src.content_digest(2, 4)}
    embed_source(open_source(npy), out, chunk_size=2, embedder=embedder, resume=True)
    m1, x1, p1 = embedding_parts(full)
    m2, x2, p2 = embedding_parts(out)
    assert np.array_equal(x1, x2) and m1.equals(m2)
    assert p1["input_sha256_of_chunks"] == p2["input_sha256_of_chunks"]


def test_resume_of_folder_input_detects_a_replaced_file(inputs, tmp_path, embedder):
    import tifffile

    from microsnoop.embed import embed_source
    from microsnoop.io import open_source

    d = tmp_path / "f"
    d.mkdir()
    for p in sorted(inputs.folder.glob("*.tif")):  # uncompressed: a replaced image keeps the file size
        tifffile.imwrite(d / p.name, tifffile.imread(p))
    out = tmp_path / "o.h5"
    _interrupted(open_source(d, channels=["w1", "w2"]), out, embedder, after_chunks=1)
    victim = d / "f1_w2.tif"
    size = victim.stat().st_size
    tifffile.imwrite(victim, 255 - tifffile.imread(victim))
    assert victim.stat().st_size == size
    with pytest.raises(MicrosnoopError, match="changed since the unfinished run"):
        embed_source(open_source(d, channels=["w1", "w2"]), out, chunk_size=2, embedder=embedder, resume=True)


@pytest.mark.parametrize("damage", ["empty", "truncated", "wrong shape"])
def test_damaged_chunk_is_embedded_again_with_a_warning(damage, inputs, tmp_path, embedder):
    from microsnoop.embed import embed_source
    from conftest import embedding_parts
    from microsnoop.io import open_source

    npy = _array_copy(inputs, tmp_path)
    full = tmp_path / "full.parquet"
    embed_source(open_source(npy), full, chunk_size=2, embedder=embedder)
    out = tmp_path / "o.parquet"
    _interrupted(open_source(npy), out, embedder, after_chunks=2)
    chunk = out.with_name(out.name + ".partial") / "chunk_000001.npy"
    if damage == "empty":
        chunk.write_bytes(b"")
    elif damage == "truncated":
        chunk.write_bytes(chunk.read_bytes()[:300])
    else:
        np.save(chunk, np.zeros((1, 512), np.float32))
    with pytest.warns(MicrosnoopWarning, match="chunk_000001.npy: damaged chunk file"):
        embed_source(open_source(npy), out, chunk_size=2, embedder=embedder, resume=True)
    assert np.array_equal(embedding_parts(full)[1], embedding_parts(out)[1])


def test_chunk_files_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    from microsnoop.io import atomic

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(a, b):
        events.append(("replace", str(a), str(b)))
        return real_replace(a, b)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    monkeypatch.setattr(atomic.os, "replace", replace)
    atomic.save_npy_atomic(tmp_path / "chunk_000000.npy", np.ones((2, 3), np.float32))
    kinds = [e[0] for e in events]
    assert kinds == ["fsync", "replace", "fsync"], events
    assert events[0][1] == events[1][1] and events[0][1].endswith(".tmp")  # the data, before it gets its name
    assert events[2][1] == str(tmp_path)  # then the folder entry
    assert np.array_equal(np.load(tmp_path / "chunk_000000.npy"), np.ones((2, 3), np.float32))


# ---- checkpoints ------------------------------------------------------------------------------
def test_checkpoint_header_digest_round_trips_and_catches_a_flipped_byte(tmp_path):
    import torch

    from microsnoop.models import create_model
    from microsnoop.models.checkpoints import (load_checkpoint, read_checkpoint_header, save_checkpoint,
                                              sha256_state_dict)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        enc = create_model("random-init")
    for dtype in (None, torch.bfloat16):
        p = tmp_path / f"m_{dtype}.safetensors"
        save_checkpoint(p, enc.state_dict(), enc.config, dtype=dtype)
        header = read_checkpoint_header(p)
        state, _, _ = load_checkpoint(p)
        saved = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in enc.state_dict().items()}
        assert header["weights_sha256"] == sha256_state_dict(saved)
        assert all(torch.equal(state[k], saved[k].float() if saved[k].is_floating_point() else saved[k]) for k in state)
    data = bytearray(p.read_bytes())
    for at in (len(data) - 7, len(data) // 2):  # bytes inside tensors
        bad = bytearray(data)
        bad[at] ^= 0x01
        (tmp_path / "bad.safetensors").write_bytes(bytes(bad))
        with pytest.raises(MicrosnoopError, match="bad.safetensors: weights do not match the digest"):
            load_checkpoint(tmp_path / "bad.safetensors")


def test_user_checkpoint_with_flipped_byte_is_refused_through_the_cli(inputs, tmp_path, cli):
    from microsnoop.models import create_model
    from microsnoop.models.checkpoints import save_checkpoint

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        enc = create_model("random-init")
    p = tmp_path / "mine.safetensors"
    save_checkpoint(p, enc.state_dict(), enc.config)
    code, _, err = cli("embed", inputs.arr, "-o", tmp_path / "ok.parquet", "--model", p, "--device", "cpu")
    assert code == 0, err
    data = bytearray(p.read_bytes())
    data[-100] ^= 0x40
    p.write_bytes(bytes(data))
    code, _, err = cli("embed", inputs.arr, "-o", tmp_path / "bad.parquet", "--model", p, "--device", "cpu")
    assert code == 2 and "mine.safetensors: weights do not match the digest" in err
    assert not (tmp_path / "bad.parquet").exists()


# ---- the --controls / --positive grammar -----------------------------------------------------------
@pytest.fixture
def frame() -> pd.DataFrame:
    return pd.DataFrame({"Metadata_Control": ["negative", "positive", "dose", "negative", "dose"],
                         "Metadata_Dose": [0.0, 10.0, 1.0, 0.0, 3.0], "Metadata_Plate": [1, 1, 1, 2, 2],
                         "Metadata_Odd name": ["a", "b", "a", "b", "a"]})


@pytest.mark.parametrize("query", [
    'Metadata_Control == "negative"',
    "Metadata_Control != 'negative'",
    'Metadata_Control in ["negative", "positive"]',
    "Metadata_Control not in ('dose',)",
    "Metadata_Dose > 0.5 and Metadata_Dose <= 3",
    "1 <= Metadata_Dose < 5",
    "not (Metadata_Plate == 2) or Metadata_Dose == 0",
    "(Metadata_Control == 'dose') & ~(Metadata_Plate == 1)",
    "`Metadata_Odd name` == 'a' | (Metadata_Dose >= 10)",
    "Metadata_Dose == -0.0",
    "Metadata_Control == 'has @ inside'",
])
def test_allowed_queries_select_the_rows_pandas_selects(query, frame):
    from microsnoop.profiling.table import select_rows

    expected = frame.index.isin(frame.query(query).index)
    assert np.array_equal(select_rows(frame, query), expected)


@pytest.mark.parametrize("query,why", [
    ("Metadata_Dose > @limit", "'@' references"),
    ("@frame.shape[0] > 0", "'@' references"),
    ("__import__('os').system('true') == 0", "not a column or a literal"),
    ("Metadata_Control.str.startswith('n')", "not allowed"),
    ("Metadata_Dose * 2 > 1", "not a column or a literal"),
    ("Metadata_Dose[0] > 1", "not a column or a literal"),
    ("[x for x in Metadata_Dose] == 1", "not a column or a literal"),
    ("Metadata_Dose > (lambda: 1)()", "not a column or a literal"),
    ("Metadata_Dose is None", "not allowed"),
    ("'a' == 'a'", "compares no column"),
    ("Metadata_Control in Metadata_Plate", "'in' needs"),
    ("Metadata_Control ==", "not a valid expression"),
    ("Metadata_Missing == 1", "no column 'Metadata_Missing'"),
])
def test_refused_queries(query, why, frame):
    from microsnoop.profiling.table import select_rows

    with pytest.raises(MicrosnoopError, match=why.replace("(", r"\(").replace("[", r"\[")):
        select_rows(frame, query)


def test_query_never_reaches_pandas_eval(frame, monkeypatch):
    from microsnoop.profiling.table import select_rows

    def boom(*a, **k):
        raise AssertionError("DataFrame.query/eval was called")

    monkeypatch.setattr(pd.DataFrame, "query", boom)
    monkeypatch.setattr(pd.DataFrame, "eval", boom)
    monkeypatch.setattr(pd, "eval", boom)
    assert select_rows(frame, 'Metadata_Control == "negative"').tolist() == [True, False, False, True, False]


# ---- images --------------------------------------------------------------------------------------
def test_lzw_tiff_reads_losslessly(inputs, tmp_path):
    import tifffile

    from microsnoop.io import read_image

    img = tifffile.imread(inputs.folder / "f0_w2.tif")
    tifffile.imwrite(tmp_path / "lzw.tif", img, compression="lzw")
    with tifffile.TiffFile(tmp_path / "lzw.tif") as t:
        assert t.pages[0].compression == tifffile.COMPRESSION.LZW
    assert np.array_equal(read_image(tmp_path / "lzw.tif")[0], img)


def test_imagecodecs_is_a_declared_dependency():
    import tomllib

    root = Path(__file__).resolve().parents[1]
    deps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.startswith("imagecodecs") for d in deps)


def test_pixel_limit_is_configurable(inputs, tmp_path, monkeypatch):
    from microsnoop.io import open_source, read_image

    monkeypatch.setenv("MICROSNOOP_MAX_PIXELS", "1023")
    with pytest.raises(MicrosnoopError, match=r"1,024 pixels, over the limit of 1,023"):
        read_image(inputs.folder / "f0_w1.tif")
    with pytest.raises(MicrosnoopError, match="images.npy: .* over the limit"):
        open_source(inputs.arr)
    monkeypatch.setenv("MICROSNOOP_MAX_PIXELS", "1024")
    assert read_image(inputs.folder / "f0_w1.tif").shape == (1, 32, 32)


def test_extreme_but_finite_pixels_never_give_nan_vectors(inputs, embedder):
    """Float pixels up to the refusal threshold embed to finite vectors; beyond it they are refused,
    and a non-finite vector from the model is refused rather than returned."""
    x = np.load(inputs.arr)[:2].astype(np.float32)
    x[0, 0, 3, 3] = 1e29
    out = embedder.embed(x)
    assert np.isfinite(out).all()
    x[0, 0, 3, 3] = 2e30
    with pytest.raises(MicrosnoopError, match=r"image 0: image has float pixel values beyond"):
        embedder.embed(x)


def test_a_nan_vector_from_the_model_is_refused(inputs, embedder, monkeypatch):
    x = np.load(inputs.arr)[:3]
    real = embedder.encode_planes

    def poisoned(planes):
        out = real(planes)
        out[2, 5] = np.nan  # plane 2 = image 1, channel 0
        return out

    monkeypatch.setattr(embedder, "encode_planes", poisoned)
    with pytest.raises(MicrosnoopError, match=r"image 1: the model gave a NaN/inf vector"):
        embedder.embed(x)


def test_profile_refuses_nan_features_and_keeps_treatments_file(inputs, tmp_path, cli):
    df = pd.read_parquet(inputs.profiles)
    df.loc[3, "GFP_emb_007"] = np.nan
    df.to_parquet(tmp_path / "nan.parquet", index=False)
    code, _, err = cli("profile", tmp_path / "nan.parquet", "-o", tmp_path / "p.parquet", "--sphere")
    assert code == 2 and "row 3, column GFP_emb_007" in err and not (tmp_path / "p.parquet").exists()
    # the clean table profiles, sphered per plate, with finite values
    code, _, err = cli("profile", inputs.profiles, "-o", tmp_path / "p.parquet", "--sphere", "--treatment",
                       "Metadata_Compound")
    assert code == 0, err
    t = pd.read_parquet(tmp_path / "p.treatments.parquet")
    assert len(t) == 3 and np.isfinite(t.filter(like="_emb_").to_numpy()).all()
