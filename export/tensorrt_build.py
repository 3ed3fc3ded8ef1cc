"""TensorRT FP16 plan builder (TensorRT 10 API). Placeholder until the GPU issue lands."""

from __future__ import annotations

from pathlib import Path


class TensorRTUnavailable(Exception):
    """TensorRT (or a CUDA GPU) is not present; str() says how to get a plan."""


def build_plan_for_export(export_dir: Path, *, image_dir: Path | None = None, log=print) -> Path:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        raise TensorRTUnavailable(
            "the tensorrt package is not installed; on a machine with an NVIDIA GPU run "
            "`pip install 'fastret[tensorrt]'` and re-run `export-engine --fp16`"
        ) from None
    raise TensorRTUnavailable("TensorRT plan building is not implemented yet")
