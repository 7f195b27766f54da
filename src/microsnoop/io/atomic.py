"""Write-then-rename helpers so a crash never leaves a half-written file under the final name."""
from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from pathlib import Path
from typing import Iterator

from ..core.errors import MicrosnoopError

_UMASK_LOCK = threading.Lock()


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_output_path(path: str | os.PathLike, kind: str = "file", option: str = "--output") -> Path:
    """Refuse, before any work, an output that cannot be written: a file output that is a folder (or a
    folder output that is a file), a parent that is a file, or a folder we may not write in."""
    path = Path(path)
    if kind == "file" and path.is_dir():
        raise MicrosnoopError(f"{option} is a folder; give a file name such as {path / 'embeddings.parquet'}", path)
    if kind == "folder" and path.exists() and not path.is_dir():
        raise MicrosnoopError(f"{option} must be a folder, but a file of that name exists", path)
    base = _nearest_existing(path.parent)
    if not base.is_dir():
        raise MicrosnoopError(f"{option}: cannot create it inside {base}, which is a file, not a folder", path)
    writable = path if (kind == "folder" and path.is_dir()) else base
    if not os.access(writable, os.W_OK | os.X_OK):
        raise MicrosnoopError(f"{option}: no permission to write in {writable}", path)
    return path


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows, where folders cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    ``fsync``: flush the file's data to disk before the rename and the folder's entry after it, so a
    journal that records the file (and is itself fsynced) never points at a file a crash emptied."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise MicrosnoopError(f"cannot write here ({exc.strerror or exc})", path) from None
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        # mkstemp files are private (0600); give the result the mode a plain open() would (0666 - umask),
        # so outputs on a lab's shared filesystem are readable as the user's other files are
        if tmp.exists():
            os.chmod(tmp, 0o666 & ~_umask())
            if fsync:
                with open(tmp, "rb+") as fh:
                    os.fsync(fh.fileno())
        os.replace(tmp, path)
        if fsync:
            _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def _umask() -> int:
    """The process umask. Reading it means setting it for an instant, which is not thread-safe, so
    it is read under a lock (a loader thread may be creating files at the same time)."""
    with _UMASK_LOCK:
        mask = os.umask(0o077)  # set the strictest mask for that instant, never a looser one
        os.umask(mask)
    return mask


def save_npy_atomic(path: str | os.PathLike, array, fsync: bool = True) -> None:
    """``np.save`` to a temp file, fsynced (by default) and renamed onto ``path``."""
    import numpy as np

    with atomic_path(path, fsync=fsync) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, array)
