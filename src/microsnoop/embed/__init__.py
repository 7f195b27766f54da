from ..core.device import resolve_device
from .engine import Embedder, embed_images
from ..io.normalize import normalize_percentile
from .run import embed_source

__all__ = ["Embedder", "embed_images", "embed_source", "normalize_percentile", "resolve_device"]
