"""Pre-flight check of an input: everything a long run would trip over, reported at once."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..core.errors import MicrosnoopError
from .images import MAX_ABS_PIXEL, MIN_SIDE
from .readers import ArraySource, FileListSource, open_source

PAD_BELOW = 16  # the U-Net's minimum input side (ChannelEncoder.min_size)
GROUP_HINTS = ("Metadata_Plate", "Metadata_Well", "Metadata_Protein", "Metadata_Compound", "Metadata_Split")


@dataclass
class InspectReport:
    input: str
    n_images: int = 0
    channel_names: list[str] = field(default_factory=list)
    shapes: dict[str, int] = field(default_factory=dict)
    dtypes: dict[str, int] = field(default_factory=dict)
    groups: dict[str, dict[str, int]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # suspicious but embeddable (e.g. blank channels)

    def summary(self) -> str:
        lines = [f"input: {self.input}", f"images: {self.n_images}",
                 f"channels ({len(self.channel_names)}): {', '.join(self.channel_names)}",
                 "shapes (H x W): " + ", ".join(f"{k} ({v})" for k, v in sorted(self.shapes.items(), key=lambda x: -x[1])[:8]),
                 "pixel types: " + ", ".join(f"{k} ({v})" for k, v in self.dtypes.items())]
        for col, counts in self.groups.items():
            vals = sorted(counts.values())
            lines.append(f"{col}: {len(counts)} groups, images per group min {vals[0]} / max {vals[-1]}")
        if self.warnings:
            lines.append(f"warnings: {len(self.warnings)} (first: {self.warnings[0]})")
        lines.append(f"problems: {len(self.problems)}" if self.problems else "problems: none")
        return "\n".join(lines)


def inspect_source(path: str | Path, channels: Sequence[str] | None = None, path_columns: Sequence[str] | None = None,
                   channel_index: Sequence[int] | None = None, group_by: Sequence[str] | None = None,
                   chunk: int = 256) -> InspectReport:
    report = InspectReport(str(path))
    try:
        src = open_source(path, channels=channels, path_columns=path_columns, channel_index=channel_index)
    except MicrosnoopError as exc:
        report.problems.append(str(exc))
        return report
    report.n_images = len(src)
    report.channel_names = list(src.channel_names)
    cols = list(group_by) if group_by else [c for c in GROUP_HINTS if c in src.metadata.columns]
    for c in cols:
        if c not in src.metadata.columns:
            report.problems.append(f"{path}: no metadata column {c}")
            continue
        report.groups[c] = src.metadata[c].astype(str).value_counts().to_dict()
    if isinstance(src, ArraySource):
        for s in range(0, len(src), chunk):
            block = src.read(s, min(s + chunk, len(src)))
            _check_block(report, block, src, s)
        report.shapes[f"{src.array.shape[2]}x{src.array.shape[3]}"] = len(src)
        report.dtypes[str(src.array.dtype)] = len(src)
    elif isinstance(src, FileListSource):
        for i in range(len(src)):
            try:
                img = src.read_one(i)
            except MicrosnoopError as exc:
                report.problems.append(str(exc))
                continue
            key = f"{img.shape[1]}x{img.shape[2]}"
            report.shapes[key] = report.shapes.get(key, 0) + 1
            report.dtypes[str(img.dtype)] = report.dtypes.get(str(img.dtype), 0) + 1
            _check_block(report, img[None], src, i)
    return report


def _check_block(report: InspectReport, block: np.ndarray, src, offset: int) -> None:
    flat = block.reshape(len(block), block.shape[1], -1)
    h, w = block.shape[-2:]
    if min(h, w) < MIN_SIDE:  # the same rule embed applies
        for i in range(min(len(block), 20)):
            report.problems.append(f"{src.name(offset + i)}: image of {h}x{w} px is too small to embed "
                                   f"(each side needs at least {MIN_SIDE} px)")
    elif min(h, w) < PAD_BELOW and len(report.warnings) < 200:
        report.warnings.append(f"{src.name(offset)}: {h}x{w} px is under {PAD_BELOW} px; the U-Net zero-pads it "
                               f"({len(block)} such image(s) here)")
    if block.dtype.kind == "f":
        bad = ~np.isfinite(flat).all(axis=(1, 2))
        for i in np.flatnonzero(bad)[:20]:
            report.problems.append(f"{src.name(offset + int(i))}: NaN or inf pixels")
        big = ~bad & (np.abs(np.where(np.isfinite(flat), flat, 0)) > MAX_ABS_PIXEL).any(axis=(1, 2))
        for i in np.flatnonzero(big)[:20]:
            report.problems.append(f"{src.name(offset + int(i))}: float pixel values beyond +-{MAX_ABS_PIXEL:g} "
                                   f"(the encoder would give NaN vectors)")
    const = flat.max(axis=2) == flat.min(axis=2)
    for i, c in zip(*np.nonzero(const)):
        if len(report.warnings) < 200:
            report.warnings.append(f"{src.name(offset + int(i))}: channel {src.channel_names[c]} is constant (blank)")
