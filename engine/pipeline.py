"""Files -> decoded batches -> embeddings, with decoding pipelined against the encoder.

Decoder threads (Pillow releases the GIL while decoding and resampling) fill fixed-size batches
while the main thread encodes the previous ones. A bad file is skipped with a reason naming it;
it never stops the job.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from fastret.engine.decode import DEFAULT_MAX_PIXELS, ImageError, Preprocessing, load_pixels
from fastret.engine.encoders import Encoder, default_threads

DEFAULT_BATCH_SIZE = 16
"""Measured best on 2 cores with OpenVINO (BENCHMARKS.md, "CPU speed"); GPUs want 64-256."""
DEFAULT_WORKERS = max(1, default_threads() // 4)
"""Decoding is ~10% of a CPU encoder's work: one decoder thread per 4 cores keeps it ahead."""


@dataclass(frozen=True)
class Skipped:
    path: Path
    reason: str

    def line(self) -> str:
        return f"skipped {self.path}: {self.reason}"


@dataclass
class DecodedBatch:
    paths: list[Path]
    pixels: np.ndarray  # (n, H, W, 3) uint8
    skipped: list[Skipped]
    seconds: float


@dataclass
class EmbedResult:
    """Embeddings of the files that decoded, in input order, and what was skipped and why."""

    paths: list[Path]
    embeddings: np.ndarray
    skipped: list[Skipped] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        total = self.stage_seconds.get("total", 0.0)
        return len(self.paths) / total if total > 0 else 0.0


def decode_batch(
    paths: Sequence[Path], spec: Preprocessing, *, draft: bool = True, max_pixels: int = DEFAULT_MAX_PIXELS
) -> DecodedBatch:
    """Decode a list of files; failures become Skipped entries, never exceptions."""
    started = time.perf_counter()
    kept: list[Path] = []
    crops: list[np.ndarray] = []
    skipped: list[Skipped] = []
    for path in paths:
        try:
            crops.append(load_pixels(path, spec, draft=draft, max_pixels=max_pixels))
            kept.append(Path(path))
        except ImageError as exc:
            skipped.append(Skipped(Path(path), str(exc)))
        except Exception as exc:  # a decoder bug must not end a batch job either
            skipped.append(Skipped(Path(path), f"unexpected {type(exc).__name__}: {exc}"))
    pixels = np.stack(crops) if crops else np.empty((0, spec.size, spec.size, 3), np.uint8)
    return DecodedBatch(kept, pixels, skipped, time.perf_counter() - started)


def decoded_batches(
    paths: Sequence[Path],
    spec: Preprocessing,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    workers: int = DEFAULT_WORKERS,
    draft: bool = True,
) -> Iterator[DecodedBatch]:
    """Yield decoded batches in input order, decoding up to `workers` batches ahead."""
    chunks = [list(paths[i : i + batch_size]) for i in range(0, len(paths), batch_size)]
    if workers <= 0:
        for chunk in chunks:
            yield decode_batch(chunk, spec, draft=draft)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fastret-decode") as pool:
        pending: deque = deque()
        chunk_iter = iter(chunks)
        for chunk in chunk_iter:
            pending.append(pool.submit(decode_batch, chunk, spec, draft=draft))
            if len(pending) > workers:
                break
        while pending:
            yield pending.popleft().result()
            next_chunk = next(chunk_iter, None)
            if next_chunk is not None:
                pending.append(pool.submit(decode_batch, next_chunk, spec, draft=draft))


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", disable=not enabled, file=sys.stderr, dynamic_ncols=True)


def embed_files(
    paths: Sequence[Path],
    encoder: Encoder,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    workers: int = DEFAULT_WORKERS,
    draft: bool = True,
    progress: bool = False,
    on_skip: Callable[[Skipped], None] | None = None,
) -> EmbedResult:
    """Embed every file that decodes; report the others through `on_skip` as they happen."""
    spec = encoder.info.preprocessing
    started = time.perf_counter()
    kept: list[Path] = []
    parts: list[np.ndarray] = []
    skipped: list[Skipped] = []
    decode_s = encode_s = 0.0
    with _progress(len(paths), progress) as bar:
        for batch in decoded_batches(paths, spec, batch_size=batch_size, workers=workers, draft=draft):
            decode_s += batch.seconds
            for skip in batch.skipped:
                skipped.append(skip)
                if on_skip is not None:
                    bar.clear()
                    on_skip(skip)
            if len(batch.paths):
                t0 = time.perf_counter()
                parts.append(encoder.encode(batch.pixels))
                encode_s += time.perf_counter() - t0
                kept.extend(batch.paths)
            bar.update(len(batch.paths) + len(batch.skipped))
    embeddings = np.concatenate(parts) if parts else np.empty((0, encoder.info.dim), np.float32)
    return EmbedResult(
        paths=kept,
        embeddings=embeddings,
        skipped=skipped,
        stage_seconds={
            "decode_worker": round(decode_s, 4),
            "encode": round(encode_s, 4),
            "total": round(time.perf_counter() - started, 4),
        },
    )
