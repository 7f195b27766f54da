"""Seeded fuzzing of real inputs (issue 16): TIFF, PNG, CSV (manifest and metadata), .npy and Parquet
files cut from ../shared are mutated (bit flips, truncation, inserted/deleted/overwritten bytes, text
edits) and run through the same functions the CLI uses. Every outcome must be success with finite
vectors or a ``MicrosnoopError``; any other exception type, or a NaN in any output, fails.

A few hundred cases run in CI; ``-m slow`` runs 5,000.
"""
from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from badinput_data import Inputs, build_inputs
from microsnoop.core.errors import MicrosnoopError

KINDS = ("tif", "png", "manifest", "metadata", "npy", "parquet")


@pytest.fixture(scope="module")
def inputs(shared_data, tmp_path_factory) -> Inputs:
    return build_inputs(shared_data, tmp_path_factory.mktemp("fuzzinputs"))


@pytest.fixture(scope="module")
def embedder():
    """The random-init model (quality is irrelevant here) on one thread: on a busy 2-core machine the
    32 px images embed ~6x faster without inter-thread hand-offs. torch's setting is restored after."""
    import torch

    from microsnoop.embed import Embedder

    threads = torch.get_num_threads()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        emb = Embedder("random-init", device="cpu", precision="fp32", threads=1)
    yield emb
    torch.set_num_threads(threads)


def mutate_bytes(data: bytes, rng: np.random.Generator) -> bytes:
    """One of: flip bits, truncate, insert, delete, overwrite a run, duplicate a block (biased to the
    header, where a decoder's size and type fields live)."""
    b = bytearray(data)
    n = len(b)
    pos = int(rng.integers(0, min(n, 512))) if rng.random() < 0.6 else int(rng.integers(0, n))
    op = rng.integers(0, 6)
    if op == 0:
        for _ in range(int(rng.integers(1, 9))):
            i = int(rng.integers(0, min(n, 1024))) if rng.random() < 0.7 else int(rng.integers(0, n))
            b[i] ^= 1 << int(rng.integers(0, 8))
    elif op == 1:
        b = b[:int(rng.integers(0, n))]
    elif op == 2:
        b[pos:pos] = rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
    elif op == 3:
        del b[pos:pos + int(rng.integers(1, 64))]
    elif op == 4:
        k = int(rng.integers(1, 16))
        b[pos:pos + k] = bytes([int(rng.choice([0, 0xFF, 0x7F, 0x80]))]) * len(b[pos:pos + k])
    else:
        k = int(rng.integers(1, 256))
        b[pos:pos] = b[pos:pos + k]
    return bytes(b)


def mutate_csv(text: str, rng: np.random.Generator) -> str:
    """Text edits a person or a script makes: drop/duplicate rows or columns, blank or garble cells."""
    lines = text.splitlines()
    op = rng.integers(0, 8)
    if op == 0 and len(lines) > 1:
        del lines[int(rng.integers(1, len(lines)))]
    elif op == 1:
        i = int(rng.integers(0, len(lines)))
        lines.insert(i, lines[i])
    elif op == 2:  # drop a column
        j = int(rng.integers(0, lines[0].count(",") + 1))
        lines = [",".join(c for k, c in enumerate(ln.split(",")) if k != j) for ln in lines]
    elif op == 3:  # replace a cell
        i, cells = int(rng.integers(0, len(lines))), None
        cells = lines[i].split(",")
        cells[int(rng.integers(0, len(cells)))] = str(rng.choice(["", "nan", "inf", "-1", "1e308", "x,y", '"', "..",
                                                                  "/", "images.npy", "\x00"]))
        lines[i] = ",".join(cells)
    elif op == 4:
        lines.append(",".join(["?"] * int(rng.integers(1, 12))))
    elif op == 5:
        lines = lines[:1]
    else:
        return mutate_bytes(text.encode(), rng).decode("latin-1")
    return "\n".join(lines) + "\n"


