"""The generic training loop: one implementation of optimiser, schedule, autocast, checkpoints,
exact resume, logging and (optional) DistributedDataParallel for every registered pretext method.

Contract with a method (``microsnoop.train.base.PretextMethod``; see its docstring):

1. ``config = {**LOOP_DEFAULTS, **method.defaults, **user options}`` (saved as ``config.json``).
2. ``model = method.build(config)``; with ``--init M``, ``method.initialize(model, create_model(M))``.
3. ``dataset = method.make_dataset(pool, config, shard=(rank, world))`` where ``pool`` is the
   ``train.data.ImagePool`` of ``config["data"]``; ``dataset[i]`` is the batch of global step ``i``
   and depends only on ``(seed, i, rank)``. The loop feeds steps ``start..steps-1`` through a
   DataLoader (``workers`` processes, ``prefetch`` batches each).
4. each step: ``loss, logs = method.loss(model, batch)`` under autocast, AdamW step, LR set from the
   step number (linear warm-up then cosine to ``min_lr_ratio * lr``).
5. ``method.to_encoder(model, config)`` gives the ``ChannelEncoder`` exported as ``model.safetensors``
   (config with ``arch`` in its header: ``create_model("run/model.safetensors")`` loads it).

Run folder: ``config.json``, ``checkpoint.pt`` (model, optimiser, step, torch/numpy/python RNG
states, data-manifest sha256, config; written every ``checkpoint_every`` steps and at the end),
``model.safetensors`` (the encoder for embedding), ``log.csv`` (step, loss, lr, images/s, ...).
Because batches are a pure function of the step and every state is restored, ``resume=True``
continues bit-for-bit (same device, thread count and precision).
"""
from __future__ import annotations

import csv
import json
import math
import random
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..errors import MicrosnoopError
from ..io.atomic import atomic_path

LOOP_DEFAULTS: dict[str, Any] = {
    "method": "mae-unet", "input_size": 112, "batch_size": 16, "steps": None, "epochs": 1,
    "epoch_images": 12000, "lr": 1e-3, "min_lr_ratio": 0.01, "weight_decay": 0.05, "warmup_steps": 100,
    "betas": [0.9, 0.999], "seed": 0, "precision": "auto", "checkpoint_every": 200, "workers": 1,
    "prefetch": 4, "holdout": 0, "init": None, "scale_range": [0.75, 1.5], "grad_clip": 1.0,
}


