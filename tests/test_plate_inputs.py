"""Plates as instruments write them (issue 17): Cell Painting with whole-cell segmentation, OME-Zarr HCS
plates, options checked before any field is processed, finished work never lost (--resume), and
--shard i/n + --merge equal to one process. All on real fields from ../shared/data/plates."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from microsnoop.core.errors import MicrosnoopError

CP_CHANNELS = ["DNA", "ER", "RNA", "AGP", "Mito"]
# 4 negative (columns 1-2), 2 positive (column 12), 2 replicate wells of one dose: sphering and Z' both run
BBBC013_WELLS = ["A01", "A02", "B01", "B02", "A12", "B12", "A06", "B06"]
FAST = ["--model", "random-init", "--crop-size", "32", "--max-cells", "6", "--device", "cpu", "--segmenter",
        "classical"]


@pytest.fixture(scope="module")
def cellpainting(shared_data) -> Path:
    return shared_data / "plates" / "bbbc022_cellpainting_mini" / "manifest.csv"


@pytest.fixture(scope="module")
def cp3(cellpainting, tmp_path_factory) -> Path:
    """3 Cell Painting fields (both sites of mock well A14, site 1 of compound well C12), absolute paths."""
    df = pd.read_csv(cellpainting)
    df = df[(df["Metadata_Well"] == "A14") | ((df["Metadata_Well"] == "C12") & (df["Metadata_Site"] == 1))].copy()
    assert len(df) == 3
    for ch in CP_CHANNELS:
        df[f"PathName_{ch}"] = str(cellpainting.parent / "images")
    out = tmp_path_factory.mktemp("cp3") / "manifest.csv"
    df.to_csv(out, index=False)
    return out


@pytest.fixture(scope="module")
def bbbc013_8(shared_data, tmp_path_factory) -> Path:
    folder = shared_data / "plates" / "bbbc013"
    df = pd.read_csv(folder / "manifest.csv")
    df = df[df["Metadata_Well"].isin(BBBC013_WELLS)].copy()
    for ch in ("GFP", "DNA"):
        df[f"FileName_{ch}"] = [str(folder / f) for f in df[f"FileName_{ch}"]]
    out = tmp_path_factory.mktemp("bbbc013_8") / "manifest.csv"
    df.to_csv(out, index=False)
    return out


def write_ome_zarr_plate(manifest: Path, out: Path, channels: list[str]) -> Path:
    """The manifest's fields as an NGFF HCS plate, written with the reference writer (ome_zarr.writer)."""
    pytest.importorskip("ome_zarr", reason="ome-zarr (the plates extra) is not installed")
    import tifffile
    import zarr
    from ome_zarr.writer import write_image, write_plate_metadata, write_well_metadata

    df = pd.read_csv(manifest)
    rows = sorted(df["Metadata_Row"].astype(str).unique())
    cols = sorted(df["Metadata_Column"].astype(int).unique())
    wells = [f"{r}/{c}" for r, c in zip(df["Metadata_Row"].astype(str), df["Metadata_Column"].astype(int))]
    root = zarr.open_group(str(out), mode="w")
    write_plate_metadata(root, rows, [str(c) for c in cols], wells, name=str(df["Metadata_Plate"].iloc[0]))
    win = {"start": 0, "end": 255, "min": 0, "max": 255}
    omero = {"channels": [{"label": ch, "color": "FFFFFF", "window": win} for ch in channels]}
    for (_, row), wpath in zip(df.iterrows(), wells):
        r, c = wpath.split("/")
        well = root.require_group(r).require_group(c)
        write_well_metadata(well, ["0"])
        img = np.stack([tifffile.imread(row[f"FileName_{ch}"]) for ch in channels])
        write_image(img, well.require_group("0"), axes="cyx", omero=omero, scale_factors=None)
    return out


