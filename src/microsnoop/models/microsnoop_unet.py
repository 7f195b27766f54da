"""The Microsnoop U-Net as a registered per-channel encoder, and its untrained floor ``random-init``."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..core.errors import MicrosnoopError
from .checkpoints import sha256_state_dict
from .heads import check_pool, check_tta, parse_levels, pool_levels, pooled_dim
from .registry import ChannelEncoder, ModelSpec, register_architecture, register_model
from .unet import DEFAULT_WIDTHS, Encoder, MicrosnoopUNet

WEIGHTS_DIR = Path(__file__).parent / "weights"


class UNetEncoder(ChannelEncoder):
    """Wraps the full U-Net (the decoder is kept for ``reconstruct``); ``forward`` = encoder + pooling head.

    Head keys in ``config``: ``levels`` (encoder levels pooled, default the deepest: ``[3]``), ``pool``
    (``mean``, ``max`` or ``meanmax``) and ``tta`` (applied by the embedding engine; see ``models/heads.py``).
    """

    def __init__(self, config: dict[str, Any] | None = None):
        super().__init__()
        config = dict(config or {})
        widths = tuple(config.get("widths", DEFAULT_WIDTHS))
        self.net = MicrosnoopUNet(config.get("in_channels", 1), config.get("out_channels", 1), widths)
        self.config = {**self.net.config, **{k: v for k, v in config.items() if k not in self.net.config}}
        self.min_size = 2 ** len(widths)
        self.set_head(levels=config.get("levels", "last"), pool=config.get("pool", "mean"), tta=config.get("tta"))

    @property
    def backbone(self) -> torch.nn.Module:
        """The convolutional encoder whose level maps are pooled."""
        return self.net.encoder

    def set_head(self, levels: Any = None, pool: str | None = None, tta: str | None = None) -> None:
        """Change the embedding head (levels pooled, pooling, TTA); ``None`` keeps the current value."""
        widths = self.config["widths"]
        if levels is not None:
            self.config["levels"] = parse_levels(levels, len(widths))
        if pool is not None:
            self.config["pool"] = check_pool(pool)
        if tta is not None or "tta" not in self.config:
            self.config["tta"] = check_tta(tta)
        self.dim = self.head_dim()

    def head_dim(self) -> int:
        return pooled_dim(self.config["widths"], self.config["levels"], self.config["pool"])

    def post_pool(self, v: torch.Tensor) -> torch.Tensor:
        """What follows pooling (nothing here; a projection in distilled models)."""
        return v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.backbone(x)
        return self.post_pool(pool_levels(feats, self.config["levels"], self.config["pool"]))

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def load_weights(self, state: dict[str, torch.Tensor], source: object = None) -> None:
        # checkpoints may hold the bare U-Net ('encoder.*') or this wrapper ('net.encoder.*')
        self.load_prefixed(state, "net.", "U-Net", source)


class DistilledUNetEncoder(UNetEncoder):
    """The U-Net encoder followed by one linear projection per teacher (``distill-unet`` training).

    The embedding is the concatenation of the projections: each predicts one teacher's (d8-averaged,
    standardised, PCA-reduced) features from a single view, so the student carries several teachers'
    information with the invariance trained in. The decoder is not part of this architecture.
    """

    def __init__(self, config: dict[str, Any] | None = None):
        torch.nn.Module.__init__(self)
        config = dict(config or {})
        widths = tuple(config.get("widths", DEFAULT_WIDTHS))
        self.encoder = Encoder(config.get("in_channels", 1), widths)
        self.config = {"arch": "distill-unet", "in_channels": config.get("in_channels", 1), "widths": list(widths),
                       **{k: v for k, v in config.items() if k not in ("arch", "in_channels", "widths")}}
        self.min_size = 2 ** len(widths)
        self.config["levels"] = parse_levels(config.get("levels", "all"), len(widths))
        self.config["pool"] = check_pool(config.get("pool", "mean"))
        self.config["tta"] = check_tta(config.get("tta"))
        in_dim = pooled_dim(widths, self.config["levels"], self.config["pool"])
        self.teachers = dict(config.get("teachers", {"self": in_dim}))  # name -> output dim
        self.config["teachers"] = self.teachers
        self.proj = torch.nn.ModuleDict({n: torch.nn.Linear(in_dim, int(d)) for n, d in self.teachers.items()})
        self.dim = self.head_dim()

    @property
    def backbone(self) -> torch.nn.Module:
        return self.encoder

    def set_head(self, levels: Any = None, pool: str | None = None, tta: str | None = None) -> None:
        if levels is not None or pool is not None:
            raise MicrosnoopError("a distilled model's levels and pooling are fixed by its projections; only tta can change")
        if tta is not None:
            self.config["tta"] = check_tta(tta)

    def head_dim(self) -> int:
        return sum(int(d) for d in self.teachers.values())

    def post_pool(self, v: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.proj[n](v.to(self.proj[n].weight.dtype)).float() for n in self.teachers], dim=1)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        raise MicrosnoopError("a distilled model has no decoder to reconstruct with")

    def load_weights(self, state: dict[str, torch.Tensor], source: object = None) -> None:
        missing, unexpected = self.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise MicrosnoopError(f"weights do not fit the distilled U-Net: {len(missing)} missing "
                                  f"({', '.join(missing[:3])}), {len(unexpected)} unexpected ({', '.join(unexpected[:3])})", source)


register_architecture("unet", UNetEncoder)
register_architecture("distill-unet", DistilledUNetEncoder)

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


# untrained: its sha256 is of the seeded weights, so the floor is reproducible bit for bit
register_model(ModelSpec(
    name="random-init", build=build_random_init, trained=False, sha256=RANDOM_INIT_SHA256,
    head="levels=last,pool=mean,tta=none (256)", input_size="any (>=16 px; 8-px multiples not required)",
    description="Microsnoop residual U-Net (32-64-128-256) with seeded random weights: the floor a trained model must beat",
    license="MIT (no data)", training_data="none (untrained, seed 0)",
))
