"""The bad-input matrix (issue 16): every case goes through the CLI entry point in-process and must end
with exit code 2, exactly one ``error:`` line (or, for ``inspect``, ``problem:`` lines) naming the file
or option at fault, no traceback, and nothing new in the output folder. Inputs are small real images
cut from ../shared; the random-init model is used where the model's quality is irrelevant.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pytest

from badinput_data import Inputs, build_inputs
from microsnoop.core.errors import MicrosnoopWarning

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.fixture(scope="session")
def inputs(shared_data, tmp_path_factory) -> Inputs:
    return build_inputs(shared_data, tmp_path_factory.mktemp("badinputs"))


@dataclass
class Ctx:
    inp: Inputs
    tmp: Path
    out: Path  # the output folder whose content must not change

    def arr(self, array: np.ndarray, name: str = "x.npy", meta: pd.DataFrame | None = None) -> Path:
        d = self.tmp / "in"
        d.mkdir(exist_ok=True)
        np.save(d / name, array)
        if meta is not None:
            meta.to_csv(d / "metadata.csv", index=False)
        return d / name

    def cells(self) -> np.ndarray:
        return np.load(self.inp.arr)

    def folder(self) -> Path:
        d = self.tmp / "folder"
        if not d.exists():
            shutil.copytree(self.inp.folder, d)
        return d

    def tif(self, array: np.ndarray, name: str = "t.tif", **kw) -> Path:
        import tifffile

        d = self.tmp / "tifs"
        d.mkdir(exist_ok=True)
        tifffile.imwrite(d / name, array, **kw)
        return d / name

    def manifest(self, edit: Callable[[pd.DataFrame], pd.DataFrame]) -> Path:
        d = self.folder()
        df = edit(pd.read_csv(d / "manifest.csv"))
        df.to_csv(d / "m.csv", index=False)
        return d / "m.csv"

    def plate(self, edit: Callable[[pd.DataFrame], pd.DataFrame]) -> Path:
        df = edit(pd.read_csv(self.inp.plate))
        p = self.tmp / "plate.csv"
        df.to_csv(p, index=False)
        return p

    def profiles(self, edit: Callable[[pd.DataFrame], pd.DataFrame] | None = None, name: str = "p.parquet") -> Path:
        df = pd.read_parquet(self.inp.profiles)
        if edit is not None:
            df = edit(df)
        p = self.tmp / name
        df.to_parquet(p, index=False)
        return p

    def ckpt(self, damage: Callable[[bytes], bytes]) -> Path:
        """A random-init checkpoint saved with its weights digest, then damaged."""
        from microsnoop.models import create_model
        from microsnoop.models.checkpoints import save_checkpoint

        enc = create_model("random-init")
        p = self.tmp / "model.safetensors"
        save_checkpoint(p, enc.state_dict(), enc.config)
        p.write_bytes(damage(p.read_bytes()))
        return p


def _file(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _flip(data: bytes, at: int) -> bytes:
    b = bytearray(data)
    b[at] ^= 0x10
    return bytes(b)


def _png_declaring(h: int, w: int) -> bytes:
    """A tiny valid-looking PNG whose header declares an h x w grey image."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


E = ["--model", "random-init", "--device", "cpu"]


def embed(c: Ctx, inp, *opts, out: str = "o.parquet"):
    return ["embed", inp, "-o", c.out / out, *E, *opts]


