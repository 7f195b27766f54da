"""Fast path: the folded/bf16 encoder keeps fp32's embeddings on real images; auto precision; loader thread."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from microsnoop.embed import Embedder
from microsnoop.core.device import cpu_has_native_bf16, resolve_precision
from microsnoop.embed.engine import bf16_validated
from microsnoop.embed.run import prefetch
from microsnoop.core.errors import MicrosnoopError
from microsnoop.models import create_model

pytestmark = pytest.mark.filterwarnings("ignore:model 'random-init' is untrained")

MODELS = ["random-init", "cellpose-encoder", "default"]


@pytest.fixture(scope="module")
def real_sets(shared_data) -> dict[str, np.ndarray]:
    """Real cells and fields of three sizes and channel counts (cells 64/68 px, nucleus fields 256x336)."""
    b = shared_data / "benchmarks"
    return {
        "yeast": np.array(np.load(b / "yeast_pci" / "images.npy", mmap_mode="r")[::41][:40]),
        "bbbc021": np.array(np.load(b / "bbbc021_dmso_vs_cycloheximide" / "images.npy", mmap_mode="r")[::40][:15]),
        "coelho": np.array(np.load(b / "coelho2009_nuclei_fields" / "images.npy", mmap_mode="r")[::24][:4]),
    }


def _per_channel_cosine(a: np.ndarray, b: np.ndarray, dim: int = 256) -> np.ndarray:
    """Cosine of each channel's vector (``dim`` features per channel)."""
    a, b = a.reshape(-1, dim), b.reshape(-1, dim)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module", params=MODELS)
def encoder(request):
    if request.param == "cellpose-encoder":
        pytest.importorskip("scellseg")
    return create_model(None if request.param == "default" else request.param)


def test_bf16_within_cosine_0999_of_fp32_on_real_images(encoder, real_sets):
    """The condition for ``--precision auto`` choosing bf16: every channel vector of every real image."""
    fp32 = Embedder(encoder, device="cpu", precision="fp32")
    bf16 = Embedder(encoder, device="cpu", precision="bf16")
    for name, imgs in real_sets.items():
        cos = _per_channel_cosine(fp32.embed(imgs), bf16.embed(imgs), encoder.out_dim)
        assert cos.min() >= 0.999, (encoder.name, name, cos.min())


def test_folded_fp32_matches_reference_encoder(encoder, real_sets):
    """BN folding is exact algebra: fp32 fast path == the plain module forward (real BN stats for Cellpose);
    with the default model's two scales, == the plain forward at each scale, concatenated."""
    from microsnoop.io.normalize import normalize_percentile
    from microsnoop.models.heads import multiscale

    imgs = real_sets["bbbc021"]
    got = Embedder(encoder, device="cpu", precision="fp32").embed(imgs)
    planes = torch.from_numpy(normalize_percentile(imgs).reshape(-1, 1, 68, 68))
    with torch.no_grad():
        ref = multiscale(encoder, planes, "none", encoder.scales).numpy().reshape(len(imgs), -1)
    assert np.abs(got - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())


def test_bf16_batch_invariance_is_looser_but_close(real_sets):
    """Documented: in bf16 an image alone vs in a batch of 40 agrees to cosine >= 0.9999 (fp32: 1e-5 abs)."""
    emb = Embedder("random-init", device="cpu", precision="bf16", batch_size=64)
    imgs = real_sets["yeast"]
    batch = emb.embed(imgs)
    alone = emb.embed(imgs[7:8])
    assert _per_channel_cosine(alone, batch[7:8]).min() >= 0.9999


def test_auto_precision_rules():
    cpu = torch.device("cpu")
    unet = create_model("random-init")
    assert resolve_precision("auto", cpu, bf16_validated(unet)) == ("bf16" if cpu_has_native_bf16() else "fp32")
    assert resolve_precision("fp32", cpu, bf16_validated(unet)) == "fp32"

    class Other(torch.nn.Module):
        config = {"arch": "effnet"}

    assert resolve_precision("auto", cpu, bf16_validated(Other())) == "fp32"  # not validated in bf16: stays fp32
    with pytest.raises(MicrosnoopError, match="unknown precision"):
        resolve_precision("int8", cpu, bf16_validated(unet))


def test_prefetch_keeps_order_and_reraises():
    def load(k):
        if k == 3:
            raise MicrosnoopError("bad image", f"img{k}")
        time.sleep(0.01 * (k % 2))
        return k * 10

    got = []
    with pytest.raises(MicrosnoopError, match="bad image"):
        for k, v in prefetch(load, [0, 1, 2, 3, 4]):
            got.append((k, v))
    assert got == [(0, 0), (1, 10), (2, 20)]


@pytest.mark.slow
def test_fast_path_faster_than_reference_forward():
    """Timing (shared machines are noisy, so slow-marked): best of 3 of each, 64 px batch of 64."""
    enc = create_model("random-init")
    emb = Embedder(enc, device="cpu", precision="auto")
    x = np.random.default_rng(0).random((64, 64, 64), dtype=np.float32)
    xt = torch.from_numpy(x)[:, None]

    def best(f):
        f()
        ts = []
        for _ in range(3):
            t = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t)
        return min(ts)

    with torch.no_grad():
        ref = best(lambda: enc(xt))
    fast = best(lambda: emb.encode_planes(x))
    assert ref / fast > 1.2, (ref, fast)
