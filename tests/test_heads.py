"""Embedding heads: levels pooled, pooling, test-time augmentation; recorded in checkpoints and outputs."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from microsnoop.embed.engine import Embedder
from microsnoop.core.errors import MicrosnoopError
from microsnoop.models import create_model
from microsnoop.models.checkpoints import save_checkpoint
from microsnoop.models.heads import dihedral, parse_levels, parse_scales, scaled_size, split_head_options
from microsnoop.models.microsnoop_unet import DistilledUNetEncoder

from conftest import run_cli

pytestmark = pytest.mark.filterwarnings("ignore:model 'random-init' is untrained")


@pytest.fixture(scope="module")
def cells(shared_data) -> np.ndarray:
    """Six real BBBC021 cells, 3 channels x 68 x 68 (uint8 as acquired)."""
    x = np.load(shared_data / "benchmarks" / "bbbc021_dmso_vs_cycloheximide" / "images.npy", mmap_mode="r")
    return np.asarray(x[:6])


def test_levels_and_names_parse():
    assert parse_levels("all", 4) == [0, 1, 2, 3]
    assert parse_levels("last", 4) == [3]
    assert parse_levels("1-3", 4) == [1, 2, 3]
    assert parse_levels("3+1", 4) == [1, 3]
    assert parse_levels(-1, 4) == [3]
    with pytest.raises(MicrosnoopError, match="out of range"):
        parse_levels("2-5", 4)
    assert split_head_options("random-init:levels=all,tta=d8") == ("random-init", {"levels": "all", "tta": "d8"})
    assert split_head_options("/data/C:/x.safetensors") == ("/data/C:/x.safetensors", {})
    with pytest.raises(MicrosnoopError, match="model option 'color=red'"):
        split_head_options("random-init:color=red")
    enc = create_model("random-init:levels=all,pool=meanmax")
    assert enc.dim == 2 * (32 + 64 + 128 + 256) and enc.name == "random-init:levels=all,pool=meanmax"


@pytest.mark.parametrize("tta,k", [("d8", 8), ("rot4", 4)])
def test_tta_vector_is_invariant_to_rotations_and_flips(cells, tta, k):
    """d8 of an image == d8 of its rotated/flipped copy (non-square crop, so H and W swap)."""
    x = cells[:, :, :, 4:]  # 68 x 64
    emb = Embedder("random-init:levels=all", device="cpu", precision="fp32", tta=tta)
    ref = emb.embed(x)
    turns = [(1, False), (2, False), (3, True), (0, True)] if tta == "d8" else [(1, False), (2, False), (3, False)]
    for turn, flip in turns:
        y = dihedral(torch.from_numpy(x.astype(np.float32)), turn, flip).numpy()
        np.testing.assert_allclose(emb.embed(y), ref, rtol=1e-4, atol=1e-5)
    # without TTA the same rotation changes the vector clearly: the invariance comes from the head
    plain = Embedder("random-init:levels=all", device="cpu", precision="fp32")
    a, b = plain.embed(x), plain.embed(np.ascontiguousarray(np.rot90(x, 1, axes=(2, 3))))
    assert np.abs(a - b).max() > 1e-2
    assert emb.provenance()["model_config"]["tta"] == tta


def test_fused_engine_matches_module_for_every_head(cells):
    """The engine's BN-folded fast path computes the same function as ``encoder(x)`` for any head."""
    x = torch.from_numpy(cells[:2, :1].astype(np.float32) / 255.0)
    for name in ("random-init:levels=all", "random-init:levels=1+3,pool=max", "random-init:levels=0,pool=meanmax"):
        emb = Embedder(name, device="cpu", precision="fp32")
        with torch.no_grad():
            ref = emb.encoder(x).numpy()
        np.testing.assert_allclose(emb.encode_planes(x[:, 0].numpy()), ref, rtol=1e-4, atol=1e-5)


def test_distilled_encoder_fused_and_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    enc = DistilledUNetEncoder({"teachers": {"t0": 16, "t1": 8}, "tta": "rot4"}).eval()
    x = torch.rand(3, 1, 40, 40)
    path = tmp_path / "d.safetensors"
    save_checkpoint(path, enc.state_dict(), enc.config)
    back = create_model(str(path))
    assert back.config["tta"] == "rot4" and back.config["levels"] == [0, 1, 2, 3] and back.dim == 24
    with torch.no_grad():
        np.testing.assert_allclose(back(x).numpy(), enc(x).numpy(), rtol=1e-5, atol=1e-6)
    emb = Embedder(back, device="cpu", precision="fp32", tta="none")
    with torch.no_grad():
        np.testing.assert_allclose(emb.encode_planes(x[:, 0].numpy()), back(x).numpy(), rtol=1e-4, atol=1e-5)
    with pytest.raises(MicrosnoopError, match="only tta can change"):
        back.set_head(levels="last")


def embed_cli_and_api(ckpt, cells, tmp_path, capsys, option: str, value: str):
    """Embed 4 cells with ``--option value`` by the CLI and the API: (provenance, CLI features, API features)."""
    import pyarrow.parquet as pq
    import microsnoop

    np.save(tmp_path / "x.npy", cells[:4])
    out = tmp_path / "out.parquet"
    code, _, err = run_cli(["embed", tmp_path / "x.npy", "-o", out, "--model", ckpt, f"--{option}", value,
                            "--precision", "fp32", "--device", "cpu"], capsys)
    assert code == 0, err
    prov = json.loads(pq.read_schema(out).metadata[b"microsnoop"])
    table = pq.read_table(out)
    feats = np.stack([table.column(c).to_numpy() for c in table.column_names if "_emb_" in c], 1)
    api = microsnoop.embed(cells[:4], model=str(ckpt), device="cpu", precision="fp32", **{option: value})
    return prov, feats, api


