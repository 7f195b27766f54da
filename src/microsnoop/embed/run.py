"""Streaming, resumable embedding of an image source into one output file.

Chunks of ``chunk_size`` images are read, embedded and saved to ``OUT.partial/chunk_NNNNNN.npy``
(each written atomically, then listed in a journal), so peak memory is about two chunks (the one
being embedded and the one the loader thread prepares) and a killed run restarted with
``resume=True`` skips the chunks already done. The output is assembled from the chunk files into
a temp file and renamed; only then is the partial folder removed.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import queue
import shutil
import sys
import threading
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from ..core.version import __version__
from ..core.errors import MicrosnoopError, MicrosnoopWarning
from ..io.atomic import atomic_path, check_output_path, save_npy_atomic
from ..io.readers import ImageSource
from ..io.writers import format_for, write_embeddings
from . import defaults, distributed as dist
from .engine import PADDING, Embedder
from ..io.normalize import NORMALIZATION


def provenance(embedder: Embedder, source: ImageSource, command: str | None = None, **extra: Any) -> dict[str, Any]:
    """The record written with every output of ``source`` (see :func:`run_provenance`)."""
    return run_provenance(embedder, str(source.path), len(source), command, **extra)


def run_provenance(embedder: Embedder, input: str, n_images: int, command: str | None = None,
                   **extra: Any) -> dict[str, Any]:
    """How the vectors were made: versions, the model and its head, normalisation, padding, the input.

    Parameters
    ----------
    embedder : Embedder
        The embedder that ran.
    input : str
        What was embedded (a path, or a description such as ``in-memory images``).
    n_images : int
        Images embedded.
    command : str, optional
        The command line; default: ``sys.argv`` joined.
    **extra
        More keys (e.g. ``world_size``).

    Returns
    -------
    dict
        JSON-serialisable provenance.
    """
    import torch

    return {
        "microsnoop_version": __version__,
        "torch_version": str(torch.__version__),
        "numpy_version": np.__version__,
        **embedder.provenance(),
        "normalization": NORMALIZATION,
        "padding": PADDING,
        "input": input,
        "n_images": n_images,
        "command": command if command is not None else " ".join(sys.argv),
        **extra,
    }


def partial_dir(output: Path) -> Path:
    return output.with_name(output.name + ".partial")


def prepare_output(output: Path, overwrite: bool, resume: bool) -> Path:
    """Refuse to clobber finished outputs or write where we cannot; return the partial folder to work in."""
    check_output_path(output)
    work = partial_dir(output)
    if work.exists() and not work.is_dir():
        raise MicrosnoopError(f"a file named {work.name} is in the way of the run's chunk folder; move it", output)
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
        try:
            old = json.loads(sp.read_text())
            if not isinstance(old, dict):
                raise ValueError("not a JSON object")
        except (ValueError, OSError) as exc:
            raise MicrosnoopError(f"cannot resume: its state.json is damaged ({type(exc).__name__}); use --overwrite "
                                  f"to start over", work) from None
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
                 chunk_size: int = defaults.CHUNK_SIZE, batch_size: int | None = defaults.BATCH_SIZE,
                 device: str = defaults.DEVICE, precision: str = defaults.PRECISION,
                 resume: bool = False, overwrite: bool = False, command: str | None = None,
                 progress: Callable[[int], None] | None = None, embedder: Embedder | None = None,
                 shard: tuple[int, int] | None = None, merge: bool = False) -> Path:
    """Embed every image of ``source`` into ``output``; under torchrun every rank embeds its share of the
    chunks and rank 0 merges them (``distributed``).

    Parameters
    ----------
    source : ImageSource
        From :func:`microsnoop.open_source` (.npy/.npz, folder, manifest, OME-Zarr plate, image).
    output : str or Path
        .parquet, .h5 or .h5ad (or ``fmt``); read it back with :func:`microsnoop.read_embeddings`.
    model, batch_size, device, precision
        As in :func:`microsnoop.embed`, with the same defaults (``microsnoop.embed.defaults``) as the CLI;
        a given ``embedder`` (an ``Embedder``) replaces them.
    chunk_size, resume, overwrite, command, progress
        Images per chunk (the resume unit); continue from finished chunks; replace an output; the command
        line for the provenance; a callback given the images finished.
    shard, merge
        ``(i, n)``: embed only chunks ``k % n == i`` and stop; ``merge``: write the output from all shards.

    Returns
    -------
    Path
        The output file.
    """
    output = Path(output)
    fmt = format_for(output, fmt)
    if chunk_size < 1:
        raise MicrosnoopError("--chunk-size must be at least 1")
    embedder = embedder or Embedder(model, device=device, precision=precision, batch_size=batch_size)
    d = dist.Dist(*shard) if shard is not None else dist.init(embedder.device)
    work = partial_dir(output)
    ranges = chunk_ranges(len(source), chunk_size)
    head = {k: embedder.encoder.config.get(k) for k in ("levels", "pool", "tta", "scales") if k in getattr(embedder.encoder, "config", {})}
    state = {"input": source.fingerprint(), "model_sha256": embedder.encoder.sha256, "model": embedder.encoder.name,
             "head": head,
             "chunk_size": chunk_size, "n_images": len(source), "channels": source.channel_names,
             "precision": embedder.precision, "normalization": NORMALIZATION}
    fresh = True
    if shard is not None or merge:   # every shard joins (or starts) the same partial folder
        fresh = False  # other shards' chunks live there too: never delete them
        if output.exists() and not overwrite:
            raise MicrosnoopError("output already exists (use --overwrite to replace it)", output)
        check_state(work, state)
        if merge:
            _check_merge(work, ranges)
    elif d.main:
        work = prepare_output(output, overwrite, resume)
        fresh = not work.exists()
        check_state(work, state)
        if not fresh:
            verify_finished_chunks(source, work, ranges)
    dist.barrier(d)
    try:
        files = _embed_chunks(source, embedder, ranges, work, progress if (d.main or shard) else None, d)
        if shard is not None:
            return output
        dist.barrier(d)
        if d.main:
            digests = dist.finished_digests(work)
            input_digest = hashlib.sha256("".join(digests.get(k) or "?" for k in range(len(ranges))).encode())
            prov = provenance(embedder, source, command, world_size=d.world,
                              input_sha256_of_chunks=input_digest.hexdigest())
            write_embeddings(output, source.metadata, _iter_chunks(files, ranges), source.channel_names,
                             embedder.dim, prov, fmt)
            shutil.rmtree(work, ignore_errors=True)
    except MicrosnoopError:
        # bad input will not get better on resume: leave nothing behind that this run created
        # (and never another shard's chunks)
        if fresh:
            shutil.rmtree(work, ignore_errors=True)
        raise
    dist.barrier(d)
    dist.finish(d)
    return output


def _check_merge(work: Path, ranges: list[tuple[int, int]]) -> None:
    """--merge embeds nothing: every chunk must have been finished by some shard."""
    done = dist.finished_chunks(work)
    missing = [k for k in range(len(ranges)) if k not in done or not (work / f"chunk_{k:06d}.npy").exists()]
    if missing:
        raise MicrosnoopError(f"cannot merge: {len(missing)} of {len(ranges)} chunks are not finished (e.g. chunk "
                              f"{missing[0]}, images {ranges[missing[0]][0]}-{ranges[missing[0]][1] - 1}); run the "
                              f"missing shards first", work)


def _embed_chunks(source: ImageSource, embedder: Embedder, ranges: list[tuple[int, int]], work: Path,
                  progress: Callable[[int], None] | None, d: dist.Dist = dist.Dist()) -> list[Path]:
    """Embed this rank's unfinished chunks; a loader thread reads and normalises chunk k+1 while
    the encoder runs on chunk k. Returns every chunk's shard path, in input order."""
    files = [work / f"chunk_{k:06d}.npy" for k in range(len(ranges))]
    width = source.n_channels * embedder.dim
    done = {k for k in dist.finished_chunks(work)
            if k < len(files) and _chunk_ok(files[k], ranges[k][1] - ranges[k][0], width)}
    todo = [k for k in range(len(ranges)) if k not in done and d.owns(k)]
    if progress:
        progress(sum(stop - start for k, (start, stop) in enumerate(ranges) if k in done))
        left = sum(stop - start for k, (start, stop) in enumerate(ranges) if k not in done)
        mine = sum(ranges[k][1] - ranges[k][0] for k in todo)
        scale = left / mine if mine else 1.0  # rank 0 reports for all ranks, assuming equal speed

    def load(k: int):
        start, stop = ranges[k]
        h = hashlib.sha256()
        images = source.read(start, stop, h)  # the digest of exactly the bytes embedded, read once
        _drop_mapped_pages(source)
        return embedder.prepare(images, name=source.name, offset=start), h.hexdigest()

    for k, (prepared, digest) in prefetch(load, todo):
        feats = embedder.encode(prepared, name=source.name, offset=ranges[k][0])
        save_npy_atomic(files[k], feats)
        dist.record(work, d, k, *ranges[k], digest=digest)
        if progress:
            progress(round((ranges[k][1] - ranges[k][0]) * scale))
    return files


