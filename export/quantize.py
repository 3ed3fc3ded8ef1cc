"""fp32 ONNX -> INT8 ONNX for CPUs: dynamic quantisation of the transformer's matrix products.

Dynamic INT8 (weights quantised ahead, activations per batch at run time) needs no calibration
data and keeps CLIP's embeddings within min cosine 0.999 of fp32 while running the MatMuls on
VNNI integer units. It is offered for transformer models only: static INT8 of EfficientNet-Lite's
depthwise convolutions lost too much (see BENCHMARKS.md) and is not shipped.
"""

from __future__ import annotations

from pathlib import Path

from fastret.export.onnx_export import Parity, derive_onnx, read_metadata

INT8_ONNX = "model.int8.onnx"
INT8_MIN_COSINE = 0.999
INT8_FAMILIES = ("clip",)


def quantize_dynamic_int8(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"], per_channel=True
    )


def export_int8(export_dir: Path, *, image_dir: Path | None = None, log=print) -> tuple[Path, Parity]:
    """Write model.int8.onnx beside model.onnx when its parity against fp32 holds; record it."""
    family = read_metadata(export_dir)["family"]
    if family not in INT8_FAMILIES:
        raise ValueError(f"INT8 is offered for {', '.join(INT8_FAMILIES)} models, not {family}")
    return derive_onnx(
        export_dir,
        INT8_ONNX,
        quantize_dynamic_int8,
        label="ONNX int8 (dynamic)",
        min_cosine=INT8_MIN_COSINE,
        info={"precision": "int8-dynamic", "ops": ["MatMul", "Gemm"]},
        image_dir=image_dir,
        log=log,
    )
