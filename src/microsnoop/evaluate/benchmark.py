"""``microsnoop benchmark``: embed labelled sets with each model once, then score every protocol.

Embeddings are cached in ``REPORT_DIR/cache`` under a key made of the images' sha256, the model's
sha256 and the precision, so re-scoring (new protocol, new plot) never re-embeds, and a changed
image file or model can never reuse a stale embedding. Sets of kind ``fields`` go through the
whole-field pipeline when ``microsnoop.pipelines.field_sets.embed_fields_dataset`` exists; otherwise
they are skipped with a message in the console and in the report, never silently.
"""
from __future__ import annotations

import contextlib
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable, Sequence

import numpy as np
import pandas as pd

from ..core.errors import MicrosnoopError
from ..embed import defaults
from ..io.atomic import atomic_path, save_npy_atomic
from .protocols import ProtocolResult, protocol_key, run_protocol

log = logging.getLogger("microsnoop")

ProgressFactory = Callable[[int, str], "tuple[ContextManager, Callable[[int], None]]"]
CHUNK = 256  # images per engine call: bounds memory and drives the progress bar


@dataclass
class BenchmarkSet:
    """A labelled set in the shared-data format: images.npy + metadata.csv + dataset.json."""

    path: Path
    info: dict[str, Any]
    metadata: pd.DataFrame
    images: np.ndarray  # memory-mapped (N, C, H, W)
    data_sha256: str

    @property
    def name(self) -> str:
        return str(self.info.get("name") or self.path.name)

    @property
    def kind(self) -> str:
        return str(self.info.get("kind", "single_cell"))

    @property
    def label(self) -> str:
        return str(self.info["label"])

    @property
    def protocols(self) -> list[dict[str, Any]]:
        return list(self.info.get("protocols", []))


@dataclass
class SetResult:
    dataset: str
    model: str
    model_sha256: str
    embed_s: float
    X: np.ndarray
    metadata: pd.DataFrame
    label: str
    results: list[tuple[str, ProtocolResult, float]] = field(default_factory=list)  # (column key, result, wall_s)


@dataclass
class BenchmarkRun:
    """Everything the report needs: records, per-set results (for plots), models and skipped pairs."""

    records: list[dict[str, Any]]
    set_results: list[SetResult]
    datasets: dict[str, dict[str, Any]]
    models: dict[str, dict[str, Any]]
    skipped: list[dict[str, str]]
    settings: dict[str, Any]


def sha256_files(paths: Iterable[Path]) -> str:
    """One digest over several files (their bytes in order): the data part of the cache key."""
    from ..core.hashing import hash_files

    return hash_files(paths).hexdigest()


def load_set(path: str | Path) -> BenchmarkSet:
    """Read and check one set; problems are user errors naming the file."""
    from ..io.dataset import load_set_folder

    s = load_set_folder(path, ("images.npy", "metadata.csv", "dataset.json"), "not a benchmark set")
    if "label" not in s.info:
        raise MicrosnoopError("dataset.json has no 'label' column", s.folder / "dataset.json")
    masks = s.folder / "masks.npy"
    data_files = [s.images_path] + ([masks] if masks.exists() else [])
    return BenchmarkSet(s.folder, s.info, s.metadata, s.images, sha256_files(data_files))


def fields_hook() -> Callable[..., tuple[pd.DataFrame, np.ndarray]] | None:
    """The whole-field pipeline's entry point, if that pipeline is installed in this version."""
    try:
        from ..pipelines import field_sets as fields_pipeline
    except ImportError:
        return None
    return getattr(fields_pipeline, "embed_fields_dataset", None)


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "model"


def _no_progress(total: int, label: str) -> tuple[ContextManager, Callable[[int], None]]:
    return contextlib.nullcontext(), lambda n: None


