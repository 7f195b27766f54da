"""``dino-vit``: DINO self-distillation of a small one-channel ViT (as uniDINO does per channel).

Recipe (Caron et al. 2021, DINO; applied channel-wise like uniDINO), at CPU scale:

- **multi-crop**: from a random region of one channel, 2 global crops (``input_size`` px, 40-100% of
  the region's area) and ``n_local`` local crops (``local_size`` px, 10-40%), each with random
  aspect ratio, dihedral flip/rotation, intensity gain/offset/gamma jitter and Gaussian blur
  (probability 1.0 / 0.1 on the two global crops, 0.5 on local ones, as DINO).
- **student** sees every crop; **teacher** (an exponential moving average of the student, momentum
  following a cosine from ``momentum_teacher`` to 1) sees only the global crops.
- **head**: 3-layer MLP -> L2-normalised bottleneck -> weight-normalised linear layer to ``out_dim``
  prototypes (norm fixed at 1); the last layer is frozen for ``freeze_last_layer_steps``.
  ``head_bn`` (DINO's ``use_bn_in_head``) is on by default here: without it, in a few hundred CPU
  steps the teacher's output went to the uniform distribution (entropy -> log K: collapse) and the
  features stayed at random-init level; with it the teacher entropy stayed well below log K.

CPU-scale defaults (vs. the paper's ViT-S/16 recipe): 192-d ViT of depth 4 with 8-px patches,
48/24-px crops, 1024 prototypes, teacher temperature 0.03 -> 0.04, teacher momentum 0.99 (0.996 leaves
the teacher near its random initialisation over a run of a few hundred steps), lr 1e-3.
- **loss**: cross-entropy between teacher softmax((t - center) / T_t) and student
  log-softmax(s / T_s) over all (teacher global, student other crop) pairs; the teacher output is
  **centred** by an EMA of its batch mean (``center_momentum``) and sharpened by a teacher
  temperature warmed up linearly from ``warmup_teacher_temp`` to ``teacher_temp``.

Embedding = the teacher ViT's CLS token (DINO evaluates the teacher), one 192-d vector per channel.
"""
from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...models.vit import VIT_DEFAULTS, ViT, ViTEncoder
from ..base import MethodSpec, PretextMethod, encoder_from, register_method
from ..data import ImagePool


class DinoHead(nn.Module):
    """MLP projection head ending in a weight-normalised prototype layer (norm fixed to 1)."""

    def __init__(self, dim: int, out_dim: int, hidden: int = 512, bottleneck: int = 128, use_bn: bool = False):
        super().__init__()
        bn = (lambda: nn.BatchNorm1d(hidden)) if use_bn else nn.Identity
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), bn(), nn.GELU(), nn.Linear(hidden, hidden), bn(), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        self.last = nn.Linear(bottleneck, out_dim, bias=False)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x).float(), dim=-1)
        return F.linear(x, F.normalize(self.last.weight.float(), dim=1))