def _drop_mapped_pages(source: ImageSource) -> None:
    """Memory-mapped inputs: tell the kernel we are done with the pages read so far.

    Pages of a read-only mapping stay in the process's resident set (and in ru_maxrss) until the
    kernel needs them back, so reading a 20k-image .npy would look like 20k images of memory.
    MADV_DONTNEED drops them from this process (the page cache keeps the file for the next read)."""
    arr = getattr(source, "array", None)
    while arr is not None and not isinstance(arr, np.memmap):
        arr = getattr(arr, "base", None)
    mm = getattr(arr, "_mmap", None)
    if mm is not None and hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        try:
            mm.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):
            pass


def prefetch(load: Callable[[int], Any], keys: list[int], depth: int = 1) -> Iterator[tuple[int, Any]]:
    """Yield (key, load(key)) in order, computing up to ``depth`` items ahead in a thread.

    numpy's reading, percentile and copies release the GIL, so on a CPU the loader overlaps the
    encoder; on a GPU it hides all of the host-side work. Errors surface in the caller, in order."""
    if not keys:
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def worker() -> None:
        for k in keys:
            if stop.is_set():
                return
            try:
                item = (k, load(k), None)
            except BaseException as exc:  # handed to the consumer, which re-raises it
                item = (k, None, exc)
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[2] is not None:
                return

    t = threading.Thread(target=worker, name="microsnoop-loader", daemon=True)
    t.start()
    try:
        for _ in keys:
            k, value, exc = q.get()
            if exc is not None:
                raise exc
            yield k, value
    finally:
        stop.set()
        t.join(timeout=5)


