"""Model name + backend -> a ready Encoder, exporting the model on first use."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from fastret.engine.cuda_torch import TorchCudaEncoder, cuda_missing
from fastret.engine.encoders import (
    BACKENDS,
    PRECISIONS,
    Encoder,
    ModelInfo,
    OnnxEncoder,
    TorchEncoder,
    ort_providers,
    ort_tensorrt_options,
)
from fastret.engine.openvino_runtime import OpenVinoEncoder, cpu_supports_bf16, openvino_missing
from fastret.engine.tensorrt_runtime import PLAN_FILE, TensorRTEncoder, plan_status
from fastret.export.models import ModelSource, load_torch_model, resolve_model
from fastret.export.onnx_export import FP16_ONNX, FP32_ONNX, INPUT_NAME, ensure_exported


class BackendUnavailable(Exception):
    """The requested runtime is not installed or has no artefact for this model."""


def model_info(source: ModelSource) -> ModelInfo:
    return ModelInfo(
        model_id=source.model_id,
        weights_sha256=source.weights_sha256,
        dim=source.dim,
        preprocessing=source.preprocessing,
    )


def encoder_for_source(
    source: ModelSource,
    backend: str = "auto",
    *,
    threads: int | None = None,
    image_dir: Path | None = None,
    precision: str = "auto",
    workload: str = "latency",
    log=print,
) -> Encoder:
    """An Encoder for a resolved model on the chosen backend and precision.

    `workload`: "latency" for one query at a time, "throughput" for batch jobs (index, eval), where
    OpenVINO then serves several batches at once; other runtimes ignore it.
    """
    if backend not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if precision not in PRECISIONS:
        raise BackendUnavailable(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    info = model_info(source)
    extra = {"threads": threads} if threads else {}
    if backend == "torch":
        return TorchEncoder(load_torch_model(source), info, **extra)
    if backend in ("torch-cuda", "torch-cuda-fp16"):
        missing = cuda_missing()
        if missing:
            raise BackendUnavailable(f"backend {backend}: {missing}")
        fast = backend == "torch-cuda-fp16"  # else fp32 eager: the GPU PyTorch baseline
        return TorchCudaEncoder(load_torch_model(source), info, half=fast, graphs=fast)
    export_dir = ensure_exported(source, image_dir=image_dir, log=log)
    if backend in ("tensorrt", "auto"):
        plan, reason = plan_status(export_dir)
        if plan is not None:
            try:
                return TensorRTEncoder(plan, info)
            except RuntimeError as exc:  # a plan TensorRT cannot load: say so, never crash `auto`
                plan, reason = None, str(exc)
        if backend == "tensorrt":
            raise BackendUnavailable(f"backend tensorrt: {reason}")
        if (export_dir / PLAN_FILE).is_file():
            log(f"not using the TensorRT plan: {reason}")
    cpu_only = _cpu_only()
    if backend == "auto" and cpu_only:
        backend = _cpu_backend(source.family, precision)
    if backend == "openvino":
        return _openvino_encoder(
            export_dir, info, source.family, precision, workload, image_dir=image_dir, log=log, **extra
        )
    if precision == "bf16":
        raise BackendUnavailable(f"precision bf16 runs on the openvino backend, not {backend}")
    if precision == "int8" or (precision == "auto" and backend == "onnxruntime" and cpu_only):
        path = _int8_onnx(export_dir, source.family, image_dir, required=precision == "int8", log=log)
        if path is not None:
            return OnnxEncoder(
                path, info, providers=["CPUExecutionProvider"], precision="int8", workload=workload, **extra
            )
    return _onnx_encoder(
        export_dir, info, tensorrt_ep=backend == "onnxruntime-trt", image_dir=image_dir, log=log, workload=workload, **extra
    )


def _cpu_backend(family: str, precision: str) -> str:
    """`auto` on a CPU, by measurement (BENCHMARKS.md, "CPU speed"): for CLIP, ONNX Runtime's
    dynamic INT8 (as fast as OpenVINO's INT8 weights, starts in a third of the time with half the
    memory, no NNCF step); for the CNN, OpenVINO's static INT8 once calibrated, else bf16 where the
    CPU has it (1.6x ONNX Runtime fp32), else ONNX Runtime, where OpenVINO would only run fp32."""
    from fastret.export.quantize import INT8_FAMILIES, OPENVINO_INT8_FAMILIES

    if openvino_missing() or (precision in ("auto", "int8") and family in INT8_FAMILIES):
        return "onnxruntime"
    if precision in ("auto", "int8") and family in OPENVINO_INT8_FAMILIES:
        return "openvino"
    if precision == "auto":
        return "openvino" if cpu_supports_bf16() else "onnxruntime"
    return "openvino" if precision == "bf16" else "onnxruntime"


def _cpu_only() -> bool:
    """No GPU runtime here: ONNX Runtime has no CUDA provider."""
    import onnxruntime as ort

    return "CUDAExecutionProvider" not in ort.get_available_providers()


def _openvino_encoder(
    export_dir: Path,
    info: ModelInfo,
    family: str,
    precision: str,
    workload: str,
    *,
    image_dir: Path | None,
    log,
    **extra,
) -> Encoder:
    """OpenVINO on the CPU: INT8 where the model has it, else bf16 where the CPU has it, else fp32."""
    missing = openvino_missing()
    if missing:
        raise BackendUnavailable(f"backend openvino: {missing}")
    cache_dir = export_dir / "openvino-cache"
    if precision in ("auto", "int8"):
        model = _openvino_int8(export_dir, family, image_dir, required=precision == "int8", log=log)
        if model is not None:
            return OpenVinoEncoder(model, info, precision="int8", cache_dir=cache_dir, workload=workload, **extra)
    if precision == "auto":
        precision = "bf16" if cpu_supports_bf16() else "fp32"
    if precision == "bf16" and not cpu_supports_bf16():
        raise BackendUnavailable("precision bf16: this CPU has no native bfloat16 arithmetic")
    return OpenVinoEncoder(
        export_dir / FP32_ONNX, info, precision=precision, cache_dir=cache_dir, workload=workload, **extra
    )


def _openvino_int8(export_dir: Path, family: str, image_dir: Path | None, *, required: bool, log) -> Path | None:
    """The export's INT8 OpenVINO model, made on first use (CNNs: calibrated on `image_dir`)."""
    from fastret.export.quantize import (
        OPENVINO_INT8_DIR,
        OPENVINO_INT8_FAMILIES,
        OPENVINO_INT8_XML,
        export_openvino_int8,
    )

    if family not in OPENVINO_INT8_FAMILIES:
        if required:
            raise BackendUnavailable(
                f"backend openvino runs int8 for {', '.join(OPENVINO_INT8_FAMILIES)} models, not {family}"
            )
        return None
    return _derived_model(
        export_dir / OPENVINO_INT8_DIR / OPENVINO_INT8_XML,
        lambda: export_openvino_int8(export_dir, image_dir, log=log)[0],
        required=required,
        fallback=f"OpenVINO {'bf16' if cpu_supports_bf16() else 'fp32'} instead of int8",
        log=log,
    )


