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

from ..models.registry import ChannelEncoder


class PretextMethod:
    """Interface every method implements.

    - ``build(config) -> nn.Module``: the full trainable model (encoder + whatever head the pretext needs).
    - ``loss(model, batch) -> (loss tensor, dict of floats to log)``.
    - ``make_dataset(...)``: what a batch holds (one-channel crops for MAE/DINO; protein/ID labels for
      cytoself; same-image cell pairs for paired inpainting).
    - ``to_encoder(model, config) -> ChannelEncoder``: the per-channel embedding head used by ``embed``.
    The checkpoint's config has ``arch`` so ``create_model(path)`` rebuilds the encoder from it.
    """

    name: str = ""
    defaults: dict[str, Any] = {}

    def build(self, config: dict[str, Any]) -> nn.Module:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def to_encoder(self, model: nn.Module, config: dict[str, Any]) -> ChannelEncoder:
        raise NotImplementedError


@dataclass
class MethodSpec:
    name: str
    factory: Callable[[], PretextMethod]
    description: str
    extra: dict[str, Any] = field(default_factory=dict)


_METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    if spec.name in _METHODS:
        raise ValueError(f"method {spec.name!r} registered twice")
    _METHODS[spec.name] = spec
    return spec


def get_method(name: str) -> PretextMethod:
    from ..errors import MicrosnoopError

    if name not in _METHODS:
        raise MicrosnoopError(f"unknown training method '{name}'; registered: {', '.join(_METHODS)}")
    return _METHODS[name].factory()


def list_methods() -> list[MethodSpec]:
    return list(_METHODS.values())
