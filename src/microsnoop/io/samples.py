"""Real sample images that come with a dependency: the Cellpose test fields shipped in scellseg.

They let the README's first command run on a fresh machine without ``../shared``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..core.errors import MicrosnoopError
from .atomic import atomic_path

SAMPLE_SETS = ("Kc167", "neurocyte", "macrophagocyte", "cytomembrane")


def sample_dir() -> Path:
    try:
        import scellseg
    except ImportError:
        raise MicrosnoopError("sample images come with scellseg: pip install --no-deps scellseg==0.1.8") from None
    return Path(scellseg.__file__).parent / "assets" / "contrast_data"


def sample_fields(sets: tuple[str, ...] = SAMPLE_SETS) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, image (2, H, W) uint8 [nuclei, cytoplasm], masks (H, W)) for every sample field."""
    import imageio.v3 as iio

    out = []
    for s in sets:
        for img_path in sorted((sample_dir() / s).glob("*_img.png")):
            rgb = iio.imread(img_path)
            masks = iio.imread(img_path.with_name(img_path.name.replace("_img", "_masks")))
            out.append((f"{s}_{img_path.stem.replace('_img', '')}", np.stack([rgb[..., 0], rgb[..., 1]]), masks))
    return out


def export_samples(folder: str | Path) -> int:
    """Write each field as ``<name>_nuclei.tif`` + ``<name>_cyto.tif`` and ``masks/<name>_nuclei.tif``."""
    import tifffile

    folder = Path(folder)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    fields = sample_fields()
    for name, img, masks in fields:
        for plane, ch in zip(img, ("nuclei", "cyto")):
            with atomic_path(folder / f"{name}_{ch}.tif") as tmp:
                tifffile.imwrite(tmp, plane, compression="zlib")
        with atomic_path(folder / "masks" / f"{name}_nuclei.tif") as tmp:
            tifffile.imwrite(tmp, masks.astype(np.uint16), compression="zlib")
    return len(fields)
