"""sha256 of files, read in chunks: weights, data sets and resume digests all hash through here."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Iterable


def hash_files(paths: Iterable[str | Path], h: Any = None, chunk: int = 1 << 20) -> Any:
    """A sha256 hasher fed the bytes of ``paths`` in order, read in chunks (data files can be large);
    returned unfinished so callers can add settings to the digest.

    Parameters
    ----------
    paths : iterable of str or Path
        Files, hashed in this order.
    h : hashlib hash, optional
        A hasher to continue (default: a new sha256).
    chunk : int
        Bytes read at a time.

    Returns
    -------
    hashlib hash
        The hasher, not yet finalised.
    """
    h = h if h is not None else hashlib.sha256()
    for path in paths:
        with open(path, "rb") as fh:
            while block := fh.read(chunk):
                h.update(block)
    return h


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of one file's bytes.

    Parameters
    ----------
    path : str or Path
        The file.
    chunk : int
        Bytes read at a time.

    Returns
    -------
    str
        64 hex digits.
    """
    return hash_files([path], chunk=chunk).hexdigest()
