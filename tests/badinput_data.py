"""Small real inputs (cut from ../shared/data) for the bad-input matrix and the fuzz test.

Built once per session in a temp folder: a yeast-cell array set, a folder of per-channel TIFF crops
of the BBBC013 plate (``_w1``/``_w2`` names), a LoadData manifest of those crops, a manifest of the
full-size plate fields (for ``plate``), PNG crops, profiles in Parquet/HDF5 and a tiny training pool.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd


@dataclass
class Inputs:
    root: Path
    arr: Path          # images.npy (8, 2, 32, 32) yeast cells (centre crops) + metadata.csv + dataset.json
    folder: Path       # f{i}_w1.tif / f{i}_w2.tif, 32x32 uint8 crops of plate fields
    manifest: Path     # LoadData CSV of the folder's crops (FileName_GFP, FileName_DNA, Metadata_*)
    plate: Path        # LoadData CSV of 4 full plate fields (absolute paths into ../shared)
    png: Path          # a folder of 32x32 grey PNG crops
    profiles: Path     # parquet: 2 plates x 8 wells, real random-init embeddings of 16 yeast cells
    profiles_h5: Path  # the same profiles as .h5
    pool: Path         # training pool: 4 real images (folder) + manifest.csv


def build_inputs(shared: Path, root: Path) -> Inputs:
    import tifffile
    import imageio.v3 as iio

    from microsnoop.io.writers import write_embeddings
    from microsnoop.embed import Embedder

    root.mkdir(parents=True, exist_ok=True)
    yeast = shared / "benchmarks" / "yeast_pci"
    arr_dir = root / "arr"
    arr_dir.mkdir()
    cells = np.load(yeast / "images.npy", mmap_mode="r")[:16]
    np.save(arr_dir / "images.npy", np.ascontiguousarray(cells[:8, :, 16:48, 16:48]))  # small: embedding is the cost
    pd.read_csv(yeast / "metadata.csv").iloc[:8].to_csv(arr_dir / "metadata.csv", index=False)
    shutil.copy(yeast / "dataset.json", arr_dir / "dataset.json")

    plate_dir = shared / "plates" / "bbbc013"
    man = pd.read_csv(plate_dir / "manifest.csv")
    folder = root / "tifs"
    folder.mkdir()
    rows = []
    for i, r in man.iloc[[0, 1, 40, 90]].reset_index(drop=True).iterrows():
        gfp = tifffile.imread(plate_dir / r["FileName_GFP"])[304:336, 304:336]
        dna = tifffile.imread(plate_dir / r["FileName_DNA"])[304:336, 304:336]
        tifffile.imwrite(folder / f"f{i}_w1.tif", gfp, compression="zlib")
        tifffile.imwrite(folder / f"f{i}_w2.tif", dna, compression="zlib")
        rows.append({"Metadata_Plate": r["Metadata_Plate"], "Metadata_Well": r["Metadata_Well"],
                     "Metadata_Control": r["Metadata_Control"], "FileName_GFP": f"f{i}_w1.tif",
                     "FileName_DNA": f"f{i}_w2.tif"})
    manifest = folder / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)

    plate = root / "plate.csv"
    pm = man.iloc[[0, 1, 2, 90, 91, 95]].copy()
    for c in ("FileName_GFP", "FileName_DNA"):
        pm[c] = [str(plate_dir / f) for f in pm[c]]
    pm.to_csv(plate, index=False)

    png = root / "pngs"
    png.mkdir()
    for i in range(3):
        iio.imwrite(png / f"p{i}.png", tifffile.imread(folder / f"f{i}_w2.tif"))

    emb = Embedder("random-init", device="cpu", precision="fp32")
    x = emb.embed(np.ascontiguousarray(cells))
    meta = pd.DataFrame({"Metadata_Plate": ["P1"] * 8 + ["P2"] * 8,
                         "Metadata_Well": [f"W{i % 8:02d}" for i in range(16)],
                         "Metadata_Control": (["negative"] * 5 + ["treated"] * 3) * 2,
                         "Metadata_Compound": (["DMSO"] * 5 + ["A", "B", "B"]) * 2})
    profiles = root / "profiles.parquet"
    write_embeddings(profiles, meta, [x], ["GFP", "RFP"], emb.dim, {"model": "random-init"})
    profiles_h5 = root / "profiles.h5"
    write_embeddings(profiles_h5, meta, [x], ["GFP", "RFP"], emb.dim, {"model": "random-init"})

    pool = root / "pool"
    pool.mkdir()
    pman = pd.read_csv(shared / "pretrain" / "manifest.csv")
    prow = []
    for modality, grp in pman.groupby("modality"):
        rel = grp["path"].iloc[0]
        img = tifffile.imread(shared / "pretrain" / rel)
        img = img[..., 0] if img.ndim == 3 else img
        y0, x0 = (img.shape[0] - 64) // 2, (img.shape[1] - 64) // 2
        tifffile.imwrite(pool / Path(rel).name, img[y0:y0 + 64, x0:x0 + 64])
        prow.append({"path": Path(rel).name, "modality": modality})
    pd.DataFrame(prow).to_csv(pool / "manifest.csv", index=False)
    return Inputs(root, arr_dir / "images.npy", folder, manifest, plate, png, profiles, profiles_h5, pool)
