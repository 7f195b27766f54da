"""Peer pretext methods (dino-vit, cytoself, paired-inpainting) and channel attribution.

Per method: the loss on a tiny real batch (a known value, or falling over a few optimiser steps),
a checkpoint round trip through the training loop's export, and an embed run through the CLI.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

TINY = dict(batch_size=4, warmup_steps=1, checkpoint_every=2, workers=0, seed=5, steps=2)


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread per test: the embed CLI sets threads to every core, and on a loaded 2-core
    machine the following small training steps then ran ~25x slower (thread oversubscription)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)



@pytest.fixture(scope="module")
def yeast82(yeast, tmp_path_factory) -> Path:
    """Every 20th yeast cell (83 real cells: all 5 proteins, 20 fields, both splits) as a labelled set."""
    import shutil

    d = tmp_path_factory.mktemp("yeast82")
    rows = np.arange(0, 1642, 20)
    np.save(d / "images.npy", np.load(yeast / "images.npy", mmap_mode="r")[rows])
    pd.read_csv(yeast / "metadata.csv").iloc[rows].to_csv(d / "metadata.csv", index=False)
    shutil.copy(yeast / "dataset.json", d / "dataset.json")
    return d


def _fit(method: str, model: torch.nn.Module, batch: dict, steps: int, lr: float = 2e-3) -> list[float]:
    """Losses of ``steps`` AdamW steps on one fixed batch (fp32)."""
    from microsnoop.train.base import get_method

    m = get_method(method)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss, _ = m.loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def _round_trip(run: Path, method: str, x: torch.Tensor) -> None:
    """The exported checkpoint rebuilds (by its arch) the encoder to_encoder gives, bit for bit."""
    from microsnoop.models import create_model
    from microsnoop.train.base import get_method
    from microsnoop.train.loop import load_training_state

    m = get_method(method)
    state = load_training_state(run / "checkpoint.pt")
    model = m.build(state["config"])
    model.load_state_dict(state["model"])
    direct = m.to_encoder(model, state["config"])
    loaded = create_model(run / "model.safetensors")
    with torch.no_grad():
        a, b = direct(x), loaded(x)
    assert a.shape == (len(x), loaded.dim) and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert loaded.header["steps"] == 2 and loaded.config["method"] == method


def _embed_cli(cli, run: Path, yeast82: Path, tmp_path: Path, dim: int) -> None:
    from conftest import embedding_parts

    out = tmp_path / "emb.parquet"
    code, _, err = cli("embed", yeast82 / "images.npy", "--model", run / "model.safetensors", "-o", out)
    assert code == 0, err
    meta, X, prov = embedding_parts(out)
    assert X.shape == (83, 2 * dim) and np.isfinite(X).all()
    assert prov["precision"] == "fp32"  # not a bf16-validated architecture: auto stays fp32


# ------------------------------------------------------------------ dino-vit
def test_dino_loss_known_values():
    from microsnoop.train.methods.dino_vit import dino_loss, momentum_at, teacher_temp_at

    k, b = 64, 3
    zeros = torch.zeros(4 * b, k)  # uniform teacher and student: cross-entropy = log K exactly
    assert dino_loss(zeros, zeros[:2 * b], torch.zeros(1, k), 4, 0.1, 0.04).item() == pytest.approx(math.log(k), rel=1e-6)
    # a sharp teacher whose targets the student already puts (almost) all mass on: loss ~ 0
    t = torch.full((2 * b, k), -1.0)
    t[:, 0] = 1.0
    s = torch.full((4 * b, k), -10.0)
    s[:, 0] = 10.0
    assert dino_loss(s, t, torch.zeros(1, k), 4, 0.1, 0.01).item() < 1e-6
    cfg = {"warmup_teacher_temp": 0.04, "teacher_temp": 0.07, "warmup_teacher_temp_steps": 10, "momentum_teacher": 0.99,
           "steps": 21}
    assert teacher_temp_at(0, cfg) == pytest.approx(0.04) and teacher_temp_at(5, cfg) == pytest.approx(0.055)
    assert teacher_temp_at(50, cfg) == pytest.approx(0.07)
    assert momentum_at(0, cfg) == pytest.approx(0.99) and momentum_at(20, cfg) == pytest.approx(1.0)


def test_dino_multicrop_and_ema_teacher(tiny_pool):
    from microsnoop.train.base import get_method
    from microsnoop.train.data import ImagePool

    m = get_method("dino-vit")
    cfg = {**m.defaults, **TINY, "steps": 10, "out_dim": 256}
    ds = m.make_dataset(ImagePool(tiny_pool), cfg)
    b = ds[3]
    assert b["global"].shape == (8, 1, 48, 48) and b["local"].shape == (4 * 6, 1, 24, 24)
    assert torch.equal(ds[3]["local"], b["local"])  # a pure function of (seed, step)
    torch.manual_seed(0)
    model = m.build(cfg)
    loss, logs = m.loss(model, b)
    assert torch.isfinite(loss) and 0 < loss.item() < 2 * math.log(256)
    assert model.center.abs().sum() > 0  # centre moved towards the teacher's batch mean
    loss.backward()
    assert all(p.grad is None for p in model.teacher.parameters())  # no gradient reaches the teacher
    before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(0.1)
        m.after_step(model, 0, cfg)
    mom = cfg["momentum_teacher"]
    k = "patch_embed.weight"
    expect = mom * before[k] + (1 - mom) * model.student.state_dict()[k]
    assert torch.allclose(model.teacher.state_dict()[k], expect, atol=1e-6)


def test_dino_train_round_trip_and_embed_cli(tiny_pool, yeast82, tmp_path, cli):
    from microsnoop.train.loop import train

    res = train(tiny_pool, tmp_path / "run", method="dino-vit", options={**TINY, "out_dim": 256, "precision": "fp32"})
    assert res["steps"] == 2 and math.isfinite(res["final_loss"])
    x = torch.from_numpy(np.load(yeast82 / "images.npy")[:5, 0].astype(np.float32))[:, None]
    x = x / x.amax(dim=(2, 3), keepdim=True)
    _round_trip(tmp_path / "run", "dino-vit", x)
    _round_trip(tmp_path / "run", "dino-vit", x[..., :40, :44])  # other sizes: padded, position embeddings interpolated
    _embed_cli(cli, tmp_path / "run", yeast82, tmp_path, 192)


# ------------------------------------------------------------------ cytoself
def test_split_quantiser_straight_through_and_split():
    from microsnoop.models.vqvae import SplitQuantizer

    torch.manual_seed(0)
    vq = SplitQuantizer(16, 32, split=4, beta=0.25, ema=False)
    z = torch.randn(2, 16, 3, 3, requires_grad=True)
    q, loss, ppl, idx = vq(z)
    assert idx.shape == (2, 4, 3, 3) and 1 <= ppl.item() <= 32
    # every 4-channel sub-vector is replaced by a codebook entry (the same codebook for all 4 splits)
    sub = q.detach().reshape(2, 4, 4, 3, 3).permute(0, 1, 3, 4, 2).reshape(-1, 4)
    assert torch.allclose(sub, vq.codebook.weight[idx.reshape(-1)], atol=1e-6)
    q.sum().backward()
    assert torch.allclose(z.grad, torch.ones_like(z))  # straight-through estimator
    expect = F_mse(q.detach(), z.detach()) * 1.25  # codebook term + 0.25 x commitment term
    assert loss.item() == pytest.approx(expect, rel=1e-5)


def F_mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b) ** 2).mean())


def test_cytoself_loss_falls_on_real_cells(yeast82):
    from microsnoop.train.base import get_method

    m = get_method("cytoself")
    cfg = {**m.defaults, **TINY, "batch_size": 8, "input_size": 32, "classify_channels": [0]}
    cells = m.load_pool(yeast82, cfg)
    assert cfg["n_classes"] == 5 and len(cells.images) == int((pd.read_csv(yeast82 / "metadata.csv")["Metadata_Split"] == "train").sum())
    batch = m.make_dataset(cells, cfg)[0]
    assert batch["image"].shape == (8, 1, 32, 32) and set(batch["classify"].tolist()) <= {0.0, 1.0}
    torch.manual_seed(0)
    model = m.build(cfg)
    losses = _fit("cytoself", model, batch, 8, lr=5e-4)
    assert losses[-1] < 0.5 * losses[0], losses


def test_cytoself_train_round_trip_and_embed_cli(yeast82, tmp_path, cli):
    from microsnoop.train.loop import train

    train(yeast82, tmp_path / "run", method="cytoself", options={**TINY, "input_size": 32, "precision": "fp32"})
    x = torch.from_numpy(np.load(yeast82 / "images.npy")[:5, 1].astype(np.float32))[:, None]
    x = x / x.amax(dim=(2, 3), keepdim=True)
    _round_trip(tmp_path / "run", "cytoself", x)
    _round_trip(tmp_path / "run", "cytoself", x[..., :40, :40])
    _embed_cli(cli, tmp_path / "run", yeast82, tmp_path, 128)


# ------------------------------------------------------------------ paired-inpainting
def test_paired_inpainting_pairs_share_a_field_and_loss_falls(yeast82):
    from microsnoop.train.base import get_method
    from microsnoop.train.methods.paired_inpainting import CellPairs

    m = get_method("paired-inpainting")
    cfg = {**m.defaults, **TINY, "batch_size": 8, "input_size": 32}
    cells = m.load_pool(yeast82, cfg)
    ds = m.make_dataset(cells, cfg)
    assert isinstance(ds, CellPairs)
    field_of = cells.meta["Metadata_Image"].to_numpy()
    assert all(len(set(field_of[g])) == 1 for g in ds.groups)
    batch = ds[0]
    assert batch["src_protein"].shape == batch["tgt_protein"].shape == (8, 1, 32, 32)
    torch.manual_seed(0)
    model = m.build(cfg)
    losses = _fit("paired-inpainting", model, batch, 8)
    assert losses[-1] < 0.5 * losses[0], losses
    _, logs = m.loss(model, batch)  # step 0: the no-source diagnostic is computed
    assert math.isfinite(logs["no_source_mse"]) and logs["mean_baseline_mse"] > 0
    plain = m.build({**cfg, "skips": False})  # encoder-decoder without target skip connections
    assert plain(batch["src_protein"], batch["src_structure"], batch["tgt_structure"]).shape == (8, 1, 32, 32)


def test_paired_inpainting_round_trip_layer_and_embed_cli(yeast82, tmp_path, cli):
    from microsnoop.models import create_model
    from microsnoop.train.methods.paired_inpainting import relayer

    code, _, err = cli("train", "--data", yeast82, "-o", tmp_path / "run", "--method", "paired-inpainting",
                       "--steps", "2", "--batch-size", "4", "--input-size", "32", "--workers", "0", "--layer", "3",
                       "--precision", "fp32")
    assert code == 0, err
    x = torch.from_numpy(np.load(yeast82 / "images.npy")[:5, 0].astype(np.float32))[:, None]
    x = x / x.amax(dim=(2, 3), keepdim=True)
    _round_trip(tmp_path / "run", "paired-inpainting", x)
    enc = create_model(tmp_path / "run" / "model.safetensors")
    assert enc.config["layer"] == 3 and enc.dim == 128
    _embed_cli(cli, tmp_path / "run", yeast82, tmp_path, 128)
    relayer(str(tmp_path / "run" / "model.safetensors"), 1, str(tmp_path / "l1.safetensors"))
    l1 = create_model(tmp_path / "l1.safetensors")
    assert l1.dim == 32 and l1(x).shape == (5, 32)
    with pytest.raises(Exception, match="layer"):
        relayer(str(tmp_path / "run" / "model.safetensors"), 9, str(tmp_path / "bad.safetensors"))


# ------------------------------------------------------------------ channel attribution
@pytest.mark.parametrize("classifier", ["knn", "logistic"])
def test_channel_attribution_finds_the_informative_block(classifier):
    from microsnoop.evaluate.attribution import channel_attribution, channel_blocks

    rng = np.random.default_rng(0)
    n, d = 150, 8
    y = np.repeat(np.arange(3), n // 3)
    X = rng.normal(size=(n, 3 * d))
    X[:, d:2 * d] += 3.0 * np.eye(3)[y] @ rng.normal(size=(3, d))  # only the middle block carries the label
    meta = pd.DataFrame({"Metadata_Class": y.astype(str)})
    blocks = channel_blocks(n_features=3 * d, channel_names=["DNA", "GFP", "Actin"])
    df = channel_attribution(X, meta, "Metadata_Class", blocks, classifier=classifier, repeats=2)
    row = df.set_index("channel")
    assert row.loc["GFP", "baseline"] > 0.8
    assert row.loc["GFP", "drop_permuted"] > 0.4 and row.loc["GFP", "drop_dropped"] > 0.4
    assert row.loc["GFP", "alone"] > 0.8
    for ch in ("DNA", "Actin"):
        assert abs(row.loc[ch, "drop_permuted"]) < 0.15 and row.loc[ch, "alone"] < 0.6


def test_channel_blocks_from_feature_names():
    from microsnoop.evaluate.attribution import channel_blocks

    names = [f"{c}_emb_{k:03d}" for c in ("GFP_protein", "RFP_cytosol") for k in range(3)]
    blocks = channel_blocks(names)
    assert [b[0] for b in blocks] == ["GFP_protein", "RFP_cytosol"] and list(blocks[1][1]) == [3, 4, 5]


def test_peer_section_survives_regeneration(tmp_path, refresh_module):
    """The peer section renders from the json alone and replaces only itself in a regenerated page."""
    PEER_END, PEER_START = refresh_module.PEER_END, refresh_module.PEER_START
    render_peers, replace_peer_section = refresh_module.render_peers, refresh_module.replace_peer_section

    peers = {"methods": [{"method": "dino-vit", "data": "../shared/data/pretrain", "split": None, "steps": 4,
                          "images_seen": 16, "wall_s": 60.0, "hardware": "cpu", "dim_per_channel": 192,
                          "sha256": "ab" * 32, "status": "recorded", "command": "microsnoop train ...",
                          "results": {"yeast_pci": {"knn k=11 train->test": "0.500 / 0.480"}}}]}
    section = render_peers(peers)
    assert section.startswith(PEER_START) and section.endswith(PEER_END)
    assert "| dino-vit | 0.500 / 0.480 |" in section and "1.0 min" in section
    fresh = "# Benchmarks\n\n## yeast_pci\n\ntable\n\n## Models\n\nmodels\n"
    page = replace_peer_section(fresh, section)
    assert page.index("## yeast_pci") < page.index(PEER_START) < page.index("## Models")
    again = replace_peer_section(page, render_peers({"methods": []}))
    assert again.count(PEER_START) == 1 and "No peer runs recorded yet." in again and "0.500" not in again


@pytest.mark.parametrize("method", ["dino-vit", "cytoself"])
def test_resume_is_bit_for_bit_with_method_state(method, tiny_pool, yeast82, tmp_path):
    """The EMA teacher and centre (dino-vit) and the EMA codebooks (cytoself) live in the state dict,
    so an interrupted run resumes exactly like the uninterrupted one."""
    from microsnoop.train.loop import load_training_state, train

    data = tiny_pool if method == "dino-vit" else yeast82
    opts = {**TINY, "steps": 4, "precision": "fp32", "input_size": 48 if method == "dino-vit" else 32}
    if method == "dino-vit":
        opts["out_dim"] = 128
    train(data, tmp_path / "a", method=method, options=opts)
    train(data, tmp_path / "b", method=method, options=opts, stop_after=2)
    train(data, tmp_path / "b", resume=True)
    a, b = load_training_state(tmp_path / "a" / "checkpoint.pt"), load_training_state(tmp_path / "b" / "checkpoint.pt")
    assert a["step"] == b["step"] == 4
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_distill_unet_trains_resumes_and_exports(tiny_pool, tmp_path):
    """distill-unet: teacher statistics are calibrated once and saved with the model (resume is exact,
    no re-calibration), background crops get no weight, and the exported encoder embeds real images."""
    from microsnoop.models import create_model
    from microsnoop.train.loop import load_training_state, train

    opts = {**TINY, "steps": 4, "precision": "fp32", "input_size": 32, "batch_size": 8, "teacher_dims": 8,
            "calibration_batches": 3, "teachers": ["random-init:levels=all", "random-init:levels=last"],
            "init": "cellpose-encoder"}
    train(tiny_pool, tmp_path / "a", method="distill-unet", options=opts)
    train(tiny_pool, tmp_path / "b", method="distill-unet", options=opts, stop_after=2)
    train(tiny_pool, tmp_path / "b", resume=True)
    a, b = load_training_state(tmp_path / "a" / "checkpoint.pt"), load_training_state(tmp_path / "b" / "checkpoint.pt")
    assert bool(a["model"]["calibrated"]) and a["model"]["t0_basis"].shape == (480, 8)
    assert a["model"]["t1_mean"].shape == (256,)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    log = (tmp_path / "a" / "log.csv").read_text().splitlines()
    assert log[0].split(",")[-1] == "kept" and all(0.0 <= float(r.split(",")[-1]) <= 1.0 for r in log[1:])
    enc = create_model(str(tmp_path / "a" / "model.safetensors"))
    assert enc.config["arch"] == "distill-unet" and enc.dim == 16
    from microsnoop.embed.engine import Embedder
    from microsnoop.io.images import read_image

    img = read_image(sorted(tiny_pool.glob("*.tif"))[0])[None, :1, :40, :40]
    vec = Embedder(enc, device="cpu", precision="fp32").embed(img)
    assert vec.shape == (1, 16) and np.isfinite(vec).all()


def test_distill_unet_stream_seed_keeps_init_and_calibration(tiny_pool, tmp_path):
    """``stream_seed`` changes the training crops only: the calibration (target basis) and the initial
    weights stay those of the run's seed, so such runs can be weight-averaged; another seed changes both."""
    from microsnoop.train.loop import load_training_state, train

    opts = {**TINY, "steps": 2, "precision": "fp32", "input_size": 32, "batch_size": 8, "teacher_dims": 8,
            "calibration_batches": 3, "teachers": ["random-init:levels=all"], "teacher_tta": ["d8"],
            "init": "cellpose-encoder"}
    train(tiny_pool, tmp_path / "a", method="distill-unet", options=opts)
    train(tiny_pool, tmp_path / "b", method="distill-unet", options={**opts, "stream_seed": 7})
    train(tiny_pool, tmp_path / "c", method="distill-unet", options={**opts, "seed": 6})
    a, b, c = (load_training_state(tmp_path / r / "checkpoint.pt")["model"] for r in "abc")
    assert torch.equal(a["t0_basis"], b["t0_basis"]) and torch.equal(a["t0_mean"], b["t0_mean"])
    assert not torch.equal(a["t0_mean"], c["t0_mean"])
    # two updates on other crops move the same start differently, and only a little
    assert not torch.equal(a["student.proj.t0.weight"], b["student.proj.t0.weight"])
    assert (a["student.proj.t0.weight"] - b["student.proj.t0.weight"]).abs().max() < 0.01