# ---- embed -------------------------------------------------------------------------------------
EMBED: dict[str, Callable[[Ctx], tuple[list, str]]] = {
    "missing input": lambda c: (embed(c, c.tmp / "nope.npy"), "nope.npy"),
    "unsupported suffix": lambda c: (embed(c, _file(c.tmp / "x.txt", b"hello")), "x.txt"),
    "garbage npy": lambda c: (embed(c, _file(c.tmp / "g.npy", b"\x93NUMPY garbage")), "g.npy"),
    "truncated npy": lambda c: (embed(c, _file(c.tmp / "t.npy", c.inp.arr.read_bytes()[:5000])), "t.npy"),
    "zero-byte npy": lambda c: (embed(c, _file(c.tmp / "z.npy", b"")), "z.npy"),
    "no images": lambda c: (embed(c, c.arr(np.zeros((0, 2, 64, 64), np.uint8))), "x.npy"),
    "5-D array": lambda c: (embed(c, c.arr(np.zeros((2, 2, 2, 64, 64), np.uint8))), "x.npy"),
    "complex array": lambda c: (embed(c, c.arr(c.cells().astype(np.complex64))), "complex"),
    "string array": lambda c: (embed(c, c.arr(np.array([["a"]]))), "x.npy"),
    "NaN pixel": lambda c: (embed(c, c.arr(_poke(c.cells().astype(np.float32), np.nan))), "x.npy (image 3)"),
    "inf pixel": lambda c: (embed(c, c.arr(_poke(c.cells().astype(np.float32), np.inf))), "x.npy (image 3)"),
    "extreme float pixel": lambda c: (embed(c, c.arr(_poke(c.cells().astype(np.float32), 3e38))), "x.npy (image 3)"),
    "1x1 images": lambda c: (embed(c, c.arr(c.cells()[:, :, :1, :1])), "1x1 px is too small"),
    "100000x1 image": lambda c: (embed(c, c.arr(np.ones((1, 1, 100000, 1), np.uint16))), "100000x1 px"),
    "metadata wrong rows": lambda c: (embed(c, c.arr(c.cells(), meta=pd.DataFrame({"Metadata_A": range(5)}))),
                                      "metadata.csv"),
    "metadata not CSV": lambda c: (embed(c, c.arr(c.cells()), "--metadata", _file(c.tmp / "m.csv", b"\x00\xff" * 9)),
                                   "m.csv"),
    "--metadata missing": lambda c: (embed(c, c.inp.arr, "--metadata", c.tmp / "gone.csv"), "gone.csv"),
    "--metadata on folder": lambda c: (embed(c, c.folder(), "--channels", "w1,w2", "--metadata", c.inp.arr.parent /
                                             "metadata.csv"), "--metadata"),
    "bad dataset.json": lambda c: (embed(c, _bad_json(c)), "dataset.json"),
    "--channel-index abc": lambda c: (embed(c, c.folder(), "--channel-index", "abc"), "--channel-index"),
    "--channel-index -1": lambda c: (embed(c, c.folder(), "--channel-index", "-1"), "--channel-index"),
    "--channel-index 0,0": lambda c: (embed(c, c.folder(), "--channel-index", "0,0"), "--channel-index"),
    "--channel-index too high": lambda c: (embed(c, c.folder(), "--channel-index", "3"), "--channel-index"),
    "--channel-names count": lambda c: (embed(c, c.inp.arr, "--channel-names", "A,B,C"), "images.npy"),
    "--channel-names repeat": lambda c: (embed(c, c.inp.arr, "--channel-names", "A,A"), "images.npy"),
    "--channels token missing": lambda c: (embed(c, c.folder(), "--channels", "w1,w3"), "w3"),
    "--channels first token absent": lambda c: (embed(c, c.folder(), "--channels", "w9,w1"), "w9"),
    "unpaired w2 file": lambda c: (embed(c, _unpaired(c), "--channels", "w1,w2"), "f9_w2.tif"),
    "manifest missing file": lambda c: (embed(c, c.manifest(lambda d: d.assign(FileName_DNA=["f0_w2.tif", "gone.tif",
                                                                                              "f2_w2.tif", "f3_w2.tif"]))),
                                        "gone.tif"),
    "manifest names a folder": lambda c: (embed(c, c.manifest(lambda d: d.assign(FileName_DNA=".")), ), "m.csv"),
    "manifest empty cell": lambda c: (embed(c, c.manifest(lambda d: d.assign(FileName_GFP=[None, "f1_w1.tif", "f2_w1.tif",
                                                                                          "f3_w1.tif"]))), "m.csv"),
    "manifest no rows": lambda c: (embed(c, c.manifest(lambda d: d.iloc[:0])), "m.csv"),
    "manifest no FileName": lambda c: (embed(c, c.manifest(lambda d: d.drop(columns=["FileName_GFP", "FileName_DNA"]))),
                                       "m.csv"),
    "manifest file twice": lambda c: (embed(c, c.manifest(lambda d: d.assign(FileName_DNA=d["FileName_GFP"]))), "m.csv"),
    "manifest binary": lambda c: (embed(c, _file(c.tmp / "b.csv", bytes(range(256)) * 4)), "b.csv"),
    "manifest --channels unknown": lambda c: (embed(c, c.inp.manifest, "--channels", "DNA,Actin"), "FileName_Actin"),
    "corrupt tif in folder": lambda c: (embed(c, _with(c, "f0_w1.tif", b"II*\x00 not a tiff")), "f0_w1.tif"),
    "truncated tif in folder": lambda c: (embed(c, _with(c, "f1_w1.tif", (c.inp.folder / "f1_w1.tif").read_bytes()[:300])),
                                          "f1_w1.tif"),
    "zero-byte tif": lambda c: (embed(c, _with(c, "f2_w1.tif", b"")), "f2_w1.tif"),
    "Z-stack tif": lambda c: (embed(c, c.tif(np.zeros((5, 32, 32), np.uint16), imagej=True, metadata={"axes": "ZYX"})),
                              "Z-stack"),
    "time-series tif": lambda c: (embed(c, c.tif(np.zeros((3, 32, 32), np.uint16), imagej=True,
                                                 metadata={"axes": "TYX"})), "time series"),
    "complex tif": lambda c: (embed(c, c.tif(np.ones((32, 32), np.complex64))), "complex"),
    "PNG declaring 1M rows": lambda c: (embed(c, _file(c.tmp / "big.png", _png_declaring(1_000_000, 1000))), "big.png"),
    "corrupt PNG": lambda c: (embed(c, _file(c.tmp / "c.png", _png_declaring(64, 64)[:40])), "c.png"),
    "channel files differ in size": lambda c: (embed(c, _resized(c), "--channels", "w1,w2"), "differ in size"),
    "channel count differs": lambda c: (embed(c, _mixed_channels(c)), "channels"),
    "output suffix": lambda c: (embed(c, c.inp.arr, out="o.csv"), "o.csv"),
    "--format bogus": lambda c: (embed(c, c.inp.arr, "--format", "xlsx"), "xlsx"),
    "output is a folder": lambda c: (embed(c, c.inp.arr, out="sub.parquet"), "sub.parquet"),
    "output parent is a file": lambda c: (embed(c, c.inp.arr, out="afile/o.parquet"), "afile"),
    "output exists": lambda c: (embed(c, c.inp.arr, out="done.parquet"), "--overwrite"),
    "partial without --resume": lambda c: (embed(c, c.inp.arr, out="half.parquet"), "--resume"),
    "partial damaged state": lambda c: (embed(c, c.inp.arr, "--resume", out="bad.parquet"), "state.json"),
    "partial other input": lambda c: (embed(c, c.inp.arr, "--resume", out="other.parquet"), "cannot resume"),
    "--chunk-size 0": lambda c: (embed(c, c.inp.arr, "--chunk-size", "0"), "--chunk-size"),
    "--batch-size 0": lambda c: (embed(c, c.inp.arr, "--batch-size", "0"), "--batch-size"),
    "--threads 0": lambda c: (embed(c, c.inp.arr, "--threads", "0"), "--threads"),
    "--device bogus": lambda c: (["embed", c.inp.arr, "-o", c.out / "o.parquet", "--model", "random-init", "--device",
                                  "gpu7"], "gpu7"),
    "--device cuda absent": lambda c: (["embed", c.inp.arr, "-o", c.out / "o.parquet", "--model", "random-init",
                                        "--device", "cuda"], "--device cuda"),
    "--precision bogus": lambda c: (embed(c, c.inp.arr, "--precision", "fp8"), "fp8"),
    "--model missing file": lambda c: (["embed", c.inp.arr, "-o", c.out / "o.parquet", "--model",
                                        c.tmp / "gone.safetensors"], "gone.safetensors"),
    "--model unknown name": lambda c: (["embed", c.inp.arr, "-o", c.out / "o.parquet", "--model", "nopenet"], "nopenet"),
    "--model flipped weight byte": lambda c: (["embed", c.inp.arr, "-o", c.out / "o.parquet", "--model",
                                               c.ckpt(lambda b: _flip(b, len(b) - 1000))], "digest"),
    "--model truncated": lambda c: (["embed", c.inp.arr, "-o", c.out / "o.parquet", "--model",
                                     c.ckpt(lambda b: b[:len(b) // 2])], "model.safetensors"),
    "--model not safetensors": lambda c: (["embed", c.inp.arr, "-o", c.out / "o.parquet", "--model",
                                           _file(c.tmp / "m.safetensors", b"PK\x03\x04 a zip")], "m.safetensors"),
    "--max-pixels exceeded": lambda c: (["--max-pixels", "1000", *embed(c, c.folder(), "--channels", "w1,w2")],
                                        "--max-pixels"),
    "--max-pixels abc": lambda c: (["--max-pixels", "abc", *embed(c, c.inp.arr)], "--max-pixels"),
}
if not IS_ROOT:  # root may write anywhere, so a read-only folder cannot be tested as root
    EMBED["read-only output folder"] = lambda c: (embed(c, c.inp.arr, out="ro/o.parquet"), "permission")


def _poke(a: np.ndarray, value: float) -> np.ndarray:
    a[3, 1, 10, 10] = value
    return a


def _bad_json(c: Ctx) -> Path:
    p = c.arr(c.cells())
    (p.parent / "dataset.json").write_text("{ not json")
    return p


def _unpaired(c: Ctx) -> Path:
    d = c.folder()
    shutil.copy(d / "f0_w2.tif", d / "f9_w2.tif")
    return d


def _with(c: Ctx, name: str, data: bytes) -> Path:
    d = c.folder()
    (d / name).write_bytes(data)
    return d


def _resized(c: Ctx) -> Path:
    import tifffile

    d = c.folder()
    tifffile.imwrite(d / "f1_w2.tif", tifffile.imread(d / "f1_w2.tif")[:20, :20])
    return d


def _mixed_channels(c: Ctx) -> Path:
    import tifffile

    d = c.tmp / "mixed"
    d.mkdir()
    tifffile.imwrite(d / "a.tif", c.cells()[0])
    tifffile.imwrite(d / "b.tif", c.cells()[1, :1])
    return d


# ---- inspect (problems listed, exit 2) ---------------------------------------------------------
INSPECT: dict[str, Callable[[Ctx], tuple[list, str]]] = {
    "missing input": lambda c: (["inspect", c.tmp / "nope.npy"], "nope.npy"),
    "garbage npy": lambda c: (["inspect", _file(c.tmp / "g.npy", b"\x93NUMPY garbage")], "g.npy"),
    "NaN pixel": lambda c: (["inspect", c.arr(_poke(c.cells().astype(np.float32), np.nan))], "x.npy (image 3)"),
    "extreme float pixel": lambda c: (["inspect", c.arr(_poke(c.cells().astype(np.float32), 3e38))], "x.npy (image 3)"),
    "1x1 images": lambda c: (["inspect", c.arr(c.cells()[:, :, :1, :1])], "too small"),
    "metadata wrong rows": lambda c: (["inspect", c.arr(c.cells(), meta=pd.DataFrame({"Metadata_A": range(5)}))],
                                      "metadata.csv"),
    "manifest missing file": lambda c: (["inspect", c.manifest(lambda d: d.assign(FileName_GFP="gone.tif"))], "gone.tif"),
    "unpaired w2 file": lambda c: (["inspect", _unpaired(c), "--channels", "w1,w2"], "f9_w2.tif"),
    "corrupt tif": lambda c: (["inspect", _with(c, "f0_w1.tif", b"II*\x00 not a tiff")], "f0_w1.tif"),
    "Z-stack tif": lambda c: (["inspect", c.tif(np.zeros((5, 32, 32), np.uint16), imagej=True,
                                               metadata={"axes": "ZYX"})], "Z-stack"),
    "complex tif": lambda c: (["inspect", c.tif(np.ones((32, 32), np.complex64))], "complex"),
    "--group-by missing": lambda c: (["inspect", c.inp.arr, "--group-by", "Metadata_Nope"], "Metadata_Nope"),
    "--channel-index abc": lambda c: (["inspect", c.folder(), "--channel-index", "x,1"], "--channel-index"),
    "PNG declaring 1M rows": lambda c: (["inspect", _file(c.tmp / "big.png", _png_declaring(1_000_000, 1000))],
                                        "big.png"),
}


# ---- profile -----------------------------------------------------------------------------------
def prof(c: Ctx, inp, *opts, out: str = "p.parquet"):
    return ["profile", inp, "-o", c.out / out, *opts]


def _h5_without(c: Ctx, key: str) -> Path:
    import h5py

    p = c.tmp / "p.h5"
    shutil.copy(c.inp.profiles_h5, p)
    with h5py.File(p, "a") as fh:
        del fh[key]
    return p


PROFILE: dict[str, Callable[[Ctx], tuple[list, str]]] = {
    "missing input": lambda c: (prof(c, c.tmp / "nope.parquet"), "nope.parquet"),
    "input is a folder": lambda c: (prof(c, _dir(c.tmp / "d.parquet")), "d.parquet"),
    "input suffix": lambda c: (prof(c, _file(c.tmp / "p.csv", b"a,b\n1,2\n")), "p.csv"),
    "truncated parquet": lambda c: (prof(c, _file(c.tmp / "t.parquet", c.inp.profiles.read_bytes()[:2000])), "t.parquet"),
    "zero-byte parquet": lambda c: (prof(c, _file(c.tmp / "z.parquet", b"")), "z.parquet"),
    "parquet tail damaged": lambda c: (prof(c, _file(c.tmp / "d.parquet", c.inp.profiles.read_bytes()[:-30] + b"\0" * 30)),
                                       "d.parquet"),
    "no feature columns": lambda c: (prof(c, c.profiles(lambda d: d[[k for k in d.columns if "_emb_" not in k]])),
                                     "p.parquet"),
    "text feature column": lambda c: (prof(c, c.profiles(lambda d: d.assign(GFP_emb_003="x"))), "p.parquet"),
    "NaN feature": lambda c: (prof(c, c.profiles(lambda d: _nan(d)), "--sphere"), "NaN"),
    "inf feature": lambda c: (prof(c, c.profiles(lambda d: _nan(d, np.inf)), "--normalize", "standardize"), "inf"),
    "h5 without feature_names": lambda c: (prof(c, _h5_without(c, "feature_names")), "p.h5"),
    "h5 without embeddings": lambda c: (prof(c, _h5_without(c, "embeddings")), "p.h5"),
    "truncated h5": lambda c: (prof(c, _file(c.tmp / "t.h5", c.inp.profiles_h5.read_bytes()[:3000])), "t.h5"),
    "garbage h5ad": lambda c: (prof(c, _file(c.tmp / "g.h5ad", b"not hdf5 at all")), "g.h5ad"),
    "output suffix": lambda c: (prof(c, c.inp.profiles, out="p.txt"), "p.txt"),
    "output exists": lambda c: (prof(c, c.inp.profiles, out="done.parquet"), "--overwrite"),
    "treatments file exists": lambda c: (prof(c, c.inp.profiles, "--treatment", "Metadata_Compound", out="t.parquet"),
                                         "t.treatments.parquet"),
    "output is a folder": lambda c: (prof(c, c.inp.profiles, out="sub.parquet"), "sub.parquet"),
    "output parent is a file": lambda c: (prof(c, c.inp.profiles, out="afile/p.parquet"), "afile"),
    "output is the input": lambda c: (["profile", c.inp.profiles, "-o", c.inp.profiles, "--overwrite"], "input"),
    "--controls @": lambda c: (prof(c, c.inp.profiles, "--controls", "Metadata_Control == @x", "--normalize",
                                    "standardize"), "--controls"),
    "--controls code": lambda c: (prof(c, c.inp.profiles, "--controls", "__import__('os').getcwd() == 1"), "--controls"),
    "--controls method call": lambda c: (prof(c, c.inp.profiles, "--controls", "Metadata_Control.str.len() > 1"),
                                         "--controls"),
    "--controls arithmetic": lambda c: (prof(c, c.inp.profiles, "--controls", "GFP_emb_000 * 2 > 1"), "--controls"),
    "--controls syntax": lambda c: (prof(c, c.inp.profiles, "--controls", "Metadata_Control =="), "--controls"),
    "--controls unknown column": lambda c: (prof(c, c.inp.profiles, "--controls", "Metadata_Ctrl == 'negative'"),
                                            "Metadata_Ctrl"),
    "--controls type clash": lambda c: (prof(c, c.inp.profiles, "--controls", "Metadata_Control > 3"), "--controls"),
    "--controls match nothing": lambda c: (prof(c, c.inp.profiles, "--controls", "Metadata_Control == 'none'",
                                                "--normalize", "standardize"), "controls"),
    "--normalize bogus": lambda c: (prof(c, c.inp.profiles, "--normalize", "zscore"), "--normalize"),
    "--aggregate-method bogus": lambda c: (prof(c, c.inp.profiles, "--aggregate", "Metadata_Well", "--aggregate-method", "mode"), "--aggregate-method"),
    "--aggregate missing": lambda c: (prof(c, c.inp.profiles, "--aggregate", "Metadata_Nope"), "Metadata_Nope"),
    "--treatment missing": lambda c: (prof(c, c.inp.profiles, "--treatment", "Metadata_Nope"), "Metadata_Nope"),
    "--sphere-by missing": lambda c: (prof(c, c.inp.profiles, "--sphere", "--sphere-by", "Metadata_Batch"),
                                      "Metadata_Batch"),
    "--sphere too few controls": lambda c: (prof(c, c.inp.profiles, "--sphere", "--controls",
                                                 "Metadata_Compound == 'A'"), "control"),
}


def _dir(p: Path) -> Path:
    p.mkdir()
    return p


def _nan(d: pd.DataFrame, value: float = np.nan) -> pd.DataFrame:
    d = d.copy()
    d.loc[4, "RFP_emb_100"] = value
    return d


# ---- plate (all refused before any field is segmented or embedded) ------------------------------
def plate(c: Ctx, man, *opts, out: str = "plate"):
    return ["plate", man, "-o", c.out / out, "--model", "random-init", "--segmenter", "classical", "--device", "cpu",
            *opts]


PLATE: dict[str, Callable[[Ctx], tuple[list, str]]] = {
    "missing manifest": lambda c: (plate(c, c.tmp / "nope.csv"), "nope.csv"),
    "manifest is a folder": lambda c: (plate(c, c.tmp), "manifest"),
    "manifest binary": lambda c: (plate(c, _file(c.tmp / "b.csv", bytes(range(256)) * 4)), "b.csv"),
    "manifest no FileName": lambda c: (plate(c, c.plate(lambda d: d.drop(columns=["FileName_GFP", "FileName_DNA"]))),
                                       "plate.csv"),
    "manifest missing file": lambda c: (plate(c, c.plate(lambda d: d.assign(FileName_GFP="gone.tif"))), "gone.tif"),
    "--controls @": lambda c: (plate(c, c.inp.plate, "--controls", "Metadata_Control == @neg"), "--controls"),
    "--positive code": lambda c: (plate(c, c.inp.plate, "--positive", "open('x') == 1"), "--positive"),
    "--controls unknown column": lambda c: (plate(c, c.inp.plate, "--controls", "Metadata_Ctl == 'negative'"),
                                            "Metadata_Ctl"),
    "--segmenter bogus": lambda c: (plate(c, c.inp.plate, "--segmenter", "stardist"), "stardist"),
    "--mode bogus": lambda c: (plate(c, c.inp.plate, "--mode", "zoom"), "zoom"),
    "--segment-channel missing": lambda c: (plate(c, c.inp.plate, "--segment-channel", "Hoechst"), "--segment-channel"),
    "--channels missing": lambda c: (plate(c, c.inp.plate, "--channels", "GFP,Actin"), "--channels"),
    "--format bogus": lambda c: (plate(c, c.inp.plate, "--format", "csv"), "--format"),
    "--normalize bogus": lambda c: (plate(c, c.inp.plate, "--normalize", "zscore"), "--normalize"),
    "--treatment missing": lambda c: (plate(c, c.inp.plate, "--treatment", "Metadata_Drug"), "Metadata_Drug"),
    "--max-cells 0": lambda c: (plate(c, c.inp.plate, "--max-cells", "0"), "--max-cells"),
    "--crop-size 4": lambda c: (plate(c, c.inp.plate, "--crop-size", "4"), "--crop-size"),
    "--segmenter masks without --masks": lambda c: (plate(c, c.inp.plate, "--segmenter", "masks"), "--masks"),
    "--centres missing": lambda c: (plate(c, c.inp.plate, "--segmenter", "centres", "--centres", c.tmp / "gone.csv"),
                                    "gone.csv"),
    "output is a file": lambda c: (plate(c, c.inp.plate, out="afile"), "afile"),
    "output parent is a file": lambda c: (plate(c, c.inp.plate, out="afile/plate"), "afile"),
    "finished run without --overwrite": lambda c: (plate(c, c.inp.plate, out="done_plate"), "--overwrite"),
}


# ---- segment -----------------------------------------------------------------------------------
def seg(c: Ctx, inp, *opts, out: str = "masks"):
    return ["segment", inp, "-o", c.out / out, "--segmenter", "classical", *opts]


SEGMENT: dict[str, Callable[[Ctx], tuple[list, str]]] = {
    "missing input": lambda c: (seg(c, c.tmp / "nope.npy"), "nope.npy"),
    "garbage npy": lambda c: (seg(c, _file(c.tmp / "g.npy", b"\x93NUMPY garbage")), "g.npy"),
    "corrupt tif": lambda c: (seg(c, _with(c, "f0_w1.tif", b"II*\x00 not a tiff")), "f0_w1.tif"),
    "--segment-channel unknown": lambda c: (seg(c, c.inp.arr, "--segment-channel", "Actin"), "Actin"),
    "--segmenter bogus": lambda c: (seg(c, c.inp.arr, "--segmenter", "stardist"), "stardist"),
    "--truth missing": lambda c: (seg(c, c.inp.arr, "--truth", c.tmp / "gone.npy"), "gone.npy"),
    "--truth wrong shape": lambda c: (seg(c, c.inp.arr, "--truth", c.arr(np.zeros((3, 8, 8), np.uint16), "t.npy")),
                                      "t.npy"),
    "--diameter negative": lambda c: (seg(c, c.inp.arr, "--diameter", "-3"), "--diameter"),
    "output exists": lambda c: (seg(c, c.inp.arr, out="done_masks"), "--overwrite"),
    "output parent is a file": lambda c: (seg(c, c.inp.arr, out="afile/masks"), "afile"),
    "--threads 0": lambda c: (seg(c, c.inp.arr, "--threads", "0"), "--threads"),
}


# ---- train -------------------------------------------------------------------------------------
def train(c: Ctx, data, *opts, out: str = "run"):
    return ["train", "--data", data, "-o", c.out / out, "--steps", "1", "--batch-size", "2", "--input-size", "32",
            "--workers", "0", *opts]


TRAIN: dict[str, Callable[[Ctx], tuple[list, str]]] = {
    "missing data": lambda c: (train(c, c.tmp / "nope"), "nope"),
    "empty folder": lambda c: (train(c, _dir(c.tmp / "empty")), "empty"),
    "manifest without path": lambda c: (train(c, _file(c.tmp / "m" / "manifest.csv", b"file,modality\na.tif,x\n")),
                                        "manifest.csv"),
    "corrupt images only": lambda c: (train(c, _corrupt_pool(c)), "a.tif"),
    "--method bogus": lambda c: (train(c, c.inp.pool, "--method", "simclr"), "simclr"),
    "--set without =": lambda c: (train(c, c.inp.pool, "--set", "lr"), "--set"),
    "--precision bogus": lambda c: (train(c, c.inp.pool, "--precision", "fp8"), "fp8"),
    "--init unknown": lambda c: (train(c, c.inp.pool, "--init", "nopenet"), "nopenet"),
    "output is a file": lambda c: (train(c, c.inp.pool, out="afile"), "afile"),
    "output parent is a file": lambda c: (train(c, c.inp.pool, out="afile/run"), "afile"),
}


def _corrupt_pool(c: Ctx) -> Path:
    d = c.tmp / "pool"
    d.mkdir()
    (d / "a.tif").write_bytes(b"II*\x00 nope")
    return d


CASES = [(cmd, name, fn) for cmd, table in (("embed", EMBED), ("inspect", INSPECT), ("profile", PROFILE),
                                            ("plate", PLATE), ("segment", SEGMENT), ("train", TRAIN))
         for name, fn in table.items()]


def _snapshot(folder: Path) -> dict[str, tuple[int, float]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else (-1, 0)
            for p in sorted(folder.rglob("*"))}


def _prefill(c: Ctx) -> None:
    """What some cases need in the output folder before they run (it must be unchanged afterwards)."""
    (c.out / "sub.parquet").mkdir()
    (c.out / "afile").write_text("a file, not a folder")
    (c.out / "done.parquet").write_text("precious")
    (c.out / "t.treatments.parquet").write_text("precious treatments")
    (c.out / "done_plate").mkdir()
    (c.out / "done_plate" / "report.json").write_text("{}")
    (c.out / "done_masks").mkdir()
    half = c.out / "half.parquet.partial"
    half.mkdir()
    (half / "state.json").write_text("{}")
    bad = c.out / "bad.parquet.partial"
    bad.mkdir()
    (bad / "state.json").write_bytes(b"\x00{trunc")
    other = c.out / "other.parquet.partial"
    other.mkdir()
    (other / "state.json").write_text(json.dumps({"input": "elsewhere", "n_images": 3}))
    if not IS_ROOT:
        (c.out / "ro").mkdir()
        os.chmod(c.out / "ro", 0o555)


def test_matrix_has_at_least_100_cases():
    assert len(CASES) >= 100, len(CASES)
    assert {cmd for cmd, _, _ in CASES} == {"embed", "inspect", "profile", "plate", "segment", "train"}


@pytest.mark.parametrize("cmd,name,build", CASES, ids=[f"{c}-{n}" for c, n, _ in CASES])
def test_bad_input(cmd, name, build, inputs, tmp_path, cli, monkeypatch):
    monkeypatch.delenv("MICROSNOOP_MAX_PIXELS", raising=False)
    monkeypatch.setenv("MICROSNOOP_MAX_PIXELS", "200000000")  # restored after the test (--max-pixels sets it)
    c = Ctx(inputs, tmp_path, tmp_path / "out")
    c.out.mkdir()
    _prefill(c)
    args, needle = build(c)
    before = _snapshot(c.out)
    try:
        code, out, err = cli(*args)
    finally:
        if (c.out / "ro").exists():
            os.chmod(c.out / "ro", 0o755)
    text = out + err
    assert "Traceback" not in text, text
    assert code == 2, f"exit {code}: {text[-2000:]}"
    if cmd == "inspect" and "error:" not in err:
        lines = [ln for ln in out.splitlines() if ln.startswith("problem:")]
        assert lines, out
        assert any(needle in ln for ln in lines), f"{needle!r} not in {lines}"
    else:
        lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1, err
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    assert _snapshot(c.out) == before, "the output folder changed"
    assert not list(c.out.parent.glob(".*partial*")), "a staging folder was left behind"


# ---- warnings a user must see ------------------------------------------------------------------
def test_tiny_images_are_padded_with_a_warning(inputs, tmp_path, cli):
    from conftest import embedding_parts

    small = np.load(inputs.arr)[:3, :, 20:30, 20:32]
    np.save(tmp_path / "small.npy", small)
    with pytest.warns(MicrosnoopWarning, match=r"3 image\(s\) smaller than the model's 16 px minimum were zero-padded"):
        code, _, err = cli("embed", tmp_path / "small.npy", "-o", tmp_path / "s.parquet", *E)
    assert code == 0, err
    _, x, _ = embedding_parts(tmp_path / "s.parquet")
    assert x.shape == (3, 512) and np.isfinite(x).all()


def test_constant_alpha_plane_is_dropped_with_a_warning(inputs, tmp_path):
    import imageio.v3 as iio

    from microsnoop.io import read_image

    grey = iio.imread(inputs.png / "p0.png")
    rgba = np.stack([grey, grey // 2, grey // 3, np.full_like(grey, 255)], axis=-1)
    iio.imwrite(tmp_path / "rgba.png", rgba)
    with pytest.warns(MicrosnoopWarning, match="dropped the constant alpha plane"):
        img = read_image(tmp_path / "rgba.png")
    assert img.shape == (3, 32, 32) and np.array_equal(img[1], grey // 2)


def test_folder_files_without_any_token_are_reported(inputs, tmp_path):
    from microsnoop.io import open_source

    d = tmp_path / "f"
    shutil.copytree(inputs.folder, d)
    shutil.copy(d / "f0_w1.tif", d / "thumbnail.tif")
    with pytest.warns(MicrosnoopWarning, match="1 image file\\(s\\) contain none of the channel tokens w1,w2"):
        src = open_source(d, channels=["w1", "w2"])
    assert len(src) == 4


def test_checkpoint_without_digest_warns(tmp_path):
    from safetensors.torch import save_file

    from microsnoop.models import create_model
    from microsnoop.models.registry import build_from_checkpoint

    enc = create_model("random-init")
    save_file({k: v.contiguous() for k, v in enc.state_dict().items()}, str(tmp_path / "old.safetensors"),
              metadata={"config": json.dumps(enc.config), "format": "microsnoop-checkpoint-v1"})
    with pytest.warns(MicrosnoopWarning, match="no weights digest"):
        build_from_checkpoint(tmp_path / "old.safetensors")


def test_inspect_warns_about_padding_and_reports_no_problem(inputs, tmp_path, cli):
    np.save(tmp_path / "small.npy", np.load(inputs.arr)[:3, :, 20:30, 20:32])
    code, out, _ = cli("inspect", tmp_path / "small.npy")
    assert code == 0, out
    assert "warnings: 1 (first: " in out and "10x12 px is under 16 px; the U-Net zero-pads it (3 such image(s)" in out
    assert "problems: none" in out
