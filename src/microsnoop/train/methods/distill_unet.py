"""``distill-unet``: a U-Net student distilled from several frozen teachers, invariance trained in.

Why: on the shared sets two things lift a Cellpose-style encoder most: pooling every encoder level,
and averaging the vector over the 8 rotations/flips (d8). The teachers (by default the Cellpose
generalist encoder with all levels pooled, and ImageNet EfficientNet-Lite0) each see a clean crop and
give their **d8-averaged** vector; the student sees **one** random rotation/flip of the same crop with
intensity changes (gamma, noise) and must predict every teacher's vector. So the student learns (1)
rotation/flip invariance, in a single forward pass, (2) the union of what the teachers know, in one
network at the U-Net's cost.

Targets: each teacher's vector is standardised (per feature, on ``calibration_batches`` seeded batches
drawn before training) and projected on its top ``teacher_dims`` principal components; components are
scaled so that each teacher's targets have mean squared norm ``teacher_dims``, i.e. teachers weigh
equally whatever their width. The statistics are buffers of the trained model, so ``--resume`` is exact.

Crops are percentile-normalised **per crop** (1st-99th), as ``embed`` normalises a single-cell image.
``centre_fraction`` (default 0, as ``microsnoop-unet-v2`` was trained) centres that share of the crops
on an object found in the plane (``train.data.object_centres``), as single-cell crops are centred on a cell.
The exported encoder (arch ``distill-unet``) outputs the concatenated projections.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...models.heads import tta_average
from ...models.microsnoop_unet import DistilledUNetEncoder
from ..base import MethodSpec, PretextMethod, load_matching, register_method
from ..data import CLIP_MAX, ImagePool, StepBatches, intensity_view, normalize_crops


def sampled_transform(fn: Any, x: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """``fn`` of each crop under its own dihedral transform ``turns[i] = (quarter turns, flip)``."""
    from ...models.heads import dihedral

    out = None
    codes = turns[:, 0] * 2 + turns[:, 1]
    for code in torch.unique(codes).tolist():
        idx = torch.nonzero(codes == code).flatten()
        y = fn(dihedral(x[idx], code // 2, bool(code % 2)))
        out = y.new_zeros(len(x), y.shape[1]) if out is None else out
        out[idx] = y
    return out


def teacher_dims(config: dict[str, Any]) -> list[int]:
    """Output width per teacher: ``teacher_dims`` is one int for all, or a list (one per teacher)."""
    dims = config["teacher_dims"]
    n = len(config["teachers"])
    return [int(d) for d in dims] if isinstance(dims, (list, tuple)) else [int(dims)] * n


class DistillModel(nn.Module):
    """The student plus the teachers' target statistics (buffers: saved with every checkpoint)."""

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        dims = teacher_dims(config)
        keys = [f"t{i}" for i in range(len(config["teachers"]))]
        self.student = DistilledUNetEncoder({"widths": list(config["widths"]), "levels": "all", "pool": "mean",
                                             "teachers": dict(zip(keys, dims)),
                                             "teacher_models": list(config["teachers"]), "teacher_tta": config["teacher_tta"]})
        self.keys = keys
        self.register_buffer("calibrated", torch.zeros((), dtype=torch.bool))
        for key, k in zip(keys, dims):  # filled at calibration (teacher widths are known only then)
            self.register_buffer(f"{key}_mean", torch.zeros(0))
            self.register_buffer(f"{key}_std", torch.zeros(0))
            self.register_buffer(f"{key}_basis", torch.zeros(0, k))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # buffers change shape at calibration
        for key in self.keys:
            for part in ("mean", "std", "basis"):
                name = f"{prefix}{key}_{part}"
                if name in state_dict:
                    setattr(self, f"{key}_{part}", torch.empty_like(state_dict[name]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student(x)

    def targets(self, key: str, feats: torch.Tensor) -> torch.Tensor:
        z = (feats.float() - getattr(self, f"{key}_mean")) / getattr(self, f"{key}_std")
        return z @ getattr(self, f"{key}_basis")


class DistillUNet(PretextMethod):
    name = "distill-unet"
    # teacher_tta per teacher: "d8" = exact average of the 8 transforms (8 passes); "d8-sample" = one
    # transform drawn independently of the student's view (1 pass): the student cannot know it, so its
    # best prediction is the d8 average; unbiased targets at 1/8 of the cost (used for EfficientNet,
    # whose 224-px passes dominate). Calibration always uses the exact d8 average.
    defaults = {"teachers": ["cellpose-encoder:levels=all", "imagenet-effnet-lite0"], "teacher_tta": ["d8", "d8-sample"],
                "teacher_dims": 256, "calibration_batches": 24, "min_signal": 0.1, "widths": [32, 64, 128, 256],
                "input_size": 64, "batch_size": 32, "scale_range": [0.4, 1.6], "gamma": [0.7, 1.4],
                "noise": 0.05, "sampling": "proportional", "centre_fraction": 0.0, "stream_seed": None, "lr": 1e-3, "encoder_lr_scale": 0.3, "warmup_steps": 100}

    def __init__(self) -> None:
        self._teachers: list[tuple[str, nn.Module, bool]] | None = None
        self._calib: StepBatches | None = None

    def build(self, config: dict[str, Any]) -> nn.Module:
        return DistillModel(config)

    def load_pool(self, data: Any, config: dict[str, Any]) -> ImagePool:
        """The pool, sampled in proportion to its planes (not modality by modality) unless
        ``sampling: modality``: the teachers' knowledge matters most where the images are."""
        pool = super().load_pool(data, config)
        if config.get("sampling", "proportional") == "proportional":
            pool.modalities = ["all"]
            pool.by_modality = {"all": np.arange(len(pool))}
        return pool

    def make_dataset(self, pool: ImagePool, config: dict[str, Any], shard: tuple[int, int] = (0, 1)) -> StepBatches:
        gamma, noise = tuple(config["gamma"]), float(config["noise"])

        def views(imgs: torch.Tensor, rng: np.random.Generator) -> dict[str, torch.Tensor]:
            raw = imgs.numpy()  # normalised by the whole plane's percentiles
            # crops of background only: per-crop normalisation would turn their noise into a full-range
            # image, which no cell crop looks like; they get no weight in the loss
            weight = (np.percentile(raw.reshape(len(raw), -1), 99.0, axis=1) > float(config["min_signal"]))
            clean = np.clip(normalize_crops(raw), -1.0, CLIP_MAX)
            student = np.clip(intensity_view(clean, rng, gamma, noise), -1.0, CLIP_MAX)
            turns = np.stack([rng.integers(0, 4, len(raw)), rng.integers(0, 2, len(raw))], 1)
            return {"image": torch.from_numpy(clean), "student": torch.from_numpy(student),
                    "weight": torch.from_numpy(weight.astype(np.float32)), "turns": torch.from_numpy(turns)}

        args = (pool, int(config["batch_size"]), int(config["input_size"]))
        scale = tuple(config.get("scale_range", (0.4, 1.6)))
        # calibration batches come from another seed stream: they never coincide with training steps
        centre = float(config.get("centre_fraction", 0.0))  # share of crops centred on an object
        self._calib = StepBatches(*args, int(config["seed"]) + 104729, scale, extra=views, centre_fraction=centre)
        self._config = config
        # stream_seed: other crops and augmentations with the same initialisation and calibration (the
        # run's seed), so runs differing only in it share the target basis and can be weight-averaged
        stream = config.get("stream_seed")
        stream = int(config["seed"]) if stream is None else int(stream)
        return StepBatches(*args, stream, scale, extra=views, shard=shard, centre_fraction=centre)

    def teachers(self, config: dict[str, Any], device: torch.device) -> list[tuple[str, nn.Module, bool]]:
        """Frozen teachers as the engine's fast modules (BN folded, bf16 weights where the CPU has it)."""
        if self._teachers is None:
            from ...core.device import resolve_precision
            from ...embed.engine import bf16_validated
            from ...embed.fused import fast_module
            from ...models.registry import create_model

            out = []
            for i, name in enumerate(config["teachers"]):
                enc = create_model(name, device=device)
                precision = resolve_precision("auto", device, bf16_validated(enc))
                mod, cast = fast_module(enc, device, precision)
                for p in mod.parameters():
                    p.requires_grad_(False)
                out.append((f"t{i}", mod.eval(), cast))
            self._teachers = out
        return self._teachers

    def teacher_features(self, x: torch.Tensor, config: dict[str, Any], turns: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Each teacher's vector of every crop: exact d8 average, or (``d8-sample`` with ``turns``) the
        vector of the crop under its own random transform."""
        feats = {}
        modes = config["teacher_tta"]
        with torch.no_grad():
            for i, (key, mod, _) in enumerate(self.teachers(config, x.device)):
                dtype = next(iter(mod.parameters()), torch.empty(0)).dtype  # handcrafted has no parameters
                mode = modes[i] if isinstance(modes, (list, tuple)) else modes
                fn = lambda t, mod=mod, dtype=dtype: mod(t.to(dtype).contiguous(memory_format=torch.channels_last)).float()
                if mode == "d8-sample" and turns is not None:
                    feats[key] = sampled_transform(fn, x, turns)
                else:
                    feats[key] = tta_average(fn, x, "d8" if mode == "d8-sample" else mode)
        return feats

    def calibrate(self, model: DistillModel, config: dict[str, Any]) -> None:
        """Per-teacher feature mean/std and top principal directions from seeded calibration batches."""
        dims = dict(zip(model.keys, teacher_dims(config)))
        dev = next(model.parameters()).device
        chunks: dict[str, list[torch.Tensor]] = {}
        for i in range(int(config["calibration_batches"])):
            cal = self._calib[i]
            x = cal["image"][cal["weight"] > 0].to(dev)
            if not len(x):
                continue
            for key, f in self.teacher_features(x, config).items():
                chunks.setdefault(key, []).append(f)
        for key, parts in chunks.items():
            f = torch.cat(parts).double()
            k = dims[key]
            if min(f.shape) < k:
                from ...core.errors import MicrosnoopError

                raise MicrosnoopError(f"teacher_dims {k} needs at least {k} calibration crops and teacher features "
                                      f"(have {f.shape[0]} crops x {f.shape[1]} features): raise calibration_batches")
            mean, std = f.mean(0), f.std(0).clamp_min(1e-6)
            z = (f - mean) / std
            _, s, vh = torch.linalg.svd(z - z.mean(0), full_matrices=False)
            basis = vh[:k].T  # (D, k)
            var = (s[:k] ** 2).sum() / (len(z) - 1)
            basis = basis * (k / var).sqrt()  # mean squared norm of the targets = k
            setattr(model, f"{key}_mean", mean.float().to(dev))
            setattr(model, f"{key}_std", std.float().to(dev))
            setattr(model, f"{key}_basis", basis.float().to(dev))
        model.calibrated.fill_(True)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        inner: DistillModel = model.module if hasattr(model, "module") else model
        config = self._config
        if not bool(inner.calibrated):  # teachers run as in training (autocast); statistics in float64
            self.calibrate(inner, config)
        feats = self.teacher_features(batch["image"], config, batch.get("turns"))
        pred = model(batch["student"]).float()
        dims = teacher_dims(config)
        w = batch["weight"].float()
        w = w / w.sum().clamp_min(1.0)
        losses, logs = [], {}
        start = 0
        for key, k in zip(inner.keys, dims):
            target = inner.targets(key, feats[key])
            p = pred[:, start:start + k]
            start += k
            # per crop, squared error relative to the targets' mean squared norm (k by construction)
            err = (p - target).pow(2).sum(1) / k
            mse = (err * w).sum()
            losses.append(mse)
            with torch.no_grad():
                cos = (F.cosine_similarity(p, target, dim=1) * w).sum()
            logs[f"{key}_rel_mse"], logs[f"{key}_cos"] = float(mse.detach()), float(cos)
        logs["kept"] = float(batch["weight"].float().mean())
        return torch.stack(losses).mean(), logs

    def initialize(self, model: nn.Module, encoder: nn.Module) -> dict[str, int]:
        """Start the student's encoder from a U-Net's (e.g. ``cellpose-encoder``); projections start fresh."""
        state = {}
        for k, v in encoder.state_dict().items():
            k = k[4:] if k.startswith("net.") else k
            if k.startswith("encoder."):
                state["student." + k] = v
        return load_matching(model, state)

    def param_groups(self, model: nn.Module, config: dict[str, Any]) -> list[dict[str, Any]]:
        enc = [p for n, p in model.named_parameters() if n.startswith("student.encoder.")]
        rest = [p for n, p in model.named_parameters() if not n.startswith("student.encoder.")]
        return [{"params": enc, "lr_scale": float(config.get("encoder_lr_scale", 1.0))}, {"params": rest}]

    def to_encoder(self, model: nn.Module, config: dict[str, Any]) -> DistilledUNetEncoder:
        inner = model.module if hasattr(model, "module") else model
        enc = DistilledUNetEncoder(dict(inner.student.config))
        enc.load_weights({k: v.detach().clone() for k, v in inner.student.state_dict().items()})
        return enc.eval()


register_method(MethodSpec(
    name="distill-unet", factory=DistillUNet,
    description="U-Net student from one random rotation/flip predicts several frozen teachers' d8-averaged features "
                "(Cellpose encoder all levels + EfficientNet-Lite0): invariance and teachers' knowledge in one pass",
))
