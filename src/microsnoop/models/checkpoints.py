"""Checkpoints are data: safetensors files whose header carries the model config, verified by sha256.

Every checkpoint saved here also records ``weights_sha256`` in its header: the content digest of its
tensors (name, dtype, shape, bytes) at save time. Loading recomputes it, so a flipped byte in a user's
own checkpoint (one the registry has no sha256 for) is refused instead of giving wrong vectors."""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import torch

from ..core.errors import MicrosnoopError, MicrosnoopWarning
from ..core.hashing import sha256_file
from ..io.atomic import atomic_path


def sha256_state_dict(state: dict[str, torch.Tensor]) -> str:
    """Content hash of tensors (name, dtype, shape, bytes), for weights built in memory (random-init)."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


WEIGHTS_DIGEST = "weights_sha256"


def save_checkpoint(path: str | Path, state: dict[str, torch.Tensor], config: dict[str, Any],
                    dtype: torch.dtype | None = None, **info: Any) -> str:
    """Write weights (+ config and free-form info in the header) atomically; returns the file's sha256."""
    from safetensors.torch import save_file

    tensors = {}
    for k, v in state.items():
        v = v.detach().cpu()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        tensors[k] = v.contiguous()
    meta = {"config": json.dumps(config, sort_keys=True), "format": "microsnoop-checkpoint-v1"}
    meta.update({k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in info.items()})
    meta[WEIGHTS_DIGEST] = sha256_state_dict(tensors)  # always of the tensors written now, never copied
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return sha256_file(path)


def read_checkpoint_header(path: str | Path) -> dict[str, Any]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except Exception as exc:
        raise MicrosnoopError(f"not a safetensors checkpoint ({type(exc).__name__}: {exc})", path) from None
    out: dict[str, Any] = {}
    for k, v in meta.items():
        try:
            out[k] = json.loads(v)
        except (json.JSONDecodeError, TypeError):
            out[k] = v
    if "config" not in out:
        raise MicrosnoopError("checkpoint header has no model config", path)
    return out


def load_checkpoint(path: str | Path, expected_sha256: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    """Load weights as float32 after checking the file's sha256 against the registry's record."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise MicrosnoopError("checkpoint not found", path)
    digest = sha256_file(path)
    if expected_sha256 and digest != expected_sha256:
        raise MicrosnoopError(f"sha256 mismatch: file has {digest[:12]}..., registry expects "
                              f"{expected_sha256[:12]}... (corrupt or replaced weights)", path)
    header = read_checkpoint_header(path)
    try:
        raw = load_file(str(path))
    except Exception as exc:  # truncated data section, bad offsets
        raise MicrosnoopError(f"cannot read the checkpoint's weights ({type(exc).__name__}: {exc})", path) from None
    verify_weights(raw, header, path, registered=bool(expected_sha256))
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in raw.items()}
    return state, header, digest


def verify_weights(state: dict[str, torch.Tensor], header: dict[str, Any], path: str | Path,
                   registered: bool = False) -> None:
    """Check the tensors against the digest their header recorded at save time."""
    recorded = header.get(WEIGHTS_DIGEST)
    if recorded is None:
        if not registered:  # registry weights are already checked by their file sha256
            warnings.warn(f"{path}: checkpoint has no weights digest (saved by an older microsnoop), so its "
                          f"weights cannot be verified", MicrosnoopWarning, stacklevel=3)
        return
    actual = sha256_state_dict(state)
    if actual != str(recorded):
        raise MicrosnoopError(f"weights do not match the digest recorded when the checkpoint was saved "
                              f"({actual[:12]}... vs {str(recorded)[:12]}...): the file is corrupt or was modified", path)
