"""Optional inference engines for CPU: OpenVINO and ONNX Runtime run the module the engine would run.

Why: on CPUs with AMX / AVX512-BF16, PyTorch eager spends most of the encoder's time outside the
matmul units (layout reorders between oneDNN primitives, un-fused ReLU / add / max-pool passes over
every activation, per-call primitive creation). OpenVINO compiles the whole graph once, fuses those
element-wise passes into the convolutions and keeps activations in its blocked bf16 layout, which
benchmarks/throughput.py measured at several times eager's throughput (see docs/scaling.md).

How it is used: :func:`engine_module` wraps the exact ``nn.Module`` that :func:`~.fused.fast_module`
returns (folded U-Net, pooling head, any projection), exported in fp32 and compiled with the
precision the embedder resolved (bf16 -> OpenVINO's bf16 inference hint). The result is itself an
``nn.Module`` taking and returning torch tensors, so :class:`~microsnoop.models.heads.TTAModule`
wraps it as it wraps the torch module. Per input shape, the first batch is checked against the fp32
torch module (every vector at cosine >= :data:`MIN_COSINE`); a failure of any kind (package
missing, conversion error, validation) falls back to torch with a logged reason, never silently.

Exports are cached on disk (``$MICROSNOOP_CACHE/engines`` or ``~/.cache/microsnoop/engines``),
keyed by the sha256 of the module's weights (which covers the model and its projections), the head
(levels, pooling), the engine and its version and the input shape.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import io
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..core.errors import MicrosnoopError

log = logging.getLogger("microsnoop")

ENGINES = ("auto", "torch", "openvino", "onnxruntime")
# order tried by ``auto``: measured fastest first (benchmarks/throughput.py)
AUTO_ORDER = ("openvino",)
MIN_COSINE = 0.999
VALIDATE_PLANES = 4  # planes of the first batch re-run in fp32 torch to validate an engine
VALIDATE_PIXELS = 4 * 256 * 256  # ... fewer (at least one) when planes are larger: fp32 at 768 px is ~1 s a plane
VALIDATE_SIDE = 256  # side of the centre crop validated when height and width are dynamic (fields)
# input shapes compiled per module: each new (H, W) costs a reshape of the shared trace, a compile and a
# validation (0.3-1.5 s at 64-768 px, cached on disk); a folder of crops of many sizes runs its further
# shapes on the torch fallback instead. 12 = 6 sizes at a two-scale head's 2 shapes each
MAX_SHAPES = 12
_PACKAGES = {"openvino": "openvino", "onnxruntime": "onnxruntime"}


def check_engine(engine: str | None) -> str:
    """Validate an ``--engine`` value; ``None`` means ``auto``."""
    engine = "auto" if engine in (None, "") else str(engine).lower()
    if engine not in ENGINES:
        raise MicrosnoopError(f"unknown engine '{engine}' ({', '.join(ENGINES)})")
    if engine in _PACKAGES and not installed(engine):
        from ..core.extras import missing_package_message

        raise MicrosnoopError(missing_package_message(_PACKAGES[engine], f"--engine {engine}")
                              + " (or use --engine auto / torch)")
    return engine


def installed(engine: str) -> bool:
    """Whether the engine's package can be imported (without importing it)."""
    if engine == "torch":
        return True
    return importlib.util.find_spec(_PACKAGES[engine]) is not None


def engine_version(engine: str) -> str:
    """The installed package version (a path component of the cache: no build suffixes or slashes)."""
    from importlib.metadata import version

    return version(_PACKAGES[engine]) if engine in _PACKAGES else torch.__version__.split("+")[0]


def cache_root() -> Path:
    """Where exported graphs live: ``$MICROSNOOP_CACHE/engines``, else ``~/.cache/microsnoop/engines``."""
    base = os.environ.get("MICROSNOOP_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or
                                                               os.path.expanduser("~/.cache"), "microsnoop")
    return Path(base) / "engines"


