"""The embedding defaults, defined once: the Python API (``microsnoop.embed``, ``embed_source``,
``Embedder``) and every CLI command that embeds (``embed``, ``plate``, ``benchmark``) read them from
here, so the same images give the same vectors whichever way they are embedded."""
from __future__ import annotations

# auto: CUDA, then Apple MPS, then CPU
DEVICE = "auto"
# auto: bf16 where the hardware runs it natively (CUDA; CPUs with AVX512-BF16/AMX) for architectures
# validated in bf16 (cosine >= 0.999 to fp32), else fp32
PRECISION = "auto"
# None: automatic, about 1M pixels per forward pass (256 planes of 64x64, 20 of 224x224)
BATCH_SIZE: int | None = None
# images read, normalised and kept in memory at a time by the streaming writer
CHUNK_SIZE = 1024
# CPU inference engine: auto = OpenVINO when installed (validated per export), else torch; $MICROSNOOP_ENGINE overrides
ENGINE = "auto"