class EmbeddingCache:
    """``.npy`` + ``.json`` per (set, model) in ``REPORT_DIR/cache``; the json keeps the original embed time."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)

    def key(self, bset: BenchmarkSet, model: str, model_sha: str, precision: str, mode: str | None) -> str:
        mode_s = f"__{safe_name(mode)}" if mode else ""
        return f"{safe_name(bset.name)}__{safe_name(model)}__{bset.data_sha256[:16]}__{model_sha[:16]}__{precision}{mode_s}"

    def load(self, key: str) -> tuple[pd.DataFrame | None, np.ndarray, dict[str, Any]] | None:
        npy, meta_json = self.dir / f"{key}.npy", self.dir / f"{key}.json"
        if not (npy.exists() and meta_json.exists()):
            return None
        info = json.loads(meta_json.read_text())
        meta = None
        if info.get("metadata_csv"):
            meta = pd.read_csv(self.dir / info["metadata_csv"])
        return meta, np.load(npy), info

    def save(self, key: str, X: np.ndarray, info: dict[str, Any], meta: pd.DataFrame | None = None) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if meta is not None:  # the fields pipeline makes its own rows; keep them beside the vectors
            info = {**info, "metadata_csv": f"{key}.metadata.csv"}
            with atomic_path(self.dir / info["metadata_csv"]) as tmp:
                meta.to_csv(tmp, index=False)
        save_npy_atomic(self.dir / f"{key}.npy", np.asarray(X, dtype=np.float32))
        with atomic_path(self.dir / f"{key}.json") as tmp:
            tmp.write_text(json.dumps(info, indent=1, sort_keys=True))


def embed_array(images: np.ndarray, embedder: Any, progress: Callable[[int], None]) -> np.ndarray:
    """Embed a memory-mapped (N, C, H, W) array chunk by chunk (bounded memory, live progress)."""
    parts = []
    for s in range(0, len(images), CHUNK):
        chunk = np.asarray(images[s:s + CHUNK])
        parts.append(embedder.embed(chunk, name=lambda i: f"image {i}", offset=s))
        progress(len(chunk))
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def fields_cache_tag(fields_mode: str | None, fields_options: dict[str, Any] | None) -> str | None:
    """The part of the cache key that says how fields were turned into vectors."""
    opts = {k: v for k, v in sorted((fields_options or {}).items()) if v is not None}
    if not fields_mode and not opts:
        return None
    return "_".join([fields_mode or "default"] + [f"{k}={v}" for k, v in opts.items()])


def _accepted(fn: Callable[..., Any], kwargs: dict[str, Any], always: Sequence[str] = ()) -> dict[str, Any]:
    """The keyword arguments ``fn`` takes (the user's own options always go through, so a hook that
    does not know one fails loudly rather than silently ignoring it)."""
    import inspect

    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params or k in always}


def embed_set(bset: BenchmarkSet, embedder: Any, cache: EmbeddingCache, progress_factory: ProgressFactory,
              fields_mode: str | None = None, fields_options: dict[str, Any] | None = None
              ) -> tuple[pd.DataFrame, np.ndarray, float] | str:
    """(metadata, X, seconds it took to embed) from the cache or the engine; a string = reason to skip."""
    enc = embedder.encoder
    hook = fields_hook() if bset.kind == "fields" else None
    if bset.kind == "fields" and hook is None:
        return ("kind 'fields' needs the whole-field pipeline (microsnoop.pipelines.field_sets."
                "embed_fields_dataset), which this version does not have: skipped")
    if bset.kind not in ("single_cell", "fields"):
        return f"unknown set kind '{bset.kind}': skipped"
    key = cache.key(bset, enc.name, enc.sha256, embedder.precision,
                    fields_cache_tag(fields_mode, fields_options) if hook else None)
    hit = cache.load(key)
    if hit is not None:
        meta, X, info = hit
        log.info("%s x %s: cached embeddings %s", bset.name, enc.name, key)
        return (bset.metadata if meta is None else meta), X, float(info.get("embed_s", 0.0))
    t0 = time.perf_counter()
    if hook is not None:
        kwargs = {"mode": fields_mode} if fields_mode else {}
        kwargs.update({k: v for k, v in (fields_options or {}).items() if v is not None})
        kwargs.update(cache_dir=cache.dir / "segmentations", data_sha256=bset.data_sha256)  # segment once per set
        kwargs = _accepted(hook, kwargs, always=("mode", *(fields_options or {})))
        meta, X = hook(bset.path, embedder, **kwargs)
        meta = pd.DataFrame(meta).reset_index(drop=True)
    else:
        prog, advance = progress_factory(len(bset.images), f"{bset.name} x {enc.name}")
        with prog:
            X = embed_array(bset.images, embedder, advance)
        meta = None
    embed_s = time.perf_counter() - t0
    info = {"dataset": bset.name, "data_sha256": bset.data_sha256, "model": enc.name, "model_sha256": enc.sha256,
            "precision": embedder.precision, "device": str(embedder.device), "embed_s": round(embed_s, 3),
            "shape": list(X.shape), "fields_mode": fields_mode if hook else None,
            "fields_options": (fields_options or None) if hook else None}
    cache.save(key, X, info, meta)
    return (bset.metadata if meta is None else meta), np.asarray(X, np.float32), embed_s


def record_for(bset: BenchmarkSet, model: str, model_sha: str, column: str, res: ProtocolResult,
               wall_s: float, embed_s: float) -> dict[str, Any]:
    """One report.json row: identifiers, the protocol's parameters, scores and timings."""
    rec: dict[str, Any] = {"dataset": bset.name, "model": model, "model_sha256": model_sha,
                           "protocol": res.protocol, "column": column}
    rec.update(res.params)
    rec.update({"accuracy": round(res.accuracy, 6), "macro_f1": round(res.macro_f1, 6), "n": res.n})
    for k, v in res.extra.items():
        rec[k] = round(v, 6) if isinstance(v, float) else v
    rec.update({"wall_s": round(wall_s, 3), "embed_s": round(embed_s, 3)})
    return rec