def module_digest(module: torch.nn.Module, extra: dict[str, Any] | None = None) -> str:
    """sha256 of a module's parameters and buffers (names, dtypes, shapes, bytes) plus ``extra`` (head config)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    h.update(json.dumps(extra or {}, sort_keys=True, default=str).encode())
    return h.hexdigest()


def head_config(module: torch.nn.Module) -> dict[str, Any]:
    """The parts of a module's behaviour not held in its weights (levels pooled, pooling, class)."""
    return {"class": type(module).__qualname__, "levels": list(getattr(module, "levels", []) or []),
            "pool": getattr(module, "pool", None), "depth": getattr(module, "depth", None),
            "post": type(getattr(module, "post", None)).__qualname__}


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two (N, D) arrays (1.0 where both rows are zero)."""
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    dot = (a * b).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = dot / (na * nb)
    return np.where((na == 0) & (nb == 0), 1.0, np.nan_to_num(cos, nan=0.0))


# ---------------------------------------------------------------- compilation, per engine


def _atomic_dir(final: Path, write: Callable[[Path], None]) -> Path:
    """Write a cache entry into a temporary folder, then rename it into place (no half-written entries)."""
    if final.exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".", dir=final.parent))
    try:
        write(tmp)
        os.replace(tmp, final)
    except OSError:
        if not final.exists():  # another process may have won the race; otherwise it is a real error
            raise
    finally:
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return final


@functools.cache
def _openvino_core():
    """The process's one OpenVINO Core, kept until exit.

    Why one: each Core's CPU plugin swaps in its own signal alternate stack on the thread that loads it and
    unmaps it when the Core dies, restoring the previous stack only if its own is still current. Two Cores
    released in the order they were made (an engine per input shape) leave the thread's alternate stack pointing
    at unmapped memory, and the next Python-handled signal (SIGCHLD from a DataLoader worker, Ctrl-C) kills the
    process with SIGSEGV. One Core also loads the plugin once instead of once per shape.
    """
    import openvino as ov

    return ov.Core()


TRACE_SIDE = 64  # side of the crop an (N, C, H, W) module is traced on for OpenVINO (shared by every shape)


def _openvino_traced(module: torch.nn.Module, example: torch.Tensor, entry: Path) -> Path:
    """The module converted once, with batch, height and width dynamic, traced on a small crop: each input
    shape then only reshapes and compiles it. Why: tracing runs the module on the example, so converting
    per shape cost 2-5 s at 224-768 px (most of a new shape's set-up) against ~0.2 s for the compile.
    Cache entry ``<digest>-traced`` beside the per-shape entries (same digest: same weights and head)."""
    import openvino as ov

    def write(folder: Path) -> None:
        small = example[..., :min(TRACE_SIDE, example.shape[-2]), :min(TRACE_SIDE, example.shape[-1])].contiguous()
        with torch.no_grad():
            model = ov.convert_model(module, example_input=small)
        shape = [-1 if i in (0, 2, 3) else int(s) for i, s in enumerate(small.shape)]
        model.reshape({model.inputs[0]: ov.PartialShape(shape)})
        ov.save_model(model, folder / "model.xml", compress_to_fp16=False)

    return _atomic_dir(entry.with_name(entry.name.split("-", 1)[0] + "-traced"), write)


def _openvino_compile(module: torch.nn.Module, example: torch.Tensor, entry: Path, precision: str,
                      threads: int, dynamic: tuple[int, ...]) -> Callable[[np.ndarray], list[np.ndarray]]:
    import openvino as ov

    core = _openvino_core()

    def write(folder: Path) -> None:
        if example.dim() == 4:  # the shared trace, reshaped to this entry's shape (validated on first use)
            model = core.read_model(_openvino_traced(module, example, entry) / "model.xml")
        else:
            with torch.no_grad():
                model = ov.convert_model(module, example_input=example)
        shape = [(-1 if i in dynamic else int(s)) for i, s in enumerate(example.shape)]
        model.reshape({model.inputs[0]: ov.PartialShape(shape)})
        ov.save_model(model, folder / "model.xml", compress_to_fp16=False)

    _atomic_dir(entry, write)
    config = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
              "INFERENCE_NUM_THREADS": int(threads), "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1,
              "CACHE_DIR": str(entry / "compiled")}  # OpenVINO's own blob cache: later runs skip compiling
    compiled = core.compile_model(core.read_model(entry / "model.xml"), "CPU", config)
    request = compiled.create_infer_request()

    def run(x: np.ndarray) -> list[np.ndarray]:
        res = request.infer({0: x}, share_inputs=True)
        return [np.array(res[o]) for o in compiled.outputs]  # copy: the request reuses its buffers

    return run


def _onnxruntime_compile(module: torch.nn.Module, example: torch.Tensor, entry: Path, precision: str,
                         threads: int, dynamic: tuple[int, ...]) -> Callable[[np.ndarray], list[np.ndarray]]:
    import onnxruntime as ort

    def write(folder: Path) -> None:
        n_out = _count_outputs(module, example)
        names = [f"y{i}" for i in range(n_out)]
        axes = {"x": {i: f"d{i}" for i in dynamic}}
        with torch.no_grad():
            torch.onnx.export(module, (example,), str(folder / "model.onnx"), input_names=["x"], output_names=names,
                              dynamic_axes=axes, opset_version=17, dynamo=False)

    _atomic_dir(entry, write)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(entry / "model.onnx"), opts, providers=["CPUExecutionProvider"])

    def run(x: np.ndarray) -> list[np.ndarray]:
        return sess.run(None, {"x": x})

    return run


def _count_outputs(module: torch.nn.Module, example: torch.Tensor) -> int:
    with torch.no_grad():
        y = module(example)
    return len(y) if isinstance(y, (tuple, list)) else 1


COMPILERS = {"openvino": _openvino_compile, "onnxruntime": _onnxruntime_compile}


class EngineModule(torch.nn.Module):
    """An exported copy of ``reference`` run by OpenVINO or ONNX Runtime; torch tensors in and out.

    Parameters
    ----------
    reference : nn.Module
        The fp32 torch module to reproduce (kept for validation and as the fallback).
    engine : str
        ``openvino`` or ``onnxruntime``.
    precision : str
        ``bf16`` (OpenVINO's bf16 inference hint) or ``fp32``.
    threads : int
        Intra-op threads of the engine.
    dynamic : tuple of int
        Input dimensions left dynamic in the export (default: the batch). A shape's other
        dimensions get their own export and validation.
    fallback : nn.Module, optional
        What runs when the engine fails (default ``reference``), e.g. the bf16 torch module.
    """

    def __init__(self, reference: torch.nn.Module, engine: str, precision: str = "bf16", threads: int | None = None,
                 dynamic: tuple[int, ...] = (0,), fallback: torch.nn.Module | None = None,
                 min_cosine: float = MIN_COSINE):
        super().__init__()
        self.reference = reference.float().eval()
        self.fallback_module = fallback if fallback is not None else self.reference
        # ONNX Runtime's CPU provider has no bf16 convolutions: it always runs fp32
        self.engine, self.precision = engine, ("fp32" if engine == "onnxruntime" else precision)
        self.threads = int(threads or torch.get_num_threads())
        self.dynamic, self.min_cosine = tuple(dynamic), float(min_cosine)
        self.digest = module_digest(self.reference, head_config(self.reference))
        self._runs: dict[tuple, Callable[[np.ndarray], list[np.ndarray]]] = {}
        self.failed: str | None = None  # reason the engine was abandoned (then the fallback runs)
        self.validation: dict[str, float] = {}  # shape -> min cosine to fp32 torch on the first batch
        self.batches = 0  # batches the engine itself ran (before any fallback)
        self.torch_batches = 0  # batches of shapes beyond MAX_SHAPES, run by the fallback

    def _key(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """``shape`` with the dynamic dimensions as -1: one compiled runner and cache entry per key."""
        return tuple(-1 if i in self.dynamic else int(s) for i, s in enumerate(shape))

    def cache_entry(self, shape: tuple[int, ...]) -> Path:
        key = self._key(shape)
        tag = "x".join("d" if s < 0 else str(s) for s in key)
        return cache_root() / f"{self.engine}-{engine_version(self.engine)}" / f"{self.digest[:24]}-{tag}"

    def _compile(self, x: torch.Tensor) -> Callable[[np.ndarray], list[np.ndarray]]:
        """The engine's runner for ``x``'s shape: exported (or read from the cache), compiled and validated."""
        key = self._key(x.shape)
        run = self._runs.get(key)
        if run is not None:
            return run
        t = time.perf_counter()
        example = x[:1].detach().float()
        if 2 in self.dynamic and 3 in self.dynamic:  # dynamic height and width: trace on a small crop (cheap)
            example = example[..., :min(64, x.shape[2]), :min(64, x.shape[3])]
        example = example.contiguous()
        entry = self.cache_entry(x.shape)
        run = COMPILERS[self.engine](self.reference, example, entry, self.precision, self.threads, self.dynamic)
        self._validate(x, run, entry)
        self._runs[key] = run
        log.info("engine %s (%s) ready for input %s in %.1f s (min cosine to fp32 torch %.6f)", self.engine,
                 self.precision, tuple(x.shape[1:]), time.perf_counter() - t, self.validation[_shape_tag(x)])
        return run

    def _validate(self, x: torch.Tensor, run: Callable[[np.ndarray], list[np.ndarray]], entry: Path) -> None:
        """The engine's output on up to VALIDATE_PLANES of this (real) batch vs the fp32 torch module, on the
        cache entry's first use; the result is kept in the entry (``validated.json``) for later runs."""
        record = entry / f"validated-{self.precision}.json"
        try:
            done = json.loads(record.read_text())
            if done.get("min_cosine", 0.0) >= self.min_cosine:
                self.validation[_shape_tag(x)] = float(done["min_cosine"])
                return
        except (OSError, ValueError):
            pass
        whole_fields = 2 in self.dynamic and 3 in self.dynamic
        per_pixels = max(1, VALIDATE_PIXELS // (x.shape[-2] * x.shape[-1]))
        n = VALIDATE_PLANES if whole_fields else min(VALIDATE_PLANES, per_pixels)
        probe = x[:n].detach().float()
        if whole_fields:  # a real centre crop keeps the fp32 pass short
            h, w = (min(VALIDATE_SIDE, d - d % 16) or d for d in x.shape[2:])
            y0, x0 = (x.shape[2] - h) // 2, (x.shape[3] - w) // 2
            probe = probe[..., y0:y0 + h, x0:x0 + w]
        probe = probe.contiguous()
        with torch.inference_mode():
            ref = _as_tuple(self.reference(probe))
        got = run(np.ascontiguousarray(probe.numpy()))
        if len(got) != len(ref):
            raise EngineError(f"{self.engine} returned {len(got)} outputs, torch {len(ref)}")
        worst = min(float(cosine_rows(np.asarray(g), r.float().numpy()).min()) for g, r in zip(got, ref))
        self.validation[_shape_tag(x)] = worst
        if not worst >= self.min_cosine:
            raise EngineError(f"{self.engine} output at cosine {worst:.5f} < {self.min_cosine} to fp32 torch "
                              f"on the first batch of shape {tuple(x.shape[1:])}")
        from ..io.atomic import atomic_path

        with atomic_path(record) as tmp:
            tmp.write_text(json.dumps({"min_cosine": worst, "planes": int(len(probe)), "shape": list(probe.shape[1:]),
                                       "time": time.time()}))

    def _new_shape_over_cap(self, x: torch.Tensor) -> bool:
        key = self._key(x.shape)
        if key in self._runs or len(self._runs) < MAX_SHAPES:
            return False
        if not self.torch_batches:
            log.info("engine %s: %d input shapes compiled; further shapes (e.g. %s) run on torch", self.engine,
                     MAX_SHAPES, tuple(x.shape[1:]))
        self.torch_batches += 1
        return True

    def forward(self, x: torch.Tensor):
        if self.failed is None and not self._new_shape_over_cap(x):
            try:
                run = self._compile(x)
                out = run(np.ascontiguousarray(x.detach().float().numpy()))
                self.batches += 1
                res = tuple(torch.from_numpy(np.asarray(o, dtype=np.float32)) for o in out)
                return res[0] if len(res) == 1 else res
            except Exception as exc:  # noqa: BLE001 - any engine failure means: fall back, loudly
                self.failed = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
                log.warning("engine %s failed (%s); falling back to torch", self.engine, self.failed)
        return self.fallback_module(_like(x, self.fallback_module))

    @property
    def name(self) -> str:
        """The engine that ran: ``openvino``, ``torch`` (fell back before any batch),
        ``openvino, then torch`` when it failed part-way (the reason is in :attr:`failed` and the log) or
        ``openvino+torch`` when shapes beyond :data:`MAX_SHAPES` ran on torch."""
        if not self.failed:
            return f"{self.engine}+torch" if self.torch_batches and self.batches else self.engine
        return f"{self.engine}, then torch" if self.batches else "torch"



class EngineError(RuntimeError):
    """An engine produced results that failed validation."""


def _shape_tag(x: torch.Tensor) -> str:
    return "x".join(str(s) for s in x.shape[1:])


def _as_tuple(y: Any) -> tuple:
    return tuple(y) if isinstance(y, (tuple, list)) else (y,)


def _like(x: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
    """``x`` in the dtype of ``module``'s parameters (the bf16 fallback takes bf16 input)."""
    p = next(module.parameters(), None)
    x = x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x
    return x.to(p.dtype) if p is not None and p.dtype != x.dtype else x


def resolve_engine(engine: str | None, device: torch.device | str, precision: str) -> tuple[str, str]:
    """(engine to try, reason) for this device and precision: ``auto`` = ``$MICROSNOOP_ENGINE`` when set,
    else the first installed of :data:`AUTO_ORDER` on CPU, else torch; engines other than torch need the CPU."""
    engine = check_engine(engine)
    dev = torch.device(device).type if not isinstance(device, torch.device) else device.type
    if engine == "torch":
        return "torch", "asked for"
    if dev != "cpu":
        if engine != "auto":
            log.warning("--engine %s runs on the CPU only; using torch on %s", engine, dev)
        return "torch", f"device {dev}"
    if precision == "fp16":
        return "torch", "fp16 is not a CPU engine precision"
    if engine != "auto":
        return engine, "asked for"
    env = os.environ.get("MICROSNOOP_ENGINE", "").strip().lower()
    if env and env != "auto":  # a site- or test-wide default for auto
        return resolve_engine(env, device, precision)[0], f"MICROSNOOP_ENGINE={env}"
    # measured on a quiet machine (docs/scaling.md): OpenVINO bf16 runs the encoder at 3.8-4.4x eager
    # (96-224 px) and the Cellpose network at 3.7x bf16 torch; each export is validated against fp32
    # on first use, else torch runs
    for name in AUTO_ORDER:
        if installed(name):
            return name, f"auto: {name} installed"
    return "torch", "auto: torch (no optional engine installed: pip install 'microsnoop[fast]')"


def engine_module(reference: torch.nn.Module, engine: str | None, device: torch.device | str, precision: str,
                  fallback: torch.nn.Module | None = None, threads: int | None = None,
                  dynamic: tuple[int, ...] = (0,)) -> torch.nn.Module | None:
    """An :class:`EngineModule` for ``reference``, or ``None`` when torch should run (reason logged)."""
    name, why = resolve_engine(engine, device, precision)
    if name == "torch":
        log.info("engine: torch (%s)", why)
        return None
    try:
        return EngineModule(reference, name, precision, threads, dynamic, fallback)
    except Exception as exc:  # noqa: BLE001
        log.warning("engine %s unavailable (%s: %s); using torch", name, type(exc).__name__, exc)
        return None