def _finite(x: np.ndarray) -> None:
    assert x.dtype == np.float32 and np.isfinite(x).all(), "non-finite vector returned without an error"


def run_images(path: Path, embedder) -> None:
    from microsnoop.io import open_source

    src = open_source(path)
    images = src.read(0, len(src))
    x = embedder.embed(images, name=src.name)
    assert x.shape == (len(src), src.n_channels * embedder.dim)
    _finite(x)


def run_case(kind: str, seed: int, inputs: Inputs, work: Path, embedder) -> str:
    """Mutate one real input with ``seed`` and run it; returns 'ok' or 'error'."""
    from microsnoop.profiling.pipeline import ProfileSettings, run_profile
    from conftest import profile_parts

    rng = np.random.default_rng(seed)
    work.mkdir(parents=True)
    try:
        if kind == "tif":
            src = inputs.folder / f"f{seed % 4}_w{1 + seed % 2}.tif"
            p = work / "m.tif"
            p.write_bytes(mutate_bytes(src.read_bytes(), rng))
            run_images(p, embedder)
        elif kind == "png":
            p = work / "m.png"
            p.write_bytes(mutate_bytes((inputs.png / f"p{seed % 3}.png").read_bytes(), rng))
            run_images(p, embedder)
        elif kind == "manifest":
            d = work / "f"
            shutil.copytree(inputs.folder, d)
            (d / "manifest.csv").write_text(mutate_csv((d / "manifest.csv").read_text(), rng), encoding="latin-1")
            run_images(d / "manifest.csv", embedder)
        elif kind == "metadata":
            shutil.copytree(inputs.arr.parent, work / "a")
            m = work / "a" / "metadata.csv"
            m.write_text(mutate_csv(m.read_text(), rng), encoding="latin-1")
            run_images(work / "a" / "images.npy", embedder)
        elif kind == "npy":
            p = work / "m.npy"
            p.write_bytes(mutate_bytes(inputs.arr.read_bytes(), rng))
            run_images(p, embedder)
        else:
            p = work / "m.parquet"
            p.write_bytes(mutate_bytes(inputs.profiles.read_bytes(), rng))
            s = ProfileSettings(controls='Metadata_Control == "negative"', normalize="standardize",
                                treatment=["Metadata_Compound"])
            out = run_profile(p, work / "out.parquet", s)
            for path in out.values():
                _, _, _ = profile_parts(path)  # re-reading checks the features are finite
        return "ok"
    except MicrosnoopError:
        return "error"


def _fuzz(n: int, inputs: Inputs, tmp: Path, embedder, monkeypatch) -> dict[str, dict[str, int]]:
    monkeypatch.setenv("MICROSNOOP_MAX_PIXELS", "2000000")  # mutated headers may declare huge images
    counts = {k: {"ok": 0, "error": 0} for k in KINDS}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(n):
            kind = KINDS[i % len(KINDS)]
            try:
                outcome = run_case(kind, 1000 + i, inputs, tmp / f"c{i}", embedder)
            except Exception as exc:  # anything but MicrosnoopError is a bug: report the reproducer
                raise AssertionError(f"{kind} seed {1000 + i}: {type(exc).__name__}: {exc}") from exc
            counts[kind][outcome] += 1
            shutil.rmtree(tmp / f"c{i}", ignore_errors=True)
    return counts


def test_fuzz_real_inputs(inputs, tmp_path, embedder, monkeypatch):
    counts = _fuzz(360, inputs, tmp_path, embedder, monkeypatch)
    # the mutations must exercise both outcomes for every kind, or the fuzzer tests nothing
    for kind, c in counts.items():
        assert c["error"] > 0, (kind, counts)
    assert sum(c["ok"] for c in counts.values()) > 20, counts


@pytest.mark.slow
def test_fuzz_real_inputs_5000(inputs, tmp_path, embedder, monkeypatch):
    counts = _fuzz(5000, inputs, tmp_path, embedder, monkeypatch)
    assert sum(c["ok"] + c["error"] for c in counts.values()) == 5000
