"""fp32 ONNX -> fp16 ONNX for GPUs, keeping overflow-prone normalisation in fp32.

CLIP's LayerNorm (and softmax) overflow in fp16 (NVIDIA/TensorRT#2564): those ops, and the final
L2 normalisation, stay fp32 with casts around them. Inputs and outputs keep their types (uint8
pixels in, float32 embeddings out), so callers do not change.
"""

from __future__ import annotations

from pathlib import Path

from fastret.engine.log import Log, no_log
from fastret.export.onnx_export import Parity, derive_onnx

FP16_STEM = "model.fp16"
FP16_KIND = "onnx-fp16"
FP32_OPS = ["LayerNormalization", "Softmax", "ReduceL2", "Div"]
FP16_MIN_COSINE = 0.999
FP16_SETTINGS = {"precision": "fp16", "fp32_ops": FP32_OPS}
"""What an fp16 derivation records (its files are named by a digest that includes it)."""


def convert_fp16(src: Path, dst: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True, op_block_list=FP32_OPS)
    onnx.save(model, str(dst))


def export_fp16(export_dir: Path, *, image_dir: Path | None = None, log: Log = no_log) -> tuple[Path, Parity]:
    """The export's model.fp16.DIGEST.onnx, written beside model.onnx when its parity against fp32 holds."""
    return derive_onnx(
        export_dir,
        FP16_STEM,
        convert_fp16,
        kind=FP16_KIND,
        label="ONNX fp16 (CPU provider)",
        min_cosine=FP16_MIN_COSINE,
        settings=FP16_SETTINGS,
        image_dir=image_dir,
        log=log,
    )