class DinoModel(nn.Module):
    """Student (ViT + head, trained) and teacher (EMA copy, no gradients) plus the output centre."""

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        vit_cfg = {k: config[k] for k in VIT_DEFAULTS if k != "grid"}
        self.config = dict(config)
        self.student = ViT(**vit_cfg, grid=int(config["input_size"]) // int(config["patch"]))
        self.student_head = DinoHead(self.student.dim, int(config["out_dim"]), int(config["head_hidden"]),
                                     int(config["head_bottleneck"]), bool(config.get("head_bn", False)))
        self.teacher = copy.deepcopy(self.student)
        self.teacher_head = copy.deepcopy(self.student_head)
        for p in list(self.teacher.parameters()) + list(self.teacher_head.parameters()):
            p.requires_grad_(False)
        self.register_buffer("center", torch.zeros(1, int(config["out_dim"])))

    def forward(self, crops: list[torch.Tensor]) -> torch.Tensor:
        """Student logits for every crop, crops of one size batched together, in the order given."""
        return torch.cat([self.student_head(self.student(c)) for c in crops])

    @torch.no_grad()
    def teacher_logits(self, crops: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([self.teacher_head(self.teacher(c)) for c in crops])


# ------------------------------------------------------------------ multi-crop augmentation
def _resized_crop(region: np.ndarray, out: int, area: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    """torchvision-style RandomResizedCrop: area fraction ``area`` and aspect ratio 3/4..4/3 of ``region``."""
    h, w = region.shape
    for _ in range(10):
        a = rng.uniform(*area) * h * w
        r = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        ch, cw = int(round(math.sqrt(a / r))), int(round(math.sqrt(a * r)))
        if 2 <= ch <= h and 2 <= cw <= w:
            break
    else:
        ch, cw = h, w
    y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    t = torch.from_numpy(np.ascontiguousarray(region[y0:y0 + ch, x0:x0 + cw]))[None, None]
    return F.interpolate(t, size=(out, out), mode="bilinear", align_corners=False,
                         antialias=max(ch, cw) > out)[0, 0].numpy()


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    r = max(1, int(math.ceil(2.5 * sigma)))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k = torch.from_numpy((k / k.sum()).astype(np.float32))
    t = F.pad(torch.from_numpy(img)[None, None], (r, r, r, r), mode="reflect")
    t = F.conv2d(t, k.view(1, 1, 1, -1))
    return F.conv2d(t, k.view(1, 1, -1, 1))[0, 0].numpy()


def augment_view(region: np.ndarray, out: int, area: tuple[float, float], blur_p: float,
                 rng: np.random.Generator) -> np.ndarray:
    """One DINO view of a normalised one-channel region: resized crop, flip/rot90, intensity jitter, blur."""
    img = _resized_crop(region, out, area, rng)
    img = np.rot90(img, int(rng.integers(0, 4)))
    if rng.random() < 0.5:
        img = img[:, ::-1]
    img = np.ascontiguousarray(img, dtype=np.float32)
    if rng.random() < 0.8:  # intensity jitter: the single-channel analogue of colour jitter
        img = img * rng.uniform(0.6, 1.4) + rng.uniform(-0.2, 0.2)
        g = math.exp(rng.uniform(math.log(0.7), math.log(1.4)))
        img = np.sign(img) * np.abs(img) ** g
    if rng.random() < blur_p:
        img = _blur(img.astype(np.float32), float(rng.uniform(0.1, 1.5)))
    return np.ascontiguousarray(img, dtype=np.float32)


def sample_region(plane: np.ndarray, lo: float, hi: float, side: int, rng: np.random.Generator) -> np.ndarray:
    """A random ``side`` x ``side`` window of a plane, percentile-normalised, zero-padded if the plane is smaller."""
    h, w = plane.shape
    y0, x0 = int(rng.integers(0, max(h - side, 0) + 1)), int(rng.integers(0, max(w - side, 0) + 1))
    crop = (plane[y0:y0 + side, x0:x0 + side].astype(np.float32) - lo) / (hi - lo)
    if crop.shape != (side, side):
        out = np.zeros((side, side), np.float32)
        oy, ox = (side - crop.shape[0]) // 2, (side - crop.shape[1]) // 2
        out[oy:oy + crop.shape[0], ox:ox + crop.shape[1]] = crop
        crop = out
    return crop


class MultiCropBatches(torch.utils.data.Dataset):
    """Item ``i`` = the multi-crop batch of step ``i`` (pure function of seed, step, rank; modality in turn)."""

    def __init__(self, pool: ImagePool, config: dict[str, Any], shard: tuple[int, int] = (0, 1)):
        self.pool, self.shard = pool, shard
        self.bs, self.seed = int(config["batch_size"]), int(config["seed"])
        self.gsize, self.lsize, self.n_local = int(config["input_size"]), int(config["local_size"]), int(config["n_local"])
        self.region_scale = tuple(config["region_scale"])
        self.global_area, self.local_area = tuple(config["global_area"]), tuple(config["local_area"])

    def __len__(self) -> int:
        return 2 ** 62

    def __getitem__(self, step: int) -> dict[str, Any]:
        rank, _ = self.shard
        rng = np.random.default_rng((self.seed, int(step), rank))
        modality = self.pool.modalities[int(step) % len(self.pool.modalities)]
        idx = rng.choice(self.pool.by_modality[modality], self.bs, replace=True)
        g1, g2, locs = [], [], [[] for _ in range(self.n_local)]
        for i in idx:
            s = float(np.exp(rng.uniform(np.log(self.region_scale[0]), np.log(self.region_scale[1]))))
            region = sample_region(self.pool.planes[i], *self.pool.ranges[i], max(8, int(round(self.gsize * s))), rng)
            g1.append(augment_view(region, self.gsize, self.global_area, 1.0, rng))
            g2.append(augment_view(region, self.gsize, self.global_area, 0.1, rng))
            for j in range(self.n_local):
                locs[j].append(augment_view(region, self.lsize, self.local_area, 0.5, rng))
        globals_ = torch.from_numpy(np.stack(g1 + g2)[:, None])  # (2B, 1, G, G): view 1 then view 2
        batch: dict[str, Any] = {"global": globals_, "step": torch.tensor(int(step))}
        if self.n_local:
            batch["local"] = torch.from_numpy(np.stack([x for loc in locs for x in loc])[:, None])  # (L*B, 1, l, l)
        return batch


# ------------------------------------------------------------------ schedules and loss
def teacher_temp_at(step: int, config: dict[str, Any]) -> float:
    """Linear warm-up of the teacher temperature over ``warmup_teacher_temp_steps``, then constant."""
    warm = int(config["warmup_teacher_temp_steps"])
    lo, hi = float(config["warmup_teacher_temp"]), float(config["teacher_temp"])
    return hi if step >= warm or warm <= 0 else lo + (hi - lo) * step / warm


def momentum_at(step: int, config: dict[str, Any]) -> float:
    """Teacher EMA momentum: cosine from ``momentum_teacher`` at step 0 to 1 at the last step."""
    base, total = float(config["momentum_teacher"]), max(1, int(config["steps"]) - 1)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * min(step, total) / total) + 1) / 2


def dino_loss(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor, n_crops: int,
              student_temp: float, teacher_temp: float) -> torch.Tensor:
    """DINO cross-entropy. ``student``: (n_crops * B, K) logits, the 2 global crops first; ``teacher``:
    (2 * B, K). Each teacher view supervises every student crop except the same view."""
    s = (student.float() / student_temp).chunk(n_crops)
    t = F.softmax((teacher.float() - center) / teacher_temp, dim=-1).chunk(2)
    total, pairs = student.new_zeros((), dtype=torch.float32), 0
    for iq, q in enumerate(t):
        for v, sv in enumerate(s):
            if v == iq:
                continue
            total = total + torch.sum(-q * F.log_softmax(sv, dim=-1), dim=-1).mean()
            pairs += 1
    return total / pairs


class DinoViT(PretextMethod):
    name = "dino-vit"
    defaults = {**{k: v for k, v in VIT_DEFAULTS.items() if k != "grid"},
                "input_size": 48, "local_size": 24, "n_local": 6, "region_scale": [1.0, 2.0],
                "global_area": [0.4, 1.0], "local_area": [0.1, 0.4],
                "out_dim": 1024, "head_hidden": 512, "head_bottleneck": 128, "head_bn": True,
                "student_temp": 0.1, "teacher_temp": 0.04, "warmup_teacher_temp": 0.03,
                "warmup_teacher_temp_steps": 100, "momentum_teacher": 0.99, "center_momentum": 0.9,
                "freeze_last_layer_steps": 20, "lr": 1e-3, "weight_decay": 0.04, "grad_clip": 3.0,
                "batch_size": 32, "warmup_steps": 50}

    def build(self, config: dict[str, Any]) -> nn.Module:
        return DinoModel({**self.defaults, **config})

    def make_dataset(self, pool: ImagePool, config: dict[str, Any], shard: tuple[int, int] = (0, 1)) -> MultiCropBatches:
        return MultiCropBatches(pool, {**self.defaults, **config}, shard)

    def param_groups(self, model: nn.Module, config: dict[str, Any]) -> list[dict[str, Any]]:
        """No weight decay on biases/norms/tokens (as DINO); the prototype layer waits
        ``freeze_last_layer_steps`` (it is unstable while the rest of the head is still random)."""
        decay, no_decay, last = [], [], []
        for n, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if n.startswith("student_head.last"):
                last.append(p)
            elif p.ndim <= 1 or n.endswith(("pos_embed", "cls_token")):
                no_decay.append(p)
            else:
                decay.append(p)
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0},
                {"params": last, "frozen_steps": int(config.get("freeze_last_layer_steps", 0))}]

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        core = getattr(model, "module", model)
        cfg = core.config
        step = int(batch["step"])
        crops = [batch["global"]] + ([batch["local"]] if "local" in batch else [])
        n_crops = 2 + int(cfg["n_local"]) * ("local" in batch)
        student = model(crops)
        with torch.no_grad():
            teacher = core.teacher_logits([batch["global"]]).float()
        t_temp = teacher_temp_at(step, cfg)
        loss = dino_loss(student, teacher, core.center, n_crops, float(cfg["student_temp"]), t_temp)
        with torch.no_grad():
            batch_center = teacher.mean(dim=0, keepdim=True)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(batch_center)
                batch_center /= torch.distributed.get_world_size()
            m = float(cfg["center_momentum"])
            core.center.mul_(m).add_(batch_center * (1 - m))
            p = F.softmax((teacher - core.center) / t_temp, dim=-1)
            entropy = float(-(p * torch.log(p.clamp_min(1e-12))).sum(-1).mean())
        return loss, {"teacher_temp": t_temp, "momentum": momentum_at(step, cfg), "teacher_entropy": entropy}

    def after_step(self, model: nn.Module, step: int, config: dict[str, Any]) -> None:
        """EMA teacher update with the scheduled momentum (after the student's optimiser step)."""
        m = momentum_at(step, {**self.defaults, **config})
        for src, dst in ((model.student, model.teacher), (model.student_head, model.teacher_head)):
            for ps, pt in zip(src.parameters(), dst.parameters()):
                pt.mul_(m).add_(ps.detach(), alpha=1 - m)

    def to_encoder(self, model: nn.Module, config: dict[str, Any]) -> ViTEncoder:
        cfg = {**self.defaults, **config}
        enc = ViTEncoder({k: cfg[k] for k in VIT_DEFAULTS if k != "grid"} | {"grid": model.teacher.grid})
        return encoder_from(enc, model.teacher, "vit")


register_method(MethodSpec(
    name="dino-vit", factory=DinoViT,
    description="DINO self-distillation of a small one-channel ViT (patch 8, 192-d, depth 4): multi-crop, EMA teacher, "
                "centering, teacher-temperature warm-up; embedding = teacher CLS token per channel",
))
