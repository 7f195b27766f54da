"""Model registry. Each import below registers its models (one line per model module)."""
from .registry import ChannelEncoder, ModelSpec, create_model, default_model_name, get_spec, list_models, register_model

from . import microsnoop_unet  # noqa: F401,E402  random-init (+ the U-Net architecture)
from . import cellpose  # noqa: F401,E402  cellpose-encoder
from . import effnet  # noqa: F401,E402  imagenet-effnet-lite0
from . import handcrafted  # noqa: F401,E402  handcrafted
from . import pretrained  # noqa: F401,E402  microsnoop-unet-v1 (default), -cpinit, -scratch (shipped weights)
from . import vit  # noqa: F401,E402  arch "vit" (dino-vit checkpoints)
from . import vqvae  # noqa: F401,E402  arch "cytoself" (cytoself checkpoints)
from . import pcinet  # noqa: F401,E402  arch "paired-inpainting" (paired cell inpainting checkpoints)

__all__ = ["ChannelEncoder", "ModelSpec", "create_model", "default_model_name", "get_spec", "list_models",
           "register_model"]