def _chunk_ok(path: Path, rows: int, width: int) -> bool:
    """A finished chunk file is usable: a readable float32 (rows, width) .npy. A damaged one (truncated,
    emptied by a crash before fsync existed, overwritten) is embedded again, with a warning."""
    if not path.exists():
        return False
    try:
        arr = np.load(path, mmap_mode="r")
        ok = arr.dtype == np.float32 and arr.shape == (rows, width) and bool(np.isfinite(arr).all())
    except (OSError, ValueError, EOFError):
        ok = False
    if not ok:
        warnings.warn(f"{path}: damaged chunk file in the unfinished run; embedding those images again",
                      MicrosnoopWarning, stacklevel=2)
    return ok


def verify_finished_chunks(source: ImageSource, work: Path, ranges: list[tuple[int, int]]) -> None:
    """Refuse to resume when the input behind a finished chunk changed (a replaced file of the same size
    and date would otherwise keep its stale vectors). Each chunk's digest was taken from the bytes the
    reader read while embedding it, so the first run reads its input once; resuming re-reads (without
    decoding or embedding) only the finished chunks' input."""
    for k, digest in sorted(dist.finished_digests(work).items()):
        if k >= len(ranges):
            continue
        start, stop = ranges[k]
        if digest is None or source.content_digest(start, stop) != digest:
            raise MicrosnoopError(f"cannot resume: the input of images {start}-{stop - 1} changed since the unfinished "
                                  f"run embedded them ({source.name(start)}); use --overwrite to start over", work)


def _iter_chunks(files: list[Path], ranges: list[tuple[int, int]] | None = None) -> Iterator[np.ndarray]:
    for k, p in enumerate(files):
        try:
            arr = np.load(p)
        except (OSError, ValueError, EOFError) as exc:
            raise MicrosnoopError(f"chunk file is damaged ({type(exc).__name__}); run again with --resume to "
                                  f"embed it again", p) from None
        if ranges is not None and len(arr) != ranges[k][1] - ranges[k][0]:
            raise MicrosnoopError(f"chunk file has {len(arr)} rows, expected {ranges[k][1] - ranges[k][0]}; run "
                                  f"again with --resume to embed it again", p)
        yield arr
