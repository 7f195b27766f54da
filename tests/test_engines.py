"""Optional inference engines (embed/backends.py): same vectors as fp32 torch on real cells, same benchmark
scores, heads and TTA reproduced, cache keys, and a loud fallback to torch."""
from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest
import torch

from microsnoop.embed import Embedder
from microsnoop.embed.backends import EngineModule, check_engine, cosine_rows, installed
from microsnoop.core.errors import MicrosnoopError

needs_openvino = pytest.mark.skipif(not installed("openvino"), reason="openvino not installed (pip install 'microsnoop[fast]')")


@pytest.fixture(autouse=True)
def engine_cache(tmp_path_factory, monkeypatch):
    """One engine cache per test session, away from the user's ~/.cache; ``auto`` as users get it."""
    monkeypatch.setenv("MICROSNOOP_CACHE", str(tmp_path_factory.getbasetemp() / "msnoop-cache"))
    monkeypatch.delenv("MICROSNOOP_ENGINE", raising=False)


@pytest.fixture(scope="module")
def bbbc021(shared_data):
    d = shared_data / "benchmarks" / "bbbc021_dmso_vs_cycloheximide"
    info = json.loads((d / "dataset.json").read_text())
    return np.load(d / "images.npy"), pd.read_csv(d / "metadata.csv"), info


def per_channel_cosines(a: np.ndarray, b: np.ndarray, c: int) -> np.ndarray:
    dim = a.shape[1] // c
    return np.stack([cosine_rows(a[:, k * dim:(k + 1) * dim], b[:, k * dim:(k + 1) * dim]) for k in range(c)], axis=1)


def test_engine_option_checked_first():
    with pytest.raises(MicrosnoopError, match="unknown engine 'tensorrt'"):
        Embedder("random-init", device="cpu", engine="tensorrt")
    assert check_engine(None) == "auto" and check_engine("TORCH") == "torch"


def test_auto_picks_openvino_when_installed_and_honours_the_environment(monkeypatch):
    from microsnoop.embed import backends
    from microsnoop.embed.backends import resolve_engine

    monkeypatch.delenv("MICROSNOOP_ENGINE", raising=False)
    want = "openvino" if installed("openvino") else "torch"
    assert resolve_engine("auto", "cpu", "bf16")[0] == want
    monkeypatch.setattr(backends, "installed", lambda name: name == "torch")
    assert resolve_engine("auto", "cpu", "bf16") == ("torch", "auto: torch (no optional engine installed: "
                                                              "pip install 'microsnoop[fast]')")
    monkeypatch.undo()
    assert resolve_engine("auto", "cpu", "fp16")[0] == "torch"
    assert resolve_engine("openvino", "cpu", "bf16")[0] == "openvino"
    assert resolve_engine("auto", "cuda", "bf16")[0] == "torch"
    monkeypatch.setenv("MICROSNOOP_ENGINE", "openvino")
    assert resolve_engine("auto", "cpu", "bf16") == ("openvino", "MICROSNOOP_ENGINE=openvino")


def test_torch_engine_is_the_eager_path(yeast):
    cells = np.load(yeast / "images.npy", mmap_mode="r")[:6]
    emb = Embedder("random-init", device="cpu", precision="bf16", engine="torch")
    assert emb.engine == "torch" and emb.provenance()["engine"] == "torch"
    assert not isinstance(emb.module, EngineModule)


@needs_openvino
def test_openvino_matches_fp32_and_knn_scores_on_bbbc021(bbbc021):
    """Every channel vector of 600 real MCF-7 cells at cosine >= 0.999 to fp32 torch, and the set's kNN
    protocols scoring within 0.005 of torch's (the default model, default head)."""
    from microsnoop.evaluate.protocols import run_protocol

    images, meta, info = bbbc021
    ref = Embedder(None, device="cpu", precision="fp32", engine="torch").embed(images)
    emb = Embedder(None, device="cpu", precision="bf16", engine="openvino")
    got = emb.embed(images)
    assert emb.engine == "openvino", emb._engine.failed
    cos = per_channel_cosines(got, ref, images.shape[1])
    assert cos.min() >= 0.999, cos.min()
    prov = emb.provenance()
    assert prov["engine"] == "openvino" and prov["engine_min_cosine_to_fp32"] >= 0.999
    for proto in [p for p in info["protocols"] if p["name"] == "knn"]:
        a = run_protocol(ref, meta, proto, info["label"]).accuracy
        b = run_protocol(got, meta, proto, info["label"]).accuracy
        assert abs(a - b) <= 0.005 + 1e-9, (proto, a, b)  # 0.005 = 3 of the 600 cells (1e-9: float rounding)


