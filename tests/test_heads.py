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
from microsnoop.models.heads import dihedral, parse_levels, split_head_options
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


def test_head_round_trips_through_checkpoint_and_output(tmp_path, capsys, cells):
    """Head config saved in a checkpoint header comes back on load and lands in the output's provenance."""
    enc = create_model("random-init:levels=all,tta=rot4")
    ckpt = tmp_path / "m.safetensors"
    save_checkpoint(ckpt, enc.state_dict(), enc.config)
    back = create_model(str(ckpt))
    assert (back.config["levels"], back.config["pool"], back.tta, back.dim) == ([0, 1, 2, 3], "mean", "rot4", 480)
    np.save(tmp_path / "x.npy", cells[:4])
    out = tmp_path / "out.parquet"
    code, _, err = run_cli(["embed", tmp_path / "x.npy", "-o", out, "--model", ckpt, "--tta", "d8",
                            "--precision", "fp32", "--device", "cpu"], capsys)
    assert code == 0, err
    import pyarrow.parquet as pq

    prov = json.loads(pq.read_schema(out).metadata[b"microsnoop"])
    cfg = prov["model_config"]
    assert (cfg["levels"], cfg["pool"], cfg["tta"]) == ([0, 1, 2, 3], "mean", "d8")
    table = pq.read_table(out)
    assert sum(c.startswith("ch0_emb_") for c in table.column_names) == 480
    # the API with the same options gives the same vectors as the CLI
    import microsnoop

    api = microsnoop.embed(cells[:4], model=str(ckpt), tta="d8", device="cpu", precision="fp32")
    feats = np.stack([table.column(c).to_numpy() for c in table.column_names if "_emb_" in c], 1)
    np.testing.assert_allclose(feats, api, rtol=1e-5, atol=1e-6)
    code, _, err = run_cli(["embed", tmp_path / "x.npy", "-o", tmp_path / "o2.parquet", "--model", ckpt,
                            "--tta", "d4"], capsys)
    assert code == 2 and "unknown test-time augmentation 'd4'" in err
