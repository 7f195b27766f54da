"""Training loop: loss goes down on real images, resume is bit-for-bit, checkpoints round-trip."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

SMALL = dict(input_size=48, batch_size=4, warmup_steps=2, lr=3e-3, checkpoint_every=2, workers=0, seed=3)



def _eval_loss(model: torch.nn.Module, pool_dir: Path) -> float:
    """Loss on fixed batches (steps 1000-1003: same crops and masks every call), with batch statistics
    (BN running averages after a dozen steps are still far from converged, which would hide progress)."""
    from microsnoop.train.base import get_method
    from microsnoop.train.data import ImagePool

    m = get_method("mae-unet")
    ds = m.make_dataset(ImagePool(pool_dir), {**m.defaults, **SMALL, "batch_size": 8})
    model.train()
    with torch.no_grad():
        return float(np.mean([m.loss(model, ds[1000 + i])[0].item() for i in range(4)]))


def _trained_unet(run: Path) -> torch.nn.Module:
    from microsnoop.train.base import get_method

    m = get_method("mae-unet")
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    model = m.build(m.defaults)
    model.load_state_dict(state["model"])
    return model


def test_few_steps_reduce_loss(tiny_pool, tmp_path):
    from microsnoop.train.base import get_method
    from microsnoop.train.loop import train

    torch.manual_seed(SMALL["seed"])
    before = _eval_loss(get_method("mae-unet").build(get_method("mae-unet").defaults), tiny_pool)
    res = train(tiny_pool, tmp_path / "run", options={**SMALL, "steps": 15})
    after = _eval_loss(_trained_unet(tmp_path / "run"), tiny_pool)
    assert res["steps"] == 15 and res["images_seen"] == 60
    assert after < 0.6 * before, (before, after)
    log = pd.read_csv(tmp_path / "run" / "log.csv")
    assert list(log["step"]) == list(range(15))
    assert log["lr"].iloc[1] == pytest.approx(3e-3) and log["lr"].iloc[-1] < 3e-4  # warm-up, then cosine down


def test_resume_is_bit_for_bit(tiny_pool, tmp_path, cli):
    from microsnoop.train.loop import train

    opts = {**SMALL, "steps": 4}
    train(tiny_pool, tmp_path / "a", options=opts)
    train(tiny_pool, tmp_path / "b", options=opts, stop_after=2)  # "interrupted" after the step-2 checkpoint
    code, _, err = cli("train", "--data", tiny_pool, "-o", tmp_path / "b", "--resume", "--workers", "1")
    assert code == 0, err
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 4
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["rng"]["torch"], b["rng"]["torch"]) for _ in [0])
    la, lb = pd.read_csv(tmp_path / "a" / "log.csv"), pd.read_csv(tmp_path / "b" / "log.csv")
    assert list(lb["step"]) == [0, 1, 2, 3] and np.array_equal(la["loss"].values, lb["loss"].values)


def test_checkpoint_round_trips(tiny_pool, tmp_path):
    from microsnoop.models import create_model
    from microsnoop.models.checkpoints import load_checkpoint, save_checkpoint
    from microsnoop.train.base import get_method
    from microsnoop.train.loop import train
    from microsnoop.train.data import ImagePool

    train(tiny_pool, tmp_path / "run", options={**SMALL, "steps": 2})
    direct = get_method("mae-unet").to_encoder(_trained_unet(tmp_path / "run"), {})
    loaded = create_model(tmp_path / "run" / "model.safetensors")
    x = torch.from_numpy(np.stack([p[:40, :40] for p in ImagePool(tiny_pool).planes]).astype(np.float32))[:, None]
    x = x / x.amax(dim=(2, 3), keepdim=True)
    assert torch.equal(direct(x), loaded(x))
    assert loaded.header["steps"] == 2 and loaded.config["method"] == "mae-unet"
    # an fp16 export (how shipped weights are stored) embeds the same up to fp16 rounding
    state, header, _ = load_checkpoint(tmp_path / "run" / "model.safetensors")
    save_checkpoint(tmp_path / "half.safetensors", state, header["config"], dtype=torch.float16)
    half = create_model(tmp_path / "half.safetensors")
    assert torch.allclose(half(x), loaded(x), rtol=1e-2, atol=1e-2)


def test_init_from_registered_model_copies_encoder_and_decoder(tiny_pool, tmp_path):
    pytest.importorskip("scellseg")
    from microsnoop.models import create_model
    from microsnoop.train.base import get_method

    m = get_method("mae-unet")
    model = m.build(m.defaults)
    info = m.initialize(model, create_model("cellpose-encoder"))
    cp = create_model("cellpose-encoder").net.state_dict()
    own = model.state_dict()
    assert torch.equal(own["encoder.down.res_down_0.conv.conv_0.2.weight"], cp["encoder.down.res_down_0.conv.conv_0.2.weight"])
    assert torch.equal(own["decoder.up.res_up_0.conv.conv_1.full.weight"], cp["decoder.up.res_up_0.conv.conv_1.full.weight"])
    assert info["copied"] == len(own)  # every tensor (cellpose-encoder already carries a U-Net output head)


def test_reconstruct_cli_writes_figure(shared_data, tmp_path, cli):
    img = sorted((shared_data / "pretrain" / "images" / "tissue").glob("*.tif"))[0]
    code, _, err = cli("reconstruct", img, "--model", "random-init", "-o", tmp_path / "fig.png", "--mask-ratio", "0.5",
                       "--crop", "64")
    assert code == 0, err
    assert (tmp_path / "fig.png").stat().st_size > 5000
    code, _, err = cli("reconstruct", img, "--model", "random-init", "-o", tmp_path / "x.png", "--mask-ratio", "1.5")
    assert code == 2 and "mask ratio" in err


def test_bad_training_input_is_one_line_error(tmp_path, cli):
    code, _, err = cli("train", "--data", tmp_path / "missing", "-o", tmp_path / "run", "--steps", "1")
    assert code == 2 and "training data not found" in err


def test_shipped_models_load_verified_and_default_is_trained():
    from microsnoop.models import create_model, default_model_name, get_spec

    default = default_model_name()
    assert default == "microsnoop-unet-v2-ms" and get_spec(default).trained
    # the default is v2's weight file with a two-scale head, under its own name; v2 stays the one-pass fast mode
    ms = create_model("microsnoop-unet-v2-ms")
    assert ms.sha256 == get_spec("microsnoop-unet-v2").sha256 and ms.scales == (1.0, 1.5) and ms.out_dim == 1024
    for name, steps, dim in (("microsnoop-unet-v2", 1500, 512), ("microsnoop-unet-v1", 600, 256),
                             ("microsnoop-unet-cpinit", 950, 256), ("microsnoop-unet-scratch", 950, 256)):
        enc = create_model(name)
        assert enc.sha256 == get_spec(name).sha256 and enc.header["steps"] == steps
        out = enc(torch.rand(2, 1, 40, 40))
        assert out.shape == (2, dim) and torch.isfinite(out).all()


def test_fine_tune_keeps_encoder_frozen_then_scaled(tiny_pool, tmp_path):
    """--init cellpose-encoder with encoder_frozen_steps=3 and freeze_encoder_bn: after 3 steps the
    encoder (weights and BN statistics) is still exactly Cellpose's while the decoder has moved."""
    from microsnoop.models import create_model
    from microsnoop.train.loop import train

    opts = {**SMALL, "steps": 3, "init": "cellpose-encoder", "encoder_frozen_steps": 3, "freeze_encoder_bn": True,
            "encoder_lr_scale": 0.1, "precision": "fp32"}
    train(tiny_pool, tmp_path / "ft", options=opts)
    model = _trained_unet(tmp_path / "ft")
    ref = {k[4:] if k.startswith("net.") else k: v for k, v in create_model("cellpose-encoder").state_dict().items()}
    enc = {k: v for k, v in model.state_dict().items() if k.startswith("encoder.")}
    assert enc and all(k in ref for k in enc)
    for k, v in enc.items():
        torch.testing.assert_close(v, ref[k].to(v.dtype), rtol=0, atol=0, msg=k)
    dec = {k: v for k, v in model.state_dict().items() if k.startswith("decoder.") and k in ref}
    assert any(not torch.equal(v, ref[k]) for k, v in dec.items())


