"""Model name + backend -> a ready Encoder, exporting the model on first use."""

from __future__ import annotations

from pathlib import Path

from fastret.engine.encoders import BACKENDS, Encoder, ModelInfo, OnnxEncoder, TorchEncoder
from fastret.export.models import ModelSource, load_torch_model, resolve_model
from fastret.export.onnx_export import FP32_ONNX, ensure_exported


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
    log=print,
) -> Encoder:
    """An Encoder for a resolved model on the chosen backend."""
    if backend not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    info = model_info(source)
    extra = {"threads": threads} if threads else {}
    if backend == "torch":
        return TorchEncoder(load_torch_model(source), info, **extra)
    if backend == "tensorrt":
        raise BackendUnavailable(
            "the TensorRT backend needs the tensorrt package and a plan built by "
            "`export-engine --fp16` on this GPU"
        )
    export_dir = ensure_exported(source, image_dir=image_dir, log=log)
    return OnnxEncoder(export_dir / FP32_ONNX, info, **extra)


def open_encoder(
    model: str = "auto",
    backend: str = "auto",
    *,
    threads: int | None = None,
    image_dir: Path | None = None,
    log=print,
) -> Encoder:
    """Resolve a model name (see fastret.export.models), say what was chosen, open the runtime."""
    source, why = resolve_model(model)
    log(f"model: {source.model_id} ({why})")
    return encoder_for_source(source, backend, threads=threads, image_dir=image_dir, log=log)


def encoder_for_index(info: ModelInfo, backend: str = "auto", *, threads: int | None = None, log=print) -> Encoder:
    """The encoder an index was built with, refusing weights that changed since."""
    source, _ = resolve_model(info.model_id)
    if source.weights_sha256 != info.weights_sha256:
        raise BackendUnavailable(
            f"the index was built with {info.model_id} weights sha256 {info.weights_sha256[:12]}…, "
            f"but the weights found now hash to {source.weights_sha256[:12]}…; re-index with "
            "`fastret index`"
        )
    return encoder_for_source(source, backend, threads=threads, log=log)
