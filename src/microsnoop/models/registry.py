"""Model registry: a name builds a per-channel encoder with verified weights.

A registered model maps a normalised one-channel batch (B, 1, H, W) to (B, dim) features. The
embedding engine runs it on every channel separately and concatenates, so any channel count works.
Adding a model = a module that calls ``register_model`` + one import line in ``models/__init__.py``.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..core.errors import MicrosnoopError
from ..core.registry import Registry


class ChannelEncoder(nn.Module):
    """Base class: ``forward`` takes (B, 1, H, W) float32 percentile-normalised pixels, returns (B, dim)."""

    dim: int = 256
    min_size: int = 16  # smaller images are zero-padded (centred) up to this size
    fixed_size: int | None = None  # encoders that resize every input to one size (e.g. ImageNet CNNs)
    name: str = "unnamed"
    sha256: str = ""
    config: dict[str, Any]
    spec: "ModelSpec | None" = None

    def load_prefixed(self, state: dict[str, torch.Tensor], prefix: str, what: str, source: object = None) -> None:
        """Strictly load ``state`` into this wrapper, whose network lives under ``prefix`` (e.g. ``net.``);
        bare-network checkpoints (keys without the prefix) are accepted too."""
        if not any(k.startswith(prefix) for k in state):
            state = {f"{prefix}{k}": v for k, v in state.items()}
        missing, unexpected = self.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise MicrosnoopError(f"weights do not fit the {what}: {len(missing)} missing ({', '.join(missing[:3])}), "
                                  f"{len(unexpected)} unexpected ({', '.join(unexpected[:3])})", source)

    @property
    def tta(self) -> str:
        """Test-time augmentation of this model's head (``none``, ``rot4``, ``d8``), run by the engine."""
        return getattr(self, "config", {}).get("tta", "none")

    @property
    def scales(self) -> tuple[float, ...]:
        """Input scale factors of this model's head (vectors concatenated in this order), run by the engine."""
        from .heads import parse_scales

        return parse_scales(getattr(self, "config", {}).get("scales"))

    @property
    def out_dim(self) -> int:
        """Features per channel with the head's scales: ``dim`` x the number of scales."""
        return int(self.dim) * len(self.scales)

    def set_head(self, levels: Any = None, pool: str | None = None, tta: str | None = None) -> None:
        """Set the embedding head; encoders without a choice of levels or pooling take only ``tta``."""
        from .heads import check_tta

        if levels is not None or pool is not None:
            raise MicrosnoopError(f"model '{self.name}' has no choice of encoder levels or pooling (only tta)")
        self.config = {**getattr(self, "config", {}), "tta": check_tta(tta)}

    def provenance(self) -> dict[str, Any]:
        return {"model": self.name, "model_sha256": self.sha256, "model_config": getattr(self, "config", {})}


@dataclass
class ModelSpec:
    name: str
    build: Callable[[bool], ChannelEncoder]  # build(pretrained) -> encoder with weights loaded
    description: str
    license: str
    training_data: str
    input_size: str
    sha256: str | None = None
    trained: bool = True
    default: bool = False
    requires: str | None = None  # install hint when an optional dependency is missing
    card: str | None = None  # path of the model card, relative to the package
    head: str = "tta=none"  # default embedding head (levels pooled, pooling, TTA); NAME:key=value overrides it
    extra: dict[str, Any] = field(default_factory=dict)


_REGISTRY: Registry[ModelSpec] = Registry("model")


def register_model(spec: ModelSpec) -> ModelSpec:
    """Make ``spec`` available by name to ``create_model`` and ``microsnoop models``."""
    return _REGISTRY.add(spec)


def list_models() -> list[ModelSpec]:
    """The registered models, in registration order.

    Parameters
    ----------
    None

    Returns
    -------
    list of ModelSpec
        Name, description, licence, training data, input size, default head and weights sha256 of each.
    """
    return list(_REGISTRY.values())


def get_spec(name: str) -> ModelSpec:
    if name not in _REGISTRY:
        raise MicrosnoopError(f"unknown model '{name}'; registered: {', '.join(_REGISTRY)} (or give a checkpoint path)")
    return _REGISTRY[name]


def default_model_name() -> str:
    for spec in _REGISTRY.values():
        if spec.default:
            return spec.name
    return "random-init"


_ARCH_BUILDERS: dict[str, Callable[[dict[str, Any]], ChannelEncoder]] = {}


def register_architecture(arch: str, builder: Callable[[dict[str, Any]], ChannelEncoder]) -> None:
    """Architectures build an (untrained) encoder from a checkpoint's config, so a user's own
    checkpoint file (``--model path.safetensors``) loads without a registry entry."""
    _ARCH_BUILDERS[arch] = builder


def build_from_checkpoint(path: str | Path, expected_sha256: str | None = None, name: str | None = None,
                          pretrained: bool = True) -> ChannelEncoder:
    """The checkpoint's architecture with its weights, or (``pretrained=False``) with PyTorch's default
    initialisation: only the header's config is read then."""
    from .checkpoints import load_checkpoint, read_checkpoint_header

    if not pretrained:
        header = read_checkpoint_header(path)
        return _ARCH_BUILDERS[_arch(header["config"], path)](header["config"])
    state, header, digest = load_checkpoint(path, expected_sha256)
    config = header["config"]
    enc = _ARCH_BUILDERS[_arch(config, path)](config)
    enc.load_weights(state, path)
    enc.name = name or str(path)
    enc.sha256 = digest
    enc.header = header
    return enc


