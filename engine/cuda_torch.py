"""PyTorch on a CUDA GPU: the fp32 eager GPU baseline and the FP16 + CUDA-graphs fast path.

Also home of `StagedPipeline`, the host<->device staging every GPU encoder shares (the TensorRT
runtime too): pinned host buffers and two batches in flight on one CUDA stream, so that copying
the next batch into pinned memory (and the caller's decoding) overlaps the GPU's work on the
previous one. Device memory, pinned memory, streams and events all come from torch, which
fastret already depends on, so no cuda-python is needed.
"""

from __future__ import annotations

from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass, field
from itertools import cycle
from typing import Callable, Iterable, Iterator

import numpy as np

from fastret.engine.encoders import EncoderRecipe, ModelInfo

MAX_BATCH = 256
STAGING_SLOTS = 2
GRAPH_WARMUP_RUNS = 3


def cuda_missing() -> str | None:
    """Why no CUDA device can be used here, or None when one can."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return "torch is not installed"
    if not torch.cuda.is_available():
        build = "a CPU-only torch build" if torch.version.cuda is None else f"torch built for CUDA {torch.version.cuda}"
        return f"no CUDA device is visible ({build}); GPU backends need an NVIDIA GPU and a CUDA build of torch"
    return None


def batch_bucket(n: int, max_batch: int = MAX_BATCH) -> int:
    """The CUDA graph a batch of n runs in: the next power of two, capped at max_batch."""
    if n < 1 or n > max_batch:
        raise ValueError(f"batch of {n} is outside 1..{max_batch}")
    return min(1 << (n - 1).bit_length(), max_batch)


def split_rows(pixels: np.ndarray, max_batch: int) -> list[np.ndarray]:
    """Consecutive chunks of at most max_batch rows (one empty chunk for an empty batch)."""
    return [pixels[i : i + max_batch] for i in range(0, len(pixels), max_batch)] or [pixels[:0]]


@dataclass
class _Slot:
    host_in: np.ndarray  # numpy view of pinned memory
    device_in: object  # torch.Tensor on the GPU
    host_out: np.ndarray
    keep_alive: tuple  # the pinned torch tensors behind the numpy views
    done: object  # torch.cuda.Event (None on the CPU)


class StagedPipeline:
    """Run `launch` (device uint8 batch -> device float32 embeddings) over host batches.

    Two pinned staging slots: while the GPU encodes chunk i, the host fills the other slot with
    chunk i+1; a slot is reused only after its result was copied out. Results come back in order.
    On device "cpu" the same code runs synchronously (unpinned, no stream): its logic is testable
    without a GPU.
    """

    def __init__(
        self,
        launch: Callable,
        max_batch: int,
        item_shape: tuple[int, ...],
        dim: int,
        slots: int = STAGING_SLOTS,
        device: str = "cuda",
    ):
        import torch

        self.launch = launch
        self.max_batch = max_batch
        self.dim = dim
        self.device = device
        self.stream = torch.cuda.Stream() if device == "cuda" else None
        self.slots = [self._slot(item_shape) for _ in range(slots)]

    def _slot(self, item_shape: tuple[int, ...]) -> _Slot:
        import torch

        pin = self.device == "cuda"
        host_in = torch.empty((self.max_batch, *item_shape), dtype=torch.uint8, pin_memory=pin)
        host_out = torch.empty((self.max_batch, self.dim), dtype=torch.float32, pin_memory=pin)
        device_in = torch.empty((self.max_batch, *item_shape), dtype=torch.uint8, device=self.device)
        done = torch.cuda.Event() if pin else None
        return _Slot(host_in.numpy(), device_in, host_out.numpy(), (host_in, host_out), done)

    def _enqueue(self, slot: _Slot, chunk: np.ndarray) -> None:
        import torch

        n = len(chunk)
        if n == 0:
            return
        np.copyto(slot.host_in[:n], chunk)
        with torch.cuda.stream(self.stream) if self.stream is not None else nullcontext():
            device_in = slot.device_in[:n]
            device_in.copy_(slot.keep_alive[0][:n], non_blocking=True)
            out = self.launch(device_in)
            slot.keep_alive[1][:n].copy_(out, non_blocking=True)
            if slot.done is not None:
                slot.done.record(self.stream)

    def _collect(self, slot: _Slot, n: int) -> np.ndarray:
        if n == 0:
            return np.empty((0, self.dim), np.float32)
        if slot.done is not None:
            slot.done.synchronize()
        return slot.host_out[:n].copy()

    def map(self, chunks: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """Embeddings of each chunk (each at most max_batch rows), in order, two in flight."""
        in_flight: deque[tuple[_Slot, int]] = deque()
        slots = cycle(self.slots)
        for chunk in chunks:
            if len(chunk) > self.max_batch:
                raise ValueError(f"chunk of {len(chunk)} rows exceeds the maximum batch {self.max_batch}")
            if len(in_flight) == len(self.slots):
                yield self._collect(*in_flight.popleft())
            slot = next(slots)
            self._enqueue(slot, np.ascontiguousarray(chunk))
            in_flight.append((slot, len(chunk)))
        while in_flight:
            yield self._collect(*in_flight.popleft())


def staged_encode_batches(pipeline: StagedPipeline, batches: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    """One (N, D) result per input batch of any size, via max-batch chunks kept two in flight."""
    chunk_counts: deque[int] = deque()

    def chunks() -> Iterator[np.ndarray]:
        for batch in batches:
            pieces = split_rows(batch, pipeline.max_batch)
            chunk_counts.append(len(pieces))
            yield from pieces

    parts: list[np.ndarray] = []
    for result in pipeline.map(chunks()):
        parts.append(result)
        if len(parts) == chunk_counts[0]:
            chunk_counts.popleft()
            yield np.concatenate(parts) if len(parts) > 1 else parts[0]
            parts = []


@dataclass
class TorchCudaEncoder:
    """An EmbeddingModel on the GPU: fp32 eager (the GPU baseline) or FP16 with CUDA graphs.

    FP16 casts the weights once and runs under autocast, which keeps layer_norm, softmax and
    norm in fp32 (the overflow-prone ops of NVIDIA/TensorRT#2564). With graphs, one CUDA graph per
    power-of-two batch bucket is captured on first use and replayed; a batch is padded to its
    bucket (rows are independent in eval mode, so padding never changes a real row).
    `device="cpu"` (no graphs) exists to test the precision logic without a GPU.
    """

    module: object
    info: ModelInfo
    half: bool = True
    graphs: bool = True
    max_batch: int = MAX_BATCH
    device: str = "cuda"
    backend: str = field(init=False)
    precision: str = field(init=False)
    parallel_requests: int = field(default=1, init=False)  # the staging keeps batches in flight instead

    def __post_init__(self) -> None:
        reason = cuda_missing() if self.device == "cuda" else None
        if reason:
            raise RuntimeError(reason)
        if self.graphs and self.device != "cuda":
            raise ValueError("CUDA graphs need device 'cuda'")
        self.backend = "torch-cuda-fp16" if self.half else "torch-cuda"
        self.precision = "fp16" if self.half else "fp32"
        module = self.module.to(self.device).eval()
        self.module = module.half() if self.half else module
        self._graphs: dict[int, tuple] = {}  # bucket -> (graph, static input, static output)
        size = self.info.preprocessing.size
        self.pipeline = StagedPipeline(self._launch, self.max_batch, (size, size, 3), self.info.dim, device=self.device)

    def _forward(self, pixels):
        import torch

        with torch.inference_mode(), torch.autocast(
            self.device, dtype=torch.float16, enabled=self.half, cache_enabled=False
        ):
            return self.module(pixels).float()

    def _capture(self, bucket: int) -> tuple:
        import torch

        size = self.info.preprocessing.size
        static_in = torch.zeros((bucket, size, size, 3), dtype=torch.uint8, device="cuda")
        warmup = torch.cuda.Stream()
        warmup.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(warmup):
            for _ in range(GRAPH_WARMUP_RUNS):
                self._forward(static_in)
        torch.cuda.current_stream().wait_stream(warmup)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # a private memory pool per graph: no reuse hazards between buckets
            static_out = self._forward(static_in)
        return graph, static_in, static_out

    def _launch(self, device_in):
        if not self.graphs:
            return self._forward(device_in)
        n = device_in.shape[0]
        bucket = batch_bucket(n, self.max_batch)
        if bucket not in self._graphs:
            import torch

            self.pipeline.stream.synchronize()
            with torch.cuda.stream(torch.cuda.default_stream()):
                self._graphs[bucket] = self._capture(bucket)
            self.pipeline.stream.wait_stream(torch.cuda.default_stream())
        graph, static_in, static_out = self._graphs[bucket]
        static_in[:n].copy_(device_in)
        graph.replay()
        return static_out[:n]

    @property
    def recipe(self) -> EncoderRecipe:
        return EncoderRecipe(self.info, self.backend, self.precision)

    def encode_batches(self, batches: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """Encode a stream of batches keeping two on the GPU at once (see StagedPipeline)."""
        return staged_encode_batches(self.pipeline, batches)

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        return next(iter(self.encode_batches([pixels])))
