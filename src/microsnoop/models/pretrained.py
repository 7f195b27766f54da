"""Trained Microsnoop U-Nets shipped inside the package (``models/weights/*.safetensors``, fp16).

Each entry records the file's sha256 (checked on every load), licence, training data and model card.
All were trained here by ``microsnoop train`` on the pretraining pool only, never on benchmark images
(v1 and earlier: the mae-unet recipe; v2: distill-unet); see ``models/cards/<name>.md`` for command,
steps and benchmark table. An entry may reuse another's weight file with its own head (``v2-ms`` = v2's
weights, ``scales=1+1.5``): a new name, so a name's vectors never change meaning between versions.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..core.errors import MicrosnoopError
from .registry import ChannelEncoder, ModelSpec, build_from_checkpoint, register_model
from .microsnoop_unet import WEIGHTS_DIR

POOL = "microsnoop pretraining pool: 470 real one-channel images, 4 modalities, 15 sources (no benchmark images)"
POOL_V2 = ("microsnoop pretraining pool: 1,004 real one-channel images, 4 modalities, 16 sources (no benchmark "
           "images); teachers: Cellpose generalist encoder, ImageNet EfficientNet-Lite0")


@dataclass(frozen=True)
class Shipped:
    name: str
    sha256: str
    description: str
    license: str
    default: bool = False
    training_data: str = POOL
    input_size: str = "any (>=16 px; trained on 96 px crops)"
    head: str = "levels=last,pool=mean,tta=none (256)"
    weights: str | None = None  # file stem under models/weights/ when another entry's file is reused
    head_config: tuple[tuple[str, str], ...] = ()  # head keys this entry sets on top of the checkpoint's


SHIPPED = (
    Shipped("microsnoop-unet-v2-ms", "03177336832978401618cd7614ae90ca93b06eec017d54373122907241d88612",
            "microsnoop-unet-v2's weights with a two-scale head: each plane is embedded as given and enlarged 1.5x "
            "(bilinear) and the two 512-feature vectors are concatenated, so fine texture also reaches the "
            "encoder's mid-level receptive fields; 1,024 features per channel, ~3.25x v2's compute",
            "BSD-3-Clause (derived from Cellpose weights; EfficientNet-Lite0 teacher Apache-2.0); training images under "
            "their sources' licences",
            default=True, training_data=POOL_V2, input_size="any (>=16 px; trained on 64 px crops)",
            head="levels=all,pool=mean -> 2 x 256 projections, tta=none, scales=1+1.5 (1024)",
            weights="microsnoop-unet-v2", head_config=(("scales", "1+1.5"),)),
    Shipped("microsnoop-unet-v2", "03177336832978401618cd7614ae90ca93b06eec017d54373122907241d88612",
            "Microsnoop U-Net encoder (Cellpose-initialised) distilled on CPU from two frozen teachers' d8-averaged "
            "features (Cellpose encoder, all 4 levels pooled; ImageNet EfficientNet-Lite0) with rotation/flip/intensity "
            "changes on the student's view: rotation invariance trained in; 512 features per channel "
            "(256 per teacher)",
            "BSD-3-Clause (derived from Cellpose weights; EfficientNet-Lite0 teacher Apache-2.0); training images under "
            "their sources' licences",
            default=False, training_data=POOL_V2, input_size="any (>=16 px; trained on 64 px crops)",
            head="levels=all,pool=mean -> 2 x 256 projections, tta=none (512)"),
    Shipped("microsnoop-unet-v1", "a2fe3a895ab47b0a59bc06cdc495b31e452f505c2fcb5aec3b5d4931158f321a",
            "Microsnoop U-Net, masked-reconstruction pretraining (mask 0.25, 96 px, 600 steps on CPU) fine-tuned "
            "from the Cellpose generalist network with a gentle encoder (LR x0.1, frozen first 100 steps, "
            "Cellpose BN statistics kept)",
            "BSD-3-Clause (derived from Cellpose weights); training images under their sources' licences",
            default=False),
    Shipped("microsnoop-unet-cpinit", "a9ae1f2d33004171e32f61b73cdcc1b6fcd1736e51c5fb661fc4f6773a68365f",
            "Microsnoop U-Net, masked-reconstruction pretraining (mask 0.25, 96 px, 950 steps on CPU) starting "
            "from the Cellpose generalist encoder+decoder, all weights at the full LR",
            "BSD-3-Clause (derived from Cellpose weights); training images under their sources' licences",
            default=False),
    Shipped("microsnoop-unet-scratch", "f6b7b50a2b5eead87acc6886fa4c5edaeb70693827c58db3c95ced36df6c945b",
            "Microsnoop U-Net, masked-reconstruction pretraining (mask 0.25, 96 px, 950 steps on CPU) from random "
            "initialisation (the paper's recipe, with ~1/1000 of its compute)",
            "MIT; training images under their sources' licences",
            default=False),
)


def _builder(entry: Shipped):
    def build(pretrained: bool = True) -> ChannelEncoder:
        path = WEIGHTS_DIR / f"{entry.weights or entry.name}.safetensors"
        if not path.exists():
            raise MicrosnoopError(f"weights of '{entry.name}' are missing from the installed package", path)
        enc = build_from_checkpoint(path, entry.sha256, entry.name, pretrained=pretrained)
        if entry.head_config:  # the entry's own head, kept under its name (no ':key=value' suffix)
            enc.config = {**enc.config, **dict(entry.head_config)}
        return enc
    return build


for _entry in SHIPPED:
    register_model(ModelSpec(
        name=_entry.name, build=_builder(_entry), description=_entry.description, license=_entry.license,
        training_data=_entry.training_data, input_size=_entry.input_size, sha256=_entry.sha256,
        trained=True, default=_entry.default, card=f"models/cards/{_entry.name}.md", head=_entry.head,
    ))
