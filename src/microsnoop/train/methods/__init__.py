"""Registered pretext methods. Each import below registers one method (one line per module)."""
from . import mae_unet  # noqa: F401  mae-unet: the paper's masked-reconstruction recipe
from . import dino_vit  # noqa: F401  dino-vit: DINO self-distillation of a one-channel ViT
from . import cytoself  # noqa: F401  cytoself: split-VQ VQ-VAE + identity classification
from . import paired_inpainting  # noqa: F401  paired-inpainting: paint cell B's protein from cell A (same field)
from . import distill_unet  # noqa: F401  distill-unet: a U-Net student of several d8-averaged teachers
