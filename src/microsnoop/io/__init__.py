from .images import read_image
from .readers import ArraySource, FolderSource, ImageSource, ManifestSource, open_source
from .writers import read_embeddings, write_embeddings

__all__ = ["ArraySource", "FolderSource", "ImageSource", "ManifestSource", "open_source", "read_embeddings",
           "read_image", "write_embeddings"]