def _no_field_read(monkeypatch) -> list:
    """Record every field read (manifest or OME-Zarr) so a test can assert none happened."""
    from microsnoop.io import omezarr, readers

    reads: list = []
    for cls in (readers.FileListSource, omezarr.OmeZarrPlateSource):
        orig = cls.read_one

        def spy(self, i, _orig=orig):
            reads.append(i)
            return _orig(self, i)

        monkeypatch.setattr(cls, "read_one", spy)
    return reads


# ------------------------------------------------------------------------------ Cell Painting

def test_cellpainting_whole_cells_named_columns_report(cp3, tmp_path, cli):
    """Whole cells from [AGP, DNA], all five channels cropped and embedded, named columns, degraded steps
    recorded as warnings (2 mock wells: no sphering; no positive controls, no treatment columns)."""
    from conftest import profile_parts

    out = tmp_path / "run"
    code, _, err = cli("plate", cp3, "-o", out, "--cyto-channel", "AGP", "--segment-channel", "DNA", "--model",
                       "random-init", "--crop-size", "32", "--max-cells", "4", "--diameter", "35", "--device", "cpu",
                       "--save-cells")
    assert code == 0, err
    rep = json.loads((out / "report.json").read_text())
    assert rep["provenance"]["segmentation_input"] == "whole cells: [AGP, DNA] (cytoplasm, nucleus)"
    assert rep["provenance"]["plan"]["segment_channels"] == ["AGP", "DNA"]
    assert any(w.startswith("sphering skipped: 1 negative-control well") for w in rep["warnings"])
    assert any("no positive controls" in w for w in rep["warnings"])
    assert rep["provenance"]["plan"]["controls"] == 'Metadata_Control == "negative"'
    fields, feats, _ = profile_parts(out / "fields.parquet")
    cells, cfeats, _ = profile_parts(out / "cells.parquet")
    expected = [f"{ch}_emb_{j:03d}" for ch in CP_CHANNELS for j in range(256)]
    assert feats == expected and cfeats == expected
    assert len(fields) == 3 and (fields["Metadata_Count"] == 4).all()
    assert len(cells) == 12 and np.isfinite(cells[feats].to_numpy()).all()
    assert "Warnings" in (out / "report.md").read_text()
    assert not (out / "treatments.parquet").exists()          # no treatment columns: skipped, not stale


def test_whole_cells_are_larger_than_nuclei(shared_data):
    """The 2-channel Cellpose input segments whole cells: on a real U2OS field they are larger than nuclei."""
    import tifffile

    from microsnoop.segment.cellpose import CellposeSegmenter

    d = shared_data / "plates" / "bbbc022_cellpainting_mini" / "images"
    dna = tifffile.imread(d / "plate1_A14_site1_Ch1.tif")
    agp = tifffile.imread(d / "plate1_A14_site1_Ch4.tif")
    seg = CellposeSegmenter(diameter=35)
    cells = seg(np.stack([agp, dna]))
    seg.diameter = 28
    nuclei = seg(dna)
    assert cells.shape == dna.shape and cells.max() > 30 and nuclei.max() > 30
    area = lambda m: np.median(np.bincount(m.ravel())[1:])       # noqa: E731
    assert area(cells) > 1.5 * area(nuclei)


@pytest.mark.slow
def test_cellpainting_mini_plate_end_to_end_default_model(cellpainting, tmp_path, cli):
    """The issue's command on all ten fields: default model, Cellpose whole cells (diameter estimated)."""
    from conftest import profile_parts

    out = tmp_path / "run"
    t0 = time.perf_counter()
    code, _, err = cli("plate", cellpainting, "-o", out, "--cyto-channel", "AGP", "--max-cells", "16",
                       "--crop-size", "96", "--device", "cpu", "--precision", "bf16", "--save-cells")
    wall = time.perf_counter() - t0
    assert code == 0, err
    fields, feats, _ = profile_parts(out / "fields.parquet")
    cells, _, _ = profile_parts(out / "cells.parquet")
    assert len(fields) == 10 and len(feats) == 5 * 256 and feats[-1] == "Mito_emb_255"
    assert (fields["Metadata_Count"] > 0).all() and len(cells) == fields["Metadata_Count"].sum()
    rep = json.loads((out / "report.json").read_text())
    assert rep["n_wells"] == 5 and rep["n_negative"] == 2
    print(f"cell painting mini plate: {wall:.0f} s wall, {rep['provenance']['n_cells_found']} cells found")


