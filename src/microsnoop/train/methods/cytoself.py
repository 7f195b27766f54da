"""``cytoself``: VQ-VAE with split quantisation + identity classification (Kobayashi et al. 2022).

The pretext (at CPU scale, one channel at a time to fit microsnoop's channel-wise contract):

- ``enc1`` -> local map, split-quantised with the *local* codebook; ``enc2`` (on ``enc1``'s output)
  -> global map, split-quantised with the *global* codebook (``models/vqvae.py``).
- ``dec1`` reconstructs the image from [upsampled quantised global, quantised local];
  ``dec2`` reconstructs ``enc1``'s local map from the quantised global map (cytoself's second
  reconstruction, which forces the global code to summarise the local one).
- an **identity classifier** (2-layer MLP) on the flattened quantised global map predicts the
  label column (``label_column``, e.g. ``Metadata_Protein``): cytoself's self-supervision signal
  that makes images of the same protein share codes. ``classify_channels`` limits it to the
  channels that carry the identity (for yeast_pci the GFP protein channel, 0); every channel is
  still reconstructed.
- loss = MSE(image) + MSE(local map) + VQ losses (codebook + ``beta`` x commitment, both levels)
  + ``cls_weight`` x cross-entropy.

Training data is a labelled set (``images.npy`` + ``metadata.csv``, rows of ``split``), e.g. the
yeast_pci train split. Embedding = pooled quantised global (+ local) representation per channel.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...models.vqvae import VQVAE_DEFAULTS, CytoselfEncoder, CytoselfVQVAE
from ..base import MethodSpec, PretextMethod, encoder_from, register_method
from ..data import LabelledSet, flip_rot


def fit_size(plane: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Random ``size`` crop of a larger plane, or centred zero-pad of a smaller one (the engine's rule)."""
    h, w = plane.shape[-2:]
    if h > size or w > size:
        y0, x0 = int(rng.integers(0, max(h - size, 0) + 1)), int(rng.integers(0, max(w - size, 0) + 1))
        plane = plane[..., y0:y0 + size, x0:x0 + size]
        h, w = plane.shape[-2:]
    if (h, w) != (size, size):
        ph, pw = size - h, size - w
        pad = [(0, 0)] * (plane.ndim - 2) + [(ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)]
        plane = np.pad(plane, pad)
    return plane


class CytoselfModel(nn.Module):
    def __init__(self, config: dict[str, Any]):
        super().__init__()
        self.config = dict(config)
        self.vqvae = CytoselfVQVAE(**{k: config[k] for k in VQVAE_DEFAULTS if k != "embedding"})
        g = int(config["input_size"]) // 16
        n_classes = int(config["n_classes"])
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(int(config["global_dim"]) * g * g, int(config["fc_hidden"])),
                                        nn.ReLU(), nn.Dropout(0.1), nn.Linear(int(config["fc_hidden"]), n_classes))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        enc = self.vqvae.encode(x)
        recon, local = self.vqvae.decode(enc)
        return {**enc, "recon": recon, "local_recon": local, "logits": self.classifier(enc["q2"])}


class CellPlanes(torch.utils.data.Dataset):
    """Item ``i`` = batch of step ``i``: random (cell, channel) planes with the cell's label, flipped/rotated."""

    def __init__(self, cells: LabelledSet, config: dict[str, Any], shard: tuple[int, int] = (0, 1)):
        self.cells, self.shard = cells, shard
        self.bs, self.size, self.seed = int(config["batch_size"]), int(config["input_size"]), int(config["seed"])
        chans = config.get("classify_channels")
        self.classify = set(range(cells.n_channels)) if chans is None else {int(c) for c in chans}

    def __len__(self) -> int:
        return 2 ** 62

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng((self.seed, int(step), self.shard[0]))
        n, c = len(self.cells.images), self.cells.n_channels
        flat = rng.integers(0, n * c, self.bs)
        cell, chan = flat // c, flat % c
        planes = [flip_rot(fit_size(self.cells.images[i, k], self.size, rng), rng) for i, k in zip(cell, chan)]
        return {"image": torch.from_numpy(np.stack(planes)[:, None]),
                "label": torch.from_numpy(self.cells.labels[cell]),
                "classify": torch.tensor([float(k in self.classify) for k in chan]),
                "step": torch.tensor(int(step))}


class Cytoself(PretextMethod):
    name = "cytoself"
    defaults = {**VQVAE_DEFAULTS, "input_size": 64, "batch_size": 32, "label_column": "Metadata_Protein",
                "split_column": "Metadata_Split", "split_value": "train", "classify_channels": None,
                "fc_hidden": 256, "cls_weight": 0.1, "local_recon_weight": 1.0, "lr": 1e-3, "warmup_steps": 50,
                "weight_decay": 0.0, "n_classes": None}

    def load_pool(self, data: Any, config: dict[str, Any]) -> LabelledSet:
        cells = LabelledSet(data, split=config.get("split_value"), split_column=config["split_column"],
                            label_column=config["label_column"])
        config["n_classes"] = len(cells.classes)  # recorded in config.json: build() needs it on resume
        config["classes"] = cells.classes
        return cells

    def build(self, config: dict[str, Any]) -> nn.Module:
        cfg = {**self.defaults, **config}
        if not cfg.get("n_classes"):
            from ...core.errors import MicrosnoopError

            raise MicrosnoopError("cytoself needs n_classes (set by load_pool from the label column)")
        if int(cfg["input_size"]) % 16:
            from ...core.errors import MicrosnoopError

            raise MicrosnoopError("cytoself: input_size must be a multiple of 16 (two 1/4 stages)")
        return CytoselfModel(cfg)

    def make_dataset(self, pool: LabelledSet, config: dict[str, Any], shard: tuple[int, int] = (0, 1)) -> CellPlanes:
        return CellPlanes(pool, {**self.defaults, **config}, shard)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = getattr(model, "module", model).config
        x = batch["image"]
        out = model(x)
        rec = F.mse_loss(out["recon"].float(), x)
        local = F.mse_loss(out["local_recon"].float(), out["z1"].float())
        w = batch["classify"]
        ce_each = F.cross_entropy(out["logits"].float(), batch["label"], reduction="none")
        ce = (ce_each * w).sum() / w.sum().clamp(min=1.0)
        loss = rec + float(cfg["local_recon_weight"]) * local + out["vq1"] + out["vq2"] + float(cfg["cls_weight"]) * ce
        with torch.no_grad():
            acc = ((out["logits"].argmax(1) == batch["label"]).float() * w).sum() / w.sum().clamp(min=1.0)
        logs = {"recon_mse": rec, "local_mse": local, "vq_local": out["vq1"], "vq_global": out["vq2"], "ce": ce,
                "cls_acc": acc, "perplexity_local": out["ppl1"], "perplexity_global": out["ppl2"]}
        return loss, {k: float(v.detach()) for k, v in logs.items()}

    def to_encoder(self, model: nn.Module, config: dict[str, Any]) -> CytoselfEncoder:
        cfg = {**self.defaults, **config}
        return encoder_from(CytoselfEncoder({k: cfg[k] for k in VQVAE_DEFAULTS}), model.vqvae, "net")


register_method(MethodSpec(
    name="cytoself", factory=Cytoself,
    description="cytoself VQ-VAE: local + global split-quantised codebooks, two reconstructions, identity "
                "classification on the quantised global map (label_column); embedding = pooled quantised global+local",
))
