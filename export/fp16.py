"""fp32 ONNX -> fp16 ONNX for GPUs, keeping overflow-prone normalisation in fp32.

CLIP's LayerNorm (and softmax) overflow in fp16 (NVIDIA/TensorRT#2564): those ops, and the final
L2 normalisation, stay fp32 with casts around them. Inputs and outputs keep their types (uint8
pixels in, float32 embeddings out), so callers do not change.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fastret.export.onnx_export import (
    FP16_ONNX,
    FP32_ONNX,
    Parity,
    add_artefact,
    compare_embeddings,
    onnx_embed,
    parity_pixels,
    read_metadata,
)
from fastret.engine.decode import Preprocessing

FP32_OPS = ["LayerNormalization", "Softmax", "ReduceL2", "Div"]
FP16_MIN_COSINE = 0.999


def convert_fp16(src: Path, dst: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True, op_block_list=FP32_OPS)
    onnx.save(model, str(dst))


def export_fp16(export_dir: Path, *, image_dir: Path | None = None, log=print) -> tuple[Path, Parity]:
    """Write model.fp16.onnx beside model.onnx and record its parity against the fp32 ONNX."""
    metadata = read_metadata(export_dir)
    spec = Preprocessing.from_dict(metadata["preprocessing"])
    dst = export_dir / FP16_ONNX
    convert_fp16(export_dir / FP32_ONNX, dst)
    pixels, source = parity_pixels(spec, image_dir)
    parity = compare_embeddings(
        onnx_embed(export_dir / FP32_ONNX, pixels), onnx_embed(dst, pixels).astype(np.float32), source
    )
    log(parity.line("ONNX fp16 vs ONNX fp32 (CPU provider)"))
    if parity.min_cosine < FP16_MIN_COSINE:
        dst.unlink()
        raise ValueError(f"fp16 ONNX min cosine {parity.min_cosine:.5f} < {FP16_MIN_COSINE}; not kept")
    add_artefact(export_dir, FP16_ONNX, {"precision": "fp16", "fp32_ops": FP32_OPS, "parity_vs_onnx_fp32": parity.to_dict()})
    return dst, parity
