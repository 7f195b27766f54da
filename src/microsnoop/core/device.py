"""Which device and which precision: one answer for embedding, segmentation and training.

``auto`` precision means bf16 only where the hardware runs it natively (CUDA with bf16 support,
CPUs with AVX512-BF16, AMX or Arm BF16 dot products); elsewhere bf16 is emulated and slower than
fp32, so ``auto`` falls back (fp32, or fp16 for training on older CUDA, which has a grad scaler).
"""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from .errors import MicrosnoopError

log = logging.getLogger("microsnoop")

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 dot-product instructions (AVX512-BF16, AMX, Arm BF16).

    Without them bf16 is emulated and slower than fp32, so ``auto`` must not pick it there.

    Returns
    -------
    bool
        Whether /proc/cpuinfo lists a native bf16 flag (False where it cannot be read).
    """
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def device_kind(device: str | torch.device) -> str:
    """``cpu``, ``cuda``, ``mps`` ... of a device or its name (``cuda:1`` -> ``cuda``)."""
    return device.type if isinstance(device, torch.device) else str(device).split(":")[0]


def native_bf16(device: str | torch.device) -> bool:
    """Whether ``device`` runs bf16 natively (CUDA with bf16 support, or a CPU with native bf16).

    Parameters
    ----------
    device : str or torch.device
        The device computed on.

    Returns
    -------
    bool
        False for devices other than CPU and CUDA (MPS).
    """
    kind = device_kind(device)
    if kind == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return kind == "cpu" and cpu_has_native_bf16()


def resolve_precision(precision: str, device: str | torch.device, validated: bool = True,
                      choices: Sequence[str] = PRECISIONS, what: str = "precision",
                      cuda_fallback: str = "fp32") -> str:
    """The precision to compute in: ``precision`` itself, or for ``auto`` bf16 where native.

    Parameters
    ----------
    precision : str
        One of ``choices``.
    device : str or torch.device
        The device computed on.
    validated : bool
        Whether the model was checked to agree with fp32 in bf16; ``auto`` stays fp32 when not.
    choices : sequence of str
        The values this caller accepts (segmentation takes no fp16).
    what : str
        The option's name in the error message.
    cuda_fallback : str
        ``auto`` on a CUDA GPU without bf16: fp32 for inference, fp16 for training.

    Returns
    -------
    str
        ``fp32``, ``bf16`` or ``fp16``.
    """
    if precision not in choices:
        raise MicrosnoopError(f"unknown {what} '{precision}' ({', '.join(choices)})")
    if precision != "auto":
        return precision
    if not validated:
        return "fp32"
    if native_bf16(device):
        return "bf16"
    return cuda_fallback if device_kind(device) == "cuda" else "fp32"


def autocast(device: torch.device, precision: str) -> Any:
    """The autocast context for ``precision`` (a no-op context for fp32).

    Parameters
    ----------
    device : torch.device
        The device computed on.
    precision : str
        ``fp32``, ``bf16`` or ``fp16``.

    Returns
    -------
    context manager
        ``torch.autocast`` with the matching dtype, or ``contextlib.nullcontext()``.
    """
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision in ("bf16", "fp16"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    raise MicrosnoopError(f"unknown precision '{precision}' ({', '.join(PRECISIONS)})")


def _rank_gpu(dev: torch.device) -> torch.device:
    """Under torchrun each rank takes the GPU of its LOCAL_RANK when no index was given."""
    if dev.type == "cuda" and dev.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]) % max(1, torch.cuda.device_count()))
    return dev


def _parse(device: str | torch.device, allowed: str) -> torch.device:
    """``device`` as a torch.device; CUDA asked for without a GPU is a user error."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise MicrosnoopError(f"unknown device '{device}' (use {allowed})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MicrosnoopError("--device cuda asked for, but no CUDA GPU is available")
    return dev


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then CPU, and logs the choice.

    Parameters
    ----------
    device : str or torch.device
        ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.

    Returns
    -------
    torch.device
        The device to compute on (under torchrun ``cuda`` is this rank's GPU).
    """
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        if torch.cuda.is_available():
            dev = torch.device("cuda")
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            dev = torch.device("mps")
        else:
            dev = torch.device("cpu")
        dev = _rank_gpu(dev)
        log.info("device: %s (auto)", dev)
        return dev
    return _rank_gpu(_parse(device, "auto, cpu, cuda, cuda:N or mps"))


def local_device(device: str | torch.device) -> torch.device:
    """Under torchrun, ``cuda`` (no index) means ``cuda:LOCAL_RANK`` (modulo the GPUs visible).

    Parameters
    ----------
    device : str or torch.device
        ``cpu``, ``cuda`` or ``cuda:N``.

    Returns
    -------
    torch.device
        The device this rank computes on.
    """
    dev = _parse(device, "cpu, cuda or cuda:N")
    if dev.type == "cuda":
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
        if dev.index is not None and local_world > 1 and torch.cuda.device_count() > 1:
            # every rank of the node would share one GPU (NCCL refuses, or they all queue on it)
            raise MicrosnoopError(f"--device {device} under torchrun with {local_world} ranks per node: "
                                  "use --device cuda (each rank takes cuda:LOCAL_RANK)")
    return _rank_gpu(dev)