def _int8_onnx(export_dir: Path, family: str, image_dir: Path | None, *, required: bool, log) -> Path | None:
    """The export's dynamic-INT8 ONNX (transformer models), written on first use; None when not offered."""
    from fastret.export.quantize import INT8_FAMILIES, INT8_ONNX, OPENVINO_INT8_FAMILIES, export_int8

    if family not in INT8_FAMILIES:
        if required:
            where = "runs on the openvino backend" if family in OPENVINO_INT8_FAMILIES else "is not offered"
            raise BackendUnavailable(f"precision int8 for {family} models {where}")
        return None
    return _derived_model(
        export_dir / INT8_ONNX,
        lambda: export_int8(export_dir, image_dir=image_dir, log=log)[0],
        required=required,
        fallback="using the fp32 ONNX",
        log=log,
    )


def _derived_model(path: Path, make: Callable[[], Path], *, required: bool, fallback: str, log) -> Path | None:
    """A variant of the fp32 ONNX (fp16, int8), made on first use; None, and the fp32 ONNX stays, when
    the variant cannot be made or fails its parity check (an error when the user asked for it)."""
    if path.is_file():
        return path
    try:
        return make()
    except ValueError as exc:
        if required:
            raise BackendUnavailable(str(exc)) from None
        log(f"{fallback}: {exc}")
        return None


