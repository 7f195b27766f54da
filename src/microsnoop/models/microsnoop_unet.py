"""The Microsnoop U-Net as a registered per-channel encoder, and its untrained floor ``random-init``."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .checkpoints import sha256_state_dict
from .registry import ChannelEncoder, ModelSpec, register_architecture, register_model
from .unet import DEFAULT_WIDTHS, MicrosnoopUNet

WEIGHTS_DIR = Path(__file__).parent / "weights"


class UNetEncoder(ChannelEncoder):
    """Wraps the full U-Net (the decoder is kept for ``reconstruct``); ``forward`` = encoder + mean pool."""

    def __init__(self, config: dict[str, Any] | None = None):
        super().__init__()
        config = dict(config or {})
        widths = tuple(config.get("widths", DEFAULT_WIDTHS))
        self.net = MicrosnoopUNet(config.get("in_channels", 1), config.get("out_channels", 1), widths)
        self.config = {**self.net.config, **{k: v for k, v in config.items() if k not in self.net.config}}
        self.dim = widths[-1]
        self.min_size = 2 ** len(widths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.embed(x)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def load_weights(self, state: dict[str, torch.Tensor], source: object = None) -> None:
        # checkpoints may hold the bare U-Net ('encoder.*') or this wrapper ('net.encoder.*')
        self.load_prefixed(state, "net.", "U-Net", source)


register_architecture("unet", UNetEncoder)

RANDOM_INIT_SEED = 0
RANDOM_INIT_SHA256 = "71ec2ce25697901a3be9fd2db2b1310071d6254d568dd5429d2aedce472927c6"


def build_random_init(pretrained: bool = True) -> UNetEncoder:
    """Seeded PyTorch default initialisation: identical on every machine, so it is a fixed baseline."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        enc = UNetEncoder()
    enc.sha256 = sha256_state_dict(enc.state_dict())
    enc.config["seed"] = RANDOM_INIT_SEED
    return enc


register_model(ModelSpec(
    name="random-init",
    build=build_random_init,
    description="Microsnoop residual U-Net (32-64-128-256) with seeded random weights: the floor a trained model must beat",
    license="MIT (no data)",
    training_data="none (untrained, seed 0)",
    input_size="any (>=16 px; 8-px multiples not required)",
    sha256=RANDOM_INIT_SHA256,
    trained=False,
))
