"""Runtimes that turn uint8 pixel batches into embeddings.

Every encoder has the same small interface (`Encoder`): `encode(pixels)` takes a (N, H, W, 3)
uint8 batch in the model's preprocessing and returns (N, D) float32, L2-normalised;
`encode_batches` does the same for a stream of batches, as fast as the runtime can (GPU encoders
keep two batches in flight, CPU encoders serve `parallel_requests` calls at once); and each says
what runs (`backend`, `precision`) and how to open the same encoder again (`recipe`). The PyTorch
encoder is the reference (and the baseline); ONNX Runtime runs the exported graph everywhere, and
service/load.py picks the fastest runtime for the machine (OpenVINO, TensorRT, ...) by measurement.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol

import numpy as np

from fastret.engine.decode import Preprocessing

BACKENDS = (
    "auto", "onnxruntime", "onnxruntime-trt", "openvino", "torch", "torch-cuda", "torch-cuda-fp16", "tensorrt"
)
PRECISIONS = ("auto", "fp32", "bf16", "int8")
"""What a user may ask for. auto: the fastest precision that passed its parity check on this machine
(see service/load.py). An encoder's own `precision` says what really runs, which may also be fp16
(the GPU runtimes)."""


@dataclass(frozen=True)
class ModelInfo:
    """What an index records about the model that made it, and checks on load."""

    model_id: str
    weights_sha256: str
    dim: int
    preprocessing: Preprocessing

    def to_dict(self) -> dict:
        return {
            "model_id": self.model_id,
            "weights_sha256": self.weights_sha256,
            "dim": self.dim,
            "preprocessing": self.preprocessing.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "ModelInfo":
        return cls(
            model_id=str(data["model_id"]),
            weights_sha256=str(data["weights_sha256"]),
            dim=int(data["dim"]),
            preprocessing=Preprocessing.from_dict(data["preprocessing"]),
        )


def artefact_files(path: Path) -> list[Path]:
    """The files an artefact is made of: an OpenVINO IR is its .xml and its .bin, others one file."""
    path = Path(path)
    return [path, path.with_suffix(".bin")] if path.suffix == ".xml" else [path]


def artefact_size(path: Path) -> int:
    """Bytes of an artefact's files (a cheap check that a recorded artefact is still the same)."""
    return sum(part.stat().st_size for part in artefact_files(path))