def _onnx_encoder(export_dir: Path, info: ModelInfo, *, tensorrt_ep: bool, image_dir: Path | None, log, **extra) -> OnnxEncoder:
    """ONNX Runtime on the best provider this build has; the FP16 ONNX when CUDA runs it."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if tensorrt_ep and "TensorrtExecutionProvider" not in available:
        raise BackendUnavailable(
            "backend onnxruntime-trt needs an onnxruntime build with the TensorRT execution provider "
            f"(this one has {', '.join(available)}); on an NVIDIA GPU run `pip install 'fastret[gpu]'`"
        )
    options = None
    if tensorrt_ep:
        from fastret.export.tensorrt_build import DEFAULT_PROFILE

        batches = (DEFAULT_PROFILE.min, DEFAULT_PROFILE.opt, DEFAULT_PROFILE.max)
        options = ort_tensorrt_options(export_dir / "ort-tensorrt-cache", INPUT_NAME, info.preprocessing.size, batches)
    path = export_dir / FP32_ONNX
    if not tensorrt_ep and "CUDAExecutionProvider" in available:
        path = _fp16_onnx(export_dir, image_dir, log) or path
    encoder = OnnxEncoder(path, info, providers=ort_providers(tensorrt_options=options), **extra)
    if tensorrt_ep:
        encoder.backend = "onnxruntime-trt"
    return encoder


def _fp16_onnx(export_dir: Path, image_dir: Path | None, log) -> Path | None:
    """The export's FP16 ONNX, written on first use; None (fp32 stays) when it fails its parity check."""
    from fastret.export.fp16 import export_fp16

    return _derived_model(
        export_dir / FP16_ONNX,
        lambda: export_fp16(export_dir, image_dir=image_dir, log=log)[0],
        required=False,
        fallback="using the fp32 ONNX on CUDA",
        log=log,
    )


def open_encoder(
    model: str = "auto",
    backend: str = "auto",
    *,
    threads: int | None = None,
    image_dir: Path | None = None,
    precision: str = "auto",
    workload: str = "latency",
    log=print,
) -> Encoder:
    """Resolve a model name (see fastret.export.models), say what was chosen, open the runtime."""
    source, why = resolve_model(model)
    log(f"model: {source.model_id} ({why})")
    return encoder_for_source(
        source, backend, threads=threads, image_dir=image_dir, precision=precision, workload=workload, log=log
    )


def encoder_for_index(
    info: ModelInfo,
    backend: str = "auto",
    *,
    threads: int | None = None,
    precision: str = "auto",
    workload: str = "latency",
    recorded: dict | None = None,
    log=print,
) -> Encoder:
    """The encoder an index was built with, refusing weights that changed since.

    With `backend` and `precision` both auto, the runtime recorded in the index (`recorded`:
    backend and precision) is tried first, so a query embeds exactly as the gallery did (a gallery
    image finds itself at cosine 1.0); where it cannot run here, `auto` picks and says so.
    """
    source, _ = resolve_model(info.model_id)
    if source.weights_sha256 != info.weights_sha256:
        raise BackendUnavailable(
            f"the index was built with {info.model_id} weights sha256 {info.weights_sha256[:12]}…, "
            f"but the weights found now hash to {source.weights_sha256[:12]}…; re-index with "
            "`fastret index`"
        )
    options = {"threads": threads, "workload": workload, "log": log}
    if backend == precision == "auto" and recorded and recorded.get("backend") in BACKENDS:
        same = recorded.get("precision") if recorded.get("precision") in PRECISIONS else "auto"
        try:
            return encoder_for_source(source, recorded["backend"], precision=same, **options)
        except BackendUnavailable as exc:
            log(f"the index was embedded on {recorded['backend']} ({recorded.get('precision')}), not available "
                f"here ({exc}); queries use the auto runtime, scores may differ slightly")
    return encoder_for_source(source, backend, precision=precision, **options)
