"""Files -> embeddings: input order, skip reports, worker-count independence, draft decoding."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from fastret.engine.decode import Preprocessing, load_pixels
from fastret.engine.encoders import EncoderRecipe, ModelInfo, pooled_encode_batches
from fastret.engine.pipeline import decoded_batches, embed_files

SPEC = Preprocessing(size=24, resize=24, interpolation="bilinear", mean=(0.0,) * 3, std=(1.0,) * 3)

# Measured on this machine (2026-11-26) over 20 wang1k photos upscaled about 5x to sizes that do
# not divide by the DCT scale: draft vs full decode, mean |diff| <= 1.1 / 255, cosine >= 0.998.
DRAFT_MEAN_ABS_DIFF = 2.0
DRAFT_MIN_COSINE = 0.995


@dataclass
class ProjectionEncoder:
    """A deterministic stand-in encoder: a fixed random projection of the pixels, normalised."""

    info: ModelInfo = field(
        default_factory=lambda: ModelInfo("projection", "0" * 64, 8, SPEC)
    )
    backend: str = "numpy"
    precision: str = "fp32"
    parallel_requests: int = 1
    calls: list[int] = field(default_factory=list)

    @property
    def recipe(self) -> EncoderRecipe:
        return EncoderRecipe(self.info, self.backend, self.precision)

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        self.calls.append(len(pixels))
        weights = np.random.default_rng(0).normal(size=(pixels[0].size, self.info.dim))
        out = pixels.reshape(len(pixels), -1).astype(np.float64) @ weights
        return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)

    def encode_batches(self, batches):
        return pooled_encode_batches(self.encode, batches, self.parallel_requests)


def write_images(folder: Path, count: int, side: int = 40) -> list[Path]:
    rng = np.random.default_rng(3)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"{i:02d}.png"
        Image.fromarray(rng.integers(0, 256, (side, side + i, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def photo_like(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth gradients, blurred discs and sensor-like noise: what a camera JPEG looks like."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(width, height)
    base = np.stack([200 * yy + 30, 180 * xx + 40, 120 * (1 - yy) + 60 * xx], axis=-1)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(400):
        x, y, r = rng.integers(0, width), rng.integers(0, height), rng.integers(10, 80)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    pixels = np.asarray(img.filter(ImageFilter.GaussianBlur(2)), dtype=np.float64)
    pixels += rng.normal(0, 6, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("workers", [0, 2])
def test_embed_files_keeps_order_and_reports_skips(tmp_path, bad_images, workers):
    good = write_images(tmp_path, 7)
    bad = [path for path, _ in bad_images.values()]
    mixed = [good[0], bad[0], good[1], good[2], bad[1], bad[2], good[3], good[4], bad[3], good[5], bad[4], good[6]]
    encoder = ProjectionEncoder()
    reported = []
    result = embed_files(mixed, encoder, batch_size=3, workers=workers, on_skip=reported.append)
    assert result.paths == good
    assert [s.path for s in result.skipped] == bad and reported == result.skipped
    for skip, (_, fragment) in zip(result.skipped, bad_images.values()):
        assert fragment in skip.reason
    one_by_one = np.concatenate([encoder.encode(load_pixels(p, SPEC)[None]) for p in good])
    np.testing.assert_allclose(result.embeddings, one_by_one, atol=1e-6)
    assert set(result.stage_seconds) >= {"decode_worker", "encode", "total"}


@dataclass
class ConcurrentEncoder(ProjectionEncoder):
    """Serves up to `parallel_requests` calls at once; early calls are the slowest, so later batches
    finish first: the pipeline must still return embeddings in input order."""

    parallel_requests: int = 3
    active: int = 0
    most_active: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        with self.lock:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
            delay = max(0.0, 0.03 - 0.005 * len(self.calls))
        time.sleep(delay)
        out = super().encode(pixels)
        with self.lock:
            self.active -= 1
        return out


@pytest.mark.parametrize("workers", [0, 2])
def test_parallel_encoder_requests_keep_input_order(tmp_path, bad_images, workers):
    good = write_images(tmp_path, 11)
    mixed = good[:4] + [bad_images["truncated.jpg"][0]] + good[4:]
    encoder = ConcurrentEncoder()
    result = embed_files(mixed, encoder, batch_size=2, workers=workers)
    assert result.paths == good and [s.path for s in result.skipped] == [bad_images["truncated.jpg"][0]]
    reference = ProjectionEncoder()
    one_by_one = np.concatenate([reference.encode(load_pixels(p, SPEC)[None]) for p in good])
    np.testing.assert_allclose(result.embeddings, one_by_one, atol=1e-6)
    assert 1 < encoder.most_active <= encoder.parallel_requests


@pytest.mark.parametrize("workers", [0, 2])
def test_progress_counts_every_file_once_as_it_finishes(tmp_path, bad_images, workers):
    good = write_images(tmp_path, 5)
    bad = [path for path, _ in bad_images.values()][:2]
    steps: list[int] = []
    mixed = good[:2] + bad + good[2:]
    result = embed_files(mixed, ProjectionEncoder(), batch_size=3, workers=workers, on_progress=steps.append)
    # Batches [g0 g1 b0] [b1 g2 g3] [g4]: skips are counted when decoded, embedded files when their batch returns.
    assert steps == [1, 2, 1, 2, 1] and sum(steps) == len(result.paths) + len(result.skipped) == 7


def test_flip_averaged_encoder_streams_both_views_through_the_wrapped_encoder(tmp_path):
    from fastret.engine.tta import FlipAveragedEncoder, flip_averaged

    paths = write_images(tmp_path, 5)
    inner = ConcurrentEncoder(parallel_requests=2)
    result = embed_files(paths, FlipAveragedEncoder(inner), batch_size=2, workers=0)
    assert sorted(inner.calls) == [1, 1, 2, 2, 2, 2]  # each batch and its mirror image, through the wrapped stream
    one_by_one = np.concatenate([flip_averaged(ProjectionEncoder(), load_pixels(p, SPEC)[None]) for p in paths])
    np.testing.assert_allclose(result.embeddings, one_by_one, atol=1e-6)


def test_nothing_to_embed_gives_an_empty_matrix(tmp_path, bad_images):
    encoder = ProjectionEncoder()
    for paths in ([], [path for path, _ in bad_images.values()]):
        result = embed_files(paths, encoder, batch_size=2)
        assert result.embeddings.shape == (0, 8) and result.paths == []
    assert encoder.calls == []  # the encoder never sees an empty batch


@pytest.mark.parametrize("workers", [0, 1, 2, 5])
def test_decoded_batches_come_in_input_order(tmp_path, workers):
    paths = write_images(tmp_path, 10, side=30)
    batches = list(decoded_batches(paths, SPEC, batch_size=3, workers=workers))
    assert [len(b.paths) for b in batches] == [3, 3, 3, 1]
    assert [p for b in batches for p in b.paths] == paths


def test_worker_count_does_not_change_embeddings(tmp_path, bundled_onnx):
    paths = write_images(tmp_path, 7, side=64)
    runs = [embed_files(paths, bundled_onnx, batch_size=3, workers=w).embeddings for w in (0, 2)]
    assert runs[0].shape == (7, 1280)
    np.testing.assert_array_equal(runs[0], runs[1])


def draft_vs_full(path: Path, encoder) -> tuple[float, float]:
    spec = encoder.info.preprocessing
    with Image.open(path) as img:
        width = img.width
        assert img.draft("RGB", (spec.resize, spec.resize))[1][2] == width / 4  # a 1/4 DCT decode
    draft, full = (load_pixels(path, spec, draft=d) for d in (True, False))
    embeddings = encoder.encode(np.stack([draft, full]))
    return float(np.abs(draft.astype(np.float64) - full).mean()), float(embeddings[0] @ embeddings[1])


def test_draft_decode_matches_full_decode_on_a_large_jpeg(tmp_path, bundled_onnx):
    # 2002 x 1501 does not divide by the 1/4 DCT scale: the crop must still line up (a crop
    # box computed from the rounded-up draft size gave 3.2 / 255 here; the full image's extent 0.5).
    path = tmp_path / "large.jpg"
    photo_like(2002, 1501).save(path, quality=92)
    mean_abs, cosine = draft_vs_full(path, bundled_onnx)
    assert mean_abs <= DRAFT_MEAN_ABS_DIFF and cosine >= DRAFT_MIN_COSINE, (mean_abs, cosine)
    drafted, full = (embed_files([path], bundled_onnx, draft=d).embeddings[0] for d in (True, False))
    assert float(drafted @ full) >= DRAFT_MIN_COSINE


@pytest.mark.data
@pytest.mark.parametrize("name, size", [("buildings/299.jpg", (2002, 1501)), ("elephants/512.jpg", (2000, 1333))])
def test_draft_decode_matches_full_decode_on_upscaled_photos(wang1k, tmp_path, bundled_onnx, name, size):
    path = tmp_path / "large.jpg"
    Image.open(wang1k / name).convert("RGB").resize(size, Image.Resampling.BICUBIC).save(path, quality=92)
    mean_abs, cosine = draft_vs_full(path, bundled_onnx)
    assert mean_abs <= DRAFT_MEAN_ABS_DIFF and cosine >= DRAFT_MIN_COSINE, (mean_abs, cosine)
