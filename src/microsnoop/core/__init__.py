"""The bottom layer: errors, hashing, version, device/precision choice and the torchrun process group.

Nothing here imports another microsnoop package, so every layer above may use it (see
``tests/test_layers.py`` for the import direction the package keeps)."""
