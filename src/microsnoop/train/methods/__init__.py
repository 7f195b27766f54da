"""Registered pretext methods. Each import below registers one method (one line per module)."""
from . import mae_unet  # noqa: F401  mae-unet: the paper's masked-reconstruction recipe
