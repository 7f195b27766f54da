"""``paired-inpainting``: paired cell inpainting (Lu, Kraus, Cooper & Moses 2019).

Pretext: cells A and B are drawn from the same microscope field (``group_column``, yeast_pci's
``Metadata_Image``), so they express the same tagged protein. Given A's protein and structural
channels and B's structural channel, the network paints B's protein channel (MSE). To solve it,
the source encoder must describe *where in a cell* the protein sits, independently of the cell's
exact shape: that description is the embedding.

Per-channel embedding: microsnoop encodes every channel on its own ((B, 1, H, W) -> (B, dim)), so
the source encoder takes one channel and is shared between A's protein and A's structural channel
(features concatenated in that order). The exported encoder is that shared source encoder, read
at ``layer`` (1-5, default 4) and max-pooled (``pool``), fed each channel alone. It therefore saw
both channel types during training; the target-structure encoder and decoder are discarded.

Channels: ``protein_channel`` (default 0, yeast_pci GFP) and ``structure_channel`` (1, RFP).

Logged diagnostics: ``mean_baseline_mse`` (painting B's mean intensity everywhere) and, every
``diagnose_every`` steps, ``no_source_mse`` (the same prediction with the source cell zeroed). The
pretext only trains the embedding while ``no_source_mse`` stays above ``loss``; when B's structural
channel alone predicts its protein channel well (cytosolic proteins), the network can ignore the
source - which is what a 300-step run on yeast_pci did (docs/methods.md).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...core.errors import MicrosnoopError
from ...models.pcinet import PCI_DEFAULTS, PairedInpaintingEncoder, PairedInpaintingNet
from ..base import MethodSpec, PretextMethod, encoder_from, register_method
from ..data import LabelledSet, flip_rot
from .cytoself import fit_size


class CellPairs(torch.utils.data.Dataset):
    """Item ``i`` = batch of step ``i``: (A protein, A structure, B structure, B protein) of same-field pairs."""

    def __init__(self, cells: LabelledSet, config: dict[str, Any], shard: tuple[int, int] = (0, 1)):
        self.cells, self.shard = cells, shard
        self.bs, self.size, self.seed = int(config["batch_size"]), int(config["input_size"]), int(config["seed"])
        self.prot, self.struct = int(config["protein_channel"]), int(config["structure_channel"])
        self.groups = [g for g in cells.groups if len(g) >= 2]
        if not self.groups:
            raise MicrosnoopError("paired-inpainting needs groups (fields) with at least 2 cells")
        sizes = np.array([len(g) for g in self.groups], np.float64)
        self.p = sizes / sizes.sum()  # a cell is equally likely to be a source, whatever its field's size

    def __len__(self) -> int:
        return 2 ** 62

    def _cell(self, i: int, rng: np.random.Generator) -> np.ndarray:
        x = fit_size(self.cells.images[i][[self.prot, self.struct]], self.size, rng)
        return flip_rot(x, rng)  # both channels of a cell get the same transform

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng((self.seed, int(step), self.shard[0]))
        src, tgt = [], []
        for g in rng.choice(len(self.groups), self.bs, p=self.p):
            a, b = rng.choice(self.groups[g], 2, replace=False)
            src.append(self._cell(int(a), rng))
            tgt.append(self._cell(int(b), rng))
        src_a, tgt_b = np.stack(src), np.stack(tgt)
        return {"src_protein": torch.from_numpy(src_a[:, :1].copy()), "src_structure": torch.from_numpy(src_a[:, 1:].copy()),
                "tgt_structure": torch.from_numpy(tgt_b[:, 1:].copy()), "tgt_protein": torch.from_numpy(tgt_b[:, :1].copy()),
                "step": torch.tensor(int(step))}


class PairedInpainting(PretextMethod):
    name = "paired-inpainting"
    defaults = {**PCI_DEFAULTS, "input_size": 64, "batch_size": 32, "group_column": "Metadata_Image",
                "split_column": "Metadata_Split", "split_value": "train", "protein_channel": 0,
                "structure_channel": 1, "lr": 1e-3, "warmup_steps": 50, "weight_decay": 0.0, "diagnose_every": 25,
                "skips": True}

    def load_pool(self, data: Any, config: dict[str, Any]) -> LabelledSet:
        return LabelledSet(data, split=config.get("split_value"), split_column=config["split_column"],
                           group_column=config["group_column"])

    def build(self, config: dict[str, Any]) -> nn.Module:
        cfg = {**self.defaults, **config}
        net = PairedInpaintingNet(cfg["widths"], skips=bool(cfg.get("skips", True)))
        net.config = cfg
        return net

    def make_dataset(self, pool: LabelledSet, config: dict[str, Any], shard: tuple[int, int] = (0, 1)) -> CellPairs:
        return CellPairs(pool, {**self.defaults, **config}, shard)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        pred = model(batch["src_protein"], batch["src_structure"], batch["tgt_structure"]).float()
        target = batch["tgt_protein"]
        loss = F.mse_loss(pred, target)
        cfg = getattr(model, "module", model).config
        every = int(cfg.get("diagnose_every", 25))
        ablated = float("nan")
        with torch.no_grad():
            base = F.mse_loss(target.mean(dim=(2, 3), keepdim=True).expand_as(target), target)
            if every > 0 and int(batch["step"]) % every == 0:
                # the same prediction with the source cell zeroed: if it is no worse, the network paints B
                # from B's own structure alone and the source encoder (the embedding) is not being trained
                src0 = torch.zeros_like(batch["src_protein"])
                ablated = float(F.mse_loss(model(src0, src0, batch["tgt_structure"]).float(), target))
        return loss, {"mean_baseline_mse": float(base), "no_source_mse": ablated}

    def to_encoder(self, model: nn.Module, config: dict[str, Any]) -> PairedInpaintingEncoder:
        cfg = {**self.defaults, **config}
        return encoder_from(PairedInpaintingEncoder({k: cfg[k] for k in PCI_DEFAULTS}), model.source, "source")


def relayer(checkpoint: str, layer: int, output: str, pool: str | None = None) -> str:
    """Re-export a paired-inpainting checkpoint reading another encoder layer (weights unchanged).

    Why: the best layer differs between data sets (the paper compared conv layers); this avoids
    retraining just to embed from another layer."""
    from ...models.checkpoints import load_checkpoint, save_checkpoint

    state, header, _ = load_checkpoint(checkpoint)
    config = {**header["config"], "layer": int(layer), **({"pool": pool} if pool else {})}
    if config.get("arch") != "paired-inpainting":
        raise MicrosnoopError("not a paired-inpainting checkpoint", checkpoint)
    PairedInpaintingEncoder(config)  # validates layer / pool
    info = {k: v for k, v in header.items() if k not in ("config", "format")}
    return save_checkpoint(output, state, config, **info)


register_method(MethodSpec(
    name="paired-inpainting", factory=PairedInpainting,
    description="Paired cell inpainting: paint cell B's protein from cell A's protein+structure (same field) and B's "
                "structure; embedding = shared one-channel source encoder at `layer`, max-pooled",
))
