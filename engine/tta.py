"""Test-time views of an image: horizontal-flip averaging and ensembles of embeddings.

Both are opt-in ways to get a steadier embedding for the price of more encoder passes. The
result stays a unit vector in a space the index can search, so they compose with everything else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain
from typing import Iterable, Iterator

import numpy as np

from fastret.engine.encoders import Encoder, EncoderRecipe, ModelInfo


def l2_normalise(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero) as float32."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)


def flip_horizontal(pixels: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 batch mirrored left-right (a contiguous copy the runtimes accept)."""
    return np.ascontiguousarray(pixels[:, :, ::-1, :])


def average_views(*views: np.ndarray) -> np.ndarray:
    """Unit-length mean of several (N, D) unit embeddings of the same images."""
    if not views:
        raise ValueError("average_views needs at least one view")
    return l2_normalise(np.mean(np.stack([np.asarray(v, dtype=np.float32) for v in views]), axis=0))


def flip_averaged(encoder: Encoder, pixels: np.ndarray) -> np.ndarray:
    """Embed each image and its mirror image, average, renormalise: two encoder passes."""
    return average_views(encoder.encode(pixels), encoder.encode(flip_horizontal(pixels)))


@dataclass
class FlipAveragedEncoder:
    """An Encoder whose embeddings are flip-averaged; drop-in for embed_files / embed_query.

    The vectors live in the wrapped model's space (same ModelInfo, same recipe), so a flip-averaged
    query can search an index built without flips and vice versa.
    """

    inner: Encoder
    info: ModelInfo = field(init=False)
    backend: str = field(init=False)
    precision: str = field(init=False)
    parallel_requests: int = field(init=False)
    recipe: EncoderRecipe = field(init=False)

    def __post_init__(self) -> None:
        self.info = self.inner.info
        self.backend = f"{self.inner.backend}+flip"
        self.precision = self.inner.precision
        self.parallel_requests = self.inner.parallel_requests
        self.recipe = self.inner.recipe

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        return flip_averaged(self.inner, pixels)

    def encode_batches(self, batches: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """Each batch and its mirror image go through the wrapped encoder's own stream, one after the other."""
        views = self.inner.encode_batches(chain.from_iterable((batch, flip_horizontal(batch)) for batch in batches))
        for plain, mirrored in zip(views, views):
            yield average_views(plain, mirrored)


def ensemble_embeddings(*parts: np.ndarray, weights: tuple[float, ...] | None = None) -> np.ndarray:
    """Concatenate per-encoder embeddings of the same images into one unit vector.

    Each part is normalised first, then scaled by sqrt(weight), so the cosine of two ensemble
    vectors is the weighted mean of the per-encoder cosines (equal weights by default).
    """
    if not parts:
        raise ValueError("ensemble_embeddings needs at least one part")
    if len({len(p) for p in parts}) != 1:
        raise ValueError(f"parts hold different numbers of images: {[len(p) for p in parts]}")
    weights = weights or (1.0,) * len(parts)
    if len(weights) != len(parts) or min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(f"need one non-negative weight per part (got {weights} for {len(parts)} parts)")
    total = float(sum(weights))
    scaled = [l2_normalise(p) * np.float32(np.sqrt(w / total)) for p, w in zip(parts, weights)]
    return np.concatenate(scaled, axis=1)
