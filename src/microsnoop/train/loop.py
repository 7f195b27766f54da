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
continues bit-for-bit (same device, thread count, precision and number of ranks).

Several processes (torchrun): ``train`` joins the process group (``microsnoop.core.distributed.init``:
gloo on CPU, NCCL on CUDA; rank r computes on ``cuda:LOCAL_RANK``), wraps the model in
``DistributedDataParallel`` (gradients averaged over ranks), gives rank r shard ``(r, world)`` of
the dataset (different batches, still a pure function of seed, step and rank), turns BatchNorm
into SyncBatchNorm on CUDA ranks (``sync_bn``), and lets only rank 0 write the run folder. The
logged loss is the mean over ranks. Checkpoints hold every rank's RNG state; a run resumes with
the same or another number of ranks (docs/scaling.md says what is then bit-exact).
"""
from __future__ import annotations

import csv
import json
import math
import numbers
import random
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..core import distributed as dist
from ..core.device import autocast, local_device, resolve_precision
from ..core.errors import MicrosnoopError
from ..io.atomic import atomic_path

LOOP_DEFAULTS: dict[str, Any] = {
    "method": "mae-unet", "input_size": 112, "batch_size": 16, "steps": None, "epochs": 1,
    "epoch_images": 12000, "lr": 1e-3, "min_lr_ratio": 0.01, "weight_decay": 0.05, "warmup_steps": 100,
    "betas": [0.9, 0.999], "seed": 0, "precision": "auto", "checkpoint_every": 200, "workers": 1,
    "prefetch": 4, "holdout": 0, "init": None, "scale_range": [0.75, 1.5], "grad_clip": 1.0, "sync_bn": "auto",
}
# options a resumed run may change (batch_size: to keep the global batch when the number of ranks changes)
RESUME_MAY_CHANGE = ("steps", "checkpoint_every", "workers", "prefetch", "batch_size")
RUN_FILES = ("config.json", "checkpoint.pt", "log.csv", "model.safetensors")
# a collective waits this long for the slowest rank (loading the pool, rank 0 writing a checkpoint)
TIMEOUT_H = 1.0


# ---------------------------------------------------------------- precision and schedule
def resolve_train_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 where native; on CUDA without bf16, fp16 (the loop scales its gradients); else fp32."""
    if precision == "fp16" and device.type != "cuda":
        raise MicrosnoopError("fp16 training needs CUDA; use bf16 or fp32 on CPU")
    return resolve_precision(precision, device, cuda_fallback="fp16")


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
                        config: dict[str, Any], manifest_sha256: str, elapsed: float, scaler: Any = None,
                        world_size: int = 1, images_seen: int | None = None,
                        rng_by_rank: list[dict[str, Any]] | None = None) -> None:
    """``checkpoint.pt`` (atomic): weights, optimiser, step, config, RNG states (every rank's under DDP)."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
             "config": json.dumps(config, sort_keys=True), "rng": rng_state(), "manifest_sha256": manifest_sha256,
             "elapsed_s": elapsed, "scaler": scaler.state_dict() if scaler is not None else None,
             "world_size": world_size, "images_seen": images_seen, "rng_by_rank": rng_by_rank}
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
    if config.get("sync_bn", "auto") not in ("auto", True, False):
        raise MicrosnoopError(f"sync_bn must be auto, true or false, not {config['sync_bn']!r}")
    for key in ("seed", "stream_seed"):  # numpy refuses others only after the pool is loaded
        value = config.get(key)
        if value is None and key != "seed":
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value < 2 ** 32:
            raise MicrosnoopError(f"{key} must be an integer from 0 to 2**32 - 1, not {value!r}")
    return config


def train_device(device: str | torch.device) -> torch.device:
    """``auto``: CUDA when present, else CPU. Under torchrun ``cuda`` is this rank's ``cuda:LOCAL_RANK``."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = local_device(device)
    if dev.type not in ("cpu", "cuda"):
        raise MicrosnoopError(f"training runs on cpu or cuda, not '{dev.type}'")
    return dev


def use_sync_bn(config: dict[str, Any], dev: torch.device, world: int) -> bool:
    """Whether BatchNorm layers become SyncBatchNorm (statistics over the global batch of all ranks).

    ``auto`` (default): yes with several CUDA ranks. torch's SyncBatchNorm does not run on CPU, so
    on gloo/CPU each rank normalises with its own batch's statistics (``true`` there is an error).
    """
    want = config.get("sync_bn", "auto")
    if world <= 1 or want is False:
        return False
    if dev.type != "cuda":
        if want is True:
            raise MicrosnoopError("sync_bn=true needs CUDA ranks: torch's SyncBatchNorm does not run on CPU")
        return False
    return True