SIGNAL_AFTER_ENGINES = """
import gc, os, signal, sys
import numpy as np
from microsnoop.embed import Embedder
cells = np.array(np.load(sys.argv[1], mmap_mode="r")[:4, :1])
emb = Embedder("random-init", device="cpu", precision="bf16", engine="openvino", scales="1+1.5")
emb.embed(cells)  # two input shapes: two compiled models
assert emb.engine == "openvino", emb.engine
del emb
gc.collect()
got = []
signal.signal(signal.SIGUSR1, lambda *a: got.append(1))  # Python handlers run on the alternate stack
os.kill(os.getpid(), signal.SIGUSR1)
print("handled", len(got))
"""


@needs_openvino
def test_signals_still_work_after_openvino_engines_are_released(yeast, tmp_path):
    """Each OpenVINO Core swaps in a signal alternate stack and unmaps it when released; with one Core per shape
    the thread was left on unmapped memory and the next signal (a DataLoader's SIGCHLD, Ctrl-C) was a SIGSEGV."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "MICROSNOOP_CACHE": str(tmp_path / "cache")}
    res = subprocess.run([sys.executable, "-c", SIGNAL_AFTER_ENGINES, str(yeast / "images.npy")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, (res.returncode, res.stderr[-2000:])
    assert res.stdout.strip().endswith("handled 1"), res.stdout


@needs_openvino
@pytest.mark.parametrize("head", [{"levels": "all", "pool": "meanmax"}, {"tta": "d8"}])
def test_openvino_reproduces_heads_and_tta(yeast, head):
    """The engine exports the module fast_module builds (all levels, meanmax pooling); TTA wraps the
    engine as it wraps torch, so the d8 vector stays invariant to a rotation of the cell."""
    cells = np.array(np.load(yeast / "images.npy", mmap_mode="r")[:8, :1])
    ref = Embedder("random-init", device="cpu", precision="fp32", engine="torch", **head).embed(cells)
    emb = Embedder("random-init", device="cpu", precision="bf16", engine="openvino", **head)
    got = emb.embed(cells)
    assert emb.engine == "openvino" and got.shape == ref.shape
    assert cosine_rows(got, ref).min() >= 0.999
    if head.get("tta") == "d8":
        rot = emb.embed(np.ascontiguousarray(np.rot90(cells, 1, axes=(2, 3))))
        assert cosine_rows(rot, got).min() >= 0.9999


@needs_openvino
def test_openvino_runs_distilled_projections(yeast):
    """distill-unet = encoder + linear projections: the engine's output includes the projections."""
    from microsnoop.models.microsnoop_unet import DistilledUNetEncoder

    torch.manual_seed(0)
    enc = DistilledUNetEncoder({"teachers": {"a": 16, "b": 8}}).eval()
    enc.name, enc.sha256 = "distilled-test", "0" * 64
    cells = np.array(np.load(yeast / "images.npy", mmap_mode="r")[:8, :1])
    ref = Embedder(enc, device="cpu", precision="fp32", engine="torch").embed(cells)
    emb = Embedder(enc, device="cpu", precision="bf16", engine="openvino")
    got = emb.embed(cells)
    assert got.shape == (8, 24) and emb.engine == "openvino"
    assert cosine_rows(got, ref).min() >= 0.999


@needs_openvino
def test_cache_key_follows_weights_head_and_shape(yeast):
    cells = np.array(np.load(yeast / "images.npy", mmap_mode="r")[:4, :1])
    a = Embedder("random-init", device="cpu", precision="bf16", engine="openvino")
    a.embed(cells)
    entry = a._engine.cache_entry((4, 1, 64, 64))
    assert (entry / "model.xml").exists() and "x1x64x64" in entry.name
    b = Embedder("random-init", device="cpu", precision="bf16", engine="openvino", levels="all")
    assert b.module is not None and b._engine.cache_entry((4, 1, 64, 64)) != entry
    assert a._engine.cache_entry((4, 1, 96, 96)) != entry
    c = Embedder("random-init", device="cpu", precision="bf16", engine="openvino")  # a new process would reuse it
    assert c.module is not None and c._engine.cache_entry((4, 1, 64, 64)) == entry


