"""The package version, in its own module so that provenance writers need not import the top package
(``microsnoop/__init__`` pulls in every layer)."""
__version__ = "0.1.0"