# ------------------------------------------------------------------------------ OME-Zarr

def test_ome_zarr_plate_equals_the_tiff_manifest(bbbc013_8, tmp_path, cli):
    from conftest import profile_parts

    plate = write_ome_zarr_plate(bbbc013_8, tmp_path / "bbbc013.zarr", ["GFP", "DNA"])
    args = [*FAST, "--channels", "GFP,DNA"]
    code, _, err = cli("plate", bbbc013_8, "-o", tmp_path / "tiff", *args)
    assert code == 0, err
    code, _, err = cli("plate", plate, "-o", tmp_path / "zarr", "--metadata", bbbc013_8, *args)
    assert code == 0, err
    tw, feats, _ = profile_parts(tmp_path / "tiff" / "wells.parquet")
    zw, zfeats, zprov = profile_parts(tmp_path / "zarr" / "wells.parquet")
    assert zfeats == feats and feats[0] == "GFP_emb_000"               # names from the omero metadata
    assert zprov["plan"]["input_kind"] == "ome-zarr plate"
    tw, zw = tw.sort_values("Metadata_Well").reset_index(drop=True), zw.sort_values("Metadata_Well").reset_index(drop=True)
    assert list(tw["Metadata_Well"]) == list(zw["Metadata_Well"]) and len(tw) == 8
    assert list(tw["Metadata_Control"]) == list(zw["Metadata_Control"])
    np.testing.assert_array_equal(tw[feats].to_numpy(), zw[feats].to_numpy())
    rt, rz = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("tiff", "zarr"))
    assert rt["z_prime"] == rz["z_prime"] and rz["n_negative"] == 4


def test_ome_zarr_source_reads_fields_lazily_and_embeds(bbbc013_8, tmp_path, cli, monkeypatch):
    from microsnoop.io.omezarr import OmeZarrPlateSource
    from microsnoop.io.readers import open_source

    plate = write_ome_zarr_plate(bbbc013_8, tmp_path / "p.zarr", ["GFP", "DNA"])
    src = open_source(plate)
    assert isinstance(src, OmeZarrPlateSource) and src.channel_names == ["GFP", "DNA"] and len(src) == 8
    assert list(src.metadata["Metadata_Well"]) == BBBC013_WELLS[:0] + list(pd.read_csv(bbbc013_8)["Metadata_Well"])
    import tifffile

    first = pd.read_csv(bbbc013_8).iloc[0]
    np.testing.assert_array_equal(src.read_one(0)[1], tifffile.imread(first["FileName_DNA"]))
    src.select(["DNA"])
    assert src.read_one(0).shape == (1, 640, 640)
    reads = _no_field_read(monkeypatch)
    out = tmp_path / "emb.parquet"
    code, _, err = cli("embed", plate, "-o", out, "--model", "random-init", "--device", "cpu", "--chunk-size", "4")
    assert code == 0, err
    assert sorted(reads) == list(range(8))                              # each field read once, on demand
    from conftest import profile_parts

    df, names, _ = profile_parts(out)
    assert len(df) == 8 and len(names) == 512 and names[0] == "GFP_emb_000"
    assert list(df["Metadata_Well"])[:2] == ["A01", "A02"]