def test_head_round_trips_through_checkpoint_and_output(tmp_path, capsys, cells):
    """Head config saved in a checkpoint header comes back on load and lands in the output's provenance."""
    enc = create_model("random-init:levels=all,tta=rot4")
    ckpt = tmp_path / "m.safetensors"
    save_checkpoint(ckpt, enc.state_dict(), enc.config)
    back = create_model(str(ckpt))
    assert (back.config["levels"], back.config["pool"], back.tta, back.dim) == ([0, 1, 2, 3], "mean", "rot4", 480)
    prov, feats, api = embed_cli_and_api(ckpt, cells, tmp_path, capsys, "tta", "d8")
    cfg = prov["model_config"]
    assert (cfg["levels"], cfg["pool"], cfg["tta"]) == ([0, 1, 2, 3], "mean", "d8")
    assert feats.shape == (4, 3 * 480) and prov["channel_features"]["ch0"] == ["ch0_emb_000", "ch0_emb_479"]
    np.testing.assert_allclose(feats, api, rtol=1e-5, atol=1e-6)  # the API with the same options == the CLI
    code, _, err = run_cli(["embed", tmp_path / "x.npy", "-o", tmp_path / "o2.parquet", "--model", ckpt,
                            "--tta", "d4"], capsys)
    assert code == 2 and "unknown test-time augmentation 'd4'" in err


def test_scales_parse_and_sizes():
    assert parse_scales("1+1.5") == (1.0, 1.5) and parse_scales(None) == (1.0,) and parse_scales(2) == (2.0,)
    assert parse_scales([1, 0.5]) == (1.0, 0.5)
    for bad in ("0", "1+1", "1+x", "1+2+3+4+1.5", "8"):
        with pytest.raises(MicrosnoopError, match="scales"):
            parse_scales(bad)
    # factor 1 keeps the plane; other factors go to the nearest multiple of 8 px
    assert (scaled_size(68, 1.0), scaled_size(68, 1.5), scaled_size(40, 1.5), scaled_size(64, 1.5)) == (68, 104, 64, 96)
    enc = create_model("random-init:levels=all,scales=1+1.5")
    assert enc.scales == (1.0, 1.5) and enc.dim == 480 and enc.out_dim == 960
    assert enc.name == "random-init:levels=all,scales=1+1.5"


def test_scales_concatenate_each_scale_vector_in_order(cells):
    """scales=1+1.5 = [vector of the plane as given, vector of the plane bilinearly resized to 104 px]."""
    x = cells[:3, :1].astype(np.float32) / 255.0
    both = Embedder("random-init:levels=all", device="cpu", precision="fp32", engine="torch", scales="1+1.5")
    assert both.dim == 960
    got = both.encode_planes(x[:, 0])
    enc = create_model("random-init:levels=all")
    with torch.no_grad():
        t = torch.from_numpy(x)
        big = torch.nn.functional.interpolate(t, size=(104, 104), mode="bilinear", align_corners=False)
        ref = torch.cat([enc(t), enc(big)], dim=1).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
    # the 1.5x vector differs clearly from the 1x one: the second half is not a copy
    assert np.abs(got[:, :480] - got[:, 480:]).max() > 1e-2


def test_scales_with_d8_stay_invariant(cells):
    x = cells[:, :, :, 4:]  # 68 x 64: the resize must follow H and W through the rotation
    emb = Embedder("random-init:levels=all", device="cpu", precision="fp32", tta="d8", scales="1+1.5")
    ref = emb.embed(x)
    assert ref.shape == (6, 3 * 960)
    for turn, flip in [(1, False), (3, True)]:
        y = dihedral(torch.from_numpy(x.astype(np.float32)), turn, flip).numpy()
        np.testing.assert_allclose(emb.embed(y), ref, rtol=1e-4, atol=1e-5)


def test_scales_below_one_pad_small_planes_to_reach_the_minimum():
    emb = Embedder("random-init", device="cpu", precision="fp32", scales="0.5")
    assert emb.min_size == 32
    with pytest.warns(UserWarning, match="32 px minimum were zero-padded"):
        out = emb.embed(np.random.default_rng(0).random((2, 1, 20, 20)).astype(np.float32))
    assert out.shape == (2, 256) and np.isfinite(out).all()


def test_scales_round_trip_through_checkpoint_output_and_api(tmp_path, capsys, cells):
    enc = create_model("random-init:scales=1+1.5")
    ckpt = tmp_path / "m.safetensors"
    save_checkpoint(ckpt, enc.state_dict(), enc.config)
    back = create_model(str(ckpt))
    assert back.scales == (1.0, 1.5) and back.out_dim == 512
    prov, feats, api = embed_cli_and_api(ckpt, cells, tmp_path, capsys, "scales", "1+2")
    assert prov["model_config"]["scales"] == "1+2" and prov["model"].endswith(":scales=1+2")
    assert feats.shape == (4, 3 * 512) and prov["channel_features"]["ch0"] == ["ch0_emb_000", "ch0_emb_511"]
    np.testing.assert_allclose(feats, api, rtol=1e-5, atol=1e-6)
    code, _, err = run_cli(["embed", tmp_path / "x.npy", "-o", tmp_path / "o2.parquet", "--model", ckpt,
                            "--scales", "0"], capsys)
    assert code == 2 and "scales '0'" in err and not (tmp_path / "o2.parquet").exists()
