"""microsnoop: embeddings of microscopy images, one channel at a time (Xun et al., Microsnoop).

The Python API runs what the CLI runs, with the same defaults (``microsnoop.embed.defaults``):

- :func:`embed` (= :func:`embed_images`): images in memory -> vectors, a labelled table or an AnnData;
- :func:`embed_source` / :func:`open_source`: stream a file, folder or manifest to an output file;
- :func:`read_embeddings`: any output back as one table (``Metadata_*`` + feature columns);
- :func:`aggregate`, :func:`normalize`, :func:`sphere`, :func:`feature_columns`: profiling, with
  pycytominer's argument names;
- :func:`create_model`, :func:`list_models`: the model registry.
"""
from .core.errors import MicrosnoopError  # noqa: E402
from .core.version import __version__  # noqa: E402
from .models import create_model, list_models  # noqa: E402
from .embed import embed_images as embed  # noqa: E402
from .embed import embed_images, embed_source  # noqa: E402
from .io import open_source, read_embeddings  # noqa: E402
from .profiling import aggregate, feature_columns, normalize, sphere  # noqa: E402

__all__ = ["MicrosnoopError", "__version__", "aggregate", "create_model", "embed", "embed_images", "embed_source",
           "feature_columns", "list_models", "normalize", "open_source", "read_embeddings", "sphere"]
