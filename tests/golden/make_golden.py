"""Regenerate the golden embeddings on purpose: `python tests/golden/make_golden.py`.

Run it only when a change to preprocessing or weights is intended; tests/test_golden.py fails
otherwise. It writes bundled_torch.npy: the bundled model's PyTorch (reference) embeddings of the
seeded synthetic images of `synthetic_images`.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

GOLDEN = Path(__file__).with_name("bundled_torch.npy")
SIZES = [(320, 240), (240, 320), (500, 500), (97, 131), (1024, 200)]
"""Landscape, portrait, square, smaller than the crop, and a panorama: each crops differently."""


def synthetic_images(folder: Path) -> list[Path]:
    """Seeded smooth colour fields with a few bright rectangles, saved as PNG (lossless, deterministic)."""
    paths = []
    for seed, (width, height) in enumerate(SIZES):
        rng = np.random.default_rng(seed)
        y, x = np.mgrid[0:height, 0:width] / max(width, height)
        channels = [np.sin(rng.uniform(2, 9) * x + rng.uniform(0, 6) * y + rng.uniform(0, 6)) for _ in range(3)]
        pixels = ((np.stack(channels, axis=-1) + 1) * 127.5).astype(np.uint8)
        for _ in range(4):
            top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
            pixels[top : top + height // 4, left : left + width // 4] = rng.integers(0, 256, 3)
        path = folder / f"synthetic-{seed}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def bundled_embeddings(folder: Path) -> np.ndarray:
    from fastret.engine.decode import load_pixels
    from fastret.export.models import bundled_source
    from fastret.service.load import encoder_for_source

    encoder = encoder_for_source(bundled_source(), "torch")
    crops = np.stack([load_pixels(path, encoder.info.preprocessing) for path in synthetic_images(folder)])
    return encoder.encode(crops)


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as folder:
        np.save(GOLDEN, bundled_embeddings(Path(folder)).astype(np.float32))
    print(f"wrote {GOLDEN}", file=sys.stderr)
