"""Streaming, resumable embedding of an image source into one output file.

Chunks of ``chunk_size`` images are read, embedded and saved to ``OUT.partial/chunk_NNNNNN.npy``
(each written atomically), so peak memory is one chunk and a killed run restarted with
``resume=True`` skips the chunks already on disk. The output is assembled from the chunk files into
a temp file and renamed; only then is the partial folder removed.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from .. import __version__
from ..errors import MicrosnoopError
from ..io.atomic import atomic_path, save_npy_atomic
from ..io.readers import ImageSource
from ..io.writers import format_for, write_embeddings
from .engine import PADDING, Embedder
from .normalize import NORMALIZATION


def provenance(embedder: Embedder, source: ImageSource, command: str | None = None, **extra: Any) -> dict[str, Any]:
    import torch

    return {
        "microsnoop_version": __version__,
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        **embedder.provenance(),
        "normalization": NORMALIZATION,
        "padding": PADDING,
        "input": str(source.path),
        "n_images": len(source),
        "command": command if command is not None else " ".join(sys.argv),
        **extra,
    }


def partial_dir(output: Path) -> Path:
    return output.with_name(output.name + ".partial")


def prepare_output(output: Path, overwrite: bool, resume: bool) -> Path:
    """Refuse to clobber finished outputs; return the partial folder to work in."""
    work = partial_dir(output)
    if output.exists() and not overwrite:
        raise MicrosnoopError("output already exists (use --overwrite to replace it)", output)
    if work.exists() and not resume:
        if overwrite:
            shutil.rmtree(work)
        else:
            raise MicrosnoopError(f"an unfinished run's chunks are in {work.name} (use --resume to continue it or "
                                  f"--overwrite to start over)", output)
    return work


def check_state(work: Path, state: dict[str, Any]) -> None:
    sp = work / "state.json"
    if sp.exists():
        old = json.loads(sp.read_text())
        diff = [k for k in state if old.get(k) != state[k]]
        if diff:
            raise MicrosnoopError(f"cannot resume: the unfinished run differs in {', '.join(diff)}", work)
    else:
        work.mkdir(parents=True, exist_ok=True)
        with atomic_path(sp) as tmp:
            tmp.write_text(json.dumps(state, indent=1))


def chunk_ranges(n: int, chunk_size: int) -> list[tuple[int, int]]:
    return [(s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)]


def embed_source(source: ImageSource, output: str | Path, *, model: str | None = None, fmt: str | None = None,
                 chunk_size: int = 1024, batch_size: int = 64, device: str = "auto", precision: str = "fp32",
                 resume: bool = False, overwrite: bool = False, command: str | None = None,
                 progress: Callable[[int], None] | None = None, embedder: Embedder | None = None) -> Path:
    """Embed every image of ``source`` into ``output`` (.parquet/.h5/.h5ad); returns the output path."""
    output = Path(output)
    fmt = format_for(output, fmt)
    if chunk_size < 1:
        raise MicrosnoopError("--chunk-size must be at least 1")
    work = prepare_output(output, overwrite, resume)
    embedder = embedder or Embedder(model, device=device, precision=precision, batch_size=batch_size)
    ranges = chunk_ranges(len(source), chunk_size)
    state = {"input": source.fingerprint(), "model_sha256": embedder.encoder.sha256, "model": embedder.encoder.name,
             "chunk_size": chunk_size, "n_images": len(source), "channels": source.channel_names,
             "precision": embedder.precision, "normalization": NORMALIZATION}
    check_state(work, state)
    try:
        files = _embed_chunks(source, embedder, ranges, work, progress)
    except MicrosnoopError:
        # bad input will not get better on resume: leave nothing behind
        shutil.rmtree(work, ignore_errors=True)
        raise
    prov = provenance(embedder, source, command)
    write_embeddings(output, source.metadata, _iter_chunks(files), source.channel_names, embedder.dim, prov, fmt)
    shutil.rmtree(work, ignore_errors=True)
    return output


def _embed_chunks(source: ImageSource, embedder: Embedder, ranges: list[tuple[int, int]], work: Path,
                  progress: Callable[[int], None] | None) -> list[Path]:
    files = []
    for k, (start, stop) in enumerate(ranges):
        path = work / f"chunk_{k:06d}.npy"
        files.append(path)
        if path.exists():
            if progress:
                progress(stop - start)
            continue
        images = source.read(start, stop)
        feats = embedder.embed(images, name=source.name, offset=start)
        save_npy_atomic(path, feats)
        if progress:
            progress(stop - start)
    return files


def _iter_chunks(files: list[Path]) -> Iterator[np.ndarray]:
    for p in files:
        yield np.load(p)