def test_set_overrides_parse_json_values():
    from microsnoop.cli import parse_overrides
    from microsnoop.core.errors import MicrosnoopError

    assert parse_overrides(["encoder_lr_scale=0.1", "freeze_encoder_bn=true", "label_column=Metadata_Protein"]) == {
        "encoder_lr_scale": 0.1, "freeze_encoder_bn": True, "label_column": "Metadata_Protein"}
    with pytest.raises(MicrosnoopError, match="KEY=VALUE"):
        parse_overrides(["oops"])


def test_smooth_is_trailing_mean_and_plot_needs_a_log(tmp_path):
    from microsnoop.core.errors import MicrosnoopError
    from microsnoop.train.plots import plot_training_logs, smooth

    np.testing.assert_allclose(smooth(np.array([1.0, 3.0, 5.0, 7.0]), 2), [1.0, 2.0, 4.0, 6.0])
    with pytest.raises(MicrosnoopError, match="no training log"):
        plot_training_logs([("x", tmp_path / "missing")], tmp_path / "f.png")
    assert not (tmp_path / "f.png").exists()


TINY = {**SMALL, "input_size": 32, "widths": [8, 16, 16, 16], "precision": "fp32"}


def test_interrupted_run_resumes_with_each_step_logged_once(tiny_pool, tmp_path):
    """Interrupted after step 4 was logged but with the last checkpoint at step 3: the resumed run
    drops the rows past the checkpoint (it used to write the resume step twice) and ends as an
    uninterrupted run does."""
    from microsnoop.train.loop import train

    opts = {**TINY, "steps": 6, "checkpoint_every": 3}
    train(tiny_pool, tmp_path / "a", options=opts)

    def interrupt(step, total, logs):
        if step == 5:  # step index 4 is in log.csv, checkpoint.pt holds step 3
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tiny_pool, tmp_path / "b", options=opts, progress=interrupt)
    assert list(pd.read_csv(tmp_path / "b" / "log.csv")["step"]) == [0, 1, 2, 3, 4]
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["step"] == 3
    train(tiny_pool, tmp_path / "b", resume=True)
    la, lb = pd.read_csv(tmp_path / "a" / "log.csv"), pd.read_csv(tmp_path / "b" / "log.csv")
    assert list(lb["step"]) == list(range(6))
    assert np.array_equal(la["loss"].values, lb["loss"].values)
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_npy_files_in_a_training_folder_are_left_out_not_fatal(tiny_pool, tmp_path, cli):
    """A folder of images that also holds .npy arrays (here an embedding matrix and an (N, C, H, W)
    stack) trains on the images; the arrays are named in a warning and in config.json."""
    import json
    import shutil

    from microsnoop.train.data import ImagePool

    folder = tmp_path / "images"
    folder.mkdir()
    for p in tiny_pool.glob("*.tif"):
        shutil.copy(p, folder / p.name)
    plain = ImagePool(folder)
    np.save(folder / "embeddings.npy", np.random.default_rng(0).random((10, 5)))
    np.save(folder / "stack.npy", np.zeros((2, 1, 40, 40), np.uint16))
    with pytest.warns(UserWarning, match=r"left out 2 \.npy file\(s\) \(embeddings\.npy, stack\.npy\)"):
        pool = ImagePool(folder)
    assert len(pool) == len(plain) and pool.skipped == ["embeddings.npy", "stack.npy"]
    with pytest.warns(UserWarning, match=r"left out 2 \.npy"):  # the CLI prints it as one 'warning:' line
        code, _, err = cli("train", "--data", folder, "-o", tmp_path / "run", "--steps", "1", "--batch-size", "2",
                           "--input-size", "32", "--workers", "0", "--set", "widths=[8,16,16,16]")
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "config.json").read_text())["skipped_files"] == ["embeddings.npy", "stack.npy"]


