"""Stand-in encoders for tests that need a model's interface but no weights."""

from __future__ import annotations

import time

import numpy as np

from fastret.engine.decode import Preprocessing
from fastret.engine.encoders import EncoderRecipe, ModelInfo, pooled_encode_batches

COLOUR_SPEC = Preprocessing(size=32, resize=32, interpolation="bilinear", mean=(0.0,) * 3, std=(1.0,) * 3)


class MeanColourEncoder:
    """Embedding = the crop's mean colour, centred on grey and L2-normalised: a red query's
    nearest items are red, a ground truth anyone can see."""

    backend = "numpy"
    precision = "fp32"
    parallel_requests = 1

    def __init__(self, model_id: str = "test-mean-colour", *, spec: Preprocessing = COLOUR_SPEC,
                 delay_s: float = 0.0) -> None:
        self.info = ModelInfo(model_id=model_id, weights_sha256="0" * 64, dim=3, preprocessing=spec)
        self.recipe = EncoderRecipe(self.info, self.backend, self.precision)
        self.delay_s = delay_s
        self.batch_sizes: list[int] = []

    def encode_batches(self, batches):
        return pooled_encode_batches(self.encode, batches, self.parallel_requests)

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        self.batch_sizes.append(len(pixels))
        time.sleep(self.delay_s)  # stands in for a model's compute, so concurrent queries queue up
        vectors = pixels.reshape(len(pixels), -1, 3).mean(axis=1) - 127.5
        return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
