"""Cellpose-style flow dynamics: network flows + cell probability -> label image.

Our own numpy/torch implementation of the procedure in Stringer et al. (2021):

1. every pixel with cell-probability logit > threshold follows the flow field (Euler steps of the
   bilinearly interpolated flow, ``niter`` of them) and converges near its cell's centre;
2. converged positions are binned; local maxima of that histogram (with enough pixels) seed the
   cells, which grow over neighbouring well-populated bins; a pixel takes the label of its bin;
3. masks whose own heat-diffusion flows disagree with the network's (mean squared error above
   ``flow_threshold``) are dropped, holes are filled, masks smaller than ``min_size`` removed.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi
from scipy.sparse import csr_matrix

FLOW_SCALE = 5.0  # the network was trained on 5x the unit flows


def follow_flows(dP: np.ndarray, inside: np.ndarray, niter: int = 200) -> np.ndarray:
    """Final (y, x) positions, shape (2, n), of the ``inside`` pixels after ``niter`` Euler steps.

    ``dP`` is (2, H, W) in pixels per step (already divided by the network's flow scale); positions
    are clamped to the image.
    """
    H, W = dP.shape[1:]
    ys, xs = np.nonzero(inside)
    p = torch.from_numpy(np.stack([ys, xs]).astype(np.float32))  # (2, n)
    if p.shape[1] == 0:
        return p.numpy()
    field = torch.from_numpy(np.ascontiguousarray(dP[::-1], dtype=np.float32))[None]  # (1, 2: dx, dy, H, W)
    sy, sx = 2.0 / max(H - 1, 1), 2.0 / max(W - 1, 1)
    hi = torch.tensor([H - 1, W - 1], dtype=torch.float32)[:, None]
    for _ in range(niter):
        grid = torch.stack([p[1] * sx - 1, p[0] * sy - 1], dim=-1)[None, None]  # (1, 1, n, 2) as (x, y)
        d = F.grid_sample(field, grid, mode="bilinear", align_corners=True)[0, :, 0]  # (2: dx, dy, n)
        p = torch.minimum(torch.clamp(p + d.flip(0), min=0), hi)
    return p.numpy()


def cluster_positions(p: np.ndarray, shape: tuple[int, int], inside: np.ndarray, min_seed_count: int = 10,
                      grow_iter: int = 5, grow_min: int = 2) -> np.ndarray:
    """Labels from converged positions: histogram maxima seed the cells, seeds grow over bins holding
    more than ``grow_min`` pixels, and each pixel takes its bin's label."""
    H, W = shape
    labels = np.zeros(shape, np.int32)
    if p.shape[1] == 0:
        return labels
    iy = np.clip(np.rint(p[0]).astype(np.int64), 0, H - 1)
    ix = np.clip(np.rint(p[1]).astype(np.int64), 0, W - 1)
    hist = np.bincount(iy * W + ix, minlength=H * W).reshape(H, W)
    hmax = ndi.maximum_filter(hist, size=5, mode="constant")
    sy, sx = np.nonzero((hist == hmax) & (hist > min_seed_count))
    if len(sy) == 0:
        return labels
    order = np.argsort(-hist[sy, sx], kind="stable")
    seeds = np.zeros(shape, np.int32)
    seeds[sy[order], sx[order]] = np.arange(1, len(order) + 1)
    grow_ok = hist > grow_min
    for _ in range(grow_iter):
        grown = ndi.maximum_filter(seeds, size=3, mode="constant")
        seeds = np.where((seeds == 0) & grow_ok, grown, seeds)
    ys, xs = np.nonzero(inside)
    labels[ys, xs] = seeds[iy, ix]
    return labels


def masks_to_flows(masks: np.ndarray, niter: int | None = None) -> np.ndarray:
    """Unit flows (2, H, W) of each mask toward its centre by heat diffusion from the centre pixel
    (the mask pixel nearest the mask's median position), diffusing only within the mask."""
    H, W = masks.shape
    mu = np.zeros((2, H, W), np.float32)
    n = int(masks.max())
    if n == 0:
        return mu
    objs = ndi.find_objects(masks)
    centres = []
    ext = 1
    for lab, sl in enumerate(objs, start=1):
        if sl is None:
            continue
        yy, xx = np.nonzero(masks[sl] == lab)
        yy, xx = yy + sl[0].start, xx + sl[1].start
        my, mx = np.median(yy), np.median(xx)
        k = int(np.argmin((yy - my) ** 2 + (xx - mx) ** 2))
        centres.append((yy[k], xx[k]))
        ext = max(ext, sl[0].stop - sl[0].start, sl[1].stop - sl[1].start)
    niter = niter or 2 * ext
    # work on the mask pixels only (flat indices into the 1-px padded image, whose border is background);
    # one diffusion step = a sparse matrix (each pixel's same-label 3x3 neighbours, in offset order, so
    # the float32 sums are those of the dense (9, n) gather this replaced) times T: ~2x faster
    L = np.pad(masks, 1).ravel()
    Wp = W + 2
    flat = np.flatnonzero(L)
    offsets = np.array([dy * Wp + dx for dy in (-1, 0, 1) for dx in (-1, 0, 1)], dtype=flat.dtype)
    nbr = flat[:, None] + offsets[None, :]                       # (n, 9)
    same = L[nbr] == L[flat][:, None]
    pos = np.full(L.size, -1, np.int64)
    pos[flat] = np.arange(len(flat))
    indptr = np.zeros(len(flat) + 1, np.int64)
    np.cumsum(same.sum(axis=1), out=indptr[1:])
    step = csr_matrix((np.ones(int(indptr[-1]), np.float32), pos[nbr[same]], indptr), shape=(len(flat), len(flat)))
    cy, cx = np.array(centres).T + 1
    cpos = pos[cy * Wp + cx]
    T = np.zeros(len(flat), np.float32)
    for _ in range(niter):
        T[cpos] += 1
        T = step @ T
        T /= 9.0
    T = np.log1p(T)

    def neighbour(k: int) -> np.ndarray:  # T of the neighbour at offset k, 0 where it is another mask
        return np.where(same[:, k], T[np.where(same[:, k], pos[nbr[:, k]], 0)], np.float32(0))

    gy, gx = neighbour(7) - neighbour(1), neighbour(5) - neighbour(3)
    norm = np.sqrt(gy ** 2 + gx ** 2) + 1e-20
    yy, xx = np.divmod(flat, Wp)
    mu[0, yy - 1, xx - 1] = gy / norm
    mu[1, yy - 1, xx - 1] = gx / norm
    return mu


def flow_errors(masks: np.ndarray, dP: np.ndarray) -> np.ndarray:
    """Per mask (index 0 = label 1): mean squared difference of its diffusion flows and ``dP`` (unit scale)."""
    n = int(masks.max())
    if n == 0:
        return np.zeros(0)
    mu = masks_to_flows(masks)
    err = ((mu - dP) ** 2).sum(axis=0)
    idx = np.arange(1, n + 1)
    return ndi.mean(err, labels=masks, index=idx)


def fill_and_filter(masks: np.ndarray, min_size: int = 15) -> np.ndarray:
    """Fill each mask's holes, drop masks under ``min_size`` pixels, relabel 1..n."""
    from skimage.segmentation import relabel_sequential

    out = np.zeros_like(masks)
    for lab, sl in enumerate(ndi.find_objects(masks), start=1):
        if sl is None:
            continue
        m = ndi.binary_fill_holes(masks[sl] == lab)
        if m.sum() >= min_size:
            out[sl][m] = lab
    return relabel_sequential(out)[0].astype(np.int32)


def compute_masks(dP: np.ndarray, cellprob: np.ndarray, niter: int = 200, cellprob_threshold: float = 0.0,
                  flow_threshold: float = 0.4, min_size: int = 15, max_fraction: float = 0.4) -> np.ndarray:
    """Network outputs (flows (2, H, W) at the trained x5 scale, cell-probability logits) -> int32 labels."""
    dP = np.asarray(dP, np.float32) / FLOW_SCALE
    inside = np.asarray(cellprob) > cellprob_threshold
    shape = inside.shape
    if not inside.any():
        return np.zeros(shape, np.int32)
    p = follow_flows(dP * inside, inside, niter)
    masks = cluster_positions(p, shape, inside)
    # a mask covering a large share of the image is background that converged: drop it
    counts = np.bincount(masks.ravel())
    big = np.flatnonzero(counts > max_fraction * masks.size)
    big = big[big > 0]
    if len(big):
        masks[np.isin(masks, big)] = 0
    from skimage.segmentation import relabel_sequential

    masks = relabel_sequential(masks)[0].astype(np.int32)
    if flow_threshold is not None and flow_threshold > 0 and masks.max() > 0:
        err = flow_errors(masks, dP)
        bad = np.flatnonzero(err > flow_threshold) + 1
        if len(bad):
            masks[np.isin(masks, bad)] = 0
    return fill_and_filter(masks, min_size)