def test_npy_listed_in_a_manifest_is_read_or_refused_in_one_line(tiny_pool, tmp_path):
    from microsnoop.core.errors import MicrosnoopError
    from microsnoop.io.images import read_image
    from microsnoop.train.data import ImagePool

    first = sorted(tiny_pool.glob("*.tif"))[0]
    np.save(tmp_path / "plane.npy", read_image(first)[0])  # (H, W): an image stored as an array
    pd.DataFrame({"path": ["plane.npy"]}).to_csv(tmp_path / "manifest.csv", index=False)
    pool = ImagePool(tmp_path / "manifest.csv")
    assert len(pool) == 1 and np.array_equal(pool.planes[0], read_image(first)[0])
    np.save(tmp_path / "plane.npy", np.zeros((2, 1, 40, 40), np.float32))
    with pytest.raises(MicrosnoopError, match=r"plane\.npy: a \.npy training image must be a numeric \(H, W\) or"):
        ImagePool(tmp_path / "manifest.csv")


def test_centred_crops_sit_on_objects_and_off_keeps_batches(shared_data, tmp_path):
    """``centre_fraction``: crops around the objects of a real nucleus field; 0 leaves v2's batches alone."""
    import shutil

    from microsnoop.train.data import ImagePool, StepBatches

    rel = "images/fluorescence/cpex_Human_AS_09125_050116030001_D03f00d0_c0.tif"  # 512 x 512 DNA field
    shutil.copy(shared_data / "pretrain" / rel, tmp_path / "field.tif")
    pool = ImagePool(tmp_path)
    centres = pool.object_centres()[0]
    plane = pool.planes[0]
    assert len(centres) >= 50  # a crowded field of nuclei
    assert np.median(plane[centres[:, 0], centres[:, 1]]) >= 4 * np.median(plane)  # on nuclei, not background
    centred = StepBatches(pool, 64, 48, 0, (0.75, 1.5), centre_fraction=1.0)[0]["image"].numpy()[:, 0]
    plain = StepBatches(pool, 64, 48, 0, (0.75, 1.5))[0]["image"].numpy()[:, 0]
    mid = lambda b: b[:, 20:28, 20:28].mean((1, 2))  # noqa: E731 - the crops' central 8 x 8 pixels
    assert (mid(centred) > centred.mean((1, 2))).mean() >= 0.6
    assert mid(centred).mean() >= 3 * mid(plain).mean()
    off = StepBatches(pool, 64, 48, 0, (0.75, 1.5), centre_fraction=0.0)[0]["image"].numpy()[:, 0]
    np.testing.assert_array_equal(off, plain)
    from microsnoop.core.errors import MicrosnoopError

    with pytest.raises(MicrosnoopError, match=r"centre_fraction must be between 0 and 1, got 1\.5"):
        StepBatches(pool, 64, 48, 0, (0.75, 1.5), centre_fraction=1.5)