def _resume_config(saved: dict[str, Any], options: dict[str, Any] | None) -> dict[str, Any]:
    config = saved["config"]
    for k in RESUME_MAY_CHANGE:
        if options and options.get(k) is not None:
            config[k] = options[k]
    return config


def _prepare_model(m: Any, config: dict[str, Any], dev: torch.device, sync_bn: bool,
                   resume: bool) -> tuple[torch.nn.Module, Any]:
    """Build the method's model with the run's seed, ``--init`` weights, train mode and (maybe) SyncBatchNorm."""
    from ..models.registry import create_model

    torch.manual_seed(int(config["seed"]))
    np.random.seed(int(config["seed"]))
    random.seed(int(config["seed"]))
    model = m.build(config)
    init_info = None
    if config.get("init") and not resume:
        init_info = m.initialize(model, create_model(config["init"]))
    model.to(dev).train()
    m.prepare_train(model, config)  # before conversion: hooks look for nn.BatchNorm2d; conversion keeps .training
    if sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # same parameters and state-dict keys
    return model, init_info


def _has_batchnorm(model: torch.nn.Module) -> bool:
    return any(isinstance(mod, torch.nn.modules.batchnorm._BatchNorm) for mod in model.modules())


def _clean_temp_files(run_dir: Path) -> None:
    """Temp files a killed run left beside its outputs (``io.atomic`` names them ``.NAME.*.tmp``)."""
    for name in RUN_FILES:
        for p in run_dir.glob(f".{name}.*.tmp"):
            p.unlink(missing_ok=True)


def _write_config(run_dir: Path, meta: dict[str, Any], resume: bool, start: int, world: int, batch: int) -> None:
    """``config.json``: the run's settings; on resume, the segment (step, world size, batch) is appended."""
    path = run_dir / "config.json"
    if resume and path.exists():
        old = json.loads(path.read_text())
        segments = old.get("segments") or [{"from_step": 0, "world_size": old.get("world_size", 1),
                                            "batch_size": old.get("batch_size")}]
        meta = {**old, **{k: meta[k] for k in ("world_size", "batch_size", "steps", "checkpoint_every", "workers",
                                                 "prefetch", "precision_resolved", "sync_bn_used")}}
    else:
        segments = []
    meta["segments"] = segments + [{"from_step": start, "world_size": world, "batch_size": batch}]
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(meta, indent=2, default=str))


