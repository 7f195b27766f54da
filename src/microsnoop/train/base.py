"""Pretext methods: a name builds a trainable model, its loss, its sampling, and an embedding head.

Adding a method = a module in ``train/methods/`` that calls ``register_method`` + one import line in
``train/methods/__init__.py``. The generic loop (``train/loop.py``) handles optimiser, schedule,
autocast, checkpoints, resume and logging for every method alike.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..core.registry import Registry
from ..models.registry import ChannelEncoder


class PretextMethod:
    """Interface every method implements (the contract ``train/loop.py`` relies on).

    - ``defaults``: method-specific config keys and their default values (merged under the user's).
    - ``build(config) -> nn.Module``: the full trainable model (encoder + whatever head the pretext
      needs). Its ``forward`` is what the loss calls, so DDP can wrap it.
    - ``make_dataset(pool, config, shard) -> torch Dataset``: item ``i`` is the whole batch for global
      step ``i``, computed from ``(config["seed"], i, rank)`` only (see ``train/data.py``), so resume is
      exact. ``pool`` is the loaded ``ImagePool``; ``shard = (rank, world_size)``. Batches for other
      pretexts can hold protein/ID labels (cytoself) or same-image cell pairs (paired inpainting).
    - ``loss(model, batch) -> (scalar loss tensor, dict of floats to log)``; runs under autocast.
    - ``initialize(model, encoder) -> {"copied": n, "skipped": m}`` (optional): start from a registered
      model's or checkpoint's weights (``--init``); ``load_matching`` below is the usual body.
    - ``param_groups(model, config)`` / ``prepare_train(model, config)`` (optional): optimiser groups
      with ``lr_scale`` / ``frozen_steps``, and a hook after ``model.train()`` (e.g. frozen BN stats).
    - ``to_encoder(model, config) -> ChannelEncoder``: the per-channel embedding head used by ``embed``.
      Its ``config`` must hold ``arch`` (a ``register_architecture`` name) so ``create_model(path)``
      rebuilds it from the exported ``model.safetensors``.
    - ``load_pool(data, config)`` (optional): the training data; default ``ImagePool`` (one-channel
      planes of a folder / manifest). Methods whose pretext needs labels or cell pairs load a
      benchmark-style set instead (``train.data.LabelledSet``). Must expose ``manifest_sha256``,
      ``counts()``, ``holdout`` and ``len()`` (what the loop records and checks on resume).
    - ``after_step(model, step, config)`` (optional): runs after each optimiser step, outside autocast
      and autograd (e.g. DINO's EMA teacher update).
    """

    name: str = ""
    defaults: dict[str, Any] = {}

    def build(self, config: dict[str, Any]) -> nn.Module:
        raise NotImplementedError

    def make_dataset(self, pool: Any, config: dict[str, Any], shard: tuple[int, int] = (0, 1)) -> Any:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def initialize(self, model: nn.Module, encoder: nn.Module) -> dict[str, int]:
        return load_matching(model, encoder.state_dict())

    def param_groups(self, model: nn.Module, config: dict[str, Any]) -> list[dict[str, Any]]:
        """Optimiser groups; a group may carry ``lr_scale`` (fraction of the scheduled LR) and
        ``frozen_steps`` (LR 0 before that step), e.g. to keep pretrained weights while a new head learns."""
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]

    def prepare_train(self, model: nn.Module, config: dict[str, Any]) -> None:
        """Called after ``model.train()``: e.g. keep some BatchNorm layers in eval mode (frozen statistics)."""

    def to_encoder(self, model: nn.Module, config: dict[str, Any]) -> ChannelEncoder:
        raise NotImplementedError

    def load_pool(self, data: Any, config: dict[str, Any]) -> Any:
        from .data import ImagePool

        return ImagePool(data, holdout_per_modality=int(config["holdout"]), seed=int(config["seed"]))

    def after_step(self, model: nn.Module, step: int, config: dict[str, Any]) -> None:
        return None


def load_matching(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, int]:
    """Copy every tensor of ``state`` whose name and shape match ``model``'s; count what was copied."""
    own = model.state_dict()
    fit = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not fit:
        from ..core.errors import MicrosnoopError

        raise MicrosnoopError("--init weights share no tensor (name and shape) with the model being trained")
    model.load_state_dict(fit, strict=False)
    return {"copied": len(fit), "kept": len(own) - len(fit)}


@dataclass
class MethodSpec:
    name: str
    factory: Callable[[], PretextMethod]
    description: str
    extra: dict[str, Any] = field(default_factory=dict)


_METHODS: Registry[MethodSpec] = Registry("method")


def register_method(spec: MethodSpec) -> MethodSpec:
    """Make ``spec`` available by name to ``microsnoop train --method``."""
    return _METHODS.add(spec)


def encoder_from(enc: Any, module: Any, prefix: str) -> Any:
    """``enc`` (a ChannelEncoder) loaded with a copy of ``module``'s trained weights under ``prefix.``.

    Parameters
    ----------
    enc : ChannelEncoder
        The inference-side encoder, built from the method's config.
    module : torch.nn.Module
        The trained network (or the part of it that embeds).
    prefix : str
        Where ``enc`` keeps that network (``net``, ``vit``, ``source``).

    Returns
    -------
    ChannelEncoder
        ``enc`` in eval mode.
    """
    enc.load_weights({f"{prefix}.{k}": v.detach().clone() for k, v in module.state_dict().items()})
    return enc.eval()


def get_method(name: str) -> PretextMethod:
    from ..core.errors import MicrosnoopError
    from . import methods  # noqa: F401  the built-in methods register on import

    if name not in _METHODS:
        raise MicrosnoopError(f"unknown training method '{name}'; registered: {', '.join(_METHODS)}")
    return _METHODS[name].factory()


def list_methods() -> list[MethodSpec]:
    from . import methods  # noqa: F401
    return list(_METHODS.values())