def test_bad_method_option_leaves_no_run_folder(tiny_pool, tmp_path, cli):
    """An option the method refuses (here centre_fraction > 1) is a one-line error, exit 2, nothing written."""
    code, _, err = cli("train", "--method", "distill-unet", "--data", tiny_pool, "-o", tmp_path / "run",
                       "--steps", "1", "--set", "centre_fraction=2")
    assert code == 2 and "centre_fraction must be between 0 and 1, got 2" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, message", [
    (("--set", "stream_seed=-1"), "stream_seed must be an integer from 0 to 2**32 - 1, not -1"),
    (("--set", "stream_seed=1.5"), "stream_seed must be an integer from 0 to 2**32 - 1, not 1.5"),
    (("--seed", "-1"), "seed must be an integer from 0 to 2**32 - 1, not -1"),
])
def test_bad_seed_is_refused_before_the_run_folder(tiny_pool, tmp_path, cli, args, message):
    """numpy refuses a negative or fractional seed only once the pool is loaded (a traceback, and a run
    folder with a config but no checkpoint); the config check refuses it first."""
    code, _, err = cli("train", "--method", "distill-unet", "--data", tiny_pool, "-o", tmp_path / "run",
                       "--steps", "1", *args)
    assert code == 2 and message in err
    assert not (tmp_path / "run").exists()