TIMING_KEYS = ("wall_s", "embed_s")


def build_embedder(model: str, device: str, precision: str, batch_size: int | None, threads: int | None = None) -> Any:
    from ..embed import Embedder

    return Embedder(model, device=device, precision=precision, batch_size=batch_size, threads=threads)


def run_benchmark(dataset_dirs: Sequence[str | Path], models: Sequence[str], report_dir: str | Path, *,
                  device: str = defaults.DEVICE, precision: str = defaults.PRECISION,
                  batch_size: int | None = defaults.BATCH_SIZE,
                  skip_missing_models: bool = False, fields_mode: str | None = None,
                  fields_options: dict[str, Any] | None = None, threads: int | None = None,
                  progress_factory: ProgressFactory | None = None,
                  notify: Callable[[str], None] | None = None) -> BenchmarkRun:
    """Embed every set with every model (cached) and score all of each set's protocols.

    ``skip_missing_models`` turns a model whose optional package is missing into a skipped entry (with
    its install hint) instead of an error: what ``refresh`` wants, where every registered model runs.
    """
    if not dataset_dirs:
        raise MicrosnoopError("give at least one benchmark set folder")
    if not models:
        raise MicrosnoopError("give at least one --model")
    notify = notify or (lambda msg: log.warning(msg))
    progress_factory = progress_factory or _no_progress
    sets = [load_set(d) for d in dataset_dirs]
    names = [s.name for s in sets]
    if len(set(names)) != len(names):
        raise MicrosnoopError(f"the same set is given twice: {', '.join(names)}")
    cache = EmbeddingCache(Path(report_dir) / "cache")
    records: list[dict[str, Any]] = []
    set_results: list[SetResult] = []
    skipped: list[dict[str, str]] = []
    model_info: dict[str, dict[str, Any]] = {}
    devices_used: set[str] = set()
    for model in dict.fromkeys(models):
        try:
            embedder = build_embedder(model, device, precision, batch_size, threads)
        except MicrosnoopError as exc:
            if not skip_missing_models:
                raise
            notify(f"model {model}: {exc}")
            skipped.append({"dataset": "*", "model": model, "reason": str(exc)})
            continue
        enc = embedder.encoder
        devices_used.add(embedder.device.type)
        model_info[enc.name] = {"sha256": enc.sha256, "dim_per_channel": int(embedder.dim),
                                "trained": bool(getattr(enc.spec, "trained", True)) if enc.spec else True,
                                "weights": (enc.spec.extra.get("weights") if enc.spec else None) or "learned",
                                "description": enc.spec.description if enc.spec else "checkpoint " + str(model)}
        for bset in sets:
            got = embed_set(bset, embedder, cache, progress_factory, fields_mode, fields_options)
            if isinstance(got, str):
                notify(f"{bset.name} x {enc.name}: {got}")
                skipped.append({"dataset": bset.name, "model": enc.name, "reason": got})
                continue
            meta, X, embed_s = got
            sr = SetResult(bset.name, enc.name, enc.sha256, embed_s, X, meta, bset.label)
            for protocol in bset.protocols:
                t0 = time.perf_counter()
                res = run_protocol(X, meta, protocol, bset.label)
                wall = time.perf_counter() - t0
                column = protocol_key(protocol, bset.label)
                sr.results.append((column, res, wall))
                records.append(record_for(bset, enc.name, enc.sha256, column, res, wall, embed_s))
            set_results.append(sr)
    datasets = {s.name: {"path": str(s.path), "kind": s.kind, "label": s.label, "n_images": int(len(s.images)),
                         "channels": s.info.get("channels"), "data_sha256": s.data_sha256,
                         "protocols": [protocol_key(p, s.label) for p in s.protocols]} for s in sets}
    settings = {"device": device, "precision": precision, "batch_size": batch_size, "fields_mode": fields_mode,
                "fields_options": {k: v for k, v in (fields_options or {}).items() if v is not None} or None,
                "devices_used": sorted(devices_used)}
    return BenchmarkRun(records, set_results, datasets, model_info, skipped, settings)