def test_ome_tiff_channel_names(shared_data, tmp_path):
    import tifffile

    from microsnoop.io.readers import open_source

    d = shared_data / "plates" / "bbbc022_cellpainting_mini" / "images"
    img = np.stack([tifffile.imread(d / f"plate1_A14_site1_Ch{c}.tif") for c in range(1, 6)])
    tifffile.imwrite(tmp_path / "f.ome.tif", img, metadata={"axes": "CYX", "Channel": {"Name": CP_CHANNELS}})
    src = open_source(tmp_path / "f.ome.tif")
    assert src.channel_names == CP_CHANNELS
    np.testing.assert_array_equal(src.read(0, 1)[0], img)
    tifffile.imwrite(tmp_path / "plain.tif", img)                      # no OME names: ch0..
    assert open_source(tmp_path / "plain.tif").channel_names == [f"ch{i}" for i in range(5)]


# ------------------------------------------------------------------------------ early checks

def _no_controls(cp3: Path, tmp_path: Path) -> Path:
    p = tmp_path / "nocontrols.csv"
    pd.read_csv(cp3).drop(columns=["Metadata_Control", "Metadata_Role"]).to_csv(p, index=False)
    return p


BAD = [
    (["--format", "xlsx"], "--format must be parquet, h5 or h5ad, not 'xlsx'"),
    (["--normalize", "zscore"], "--normalize must be standardize or mad_robustize, not 'zscore'"),
    (["--controls", 'Metadata_Control == "DMSO"'], "selects no well"),
    (["--controls", "Metadata_Nope == 1"], "--controls 'Metadata_Nope == 1': no column 'Metadata_Nope'"),
    (["--controls", "Metadata_Site == 1"], "varies within a well"),
    (["--positive", 'Metadata_Role == "positive"'], "--positive 'Metadata_Role == \"positive\"' selects no well"),
    (["--treatment", "Metadata_Compound"], "--treatment column(s) Metadata_Compound not in"),
    (["--treatment", "Metadata_Site"], "vary within a well"),
    (["--channels", "DNA,Actin"], "--channels Actin: not a channel"),
    (["--segment-channel", "Hoechst"], "--segment-channel Hoechst is not a channel"),
    (["--cyto-channel", "Actin"], "--cyto-channel Actin is not a channel"),
    (["--cyto-channel", "AGP", "--segmenter", "classical"], "needs --segmenter cellpose"),
    (["--model", "no-such-model"], "no-such-model"),
    (["--shard", "3/2"], "--shard 3/2"),
    (["--mode", "patch"], "unknown mode 'patch'"),
    (["--metadata", "MISSING_WELLS"], "not in the plate map"),
    (["NO_CONTROLS"], "cannot tell the negative controls"),
]


@pytest.mark.parametrize("args, message", BAD, ids=[b[1][:30] for b in BAD])
def test_bad_options_fail_before_any_field(cp3, tmp_path, cli, monkeypatch, args, message):
    """Each bad option is one line, exit 2, after well under a field's work, with no field read and nothing
    written."""
    manifest = cp3
    if args == ["NO_CONTROLS"]:
        manifest, args = _no_controls(cp3, tmp_path), []
    if "MISSING_WELLS" in args:
        pm = tmp_path / "map.csv"
        pd.read_csv(cp3).iloc[:1].to_csv(pm, index=False)
        args = ["--metadata", str(pm)]
    # the first CLI call of a process pays its imports (typer's option parsing alone imports for seconds on
    # a busy 2-core machine): warm them so the timing below is the checks' own
    cli("plate", cp3, "-o", tmp_path / "warm", "--format", "none", "--device", "cpu")
    reads = _no_field_read(monkeypatch)
    out = tmp_path / "run"
    t0, c0 = time.perf_counter(), time.process_time()
    code, _, err = cli("plate", manifest, "-o", out, "--cyto-channel" if "--cyto-channel" not in args else "--diameter",
                       "AGP" if "--cyto-channel" not in args else "30", "--device", "cpu", *args)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert code == 2 and message in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert reads == [] and not out.exists() and not (tmp_path / "run.partial").exists()
    # CPU time, not wall time: this machine is shared, and a starved process's wall clock says nothing about
    # the work done. One whole-cell Cellpose field is >= 5 s of CPU here (segmentation alone), plus embedding.
    assert cpu < 2.0, f"failed after {cpu:.1f} s of CPU ({elapsed:.1f} s wall)"
    print(f"{message}: {cpu:.2f} s CPU, {elapsed:.2f} s wall")


