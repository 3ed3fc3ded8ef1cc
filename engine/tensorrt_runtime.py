"""Run a TensorRT plan (TensorRT 10 API) as an Encoder, and decide whether a plan may run here.

A serialized plan only runs on the GPU model and TensorRT version that built it
(NVIDIA/TensorRT#3965). `export-engine --fp16` records both, with the compute capability, in the
export's metadata.json; `plan_problem` compares that record (the caller reads it) with this
machine before any load, so a stale plan is refused with a one-line reason instead of a
deserialisation error.

The encoder runs `execute_async_v3` on a torch CUDA stream with torch-allocated device buffers
(`set_input_shape` / `set_tensor_address` per batch) and the pinned, two-in-flight staging of
`fastret.engine.cuda_torch.StagedPipeline`.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from fastret.engine.cuda_torch import StagedPipeline, cuda_missing, staged_encode_batches
from fastret.engine.encoders import EncoderRecipe, ModelInfo, artefact_size

PLAN_FILE = "model.fp16.plan"


def tensorrt_missing() -> str | None:
    """Why TensorRT cannot run here (package or GPU absent), or None when it can."""
    if importlib.util.find_spec("tensorrt") is None:
        return (
            "the tensorrt package is not installed; on a machine with an NVIDIA GPU run "
            "`pip install 'fastret[tensorrt]'` (with a CUDA build of torch) and re-run `export-engine --fp16`"
        )
    try:
        import tensorrt  # noqa: F401
    except ImportError as exc:
        return f"the tensorrt package does not import ({exc}); reinstall it with `pip install 'fastret[tensorrt]'`"
    return cuda_missing()


_LOGGER = None


def trt_logger():
    """One process-wide TensorRT logger (TensorRT expects the same one for builder and runtime)."""
    global _LOGGER
    if _LOGGER is None:
        import tensorrt as trt

        _LOGGER = trt.Logger(trt.Logger.WARNING)
    return _LOGGER


@dataclass(frozen=True)
class PlanTarget:
    """What a serialized plan is tied to."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "9.0"

    def to_dict(self) -> dict:
        return {
            "tensorrt_version": self.tensorrt_version,
            "gpu_name": self.gpu_name,
            "compute_capability": self.compute_capability,
        }


def current_target() -> PlanTarget:
    """This machine's TensorRT version and first GPU (needs tensorrt and CUDA torch)."""
    import tensorrt as trt
    import torch

    major, minor = torch.cuda.get_device_capability(0)
    return PlanTarget(trt.__version__, torch.cuda.get_device_name(0), f"{major}.{minor}")


def plan_problem(recorded: dict | None, current: PlanTarget) -> str | None:
    """Why a plan built for `recorded` must not run on `current`, or None when it may."""
    rebuild = "rebuild it here with `export-engine --fp16`"
    if not recorded:
        return f"the plan has no build record in metadata.json; {rebuild}"
    for key, label in (
        ("tensorrt_version", "TensorRT"),
        ("gpu_name", "GPU"),
        ("compute_capability", "compute capability"),
    ):
        built = recorded.get(key)
        here = getattr(current, key)
        if built != here:
            return f"the plan was built for {label} {built}, this machine has {label} {here}; {rebuild}"
    return None


def plan_status(plan: Path, recorded: dict | None) -> tuple[Path | None, str]:
    """`plan` when it may run on this machine, else None; and a one-line reason.

    `recorded`: the plan's build record from its export's metadata.json (None when there is none).
    """
    missing = tensorrt_missing()
    if missing:
        return None, missing
    if not plan.is_file():
        return None, f"no TensorRT plan in {plan.parent}; build one with `export-engine --fp16`"
    problem = plan_problem(recorded, current_target())
    if problem:
        return None, f"{plan}: {problem}"
    return plan, f"TensorRT plan {plan} built for this GPU"


def load_plan(plan_path: Path) -> tuple:
    """(runtime, engine, execution context, input name, output name) of a plan with one input and one
    output; RuntimeError naming the plan when TensorRT cannot load it."""
    import tensorrt as trt

    runtime = trt.Runtime(trt_logger())
    engine = runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
    if engine is None:
        raise RuntimeError(f"{plan_path}: TensorRT could not deserialize the plan (see its log above)")
    context = engine.create_execution_context()
    if context is None:
        raise RuntimeError(f"{plan_path}: TensorRT could not create an execution context (GPU memory?)")
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
    if len(inputs) != 1 or len(outputs) != 1:
        raise RuntimeError(f"{plan_path}: expected one input and one output, found {inputs} and {outputs}")
    return runtime, engine, context, inputs[0], outputs[0]


def _torch_dtype(trt_dtype):
    import tensorrt as trt
    import torch

    return {trt.DataType.UINT8: torch.uint8, trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16}.get(trt_dtype)


@dataclass
class TensorRTEncoder:
    """A deserialized plan: uint8 (N, H, W, 3) in, float32 (N, D) embeddings out, on the GPU."""

    plan_path: Path
    info: ModelInfo
    artefact_sha256: str | None = None
    backend: str = field(default="tensorrt", init=False)
    precision: str = field(default="fp16", init=False)  # strongly typed from the FP16 ONNX
    parallel_requests: int = field(default=1, init=False)  # the staging keeps batches in flight instead

    def __post_init__(self) -> None:
        import torch

        self.artefact_bytes = artefact_size(self.plan_path)
        self.runtime, self.engine, self.context, self.input_name, self.output_name = load_plan(self.plan_path)
        in_dtype = self.engine.get_tensor_dtype(self.input_name)
        out_dtype = self.engine.get_tensor_dtype(self.output_name)
        if _torch_dtype(in_dtype) is not torch.uint8 or _torch_dtype(out_dtype) is not torch.float32:
            raise RuntimeError(f"{self.plan_path}: expected uint8 in and float32 out, found {in_dtype} and {out_dtype}")
        min_shape, _, max_shape = self.engine.get_tensor_profile_shape(self.input_name, 0)
        self.min_batch, self.max_batch = int(min_shape[0]), int(max_shape[0])
        size = self.info.preprocessing.size
        self.device_out = torch.empty((self.max_batch, self.info.dim), dtype=torch.float32, device="cuda")
        # A batch below the profile's minimum runs padded (rows are independent; padding is dropped).
        self.padded_in = torch.zeros((self.min_batch, size, size, 3), dtype=torch.uint8, device="cuda")
        self.pipeline = StagedPipeline(self._launch, self.max_batch, (size, size, 3), self.info.dim)

    def _launch(self, device_in):
        import torch

        n = int(device_in.shape[0])
        if n < self.min_batch:
            self.padded_in[:n].copy_(device_in)
            device_in = self.padded_in
        if not self.context.set_input_shape(self.input_name, tuple(device_in.shape)):
            raise RuntimeError(f"{self.plan_path}: TensorRT refused input shape {tuple(device_in.shape)}")
        self.context.set_tensor_address(self.input_name, device_in.data_ptr())
        self.context.set_tensor_address(self.output_name, self.device_out.data_ptr())
        if not self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise RuntimeError(f"{self.plan_path}: TensorRT execution failed for a batch of {n}")
        return self.device_out[:n]

    @property
    def recipe(self) -> EncoderRecipe:
        artefact = str(Path(self.plan_path).resolve())
        return EncoderRecipe(self.info, self.backend, self.precision, artefact, self.artefact_sha256, self.artefact_bytes)

    def encode_batches(self, batches: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """Encode a stream of batches keeping two on the GPU at once (see StagedPipeline)."""
        return staged_encode_batches(self.pipeline, batches)

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        return next(iter(self.encode_batches([pixels])))
