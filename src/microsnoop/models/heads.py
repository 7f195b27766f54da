"""Embedding heads: which encoder levels are pooled, how, and test-time augmentation (TTA).

A head is part of a model's config (``levels``, ``pool``, ``tta``): it is saved in checkpoint headers,
listed by the registry and written into every output's provenance, so a vector always says how it
was made. Any registered model takes head options after a colon, e.g.
``cellpose-encoder:levels=all,tta=d8`` (the CLI's ``--tta`` / ``--levels`` set the same keys).

Why TTA exists: cells have no canonical orientation, so averaging the vector over the 8 rotations and
flips of a plane (``d8``; ``rot4`` = the 4 rotations) gives a vector that is exactly invariant to them,
at 8x (4x) the cost. Trained-in invariance (``microsnoop-unet-v2``) is the fast way to the same goal.

Why ``scales`` exists: a convolutional encoder sees structure at the sizes its receptive fields were
trained on, and microscopy comes at any magnification. ``scales=1+1.5`` embeds each plane as given and
bilinearly enlarged 1.5x and concatenates the two vectors (dim x 2, cost 1 + 1.5^2 = 3.25x): the encoder
then also sees fine texture (puncta, organelles) at the size of its mid-level receptive fields. A factor
of 1 leaves the plane unchanged; any other factor resizes it to the multiple of 8 px nearest to
factor x size (the encoder's three 2x poolings then divide it evenly). TTA, when set, runs at each scale.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from ..core.errors import MicrosnoopError

HEAD_KEYS = ("levels", "pool", "tta", "scales")
MIN_SCALE, MAX_SCALE, MAX_SCALES = 0.25, 4.0, 4
POOLS = ("mean", "max", "meanmax")
# (number of 90-degree rotations, horizontal flip after rotating)
TTA_MODES: dict[str, tuple[tuple[int, bool], ...]] = {
    "none": ((0, False),),
    "rot4": tuple((k, False) for k in range(4)),
    "d8": tuple((k, f) for k in range(4) for f in (False, True)),
}


def parse_levels(value: Any, n_levels: int) -> list[int]:
    """Encoder levels to pool, as sorted non-negative indices.

    Parameters
    ----------
    value : str, int or sequence of int
        ``"all"``, ``"last"``, a range ``"1-3"``, a ``+``-joined list ``"2+3"``, an int or a list
        (negative indices count from the deepest level).
    n_levels : int
        Number of levels of the encoder.

    Returns
    -------
    list of int
    """
    if isinstance(value, str):
        v = value.strip().lower()
        if v == "all":
            return list(range(n_levels))
        if v == "last":
            return [n_levels - 1]
        try:
            if "-" in v.lstrip("-"):
                a, b = v.split("-", 1)
                items = list(range(int(a), int(b) + 1))
            else:
                items = [int(p) for p in v.split("+")]
        except ValueError:
            raise MicrosnoopError(f"levels '{value}': use all, last, a range like 1-3 or a list like 2+3") from None
    elif isinstance(value, int):
        items = [value]
    else:
        items = [int(p) for p in value]
    out = sorted({i % n_levels if -n_levels <= i < n_levels else -999 for i in items})
    if not out or out[0] < 0:
        raise MicrosnoopError(f"levels '{value}' out of range: the encoder has levels 0-{n_levels - 1}")
    return out


def check_pool(pool: str) -> str:
    if pool not in POOLS:
        raise MicrosnoopError(f"unknown pool '{pool}' ({', '.join(POOLS)})")
    return pool


def check_tta(tta: str | None) -> str:
    tta = "none" if tta in (None, "", "off") else str(tta)
    if tta not in TTA_MODES:
        raise MicrosnoopError(f"unknown test-time augmentation '{tta}' ({', '.join(TTA_MODES)})")
    return tta


def pooled_dim(widths: Sequence[int], levels: Sequence[int], pool: str) -> int:
    return sum(int(widths[i]) for i in levels) * (2 if pool == "meanmax" else 1)


def pool_levels(feats: Sequence[torch.Tensor], levels: Sequence[int], pool: str) -> torch.Tensor:
    """Global pooling of each chosen (B, C_l, H_l, W_l) map, concatenated in level order -> (B, D) float32."""
    out = []
    for i in levels:
        f = feats[i].float()
        if pool in ("mean", "meanmax"):
            out.append(f.mean(dim=(2, 3)))
        if pool in ("max", "meanmax"):
            out.append(f.amax(dim=(2, 3)))
    return out[0] if len(out) == 1 else torch.cat(out, dim=1)


def parse_scales(value: Any) -> tuple[float, ...]:
    """Input scale factors of a head, in concatenation order.

    Parameters
    ----------
    value : str, float or sequence of float
        ``"1"``, ``"1+1.5"`` (``+``-joined), a number or a list; ``None`` or ``""`` means ``(1.0,)``.

    Returns
    -------
    tuple of float
        Distinct factors in [0.25, 4], at most 4 of them.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return (1.0,)
    try:
        if isinstance(value, str):
            items = [float(p) for p in value.replace(",", "+").split("+")]
        elif isinstance(value, (int, float)):
            items = [float(value)]
        else:
            items = [float(p) for p in value]
    except ValueError:
        raise MicrosnoopError(f"scales '{value}': use a factor like 1.5 or a +-joined list like 1+1.5") from None
    if not items or len(items) > MAX_SCALES or len(set(items)) != len(items) \
            or not all(MIN_SCALE <= f <= MAX_SCALE for f in items):
        raise MicrosnoopError(f"scales '{value}': 1 to {MAX_SCALES} distinct factors between {MIN_SCALE} and {MAX_SCALE}")
    return tuple(items)