# ------------------------------------------------------------------------------ nothing lost

def test_late_failure_keeps_finished_stages_and_resume_reuses_fields(bbbc013_8, tmp_path, cli, monkeypatch):
    import importlib

    norm_mod = importlib.import_module("microsnoop.profiling.normalize")  # the module (the package exports the function)

    out = tmp_path / "run"

    def broken(*a, **k):
        raise MicrosnoopError("simulated failure while normalising")

    monkeypatch.setattr(norm_mod, "normalize", broken)
    code, _, err = cli("plate", bbbc013_8, "-o", out, *FAST, "--normalize", "standardize", "--save-cells")
    assert code == 2 and "simulated failure" in err and "--resume" in err
    for name in ("fields", "cells", "wells_raw"):
        assert (out / f"{name}.parquet").exists(), name
    assert not (out / "report.json").exists() and not (out / "wells.parquet").exists()
    code, _, err = cli("plate", bbbc013_8, "-o", out, *FAST, "--normalize", "standardize", "--save-cells")
    assert code == 2 and "--resume" in err                             # no silent mixing with the earlier run
    monkeypatch.undo()
    reads = _no_field_read(monkeypatch)
    code, _, err = cli("plate", bbbc013_8, "-o", out, *FAST, "--normalize", "standardize", "--save-cells", "--resume")
    assert code == 0, err
    assert reads == []                                                # the finished fields were reused
    rep = json.loads((out / "report.json").read_text())
    assert [st["step"] for st in rep["provenance"]["profiling"]] == ["aggregate", "normalize", "sphere", "aggregate"]


def test_interrupted_fields_are_kept_and_resumed(bbbc013_8, tmp_path, cli, monkeypatch):
    from microsnoop.pipelines import fields as fields_mod
    from conftest import profile_parts

    ref = tmp_path / "ref"
    assert cli("plate", bbbc013_8, "-o", ref, *FAST)[0] == 0
    calls = []
    orig = fields_mod.FieldEmbedder.__call__

    def flaky(self, image, index, **kw):
        calls.append(index)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return orig(self, image, index, **kw)

    monkeypatch.setattr(fields_mod.FieldEmbedder, "__call__", flaky)
    out = tmp_path / "run"
    try:                                      # click turns Ctrl-C into "Aborted!" and exit 1
        code = cli("plate", bbbc013_8, "-o", out, *FAST)[0]
    except KeyboardInterrupt:
        code = 130
    assert code != 0 and not out.exists()
    assert len(list((tmp_path / "run.partial" / "fields").glob("*.npz"))) == 3
    monkeypatch.undo()
    reads = _no_field_read(monkeypatch)
    code, _, err = cli("plate", bbbc013_8, "-o", out, *FAST, "--resume")
    assert code == 0, err
    assert sorted(reads) == [3, 4, 5, 6, 7] and not (tmp_path / "run.partial").exists()
    a, feats, _ = profile_parts(ref / "wells.parquet")
    b, _, _ = profile_parts(out / "wells.parquet")
    np.testing.assert_array_equal(a[feats].to_numpy(), b[feats].to_numpy())


# ------------------------------------------------------------------------------ shards