def _arch(config: dict[str, Any], path: str | Path) -> str:
    arch = config.get("arch")
    if arch not in _ARCH_BUILDERS:
        raise MicrosnoopError(f"checkpoint architecture '{arch}' is not known; known: {', '.join(_ARCH_BUILDERS)}", path)
    return arch


def create_model(name: str | Path | None = None, pretrained: bool = True, device: str | torch.device = "cpu",
                 **head: Any) -> ChannelEncoder:
    """Build a registered model by name (or load a checkpoint path), in eval mode on ``device``.

    Parameters
    ----------
    name : str or Path, optional
        A registered name, a checkpoint path, or either followed by head options after a colon
        (``"cellpose-encoder:levels=all,tta=d8"``). Default: the default model.
    pretrained : bool
        True: the trained weights. False: the same architecture with PyTorch's default initialisation,
        seeded (``UNTRAINED_SEED``) so it is the same on every machine; ``config["pretrained"]`` is then
        False and ``sha256`` is that of the random weights. Models without learned weights
        (``handcrafted``) refuse False.
    device : str or torch.device
    **head
        ``levels``, ``pool``, ``tta``, ``scales``: override the model's embedding head (see ``models/heads.py``).

    Returns
    -------
    ChannelEncoder
        The encoder: (B, 1, H, W) normalised planes -> (B, dim) features.
    """
    from .heads import split_head_options

    name = str(name) if name is not None else default_model_name()
    if name not in _REGISTRY and not Path(name).exists():
        name, opts = split_head_options(name)
        head = {**opts, **{k: v for k, v in head.items() if v is not None}}
    enc = _build_named(name, pretrained)
    apply_head(enc, **head)
    return enc.eval().to(device)


def apply_head(enc: ChannelEncoder, **head: Any) -> ChannelEncoder:
    """Set head options that are not ``None`` and add them to the model's name, which then says which
    head made the vectors (benchmark tables, caches, provenance)."""
    from .heads import format_scales, parse_scales

    head = {k: v for k, v in head.items() if v is not None}
    if "scales" in head:  # every encoder takes scales: the engine resizes its input
        head["scales"] = format_scales(parse_scales(head["scales"]))
    if head:
        rest = {k: v for k, v in head.items() if k != "scales"}
        if rest:
            enc.set_head(**rest)
        if "scales" in head:
            enc.config = {**getattr(enc, "config", {}), "scales": head["scales"]}
        base, old = enc.name.split(":", 1) if ":" in enc.name and "=" in enc.name.rsplit(":", 1)[1] else (enc.name, "")
        merged = dict(p.split("=", 1) for p in old.split(",") if "=" in p)
        merged.update({k: str(v) for k, v in head.items()})
        enc.name = f"{base}:" + ",".join(f"{k}={v}" for k, v in merged.items())
    return enc


def _build_named(name: str, pretrained: bool) -> ChannelEncoder:
    if not pretrained:
        return _build_untrained(name)
    if name in _REGISTRY:
        spec = _REGISTRY[name]
        try:
            enc = spec.build(pretrained)
        except ImportError as exc:
            from ..core.extras import install_hint

            hint = f"; install it with: {spec.requires or install_hint(exc.name or str(exc))}"
            raise MicrosnoopError(f"model '{name}' needs a missing package ({exc.name or exc}){hint}") from None
        enc.name = name
        enc.spec = spec
        if spec.sha256 and enc.sha256 and enc.sha256 != spec.sha256:
            raise MicrosnoopError(f"model '{name}': weights sha256 {enc.sha256[:12]}... does not match the "
                                  f"registry's {spec.sha256[:12]}...")
        if not spec.trained:
            warnings.warn(f"model '{name}' is untrained (random weights): its embeddings are a floor for "
                          f"comparison, not a representation to analyse", UserWarning, stacklevel=2)
    elif Path(name).suffix == ".safetensors" or Path(name).exists():
        enc = build_from_checkpoint(name)
    else:
        get_spec(name)  # raises the 'unknown model' error
        raise AssertionError
    return enc


UNTRAINED_SEED = 0


def _build_untrained(name: str) -> ChannelEncoder:
    """``create_model(name, pretrained=False)``: the architecture with seeded default initialisation."""
    from .checkpoints import sha256_state_dict

    spec = _REGISTRY.get(name)
    if spec is not None and str(spec.extra.get("weights", "")).startswith("none"):
        raise MicrosnoopError(f"model '{name}' has no learned weights, so pretrained=False does not apply")
    if spec is None and not Path(name).exists():
        get_spec(name)  # raises the 'unknown model' error
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(UNTRAINED_SEED)
        try:
            enc = spec.build(False) if spec is not None else build_from_checkpoint(name, pretrained=False)
        except ImportError as exc:
            hint = f"; install it with: {spec.requires}" if spec is not None and spec.requires else ""
            raise MicrosnoopError(f"model '{name}' needs a missing package ({exc.name or exc}){hint}") from None
    enc.name = name
    enc.spec = spec
    enc.config = {**getattr(enc, "config", {}), "pretrained": False, "seed": UNTRAINED_SEED}
    enc.sha256 = sha256_state_dict(enc.state_dict())
    warnings.warn(f"model '{name}' was built untrained (pretrained=False, random weights)", UserWarning, stacklevel=3)
    return enc
