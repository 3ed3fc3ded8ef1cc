"""Group queries that arrive together into one encoder call.

One worker thread owns the encoder. While it encodes a batch, new queries queue up; the next
call takes all of them at once (up to `max_batch`). A lone query is never delayed, and under
load the encoder runs fewer, larger batches, which is where its throughput is.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from fastret.engine.encoders import Encoder

DEFAULT_MAX_BATCH = 16


@dataclass(frozen=True)
class Encoded:
    embedding: np.ndarray  # (D,) float32, unit norm
    batch_size: int  # how many queries shared the encoder call


class MicroBatcher:
    """Thread-safe `submit(pixels) -> Future[Encoded]` in front of one Encoder."""

    def __init__(self, encoder: Encoder, max_batch: int = DEFAULT_MAX_BATCH) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.encoder = encoder
        self.max_batch = max_batch
        self._queue: queue.SimpleQueue[tuple[np.ndarray, Future] | None] = queue.SimpleQueue()
        self._worker = threading.Thread(target=self._run, name="fastret-encoder", daemon=True)
        self._worker.start()

    def submit(self, pixels: np.ndarray) -> Future:
        """Queue one (H, W, 3) uint8 crop; the future resolves to its `Encoded`."""
        future: Future = Future()
        self._queue.put((pixels, future))
        return future

    def close(self) -> None:
        """Finish the queued work, then stop the worker."""
        self._queue.put(None)
        self._worker.join()

    def _next_batch(self) -> tuple[list[tuple[np.ndarray, Future]], bool]:
        """Block for one job, then take whatever else is already waiting; also say if closing."""
        first = self._queue.get()
        if first is None:
            return [], True
        batch = [first]
        while len(batch) < self.max_batch:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                return batch, True
            batch.append(job)
        return batch, False

    def _run(self) -> None:
        closing = False
        while not closing:
            batch, closing = self._next_batch()
            batch = [(pixels, future) for pixels, future in batch if future.set_running_or_notify_cancel()]
            if not batch:
                continue
            try:
                embeddings = self.encoder.encode(np.stack([pixels for pixels, _ in batch]))
            except Exception as exc:  # the callers get the encoder's error; the worker lives on
                for _, future in batch:
                    future.set_exception(exc)
                continue
            for (_, future), embedding in zip(batch, embeddings):
                future.set_result(Encoded(embedding, len(batch)))
