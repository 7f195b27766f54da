"""One-channel image pool for self-supervised pretraining, with step-indexed deterministic batches.

Every channel of every image is a sample (the paper's channel-wise pool). A batch is drawn from one
modality at a time, in turn (``manifest.csv``'s ``modality`` column), so that scarce image types
(tissue, histopathology) are not drowned by the abundant fluorescence fields.

Why step-indexed: batch ``i`` is generated from ``numpy.random.default_rng((seed, i))`` alone, so
the stream of batches does not depend on DataLoader workers, prefetching or where a run was
interrupted. ``--resume`` therefore sees exactly the batches the uninterrupted run would have seen.
"""
from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..core.errors import MicrosnoopError

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp", ".npy")
FOLDER_SKIP_SUFFIXES = (".npy",)  # scanned, but not read as images from a folder (see _manifest_rows)
FOLDER_SUFFIXES = tuple(x for x in IMAGE_SUFFIXES if x not in FOLDER_SKIP_SUFFIXES)


@dataclass
class PoolEntry:
    path: str
    modality: str
    channel: int


def _manifest_rows(data_path: Path) -> tuple[list[tuple[str, str]], Path, bytes, list[str]]:
    """(relative path, modality) rows, the folder they are relative to, the bytes hashed, and the
    files of a folder that were left out (``.npy`` arrays)."""
    import pandas as pd

    manifest = data_path / "manifest.csv" if data_path.is_dir() else data_path
    if manifest.exists() and manifest.suffix == ".csv":
        df = pd.read_csv(manifest)
        if "path" not in df.columns:
            raise MicrosnoopError("manifest has no 'path' column", manifest)
        mods = df["modality"].astype(str) if "modality" in df.columns else ["all"] * len(df)
        return list(zip(df["path"].astype(str), mods)), manifest.parent, manifest.read_bytes(), []
    if not data_path.is_dir():
        raise MicrosnoopError("training data must be a folder of images or a manifest.csv", data_path)
    found = sorted(p for p in data_path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    # a folder's .npy files are usually not images (embeddings, an (N, C, H, W) stack, caches): they
    # are left out, said so, and listed in config.json; a manifest may list (H, W) / (C, H, W) arrays
    files = [p for p in found if p.suffix.lower() not in FOLDER_SKIP_SUFFIXES]
    skipped = [str(p.relative_to(data_path)) for p in found if p.suffix.lower() in FOLDER_SKIP_SUFFIXES]
    if not files:
        hint = f" ({len(skipped)} .npy file(s) are not read from a folder: list them in a manifest.csv)" if skipped else ""
        raise MicrosnoopError("no images found (looked for " + ", ".join(FOLDER_SUFFIXES) + ")" + hint, data_path)
    if skipped:
        warnings.warn(f"{data_path}: left out {len(skipped)} .npy file(s) ({', '.join(skipped[:3])}"
                      f"{', ...' if len(skipped) > 3 else ''}): arrays in a folder are not read as training images "
                      "(list them in a manifest.csv to use them)", stacklevel=3)
    rows = [(str(p.relative_to(data_path)), "all") for p in files]
    listing = "\n".join(f"{r}\t{p.stat().st_size}" for (r, _), p in zip(rows, files)).encode()
    return rows, data_path, listing, skipped


def read_training_image(path: Path) -> np.ndarray:
    """One training image as (C, H, W): image files through ``io.images.read_image``; a ``.npy``
    (listed in a manifest) must hold an (H, W) or (C, H, W) array."""
    from ..io.images import read_image

    if path.suffix.lower() != ".npy":
        return read_image(path)
    if not path.exists():
        raise MicrosnoopError("file not found", path)
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise MicrosnoopError(f"cannot read .npy ({type(exc).__name__}: {exc})", path) from None
    if arr.ndim not in (2, 3) or arr.dtype.kind not in "uif" or min(arr.shape[-2:]) < 2:
        raise MicrosnoopError(f"a .npy training image must be a numeric (H, W) or (C, H, W) array, "
                              f"got {arr.dtype} {tuple(arr.shape)}", path)
    return np.asarray(arr)[None] if arr.ndim == 2 else np.asarray(arr)


class ImagePool:
    """All channels of all images in memory (native dtype) with their per-plane 1st/99th percentiles."""

    def __init__(self, data_path: str | Path, holdout_per_modality: int = 0, seed: int = 0,
                 limit: int | None = None):
        data_path = Path(data_path)
        if not data_path.exists():
            raise MicrosnoopError("training data not found", data_path)
        rows, root, hashed, self.skipped = _manifest_rows(data_path)
        self.manifest_sha256 = hashlib.sha256(hashed).hexdigest()
        self.holdout = _pick_holdout(rows, holdout_per_modality, seed)
        rows = [r for r in rows if r[0] not in self.holdout]
        if limit is not None:
            rows = rows[:limit]
        self.root = root
        self.entries: list[PoolEntry] = []
        self.planes: list[np.ndarray] = []
        self.ranges: list[tuple[float, float]] = []
        for rel, modality in rows:
            img = read_training_image(root / rel)
            for c in range(img.shape[0]):
                plane = np.ascontiguousarray(img[c])
                lo, hi = np.percentile(plane, [1.0, 99.0])
                if hi <= lo:  # blank plane: nothing to reconstruct
                    continue
                self.entries.append(PoolEntry(rel, modality, c))
                self.planes.append(plane)
                self.ranges.append((float(lo), float(hi)))
        if not self.entries:
            raise MicrosnoopError("no usable (non-constant) image planes", data_path)
        self.modalities = sorted({e.modality for e in self.entries})
        self.by_modality = {m: np.array([i for i, e in enumerate(self.entries) if e.modality == m])
                            for m in self.modalities}
        self._centres: list[np.ndarray] | None = None  # object_centres(), found on first use

    def __len__(self) -> int:
        return len(self.entries)

    def counts(self) -> dict[str, int]:
        return {m: len(v) for m, v in self.by_modality.items()}

    def object_centres(self) -> list[np.ndarray]:
        """Each plane's object centres (``object_centres``), computed once and kept (~17 s for 1,004 planes)."""
        if self._centres is None:
            self._centres = [object_centres(p, lo, hi) for p, (lo, hi) in zip(self.planes, self.ranges)]
        return self._centres


def _pick_holdout(rows: Sequence[tuple[str, str]], per_modality: int, seed: int) -> list[str]:
    """A seeded choice of files per modality kept out of training (for reconstruction figures)."""
    if per_modality <= 0:
        return []
    rng = np.random.default_rng((seed, 7919))
    out: list[str] = []
    for m in sorted({mod for _, mod in rows}):
        paths = sorted(p for p, mod in rows if mod == m)
        if len(paths) > per_modality:
            out += [paths[i] for i in sorted(rng.choice(len(paths), per_modality, replace=False))]
    return out


def object_centres(plane: np.ndarray, lo: float, hi: float, sigma: float = 3.0, max_peaks: int = 256) -> np.ndarray:
    """(K, 2) integer (y, x) centres of blob-like objects in one plane (K <= ``max_peaks``, may be 0).

    Why: single-cell embedding sees crops centred on a cell, whereas a random window of a field is
    often background or a cut cell. Objects are the local maxima of the absolute difference of
    Gaussians (``sigma`` and ``4 sigma``), so bright nuclei and dark objects on a bright background
    (brightfield, histology) both count; peaks weaker than a quarter of the strongest are ignored.
    """
    from scipy import ndimage as ndi
    from skimage.feature import peak_local_max

    x = np.clip((plane.astype(np.float32) - lo) / (hi - lo), 0.0, 1.0)
    r = np.abs(ndi.gaussian_filter(x, sigma) - ndi.gaussian_filter(x, 4 * sigma))
    thr = max(0.02, 0.25 * float(r.max()))
    return peak_local_max(r, min_distance=int(3 * sigma), threshold_abs=thr, num_peaks=max_peaks,
                          exclude_border=False).astype(np.int64)


def augment_crop(plane: np.ndarray, lo: float, hi: float, size: int, rng: np.random.Generator,
                 scale_range: tuple[float, float] = (0.75, 1.5), centre: tuple[int, int] | None = None) -> np.ndarray:
    """Random scale -> crop (random, or around ``centre`` with a jitter of 1/8 of the crop; zero pad
    if smaller) -> percentile normalisation -> rot90/flip.

    Scaling is done by cropping ``size / s`` pixels and resizing to ``size`` so the work is per crop,
    not per (up to 1024 px) image.
    """
    s = float(np.exp(rng.uniform(np.log(scale_range[0]), np.log(scale_range[1]))))
    c = max(8, int(round(size / s)))
    h, w = plane.shape
    if centre is None:
        y0 = int(rng.integers(0, max(h - c, 0) + 1))
        x0 = int(rng.integers(0, max(w - c, 0) + 1))
    else:
        jy, jx = rng.integers(-(c // 8), c // 8 + 1, size=2)
        y0 = int(np.clip(int(centre[0]) + int(jy) - c // 2, 0, max(h - c, 0)))
        x0 = int(np.clip(int(centre[1]) + int(jx) - c // 2, 0, max(w - c, 0)))
    crop = (plane[y0:y0 + c, x0:x0 + c].astype(np.float32) - lo) / (hi - lo)
    if crop.shape != (c, c):  # image smaller than the crop: zero-pad (centred) like the embedder does
        out = np.zeros((c, c), np.float32)
        oy, ox = (c - crop.shape[0]) // 2, (c - crop.shape[1]) // 2
        out[oy:oy + crop.shape[0], ox:ox + crop.shape[1]] = crop
        crop = out
    if c != size:
        t = torch.from_numpy(crop)[None, None]
        crop = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False,
                             antialias=c > size)[0, 0].numpy()
    crop = np.rot90(crop, int(rng.integers(0, 4)))
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return np.ascontiguousarray(crop, dtype=np.float32)


CLIP_MAX = 8.0  # a single bright speck in a dim crop can sit far above the 99th percentile: keep it bounded


def normalize_crops(x: np.ndarray) -> np.ndarray:
    """(B, 1, H, W) -> each crop mapped by its own 1st/99th percentiles (constant crops become 0)."""
    flat = x.reshape(len(x), -1)
    lo, hi = np.percentile(flat, [1.0, 99.0], axis=1)
    scale = np.where(hi > lo, hi - lo, 1.0)
    out = (flat - lo[:, None]) / scale[:, None]
    out[hi <= lo] = 0.0
    return out.reshape(x.shape).astype(np.float32)


def intensity_view(x: np.ndarray, rng: np.random.Generator, gamma: tuple[float, float], noise: float) -> np.ndarray:
    """The student's view: gamma (on the clipped [0, 1] range), additive Gaussian noise, re-normalised."""
    g = np.exp(rng.uniform(np.log(gamma[0]), np.log(gamma[1]), size=(len(x), 1, 1, 1))).astype(np.float32)
    y = np.clip(x, 0.0, None) ** g
    sigma = (noise * rng.random((len(x), 1, 1, 1))).astype(np.float32)
    y = y + sigma * rng.standard_normal(x.shape).astype(np.float32)
    return normalize_crops(y)


class StepBatches(torch.utils.data.Dataset):
    """Map-style dataset whose item ``i`` is the whole batch for global step ``i``.

    Batch ``i`` comes from modality ``i % n_modalities`` (in turn), sampled with replacement.
    ``extra(batch_images, rng)`` lets a method add its own fields (e.g. the MAE mask) from the same
    per-step generator, keeping everything a pure function of (seed, step).
    """

    def __init__(self, pool: ImagePool, batch_size: int, input_size: int, seed: int,
                 scale_range: tuple[float, float] = (0.75, 1.5), extra: Any = None, shard: tuple[int, int] = (0, 1),
                 centre_fraction: float = 0.0):
        self.pool, self.batch_size, self.input_size, self.seed = pool, batch_size, input_size, seed
        self.scale_range, self.extra, self.shard = scale_range, extra, shard
        self.centre_fraction = float(centre_fraction)
        if not 0.0 <= self.centre_fraction <= 1.0:  # refused before the object search and any training
            raise MicrosnoopError(f"centre_fraction must be between 0 and 1, got {centre_fraction}")
        # object centres per plane, found once here (before DataLoader workers copy the dataset)
        self.centres = pool.object_centres() if self.centre_fraction > 0 else None

    def __len__(self) -> int:  # steps are unbounded; the sampler decides which ones are drawn
        return 2 ** 62

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        rank, world = self.shard
        rng = np.random.default_rng((self.seed, int(step), rank))
        # every rank uses the same modality for a given step, so DDP batches stay balanced
        modality = self.pool.modalities[int(step) % len(self.pool.modalities)]
        idx = rng.choice(self.pool.by_modality[modality], self.batch_size, replace=True)
        crops = [augment_crop(self.pool.planes[i], *self.pool.ranges[i], self.input_size, rng, self.scale_range,
                              self._centre(int(i), rng)) for i in idx]
        batch = {"image": torch.from_numpy(np.stack(crops)[:, None]), "step": torch.tensor(int(step))}
        if self.extra is not None:
            batch.update(self.extra(batch["image"], rng))
        return batch

    def _centre(self, i: int, rng: np.random.Generator) -> tuple[int, int] | None:
        """An object centre of plane ``i`` for a ``centre_fraction`` of crops (None: a random window).
        Draws nothing from ``rng`` when centring is off, so earlier runs' batches are unchanged."""
        if self.centres is None:
            return None
        cands = self.centres[i]
        if rng.random() >= self.centre_fraction or not len(cands):
            return None
        y, x = cands[int(rng.integers(len(cands)))]
        return int(y), int(x)


def step_loader(dataset: StepBatches, start: int, stop: int, workers: int = 1, prefetch: int = 4) -> Iterator[dict]:
    """Batches for steps ``start..stop-1`` in order, built by ``workers`` processes ahead of the model."""
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, sampler=range(start, stop), num_workers=workers,
        prefetch_factor=prefetch if workers > 0 else None, persistent_workers=False,
        worker_init_fn=_worker_init if workers > 0 else None)
    # the DataLoader draws worker seeds from the global torch RNG; keep that out of the training RNG
    # stream so the number of workers does not change it (batches are seeded per step anyway)
    with torch.random.fork_rng(devices=[]):
        return iter(loader)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # crops are small; one thread per worker leaves the cores to the model


class LabelledSet:
    """A benchmark-style set (``images.npy`` (N, C, H, W) + ``metadata.csv``) held in memory, normalised.

    Why: pretexts such as cytoself (identity classification) and paired cell inpainting (cells of the
    same field) need per-cell labels or groups that a folder of fields does not have. Rows can be
    restricted to one split (``Metadata_Split == "train"``) so the test cells of a benchmark stay
    unseen. Planes are percentile-normalised per cell and channel exactly as the embedding engine
    does, so training inputs match what ``embed`` feeds the encoder.
    """

    def __init__(self, data_path: str | Path, split: str | None = "train", split_column: str = "Metadata_Split",
                 label_column: str | None = None, group_column: str | None = None):
        from ..io.dataset import load_set_folder
        from ..io.normalize import normalize_percentile

        s = load_set_folder(data_path, ("images.npy", "metadata.csv"), "this method trains on a labelled set")
        img_path, meta_path, meta, images = s.images_path, s.metadata_path, s.metadata, s.images
        rows = np.arange(len(meta))
        if split:
            if split_column not in meta.columns:
                raise MicrosnoopError(f"split column '{split_column}' not in metadata (set split=null to use all rows)", meta_path)
            rows = rows[(meta[split_column].astype(str) == split).to_numpy()]
            if not len(rows):
                raise MicrosnoopError(f"no rows with {split_column} == '{split}'", meta_path)
        self.rows = rows
        self.meta = meta.iloc[rows].reset_index(drop=True)
        self.images = normalize_percentile(np.asarray(images[rows]))  # (N, C, H, W) float32
        self.n_channels = int(self.images.shape[1])
        from ..core.hashing import hash_files

        h = hash_files([img_path, meta_path])  # chunked: images.npy can be larger than memory
        h.update(f"{split}|{split_column}|{label_column}|{group_column}".encode())
        self.manifest_sha256 = h.hexdigest()
        self.holdout: list[str] = []
        self.label_column, self.group_column = label_column, group_column
        self.classes: list[str] = []
        self.labels = np.zeros(len(rows), np.int64)
        if label_column:
            if label_column not in self.meta.columns:
                raise MicrosnoopError(f"label column '{label_column}' not in metadata", meta_path)
            values = self.meta[label_column].astype(str).to_numpy()
            self.classes = sorted(set(values))
            self.labels = np.searchsorted(np.array(self.classes), values).astype(np.int64)
        self.groups: list[np.ndarray] = []
        if group_column:
            if group_column not in self.meta.columns:
                raise MicrosnoopError(f"group column '{group_column}' not in metadata", meta_path)
            codes = self.meta[group_column].astype(str).to_numpy()
            self.groups = [np.flatnonzero(codes == g) for g in sorted(set(codes))]

    def __len__(self) -> int:
        return len(self.images) * self.n_channels

    def counts(self) -> dict[str, int]:
        if self.classes:
            return {c: int((self.labels == i).sum()) for i, c in enumerate(self.classes)}
        return {"all": len(self.images)}


def flip_rot(plane: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One of the 8 dihedral transforms, at random (cells have no preferred orientation)."""
    plane = np.rot90(plane, int(rng.integers(0, 4)), axes=(-2, -1))
    if rng.random() < 0.5:
        plane = plane[..., ::-1]
    return np.ascontiguousarray(plane, dtype=np.float32)
