"""``microsnoop.embed``: images in memory -> vectors, a labelled table or an AnnData.

It runs exactly what ``microsnoop embed`` runs (the same ``Embedder``, the same defaults from
``embed/defaults.py``, the same chunks of ``CHUNK_SIZE`` images), so an array embedded here and the same
array saved as .npy and embedded by the CLI give identical vectors.
"""
from __future__ import annotations

import sys
from typing import Any, Sequence

import numpy as np
import pandas as pd

from ..core.errors import MicrosnoopError
from ..io.writers import feature_columns, output_provenance, to_anndata, to_frame
from . import defaults
from .engine import Embedder
from .run import run_provenance

OUTPUTS = ("array", "frame", "anndata")


def embed_images(images: np.ndarray | Sequence[np.ndarray], model: Any = None, *,
                 batch_size: int | None = defaults.BATCH_SIZE, device: str = defaults.DEVICE,
                 precision: str = defaults.PRECISION, tta: str | None = None, engine: str | None = defaults.ENGINE,
                 output: str = "array", metadata: pd.DataFrame | None = None,
                 channel_names: Sequence[str] | None = None, scales: Any = None) -> Any:
    """Embed images in memory, every channel separately, vectors concatenated in channel order.

    Parameters
    ----------
    images : numpy.ndarray or sequence of numpy.ndarray
        An (N, C, H, W) array, one (C, H, W) image, or a list of (C, H, W) images (sizes may differ).
    model : str, Path or ChannelEncoder, optional
        Registered model name (``microsnoop.list_models()``), optionally with head options
        (``"cellpose-encoder:levels=all"``), a checkpoint path, or a model from ``create_model``.
        Default: the shipped default model.
    batch_size : int, optional
        One-channel planes per forward pass. Default: automatic, about 1M pixels per pass.
    device : str
        ``auto`` (CUDA, then MPS, then CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
    precision : str
        ``auto`` (bf16 where native and validated for the model, else fp32), ``fp32`` or ``bf16``.
    tta : str, optional
        Test-time augmentation: ``none``, ``rot4`` or ``d8``. Default: the model's head.
    engine : str
        CPU inference engine: ``auto``, ``torch``, ``openvino`` or ``onnxruntime``.
    output : str
        ``array`` (default): the (N, C * dim) float32 matrix. ``frame``: a pandas DataFrame with the
        metadata columns and one float32 column per feature, named ``<channel>_emb_<k>`` as in the
        Parquet outputs, provenance in ``frame.attrs["microsnoop"]``. ``anndata``: an AnnData with
        ``X``, ``obs`` = metadata, ``var_names`` = feature names, ``uns["microsnoop"]`` = provenance (a dict).
    metadata : pandas.DataFrame, optional
        One row per image, carried into the table (``frame``/``anndata``); columns not named ``Metadata_*``
        get that prefix (pycytominer's convention). ``Metadata_Index`` (0..N-1) is added when absent.
    channel_names : sequence of str, optional
        Names of the C channels for the feature columns. Default: ``ch0``, ``ch1``, ...
    scales : str or sequence of float, optional
        Input scale factors, vectors concatenated (``"1+1.5"``: as given and enlarged 1.5x; dim x 2).
        Default: the model's head.

    Returns
    -------
    numpy.ndarray or pandas.DataFrame or anndata.AnnData
        (N, C * dim) float32 features, or the table chosen by ``output``.

    Examples
    --------
    >>> import microsnoop, numpy as np
    >>> microsnoop.embed(np.random.rand(2, 3, 64, 64), model="random-init").shape  # doctest: +SKIP
    (2, 768)
    """
    if output not in OUTPUTS:
        raise MicrosnoopError(f"unknown output '{output}' (choose {', '.join(OUTPUTS)})")
    if isinstance(images, np.ndarray) and images.ndim == 3:
        images = images[None]
    n = len(images)
    emb = Embedder(model, device=device, precision=precision, batch_size=batch_size, tta=tta, engine=engine,
                   scales=scales)
    # the CLI's chunks: batches (and so bf16 kernels) see the same images either way
    blocks = [emb.embed(images[s:s + defaults.CHUNK_SIZE], offset=s) for s in range(0, n, defaults.CHUNK_SIZE)]
    x = np.concatenate(blocks, axis=0) if blocks else np.zeros((0, 0), np.float32)
    if output == "array":
        return x
    c = x.shape[1] // emb.dim if n else 0
    names = _channel_names(channel_names, c)
    meta = _metadata(metadata, n)
    prov = output_provenance(run_provenance(emb, "in-memory images", n, " ".join(sys.argv) or "python"),
                             names, emb.dim)
    columns = feature_columns(names, emb.dim)
    if output == "frame":
        return to_frame(meta, x, columns, prov)
    return to_anndata(meta, x, columns, prov)


def _channel_names(names: Sequence[str] | None, c: int) -> list[str]:
    if names is None:
        return [f"ch{i}" for i in range(c)]
    names = [str(v) for v in names]
    if len(names) != c:
        raise MicrosnoopError(f"{len(names)} channel names for images with {c} channels")
    if len(set(names)) != len(names):
        raise MicrosnoopError(f"channel names must be unique: {','.join(names)}")
    return names


def _metadata(metadata: pd.DataFrame | None, n: int) -> pd.DataFrame:
    """The images' metadata as ``Metadata_*`` columns, one row per image, ``Metadata_Index`` first."""
    meta = pd.DataFrame(index=range(n)) if metadata is None else pd.DataFrame(metadata).reset_index(drop=True)
    if len(meta) != n:
        raise MicrosnoopError(f"metadata has {len(meta)} rows for {n} images")
    meta = meta.rename(columns={c: c if str(c).startswith("Metadata_") else f"Metadata_{c}" for c in meta.columns})
    if "Metadata_Index" not in meta.columns:
        meta.insert(0, "Metadata_Index", np.arange(n))
    return meta