# ---------------------------------------------------------------- precision and schedule
def cpu_has_bf16() -> bool:
    """AVX512-BF16 or AMX makes bf16 matmuls several times faster than fp32 on CPU."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise MicrosnoopError(f"unknown precision '{precision}' (auto, fp32, bf16, fp16)")
    if precision != "auto":
        if precision == "fp16" and device.type != "cuda":
            raise MicrosnoopError("fp16 training needs CUDA; use bf16 or fp32 on CPU")
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_bf16() else "fp32"


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def lr_at(step: int, config: dict[str, Any]) -> float:
    """Linear warm-up over ``warmup_steps`` then cosine decay to ``min_lr_ratio * lr`` at the last step."""
    base, total, warm = config["lr"], config["steps"], max(0, int(config["warmup_steps"]))
    if step < warm:
        return base * (step + 1) / warm
    frac = (step - warm) / max(1, total - warm)
    floor = base * config["min_lr_ratio"]
    return floor + (base - floor) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))


# ---------------------------------------------------------------- RNG and checkpoints
def rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int,
                        config: dict[str, Any], manifest_sha256: str, elapsed: float, scaler: Any = None) -> None:
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
             "config": json.dumps(config, sort_keys=True), "rng": rng_state(), "manifest_sha256": manifest_sha256,
             "elapsed_s": elapsed, "scaler": scaler.state_dict() if scaler is not None else None}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_training_state(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise MicrosnoopError("no checkpoint to resume from", path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    state["config"] = json.loads(state["config"])
    return state


def export_encoder(pretext: Any, model: torch.nn.Module, config: dict[str, Any], path: Path,
                   dtype: torch.dtype | None = None, **info: Any) -> str:
    """Write the embedding encoder as a safetensors checkpoint that ``create_model(path)`` loads."""
    from ..models.checkpoints import save_checkpoint

    enc = pretext.to_encoder(model, config)
    enc_config = {**enc.config, "method": config["method"], "input_size": config["input_size"],
                  "seed": config["seed"], "init": config.get("init")}
    return save_checkpoint(path, enc.state_dict(), enc_config, dtype=dtype, **info)


# ---------------------------------------------------------------- the loop
def build_config(method: Any, options: dict[str, Any]) -> dict[str, Any]:
    config = {**LOOP_DEFAULTS, **method.defaults, **{k: v for k, v in options.items() if v is not None}}
    if not config.get("steps"):
        config["steps"] = max(1, int(config["epochs"] * config["epoch_images"]) // int(config["batch_size"]))
    config["steps"] = int(config["steps"])
    if config["input_size"] < 16 or config["batch_size"] < 1:
        raise MicrosnoopError("input_size must be >= 16 and batch_size >= 1")
    return config


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _log_rows(path: Path, upto: int) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        return [r for r in csv.DictReader(fh) if int(r["step"]) < upto]


def train(data: str | Path, run_dir: str | Path, *, method: str = "mae-unet", resume: bool = False,
          device: str = "cpu", options: dict[str, Any] | None = None,
          progress: Callable[[int, int, dict[str, float]], None] | None = None,
          stop_after: int | None = None) -> dict[str, Any]:
    """Train ``method`` on the images of ``data``; write checkpoints and logs to ``run_dir``.

    ``stop_after`` ends the run early after that global step (as if interrupted; used by tests).
    Returns a summary (steps, images seen, wall time, final loss, paths).
    """
    from ..models.registry import create_model
    from .base import get_method
    from . import methods  # noqa: F401  registers the built-in methods
    from .data import step_loader

    run_dir = Path(run_dir)
    ckpt_path = run_dir / "checkpoint.pt"
    m = get_method(method)
    if resume:
        saved = load_training_state(ckpt_path)
        config = saved["config"]
        for k in ("steps", "checkpoint_every", "workers", "prefetch"):  # may change on resume
            if options and options.get(k) is not None:
                config[k] = options[k]
        m = get_method(config["method"])
    else:
        if ckpt_path.exists():
            raise MicrosnoopError("run folder already holds a checkpoint; use --resume or another folder", run_dir)
        config = build_config(m, {**(options or {}), "method": method})
        config["data"] = str(data)
    dev = torch.device(device)
    precision = resolve_precision(config["precision"], dev)
    rank, world = _dist()

    pool = m.load_pool(data, config)
    if resume and saved["manifest_sha256"] != pool.manifest_sha256:
        raise MicrosnoopError("the training data's manifest changed since the checkpoint was written "
                              "(resume would not continue the same run)", data)

    torch.manual_seed(int(config["seed"]))
    np.random.seed(int(config["seed"]))
    random.seed(int(config["seed"]))
    model = m.build(config)
    init_info = None
    if config.get("init") and not resume:
        init_info = m.initialize(model, create_model(config["init"]))
    model.to(dev).train()
    m.prepare_train(model, config)
    opt = torch.optim.AdamW(m.param_groups(model, config), lr=config["lr"], weight_decay=config["weight_decay"],
                            betas=tuple(config["betas"]))
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    start, elapsed = 0, 0.0
    if resume:
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        if scaler is not None and saved.get("scaler"):
            scaler.load_state_dict(saved["scaler"])
        start, elapsed = int(saved["step"]), float(saved["elapsed_s"])
        set_rng_state(saved["rng"])
    train_model = model
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)

    main = rank == 0
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        meta = {**config, "precision_resolved": precision, "world_size": world, "manifest_sha256": pool.manifest_sha256,
                "pool_planes": len(pool), "pool_counts": pool.counts(), "holdout_files": pool.holdout,
                "init_copied": init_info}
        if not resume:
            with atomic_path(run_dir / "config.json") as tmp:
                tmp.write_text(json.dumps(meta, indent=2, default=str))
    log_path = run_dir / "log.csv"
    rows = _log_rows(log_path, start + 1) if (resume and main) else []

    dataset = m.make_dataset(pool, config, shard=(rank, world))
    stop = config["steps"] if stop_after is None else min(config["steps"], stop_after)
    loader = step_loader(dataset, start, stop, int(config["workers"]), int(config["prefetch"]))
    per_step = int(config["batch_size"]) * world
    loss_value, t_last, step = float("nan"), time.perf_counter(), start
    log_fh = None
    if main:
        log_fh = open(log_path, "w", newline="")
        writer = None
    try:
        for step in range(start, stop):
            batch = next(loader)
            batch = {k: v.to(dev, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
            lr = lr_at(step, config)
            for g in opt.param_groups:  # a group may run at a fraction of the LR, or wait (frozen) for a while
                g["lr"] = lr * g.get("lr_scale", 1.0) if step >= g.get("frozen_steps", 0) else 0.0
            with autocast(dev, precision):
                loss, logs = m.loss(train_model, batch)
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
            else:
                loss.backward()
            if config.get("grad_clip"):
                torch.nn.utils.clip_grad_norm_(model.parameters(), float(config["grad_clip"]))
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            with torch.no_grad():
                m.after_step(model, step, config)
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise MicrosnoopError(f"loss became {loss_value} at step {step}; lower --lr or use fp32")
            now = time.perf_counter()
            dt, t_last = now - t_last, now
            elapsed += dt
            ips = per_step / dt if dt > 0 else float("nan")
            if main:
                row = {"step": step, "loss": f"{loss_value:.6f}", "lr": f"{lr:.6g}", "images_per_s": f"{ips:.2f}",
                       "elapsed_s": f"{elapsed:.1f}", **{k: f"{v:.6f}" for k, v in logs.items()}}
                if writer is None:
                    writer = csv.DictWriter(log_fh, fieldnames=list(row))
                    writer.writeheader()
                    writer.writerows(rows)
                writer.writerow(row)
                log_fh.flush()
                if progress:
                    progress(step + 1, config["steps"], {"loss": loss_value, "images_per_s": ips, "lr": lr})
                done = step + 1
                if done % int(config["checkpoint_every"]) == 0 or done == stop:
                    save_training_state(ckpt_path, model, opt, done, config, pool.manifest_sha256, elapsed, scaler)
    finally:
        if log_fh:
            log_fh.close()
    done = stop
    summary = {"steps": done, "total_steps": config["steps"], "images_seen": done * per_step,
               "wall_s": round(elapsed, 1), "final_loss": loss_value, "precision": precision,
               "run_dir": str(run_dir), "model": str(run_dir / "model.safetensors")}
    if main and done == config["steps"]:
        info = {"trained_with": config["method"], "steps": done, "images_seen": done * per_step,
                "final_loss": loss_value, "manifest_sha256": pool.manifest_sha256}
        export_encoder(m, model, config, run_dir / "model.safetensors", **info)
    return summary
