"""OpenVINO CPU runtime: the fastest CPU path we measured for the exported ONNX graphs.

OpenVINO compiles the same model.onnx that ONNX Runtime runs. On CPUs with AVX-512 BF16 (or AMX)
it can run convolutions and matrix products in bfloat16 (`precision="bf16"`); elsewhere, and with
`precision="fp32"`, it computes in fp32. `precision="int8"` runs an INT8 IR (see
export/quantize.py): the CNN's statically quantised convolutions, or CLIP's INT8 weights, whose
activations the CPU plugin quantises at run time, per row in groups of
DYNAMIC_QUANTIZATION_GROUP_SIZE values, so its matrix products run on integer units; bf16 (or
fp32) for the rest. Jobs cache compiled blobs beside the export (OpenVINO's CACHE_DIR), so a second
job starts in a fraction of a second. Searches never write there: they import the compiled batch-1
query model that the writing job saved (`save_query_model`, keyed by everything the compilation
depends on), and compile in memory when it is missing or does not import.

`workload="latency"` gives one request all cores (a lone query finishes soonest); "throughput"
gives OpenVINO's streams (on 2 cores: two one-thread streams) and one infer request per stream, so
batch jobs keep several small batches in flight, each in its own core's cache (BENCHMARKS.md,
"CPU speed": the INT8 model, 140 images/s one call at a time, gives 177 in the pipeline this way).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import queue
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from fastret.engine.encoders import (
    EncoderRecipe,
    ModelInfo,
    artefact_files,
    artefact_size,
    default_threads,
    pooled_encode_batches,
)
from fastret.engine.files import write_bytes_atomic

OPENVINO_PRECISIONS = ("fp32", "bf16", "int8")
QUERY_MODELS_DIR = "openvino-query"
"""The folder of an export that holds compiled query models (batch 1, latency), one file per key."""
WORKLOADS = ("latency", "throughput")
_HINTS = {"fp32": "f32", "bf16": "bf16"}
DYNAMIC_QUANTIZATION_GROUP_SIZE = 256
"""Activation values sharing one INT8 scale in weight-compressed matrix products. CLIP B/32, batches of
8-16, two streams (2 cores): 128 -> 72, 256 -> 67-77, 768 -> 70-76 images/s; 0 (off: weights
decompressed to bf16) -> 40, slower than plain bf16 (43)."""


def import_openvino():
    """The openvino module, imported without its model-conversion tools (openvino.tools.ovc, which
    openvino's __init__ imports when it can, with their telemetry: more than the runtime itself
    costs to import). fastret opens ONNX and IR files with Core.read_model and never calls
    openvino.convert_model; `import openvino.tools.ovc` still works afterwards."""
    if "openvino" in sys.modules:
        return sys.modules["openvino"]
    blocked = "openvino.tools.ovc" not in sys.modules
    if blocked:
        sys.modules["openvino.tools.ovc"] = None  # type: ignore[assignment]  # import fails: openvino skips it
    try:
        import openvino
    finally:
        if blocked and sys.modules.get("openvino.tools.ovc", ...) is None:
            del sys.modules["openvino.tools.ovc"]
    return openvino


def openvino_missing() -> str | None:
    """Why the OpenVINO backend cannot run here, or None when it can."""
    try:
        import_openvino()
    except ImportError:
        return "the openvino package is not installed (pip install openvino)"
    return None


@functools.cache
def cpu_supports_bf16() -> bool:
    """Does OpenVINO report native bfloat16 arithmetic on this CPU? (Asked once: opening an encoder
    consults it up to four times, each a new ov.Core.)"""
    ov = import_openvino()
    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def compile_config(precision: str, workload: str, threads: int) -> dict:
    """OpenVINO CPU settings for a precision: what the encoder runs and INT8 parity checks measure."""
    rest = "bf16" if precision == "bf16" or (precision == "int8" and cpu_supports_bf16()) else "fp32"
    config = {
        "INFERENCE_PRECISION_HINT": _HINTS[rest],
        "PERFORMANCE_HINT": workload.upper(),
        "INFERENCE_NUM_THREADS": threads,
    }
    if precision == "int8":  # acts on weight-compressed matrix products only (CLIP), not on static INT8
        config["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = DYNAMIC_QUANTIZATION_GROUP_SIZE
    return config


@dataclass
class OpenVinoEncoder:
    """OpenVINO CPU inference over an exported model: the fp32 ONNX or an INT8 IR (same interface as
    OnnxEncoder). `cache_dir`: where OpenVINO keeps compiled blobs (None: compile in memory, write nothing).
    `query_models`: a folder to import the compiled batch-1 model from (see save_query_model); read only.
    """

    path: Path
    info: ModelInfo
    precision: str = "fp32"
    threads: int = field(default_factory=default_threads)
    cache_dir: Path | None = None
    workload: str = "latency"
    artefact_sha256: str | None = None
    query_models: Path | None = None
    backend: str = field(default="openvino", init=False)
    parallel_requests: int = field(init=False)
    imported_query_model: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        ov = import_openvino()

        self.artefact_bytes = artefact_size(self.path)
        if self.precision not in OPENVINO_PRECISIONS:
            raise ValueError(f"openvino precision must be one of {OPENVINO_PRECISIONS}, not {self.precision!r}")
        if self.workload not in WORKLOADS:
            raise ValueError(f"openvino workload must be one of {WORKLOADS}, not {self.workload!r}")
        self.core = ov.Core()
        if self.cache_dir is not None:
            self.core.set_property({"CACHE_DIR": str(self.cache_dir)})
        self.config = compile_config(self.precision, self.workload, self.threads)
        self.pools: dict[bool, queue.SimpleQueue] = {}
        self.compiled: dict[bool, object] = {}
        self.pools_lock = threading.Lock()
        # Latency: one query at a time, on a batch-1 static model (10% faster than the dynamic-batch
        # one at one image); other batch sizes compile the dynamic model on first use.
        self.parallel_requests = self._requests(single=self.workload == "latency").qsize()

    def _requests(self, *, single: bool) -> queue.SimpleQueue:
        """Idle infer requests of the static batch-1 model (`single`) or the dynamic-batch one."""
        with self.pools_lock:
            if single not in self.pools:
                compiled = self._import_query_model() if single else None
                if compiled is None:
                    model = self.core.read_model(str(self.path))
                    if single:
                        size = self.info.preprocessing.size
                        model.reshape({0: [1, size, size, 3]})
                    compiled = self.core.compile_model(model, "CPU", self.config)
                idle: queue.SimpleQueue = queue.SimpleQueue()
                for _ in range(max(1, int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))):
                    idle.put(compiled.create_infer_request())
                self.compiled[single] = compiled
                self.pools[single] = idle
            return self.pools[single]

    def query_model_file(self, folder: Path) -> Path:
        """Where the compiled batch-1 model of this encoder is kept in `folder`: named by a hash of what
        the compilation depends on (the artefact's files as they are now, their recorded sha256, the
        OpenVINO build, the CPU and its capabilities, the settings), so a changed artefact or runtime
        misses it instead of running a stale model."""
        size = self.info.preprocessing.size
        key = {
            "artefact": [[part.name, part.stat().st_size, part.stat().st_mtime_ns] for part in artefact_files(self.path)],
            "artefact_sha256": self.artefact_sha256,
            "openvino": self.core.get_versions("CPU")["CPU"].build_number,
            "cpu": self.core.get_property("CPU", "FULL_DEVICE_NAME"),
            "capabilities": sorted(self.core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")),
            "config": self.config,
            "input": [1, size, size, 3],
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
        return Path(folder) / f"{digest[:32]}.blob"

    def _import_query_model(self):
        """The compiled batch-1 model from `query_models`, or None (absent, damaged, another build)."""
        if self.query_models is None or self.workload != "latency":
            return None
        blob = self.query_model_file(self.query_models)
        try:
            compiled = self.core.import_model(blob.read_bytes(), "CPU", self.config)
        except (OSError, RuntimeError):
            return None
        self.imported_query_model = True
        return compiled

    def export_query_model(self) -> bytes:
        """The compiled batch-1 model as bytes (a latency encoder's), for save_query_model."""
        self._requests(single=True)
        stream = io.BytesIO()
        self.compiled[True].export_model(stream)
        return stream.getvalue()

    @property
    def recipe(self) -> EncoderRecipe:
        artefact = str(Path(self.path).resolve())
        return EncoderRecipe(self.info, self.backend, self.precision, artefact, self.artefact_sha256, self.artefact_bytes)

    def encode_batches(self, batches: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        return pooled_encode_batches(self.encode, batches, self.parallel_requests)

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        # Each call borrows an idle request: up to parallel_requests callers run at once.
        idle = self._requests(single=len(pixels) == 1 and self.workload == "latency")
        request = idle.get()
        try:
            out = request.infer({0: np.ascontiguousarray(pixels)})[0]
            embeddings = np.array(out, dtype=np.float32, copy=True)
        finally:
            idle.put(request)
        # bf16 arithmetic leaves the in-graph L2 normalisation slightly off unit length.
        return embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)


def save_query_model(
    path: Path, info: ModelInfo, precision: str, folder: Path, *, artefact_sha256: str | None = None
) -> Path:
    """Compile the batch-1 latency model that a search on this artefact opens (default threads) and
    keep it in `folder` under its key; nothing to do when it is there. For jobs that write artefacts
    (index, eval): searches only read it (OpenVinoEncoder(query_models=folder))."""
    encoder = OpenVinoEncoder(path, info, precision=precision, query_models=folder, artefact_sha256=artefact_sha256)
    target = encoder.query_model_file(folder)
    if not encoder.imported_query_model:
        folder.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(target, encoder.export_query_model())
    return target
