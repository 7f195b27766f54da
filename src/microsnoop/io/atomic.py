"""Write-then-rename helpers so a crash never leaves a half-written file under the final name."""
from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from pathlib import Path
from typing import Iterator

_UMASK_LOCK = threading.Lock()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        # mkstemp files are private (0600); give the result the mode a plain open() would (0666 - umask),
        # so outputs on a lab's shared filesystem are readable as the user's other files are
        if tmp.exists():
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
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


def save_npy_atomic(path: str | os.PathLike, array) -> None:
    import numpy as np

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, array)
