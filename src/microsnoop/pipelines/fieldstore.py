"""Finished fields of a plate run, one file each, so no finished field is ever lost.

``<output>.partial/`` holds ``state.json`` (what the fields depend on: input fingerprint, model sha256,
segmentation and crop settings), ``diameter.json`` (the plate's Cellpose diameter, estimated once and
shared by every shard), ``fields/NNNNNN.npz`` (one per finished field: its vector, counts, the kept
cells' table and vectors, and timings) and the previews/masks folders. Each field file is written to a
temp name and renamed, so a killed run leaves only whole files; ``--resume`` and ``--merge`` and the
shards of a ``--shard i/n`` run all read and write the same folder, and the plate's tables are built
from these files in field order whatever process computed them, which is why a sharded run merged
equals the single-process run exactly.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..core.errors import MicrosnoopError
from ..io.atomic import atomic_path
from .crop import CELL_COLUMNS


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"i/n"`` (1 <= i <= n) -> (i - 1, n), zero-based; None for no sharding."""
    if text is None or str(text).strip() == "":
        return None
    try:
        i, n = (int(v) for v in str(text).split("/"))
    except ValueError:
        raise MicrosnoopError(f"--shard expects i/n (e.g. 1/4), got '{text}'") from None
    if n < 1 or not 1 <= i <= n:
        raise MicrosnoopError(f"--shard {text}: i must be between 1 and n")
    return i - 1, n


def shard_fields(n_fields: int, shard: tuple[int, int] | None) -> list[int]:
    """The fields a shard owns: every n-th field from its index (interleaved, so slow wells spread out)."""
    if shard is None:
        return list(range(n_fields))
    i, n = shard
    return list(range(i, n_fields, n))


class FieldStore:
    """The per-field folder of one plate run."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.fields_dir = self.folder / "fields"

    def exists(self) -> bool:
        return self.folder.exists()

    def open(self, state: dict[str, Any], resume: bool, overwrite: bool, output: Path) -> None:
        """Create the folder, or continue it when its state matches (resume/merge/shards)."""
        if self.folder.exists() and overwrite and not resume:
            shutil.rmtree(self.folder)
        sp = self.folder / "state.json"
        if self.folder.exists() and sp.exists():
            if not resume:
                n = len(self.done())
                raise MicrosnoopError(f"{n} finished field(s) of an unfinished run are in {self.folder.name} (use "
                                      f"--resume to continue it, or --overwrite to start over)", output)
            old = json.loads(sp.read_text())
            diff = [k for k in state if old.get(k) != state[k]]
            if diff:
                raise MicrosnoopError(f"cannot resume: the unfinished run in {self.folder.name} differs in "
                                      f"{', '.join(diff)} (use --overwrite to start over)", output)
            return
        self.fields_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(sp) as tmp:
            tmp.write_text(json.dumps(state, indent=1, default=str))

    def path(self, i: int) -> Path:
        return self.fields_dir / f"{i:06d}.npz"

    def done(self) -> set[int]:
        if not self.fields_dir.exists():
            return set()
        return {int(p.stem) for p in self.fields_dir.glob("*.npz") if p.stem.isdigit()}

    def save(self, i: int, r: Any, timings: dict[str, float]) -> None:
        cells = r.cells[CELL_COLUMNS].to_numpy(np.float64) if r.cells is not None and len(r.cells) else \
            np.zeros((0, len(CELL_COLUMNS)))
        cell_x = r.cell_X if r.cell_X is not None else np.zeros((0, len(r.vector)), np.float32)
        with atomic_path(self.path(i)) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, vector=r.vector, count=r.count, has_cells=r.cells is not None, n_found=r.n_found, cells=cells, cell_X=cell_x,
                         timings=np.array([timings.get(k, 0.0) for k in ("read", "segment", "crop_embed")]))

    def load(self, i: int) -> tuple[Any, dict[str, float]]:
        from .fields import FieldResult

        try:
            with np.load(self.path(i)) as z:
                cells = pd.DataFrame(z["cells"], columns=CELL_COLUMNS)
                for c in CELL_COLUMNS:
                    if "Centroid" not in c:
                        cells[c] = cells[c].astype(np.int64)
                if not bool(z["has_cells"]):  # whole-field modes: no cell table
                    cells = None
                r = FieldResult(z["vector"], int(z["count"]), int(z["n_found"]), cells,
                                z["cell_X"] if cells is not None else None)
                t = dict(zip(("read", "segment", "crop_embed"), map(float, z["timings"])))
        except Exception as exc:
            raise MicrosnoopError(f"cannot read a finished field ({type(exc).__name__}: {exc}); delete it and "
                                  f"rerun with --resume", self.path(i)) from None
        return r, t

    def save_json(self, name: str, obj: Any) -> None:
        with atomic_path(self.folder / name) as tmp:
            tmp.write_text(json.dumps(obj, indent=1, default=str))

    def load_json(self, name: str) -> Any | None:
        p = self.folder / name
        return json.loads(p.read_text()) if p.exists() else None