def format_scales(scales: Sequence[float]) -> str:
    """``(1.0, 1.5)`` -> ``"1+1.5"`` (the form written in names, headers and provenance)."""
    return "+".join(f"{f:g}" for f in scales)


def scaled_size(n: int, factor: float) -> int:
    """Side length of a plane of ``n`` px embedded at ``factor``: unchanged at 1, else the nearest multiple of 8."""
    return n if factor == 1.0 else max(8, int(round(n * factor / 8)) * 8)


def rescale(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Bilinear resize of (B, C, H, W) by ``factor`` (see ``scaled_size``), keeping the dtype."""
    h, w = x.shape[-2:]
    size = (scaled_size(h, factor), scaled_size(w, factor))
    if size == (h, w):
        return x
    y = torch.nn.functional.interpolate(x.float(), size=size, mode="bilinear", align_corners=False, antialias=factor < 1)
    return y.to(x.dtype).contiguous(memory_format=torch.channels_last)


def dihedral(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    """Rotate (B, C, H, W) by ``k`` quarter turns, then flip left-right when ``flip``."""
    x = torch.rot90(x, k, dims=(-2, -1)) if k % 4 else x
    return torch.flip(x, dims=(-1,)) if flip else x


def tta_average(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tta: str) -> torch.Tensor:
    """Mean of ``fn`` over the transforms of ``tta``: exactly invariant to them (up to float rounding)."""
    transforms = TTA_MODES[check_tta(tta)]
    if len(transforms) == 1:
        return fn(x)
    total = None
    for k, flip in transforms:
        y = fn(dihedral(x, k, flip).contiguous(memory_format=torch.channels_last)).float()
        total = y if total is None else total.add_(y)
    return total / len(transforms)


def multiscale(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tta: str,
               scales: Sequence[float] = (1.0,)) -> torch.Tensor:
    """``fn``'s TTA-averaged vector at each input scale, concatenated in the order of ``scales``."""
    outs = [tta_average(fn, rescale(x, f), tta) for f in scales]
    return outs[0] if len(outs) == 1 else torch.cat([o.float() for o in outs], dim=1)


class TTAModule(torch.nn.Module):
    """Wraps an embedding module so its output is the TTA average (the engine runs this; the engine runs
    the scales itself, one at a time, as ``multiscale`` defines them)."""

    def __init__(self, module: torch.nn.Module, tta: str):
        super().__init__()
        self.inner, self.tta = module, check_tta(tta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return tta_average(self.inner, x, self.tta)


def split_head_options(name: str) -> tuple[str, dict[str, str]]:
    """``"cellpose-encoder:levels=all,tta=d8"`` -> ``("cellpose-encoder", {"levels": "all", "tta": "d8"})``.

    A name without a ``key=value`` tail is returned unchanged (paths may hold colons)."""
    base, sep, tail = name.rpartition(":")
    if not sep or "=" not in tail:
        return name, {}
    opts: dict[str, str] = {}
    for part in tail.split(","):
        key, eq, value = part.partition("=")
        key = key.strip()
        if not eq or key not in HEAD_KEYS:
            raise MicrosnoopError(f"model option '{part}' in '{name}': use {', '.join(k + '=...' for k in HEAD_KEYS)}")
        opts[key] = value.strip()
    return base, opts
