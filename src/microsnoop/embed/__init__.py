from ..core.device import resolve_device
from ..io.normalize import normalize_percentile
from . import defaults
from .api import embed_images
from .engine import Embedder
from .run import embed_source

__all__ = ["Embedder", "defaults", "embed_images", "embed_source", "normalize_percentile", "resolve_device"]