class RunLog:
    """``log.csv``, written by rank 0 only: one row per step, flushed as it goes.

    On resume the rows of steps at or after the checkpoint (written by the killed run after its
    last checkpoint, and about to be redone) are dropped first, atomically, so every step appears
    exactly once and a crash before the first new row loses nothing."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path, self.fieldnames = path, None
        rows: list[dict[str, str]] = []
        if resume_step is not None and path.exists():
            with open(path, newline="") as fh:
                reader = csv.DictReader(fh)
                rows = [r for r in reader if int(r["step"]) < resume_step]
                self.fieldnames = reader.fieldnames
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
            if self.fieldnames:
                w = csv.DictWriter(fh, fieldnames=self.fieldnames)
                w.writeheader()
                w.writerows(rows)
        self.fh = open(path, "a", newline="")
        self.writer = csv.DictWriter(self.fh, fieldnames=self.fieldnames) if self.fieldnames else None

    def write(self, row: dict[str, Any]) -> None:
        if self.writer is None:
            self.fieldnames = list(row)
            self.writer = csv.DictWriter(self.fh, fieldnames=self.fieldnames)
            self.writer.writeheader()
        self.writer.writerow(row)
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()


def train(data: str | Path, run_dir: str | Path, *, method: str = "mae-unet", resume: bool = False,
          device: str = "auto", options: dict[str, Any] | None = None,
          progress: Callable[[int, int, dict[str, float]], None] | None = None,
          stop_after: int | None = None) -> dict[str, Any]:
    """Train ``method`` on the images of ``data``; write checkpoints and logs to ``run_dir``.

    Under torchrun (``WORLD_SIZE`` > 1) every rank joins the process group (gloo on CPU, NCCL on
    CUDA, ``microsnoop.core.distributed.init``), computes on ``cuda:LOCAL_RANK`` when ``device`` is
    ``cuda``, trains a ``DistributedDataParallel`` replica on its own batches (shard ``(rank,
    world)`` of the method's dataset) and only rank 0 writes files. A process group the caller
    already initialised is used as it is (and left open).

    Parameters
    ----------
    data : str or Path
        Folder of images, a manifest.csv, or (labelled-set methods) a folder with images.npy + metadata.csv.
    run_dir : str or Path
        Run folder: config.json, checkpoint.pt, log.csv, model.safetensors.
    method : str
        Registered pretext method (ignored on resume: the checkpoint's).
    resume : bool
        Continue from ``run_dir/checkpoint.pt`` (any world size; see docs/scaling.md for what is bit-exact).
    device : str
        ``auto`` (CUDA if present, else CPU; the default, as every command), ``cpu``, ``cuda`` or ``cuda:N``.
    options : dict, optional
        Config overrides (``LOOP_DEFAULTS`` and the method's defaults).
    progress : callable, optional
        ``progress(step, total, logs)`` after each step (rank 0 only).
    stop_after : int, optional
        End early after that global step, as if interrupted (tests).

    Returns
    -------
    dict
        steps, total_steps, images_seen, wall_s, final_loss, precision, world_size, rank, run_dir, model.
    """
    from .base import get_method
    from . import methods  # noqa: F401  registers the built-in methods

    run_dir = Path(run_dir)
    ckpt_path = run_dir / "checkpoint.pt"
    saved = None
    if resume:
        saved = load_training_state(ckpt_path)
        config = _resume_config(saved, options)
    else:
        if ckpt_path.exists():
            raise MicrosnoopError("run folder already holds a checkpoint; use --resume or another folder", run_dir)
        config = build_config(get_method(method), {**(options or {}), "method": method})
        config["data"] = str(data)
    m = get_method(config["method"])
    dev = train_device(device)
    precision = resolve_train_precision(config["precision"], dev)
    joined_here = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    d = dist.init(dev, timeout_h=TIMEOUT_H)
    try:
        sync_bn = use_sync_bn(config, dev, d.world)
        return _train(m, data, run_dir, config, saved, dev, precision, sync_bn, d, progress, stop_after)
    finally:
        if joined_here:
            dist.finish(d)


def _train(m: Any, data: str | Path, run_dir: Path, config: dict[str, Any], saved: dict[str, Any] | None,
           dev: torch.device, precision: str, sync_bn: bool, d: dist.Dist,
           progress: Callable[[int, int, dict[str, float]], None] | None, stop_after: int | None) -> dict[str, Any]:
    from .data import step_loader

    resume = saved is not None
    pool = m.load_pool(data, config)
    if resume and saved["manifest_sha256"] != pool.manifest_sha256:
        raise MicrosnoopError("the training data's manifest changed since the checkpoint was written "
                              "(resume would not continue the same run)", data)
    model, init_info = _prepare_model(m, config, dev, sync_bn, resume)
    if d.world > 1 and not sync_bn and _has_batchnorm(model) and d.main:
        warnings.warn("BatchNorm layers normalise with each rank's own batch (SyncBatchNorm needs CUDA ranks, or "
                      "sync_bn=false was set): not the same as one process on the global batch", stacklevel=2)
    opt = torch.optim.AdamW(m.param_groups(model, config), lr=config["lr"], weight_decay=config["weight_decay"],
                            betas=tuple(config["betas"]))
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    start, elapsed, seen = 0, 0.0, 0
    if resume:
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        if scaler is not None and saved.get("scaler"):
            scaler.load_state_dict(saved["scaler"])
        start, elapsed = int(saved["step"]), float(saved["elapsed_s"])
        seen = int(saved.get("images_seen", start * int(config["batch_size"]) * int(saved.get("world_size", 1))))
        by_rank = saved.get("rng_by_rank") or []
        set_rng_state(by_rank[d.rank] if d.rank < len(by_rank) else saved["rng"])
        if d.main and int(saved.get("world_size", d.world)) != d.world:
            warnings.warn(f"resuming a {saved.get('world_size')}-rank run on {d.world} ranks: from step {start} the "
                          "batches (and the global batch size) differ from an uninterrupted run", stacklevel=2)
    train_model = model
    if d.world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None)

    # before anything is written: a method's bad option (raised here) leaves no half-made run folder
    dataset = m.make_dataset(pool, config, shard=(d.rank, d.world))
    log = None
    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _clean_temp_files(run_dir)
        meta = {**config, "precision_resolved": precision, "world_size": d.world, "sync_bn_used": sync_bn,
                "manifest_sha256": pool.manifest_sha256, "pool_planes": len(pool), "pool_counts": pool.counts(),
                "holdout_files": pool.holdout, "init_copied": init_info,
                "skipped_files": getattr(pool, "skipped", [])}
        _write_config(run_dir, meta, resume, start, d.world, int(config["batch_size"]))
        log = RunLog(run_dir / "log.csv", start if resume else None)

    stop = config["steps"] if stop_after is None else min(config["steps"], stop_after)
    loader = step_loader(dataset, start, stop, int(config["workers"]), int(config["prefetch"]))
    per_step = int(config["batch_size"]) * d.world
    state = {"model": model, "opt": opt, "scaler": scaler, "elapsed": elapsed, "seen": seen, "loss": float("nan"),
             "t_last": time.perf_counter()}
    try:
        for step in range(start, stop):
            _step(m, train_model, state, next(loader), step, config, dev, precision, d)
            state["seen"] += per_step
            _after_step(m, state, step, stop, config, d, log, progress, run_dir, pool.manifest_sha256, per_step)
    finally:
        if log is not None:
            log.close()
    done = stop
    summary = {"steps": done, "total_steps": config["steps"], "images_seen": state["seen"],
               "wall_s": round(state["elapsed"], 1), "final_loss": state["loss"], "precision": precision,
               "world_size": d.world, "rank": d.rank, "run_dir": str(run_dir),
               "model": str(run_dir / "model.safetensors")}
    if d.main and done == config["steps"]:
        info = {"trained_with": config["method"], "steps": done, "images_seen": state["seen"],
                "final_loss": state["loss"], "manifest_sha256": pool.manifest_sha256, "world_size": d.world}
        export_encoder(m, model, config, run_dir / "model.safetensors", **info)
    dist.barrier(d)  # every rank returns once rank 0's files are in place
    return summary


def _step(m: Any, train_model: torch.nn.Module, state: dict[str, Any], batch: dict[str, Any], step: int,
          config: dict[str, Any], dev: torch.device, precision: str, d: dist.Dist) -> None:
    """One optimiser step; DDP averages the gradients over ranks during ``backward``."""
    model, opt, scaler = state["model"], state["opt"], state["scaler"]
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
    # the logged loss (and method logs) are means over the ranks: one all_reduce of a few numbers
    values = dist.mean_over_ranks(d, torch.tensor([float(loss.detach()), *map(float, logs.values())],
                                                  dtype=torch.float64, device=dev))
    values = values.tolist()
    state["loss"], state["logs"], state["lr"] = values[0], dict(zip(logs, values[1:])), lr
    if not math.isfinite(state["loss"]):
        raise MicrosnoopError(f"loss became {state['loss']} at step {step}; lower --lr or use fp32")


def _after_step(m: Any, state: dict[str, Any], step: int, stop: int, config: dict[str, Any], d: dist.Dist,
                log: RunLog | None, progress: Callable | None, run_dir: Path, manifest_sha256: str,
                per_step: int) -> None:
    """Log the step (rank 0) and checkpoint when due (every rank takes part: RNG states are gathered)."""
    now = time.perf_counter()  # wall time since the last step ended: data wait, compute, last checkpoint
    dt, state["t_last"] = now - state["t_last"], now
    state["elapsed"] += dt
    ips = per_step / dt if dt > 0 else float("nan")
    if log is not None:
        log.write({"step": step, "loss": f"{state['loss']:.6f}", "lr": f"{state['lr']:.6g}",
                   "images_per_s": f"{ips:.2f}", "elapsed_s": f"{state['elapsed']:.1f}",
                   **{k: f"{v:.6f}" for k, v in state["logs"].items()}})
        if progress:
            progress(step + 1, config["steps"], {"loss": state["loss"], "images_per_s": ips, "lr": state["lr"]})
    done = step + 1
    if done % int(config["checkpoint_every"]) == 0 or done == stop:
        rngs = dist.gather_objects(d, rng_state())
        if d.main:
            save_training_state(run_dir / "checkpoint.pt", state["model"], state["opt"], done, config, manifest_sha256,
                                state["elapsed"], state["scaler"], world_size=d.world, images_seen=state["seen"],
                                rng_by_rank=rngs if d.world > 1 else None)