@dataclass(frozen=True)
class EncoderRecipe:
    """Exactly which encoder embedded an index: the model, the runtime and the precision it ran, and
    the artefact file it ran (None for the PyTorch backends, whose artefact is the weights).

    An index records it, so queries are embedded by the same artefact
    (service/load.py, encoder_from_recipe); `artefact_bytes` is checked on every open,
    `artefact_sha256` (None where the export did not record one) is for a full verification.
    """

    model: ModelInfo
    backend: str
    precision: str
    artefact: str | None = None  # absolute path of the file the runtime opens
    artefact_sha256: str | None = None
    artefact_bytes: int | None = None

    def to_dict(self) -> dict:
        return {
            "model": self.model.to_dict(),
            "backend": self.backend,
            "precision": self.precision,
            "artefact": self.artefact,
            "artefact_sha256": self.artefact_sha256,
            "artefact_bytes": self.artefact_bytes,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "EncoderRecipe":
        """The recipe an index recorded; ValueError naming what is missing or malformed."""
        try:
            bytes_ = data.get("artefact_bytes")
            return cls(
                model=ModelInfo.from_dict(data["model"]),
                backend=str(data["backend"]),
                precision=str(data["precision"]),
                artefact=None if data.get("artefact") is None else str(data["artefact"]),
                artefact_sha256=None if data.get("artefact_sha256") is None else str(data["artefact_sha256"]),
                artefact_bytes=None if bytes_ is None else int(bytes_),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"malformed encoder recipe ({type(exc).__name__}: {exc})") from None

    def line(self) -> str:
        """'backend (precision) on ARTEFACT' for messages."""
        where = f" on {self.artefact}" if self.artefact else f" ({self.model.model_id} weights)"
        return f"{self.backend} ({self.precision}){where}"


class Encoder(Protocol):
    info: ModelInfo
    backend: str
    precision: str  # what really runs: fp32, bf16, int8 or fp16
    parallel_requests: int  # `encode` calls it serves at once (CPU runtimes in throughput workload)
    recipe: EncoderRecipe

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 -> (N, D) float32, rows of unit length."""
        ...

    def encode_batches(self, batches: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """One `encode` result per batch, in order, with the runtime's own overlap of batches."""
        ...


def describe_runtime(encoder: Encoder) -> str:
    """'backend (precision)' for logs and reports."""
    return f"{encoder.backend} ({encoder.precision})"


def pooled_encode_batches(
    encode: Callable[[np.ndarray], np.ndarray], batches: Iterable[np.ndarray], parallel_requests: int
) -> Iterator[np.ndarray]:
    """`encode` over a stream of batches from `parallel_requests` threads, results in input order.

    While one result is handed back, up to parallel_requests - 1 calls keep running: the stream
    of a CPU runtime that serves several requests at once (OpenVINO's throughput streams).
    """
    in_flight: deque[Future] = deque()
    with ThreadPoolExecutor(max(1, parallel_requests), thread_name_prefix="fastret-encode") as pool:
        for batch in batches:
            in_flight.append(pool.submit(encode, batch))
            while len(in_flight) >= parallel_requests:
                yield in_flight.popleft().result()
        while in_flight:
            yield in_flight.popleft().result()


def default_threads() -> int:
    """Cores this process may use (respects taskset / cgroup affinity)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


@dataclass
class TorchEncoder:
    """fp32 PyTorch eager on the CPU: the reference implementation."""

    module: object
    info: ModelInfo
    threads: int = field(default_factory=default_threads)
    backend: str = field(default="torch", init=False)
    precision: str = field(default="fp32", init=False)
    parallel_requests: int = field(default=1, init=False)

    def __post_init__(self) -> None:
        import torch

        torch.set_num_threads(self.threads)

    @property
    def recipe(self) -> EncoderRecipe:
        return EncoderRecipe(self.info, self.backend, self.precision)

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            # A private, writable copy: torch refuses to share read-only numpy memory.
            return self.module(torch.from_numpy(np.array(pixels, copy=True))).numpy()

    def encode_batches(self, batches: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        return pooled_encode_batches(self.encode, batches, self.parallel_requests)


def ort_providers(device: str = "auto", tensorrt_options: dict | None = None) -> list:
    """ONNX Runtime providers to ask for: GPU ones first where this onnxruntime build has them.

    With `tensorrt_options`, the TensorRT execution provider leads (onnxruntime-gpu builds only);
    nodes it cannot take fall back to CUDA, then CPU.
    """
    import onnxruntime as ort

    available = ort.get_available_providers()
    wanted: list = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device != "cpu" else ["CPUExecutionProvider"]
    if tensorrt_options is not None and device != "cpu":
        wanted.insert(0, ("TensorrtExecutionProvider", tensorrt_options))
    chosen = [p for p in wanted if (p[0] if isinstance(p, tuple) else p) in available]
    return chosen or ["CPUExecutionProvider"]


def ort_tensorrt_options(cache_dir: Path | None, input_name: str, size: int, batches: tuple[int, int, int]) -> dict:
    """TensorRT EP settings: FP16 with LayerNorm kept fp32, one batch profile, and engine + timing
    caches in `cache_dir` (None: no caches, nothing written; the engine is built at every start)."""
    low, opt, high = (f"{input_name}:{b}x{size}x{size}x3" for b in batches)
    caches = {} if cache_dir is None else {
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache_dir),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(cache_dir),
    }
    return {
        "trt_fp16_enable": True,
        "trt_layer_norm_fp32_fallback": True,
        **caches,
        "trt_profile_min_shapes": low,
        "trt_profile_opt_shapes": opt,
        "trt_profile_max_shapes": high,
    }


def ort_session(path: Path, providers: list, threads: int):
    """An ONNX Runtime session with every graph optimisation, `threads` threads per call, quiet logs."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=providers)


@dataclass
class OnnxEncoder:
    """ONNX Runtime session over an exported model (CPU here; CUDA where onnxruntime-gpu is).

    `precision` is the graph's (fp32, int8, or fp16 for the FP16 ONNX and the TensorRT provider).
    `workload="throughput"` on the CPU runs one-thread calls, `parallel_requests` (one per core) at
    once, for batch jobs: no thread synchronisation inside a call (CLIP's dynamic INT8 at batch 16:
    65 -> 74 images/s on 2 cores, BENCHMARKS.md "CPU speed"). "latency" gives one call all cores.
    """

    path: Path
    info: ModelInfo
    threads: int = field(default_factory=default_threads)
    providers: list | None = None
    precision: str = "fp32"
    workload: str = "latency"
    backend: str = "onnxruntime"
    artefact_sha256: str | None = None
    parallel_requests: int = field(init=False)

    def __post_init__(self) -> None:
        self.artefact_bytes = artefact_size(self.path)
        self.providers = self.providers or ort_providers()
        on_cpu = all((p[0] if isinstance(p, tuple) else p) == "CPUExecutionProvider" for p in self.providers)
        self.parallel_requests = self.threads if self.workload == "throughput" and on_cpu else 1
        self.session = ort_session(self.path, self.providers, max(1, self.threads // self.parallel_requests))
        self.providers = self.session.get_providers()  # what ONNX Runtime actually enabled
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name

    @property
    def recipe(self) -> EncoderRecipe:
        artefact = str(Path(self.path).resolve())
        return EncoderRecipe(self.info, self.backend, self.precision, artefact, self.artefact_sha256, self.artefact_bytes)

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        out = self.session.run([self.output_name], {self.input_name: np.ascontiguousarray(pixels)})[0]
        return out.astype(np.float32, copy=False)

    def encode_batches(self, batches: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        return pooled_encode_batches(self.encode, batches, self.parallel_requests)