@needs_openvino
def test_new_shapes_reuse_one_trace_and_match_torch(yeast, monkeypatch):
    """The module is converted once (traced on a small crop, height and width dynamic); each new shape
    only reshapes and compiles that trace, and its vectors still match fp32 torch at every size."""
    import openvino as ov

    calls = []
    real = ov.convert_model
    monkeypatch.setattr(ov, "convert_model", lambda *a, **k: calls.append(1) or real(*a, **k))
    cells = np.array(np.load(yeast / "images.npy", mmap_mode="r")[:4, :1]).astype(np.float32)
    emb = Embedder("random-init", device="cpu", precision="bf16", engine="openvino", levels="all", scales="1+1.5")
    ref = Embedder("random-init", device="cpu", precision="fp32", engine="torch", levels="all", scales="1+1.5")
    for crop in (cells, np.ascontiguousarray(cells[..., 3:44, 5:57])):  # 64x64 (+96x96), 41x52 (+64x80)
        got = emb.embed(crop)
        assert emb.engine == "openvino" and cosine_rows(got, ref.embed(crop)).min() >= 0.999
    assert len(emb._engine._runs) == 4 and len(calls) == 1
    folder = emb._engine.cache_entry((1, 1, 64, 64)).parent  # shared with the session's other engine tests
    assert (folder / f"{emb._engine.digest[:24]}-traced" / "model.xml").exists()


@needs_openvino
def test_shapes_beyond_the_cap_run_on_torch_and_say_so(yeast, monkeypatch):
    """A folder of crops of many sizes must not pay an export per size: after MAX_SHAPES compiled
    shapes, new ones run on the torch fallback, and the provenance names both engines."""
    from microsnoop.embed import backends

    monkeypatch.setattr(backends, "MAX_SHAPES", 1)
    cells = np.array(np.load(yeast / "images.npy", mmap_mode="r")[:4, :1])
    small = np.ascontiguousarray(cells[..., :48, :48])
    emb = Embedder("random-init", device="cpu", precision="bf16", engine="openvino")
    emb.embed(cells)
    assert emb.engine == "openvino"
    want = Embedder("random-init", device="cpu", precision="bf16", engine="torch").embed(small)
    got = emb.embed(small)
    assert emb._engine.torch_batches == 1 and len(emb._engine._runs) == 1
    assert emb.engine == "openvino+torch" and emb.provenance()["engine"] == "openvino+torch"
    np.testing.assert_array_equal(got, want)  # exactly the torch path's vectors for the uncompiled shape


@needs_openvino
def test_openvino_batches_are_small(yeast):
    """OpenVINO runs ~128k pixels per forward (faster in cache), torch ~1M; --batch-size overrides both."""
    emb = Embedder("random-init", device="cpu", precision="bf16", engine="openvino")
    assert emb.batch_for(64, 64) == 32 and emb.batch_for(224, 224) == 2 and emb.batch_for(96, 96) == 14
    assert Embedder("random-init", device="cpu", engine="torch").batch_for(64, 64) == 256
    assert Embedder("random-init", device="cpu", engine="openvino", batch_size=7).batch_for(64, 64) == 7


@needs_openvino
def test_failed_validation_falls_back_to_torch_loudly(yeast, caplog):
    cells = np.array(np.load(yeast / "images.npy", mmap_mode="r")[:4, :1])
    want = Embedder("random-init", device="cpu", precision="bf16", engine="torch").embed(cells)
    emb = Embedder("random-init", device="cpu", precision="bf16", engine="openvino")
    emb.module.min_cosine = 1.5  # no engine can pass: forces the fallback path
    with caplog.at_level(logging.WARNING, logger="microsnoop"):
        got = emb.embed(cells)
    assert emb.engine == "torch" and "cosine" in emb._engine.failed
    assert any("falling back to torch" in r.getMessage() for r in caplog.records)
    np.testing.assert_array_equal(got, want)


@needs_openvino
@pytest.mark.slow
def test_cellpose_openvino_masks_match_torch(shared_data):
    """One real BBBC013 field: the OpenVINO Cellpose network's masks match today's torch masks at F1 >= 0.99."""
    import tifffile

    from microsnoop.segment.metrics import match_masks
    from microsnoop.segment.cellpose import CellposeSegmenter

    img = tifffile.imread(shared_data / "plates" / "bbbc013" / "Channel2-01-A-01.tif")
    a = CellposeSegmenter(engine="torch")(img)
    seg = CellposeSegmenter(engine="openvino")
    b = seg(img)
    assert seg.engine == "openvino" and seg.provenance()["engine"] == "openvino"
    res = match_masks(a, b, 0.5)
    f1 = 2 * res.tp / (2 * res.tp + res.fp + res.fn)
    assert a.max() > 20 and f1 >= 0.99, (a.max(), b.max(), f1)


def test_cli_rejects_unknown_engine_before_work(yeast, tmp_path, capsys):
    from conftest import run_cli

    out = tmp_path / "e.parquet"
    code, so, se = run_cli(["embed", str(yeast / "images.npy"), "-o", str(out), "--engine", "tensorrt"], capsys)
    assert code == 2 and "unknown engine 'tensorrt'" in so + se and not out.exists()
