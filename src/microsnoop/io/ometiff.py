"""Channel names from an OME-TIFF's OME-XML (``Image/Pixels/Channel/@Name``), read with tifffile."""
from __future__ import annotations

from pathlib import Path
from xml.etree import ElementTree

from .images import TIFF_SUFFIXES


def ome_channel_names(path: str | Path, n_channels: int | None = None) -> list[str] | None:
    """Names of the first image's channels, or None when the file is not an OME-TIFF, a channel has no
    name, names repeat, or (given ``n_channels``) their number differs from the planes read."""
    path = Path(path)
    if path.suffix.lower() not in TIFF_SUFFIXES:
        return None
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            xml = tif.ome_metadata if tif.is_ome else None
    except Exception:  # the image reader reports undecodable files; here a name is merely unavailable
        return None
    if not xml:
        return None
    try:
        root = ElementTree.fromstring(xml)
    except ElementTree.ParseError:
        return None
    image = next((el for el in root if el.tag.endswith("}Image") or el.tag == "Image"), None)
    pixels = next((el for el in image if el.tag.endswith("Pixels")), None) if image is not None else None
    if pixels is None:
        return None
    names = [el.get("Name") for el in pixels if el.tag.endswith("Channel")]
    if not names or not all(names) or len(set(names)) != len(names):
        return None
    if n_channels is not None and len(names) != n_channels:
        return None
    return [str(n) for n in names]
