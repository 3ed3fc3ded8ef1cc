"""Files -> decoded batches -> embeddings, with decoding pipelined against the encoder.

Decoder threads (Pillow releases the GIL while decoding and resampling) fill fixed-size batches
while the encoder works on the previous ones, as its `encode_batches` stream overlaps them: GPU
encoders keep two batches in flight, CPU encoders as many calls as they have parallel requests
(OpenVINO's throughput streams). A bad file is skipped with a reason naming it; it never stops the
job. Progress goes to a caller's callback: the engine never prints.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from fastret.engine.decode import DEFAULT_MAX_PIXELS, ImageError, Preprocessing, Skipped, load_pixels_and_image
from fastret.engine.duplicates import thumbnail_of
from fastret.engine.encoders import Encoder, default_threads
from fastret.engine.thumbnails import Thumbnail, Thumbnails

DEFAULT_BATCH_SIZE = 4
"""Measured best on 2 cores (BENCHMARKS.md, "CPU speed"): with OpenVINO's two streams, two batches
of 4 in flight beat batch 16 by 5-15%; CLIP on ONNX Runtime INT8 is as fast at 4 as at 16.
GPUs want 64-256 (--batch-size)."""
DEFAULT_WORKERS = max(1, default_threads() // 4)
"""Decoding is ~10% of a CPU encoder's work: one decoder thread per 4 cores keeps it ahead."""


@dataclass
class DecodedBatch:
    paths: list[Path]
    pixels: np.ndarray  # (n, H, W, 3) uint8
    skipped: list[Skipped]
    seconds: float
    thumbnails: list[Thumbnail] | None = None  # per decoded path, when asked for


@dataclass
class EmbedResult:
    """Embeddings of the files that decoded, in input order, and what was skipped and why."""

    paths: list[Path]
    embeddings: np.ndarray
    skipped: list[Skipped] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    thumbnails: Thumbnails | None = None  # per embedded path, when asked for

    @property
    def images_per_second(self) -> float:
        total = self.stage_seconds.get("total", 0.0)
        return len(self.paths) / total if total > 0 else 0.0


def decode_batch(
    paths: Sequence[Path],
    spec: Preprocessing,
    *,
    draft: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    thumbnails: bool = False,
) -> DecodedBatch:
    """Decode a list of files; failures become Skipped entries, never exceptions. With `thumbnails`,
    also what the duplicate finder keeps of each image (thumbnail_of), from the same decode."""
    started = time.perf_counter()
    kept: list[Path] = []
    crops: list[np.ndarray] = []
    kept_thumbnails: list[Thumbnail] = []
    skipped: list[Skipped] = []
    for path in paths:
        try:
            crop, decoded = load_pixels_and_image(path, spec, draft=draft, max_pixels=max_pixels)
            thumbnail = thumbnail_of(decoded, Path(path), max_pixels=max_pixels) if thumbnails else None
            crops.append(crop)
            if thumbnail is not None:
                kept_thumbnails.append(thumbnail)
            kept.append(Path(path))
        except ImageError as exc:
            skipped.append(Skipped(Path(path), str(exc)))
        except Exception as exc:  # a decoder bug must not end a batch job either
            skipped.append(Skipped(Path(path), f"unexpected {type(exc).__name__}: {exc}"))
    pixels = np.stack(crops) if crops else np.empty((0, spec.size, spec.size, 3), np.uint8)
    return DecodedBatch(kept, pixels, skipped, time.perf_counter() - started, kept_thumbnails if thumbnails else None)


def decoded_batches(
    paths: Sequence[Path],
    spec: Preprocessing,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    workers: int = DEFAULT_WORKERS,
    draft: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    thumbnails: bool = False,
) -> Iterator[DecodedBatch]:
    """Yield decoded batches in input order, decoding up to `workers` batches ahead."""
    chunks = [list(paths[i : i + batch_size]) for i in range(0, len(paths), batch_size)]
    decode = partial(decode_batch, spec=spec, draft=draft, max_pixels=max_pixels, thumbnails=thumbnails)
    if workers <= 0:
        for chunk in chunks:
            yield decode(chunk)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fastret-decode") as pool:
        pending: deque = deque()
        chunk_iter = iter(chunks)
        for chunk in chunk_iter:
            pending.append(pool.submit(decode, chunk))
            if len(pending) > workers:
                break
        while pending:
            yield pending.popleft().result()
            next_chunk = next(chunk_iter, None)
            if next_chunk is not None:
                pending.append(pool.submit(decode, next_chunk))


def embed_files(
    paths: Sequence[Path],
    encoder: Encoder,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    workers: int = DEFAULT_WORKERS,
    draft: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    on_skip: Callable[[Skipped], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
    thumbnails: bool = False,
) -> EmbedResult:
    """Embed every file that decodes; report the others through `on_skip` as they happen.

    Decoded batches stream into `encoder.encode_batches`, which overlaps them its own way (GPU
    encoders: two batches in flight; CPU encoders: `parallel_requests` calls at once); the encoder
    never sees an empty batch. `on_progress(n)` is called with the number of files just finished
    (embedded or skipped): increments, whose sum is len(paths). In the stage times, `encode` is the
    time the job waited on the encoder, `decode_wait` the time it waited on the decoders, and
    `decode_worker` the decoders' own time (they run ahead, in parallel). With `thumbnails`, the
    result also holds what the duplicate finder keeps of each embedded image.
    """
    started = time.perf_counter()
    skipped: list[Skipped] = []
    fed: deque[DecodedBatch] = deque()  # batches handed to the encoder, awaiting embeddings
    decode_s = decode_wait_s = 0.0

    def pixel_batches() -> Iterator[np.ndarray]:
        nonlocal decode_s, decode_wait_s
        batches = decoded_batches(
            paths, encoder.info.preprocessing, batch_size=batch_size, workers=workers, draft=draft, max_pixels=max_pixels,
            thumbnails=thumbnails,
        )
        while True:
            waiting = time.perf_counter()
            batch = next(batches, None)
            decode_wait_s += time.perf_counter() - waiting
            if batch is None:
                return
            decode_s += batch.seconds
            skipped.extend(batch.skipped)
            if on_skip is not None:
                for skip in batch.skipped:
                    on_skip(skip)
            if batch.skipped and on_progress is not None:
                on_progress(len(batch.skipped))
            if len(batch.paths):
                fed.append(batch)
                yield batch.pixels

    kept: list[Path] = []
    kept_thumbnails: list[Thumbnail] = []
    parts: list[np.ndarray] = []
    for embeddings in encoder.encode_batches(pixel_batches()):
        batch = fed.popleft()
        parts.append(embeddings)
        kept.extend(batch.paths)
        kept_thumbnails.extend(batch.thumbnails or ())
        if on_progress is not None:
            on_progress(len(batch.paths))
    embeddings = np.concatenate(parts) if parts else np.empty((0, encoder.info.dim), np.float32)
    total = time.perf_counter() - started
    return EmbedResult(
        paths=kept,
        embeddings=embeddings,
        thumbnails=Thumbnails.of(kept_thumbnails) if thumbnails else None,
        skipped=skipped,
        stage_seconds={
            "decode_worker": round(decode_s, 4),
            "decode_wait": round(decode_wait_s, 4),
            "encode": round(total - decode_wait_s, 4),
            "total": round(total, 4),
        },
    )