def test_two_shards_merged_equal_the_single_run(bbbc013_8, tmp_path, cli):
    from conftest import profile_parts

    assert cli("plate", bbbc013_8, "-o", tmp_path / "one", *FAST, "--save-cells")[0] == 0
    out = tmp_path / "sharded"
    code, _, err = cli("plate", bbbc013_8, "-o", out, *FAST, "--save-cells", "--merge")
    assert code == 2 and "8 of 8 fields are not finished" in err
    for i in (1, 2):
        code, _, err = cli("plate", bbbc013_8, "-o", out, *FAST, "--save-cells", "--shard", f"{i}/2")
        assert code == 0, err
        assert not (out / "fields.parquet").exists()
    code, _, err = cli("plate", bbbc013_8, "-o", out, *FAST, "--save-cells", "--merge")
    assert code == 0, err
    for name in ("cells", "fields", "wells_raw", "wells", "treatments"):
        a, feats, _ = profile_parts(tmp_path / "one" / f"{name}.parquet")
        b, _, _ = profile_parts(out / f"{name}.parquet")
        pd.testing.assert_frame_equal(a, b, check_exact=True)
    r1, r2 = (json.loads((d / "report.json").read_text()) for d in (tmp_path / "one", out))
    assert r1["z_prime"] == r2["z_prime"] and r1["mean_map"] == r2["mean_map"]


def test_embed_two_shards_merged_equal_the_single_run(yeast_subset, tmp_path, cli):
    from conftest import embedding_parts

    args = ["--model", "random-init", "--device", "cpu", "--chunk-size", "16"]
    assert cli("embed", yeast_subset, "-o", tmp_path / "one.parquet", *args)[0] == 0
    out = tmp_path / "two.parquet"
    code, _, err = cli("embed", yeast_subset, "-o", out, *args, "--merge")
    assert code == 2 and "cannot merge: 6 of 6 chunks" in err
    for i in (1, 2):
        code, _, err = cli("embed", yeast_subset, "-o", out, *args, "--shard", f"{i}/2")
        assert code == 0, err and not out.exists()
    assert cli("embed", yeast_subset, "-o", out, *args, "--merge")[0] == 0
    m1, x1, _ = embedding_parts(tmp_path / "one.parquet")
    m2, x2, _ = embedding_parts(out)
    np.testing.assert_array_equal(x1, x2)
    assert x1.shape == (96, 512) and m1.equals(m2)


def test_defaults_inferred_from_common_metadata_names(shared_data):
    """Treatment and controls from the names plate maps use, not BBBC013's; a clear error when none fits."""
    from microsnoop.workflows.plate import PlateSettings
    from microsnoop.workflows.plate_checks import check_columns, infer_controls, infer_treatment

    jump = pd.DataFrame({"Metadata_Plate": ["P"] * 8, "Metadata_Well": [f"A{i:02d}" for i in range(1, 9)],
                         "Metadata_pert_iname": ["DMSO"] * 4 + ["x", "x", "y", "y"],
                         "Metadata_mmoles_per_liter": [0] * 4 + [1, 1, 2, 2]})
    plan = check_columns(jump, PlateSettings())
    assert plan.treatment == ["Metadata_pert_iname", "Metadata_mmoles_per_liter"]
    assert plan.controls == 'Metadata_pert_iname == "DMSO"' and plan.sphere and plan.positive is None
    assert infer_treatment(["Metadata_Well", "Metadata_Compound", "Metadata_Concentration"], None) == \
        ["Metadata_Compound", "Metadata_Concentration"]
    cp = pd.read_csv(shared_data / "plates" / "bbbc022_cellpainting_mini" / "manifest.csv")
    assert infer_treatment(cp.columns, None) is None
    assert infer_controls(cp, None)[0] == 'Metadata_Control == "negative"'
    assert infer_controls(cp.drop(columns="Metadata_Control"), None)[0] == 'Metadata_Role == "mock"'
    two = check_columns(cp, PlateSettings())
    assert not two.sphere and any("sphering skipped: 2" in w for w in two.warnings)
    with pytest.raises(MicrosnoopError, match="cannot tell the negative controls"):
        check_columns(cp.drop(columns=["Metadata_Control", "Metadata_Role"]), PlateSettings())
    assert check_columns(cp.drop(columns=["Metadata_Control", "Metadata_Role"]), PlateSettings(sphere=False)).controls is None
