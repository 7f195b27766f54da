"""microsnoop: embeddings of microscopy images, one channel at a time (Xun et al., Microsnoop)."""
from .core.errors import MicrosnoopError  # noqa: E402
from .core.version import __version__  # noqa: E402
from .models import create_model, list_models  # noqa: E402
from .embed import embed_images as embed  # noqa: E402
from .embed import embed_images, embed_source  # noqa: E402
from .io import open_source, read_embeddings  # noqa: E402

__all__ = ["MicrosnoopError", "__version__", "create_model", "embed", "embed_images", "embed_source", "list_models",
           "open_source", "read_embeddings"]
