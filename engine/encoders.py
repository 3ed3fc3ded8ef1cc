"""Runtimes that turn uint8 pixel batches into embeddings.

Every encoder has the same small interface: `encode(pixels)` takes a (N, H, W, 3) uint8 batch
in the model's preprocessing and returns (N, D) float32, L2-normalised. The PyTorch encoder is
the reference (and the baseline); ONNX Runtime runs the exported graph everywhere, and
service/load.py picks the fastest runtime for the machine (OpenVINO, TensorRT, ...) by measurement.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from fastret.engine.decode import Preprocessing

BACKENDS = (
    "auto", "onnxruntime", "onnxruntime-trt", "openvino", "torch", "torch-cuda", "torch-cuda-fp16", "tensorrt"
)
PRECISIONS = ("auto", "fp32", "bf16", "int8")
"""auto: the fastest precision that passed its parity check on this machine (see service/load.py)."""


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


class Encoder(Protocol):
    info: ModelInfo
    backend: str

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 -> (N, D) float32, rows of unit length."""
        ...


def describe_runtime(encoder: Encoder) -> str:
    """'backend (precision)' for logs and reports."""
    return f"{encoder.backend} ({getattr(encoder, 'precision', 'fp32')})"


def default_threads() -> int:
    """Cores this process may use (respects taskset / cgroup affinity)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


@dataclass
class TorchEncoder:
    """fp32 PyTorch eager: the reference implementation."""

    module: object
    info: ModelInfo
    threads: int = field(default_factory=default_threads)
    backend: str = "torch"

    def __post_init__(self) -> None:
        import torch

        torch.set_num_threads(self.threads)

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            # A private, writable copy: torch refuses to share read-only numpy memory.
            return self.module(torch.from_numpy(np.array(pixels, copy=True))).numpy()


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


def ort_tensorrt_options(cache_dir: Path, input_name: str, size: int, batches: tuple[int, int, int]) -> dict:
    """TensorRT EP settings: FP16 with LayerNorm kept fp32, engine + timing caches, one batch profile."""
    low, opt, high = (f"{input_name}:{b}x{size}x{size}x3" for b in batches)
    return {
        "trt_fp16_enable": True,
        "trt_layer_norm_fp32_fallback": True,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache_dir),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(cache_dir),
        "trt_profile_min_shapes": low,
        "trt_profile_opt_shapes": opt,
        "trt_profile_max_shapes": high,
    }


@dataclass
class OnnxEncoder:
    """ONNX Runtime session over an exported model (CPU here; CUDA where onnxruntime-gpu is).

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

    def __post_init__(self) -> None:
        import onnxruntime as ort

        self.providers = self.providers or ort_providers()
        on_cpu = all((p[0] if isinstance(p, tuple) else p) == "CPUExecutionProvider" for p in self.providers)
        self.parallel_requests = self.threads if self.workload == "throughput" and on_cpu else 1
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = max(1, self.threads // self.parallel_requests)
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(self.path), options, providers=self.providers)
        self.providers = self.session.get_providers()  # what ONNX Runtime actually enabled
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        out = self.session.run([self.output_name], {self.input_name: np.ascontiguousarray(pixels)})[0]
        return out.astype(np.float32, copy=False)
