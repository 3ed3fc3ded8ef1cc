"""fp32 ONNX -> INT8 models for CPUs, each kept only when its parity against fp32 holds.

* Transformers (CLIP): dynamic INT8 ONNX for ONNX Runtime. Weights are quantised ahead and
  activations per batch at run time, so no calibration data is needed, and CLIP's embeddings stay
  within min cosine 0.999 of fp32 while the MatMuls run on VNNI integer units.
* CNNs (EfficientNet-Lite): static INT8 OpenVINO IR from NNCF post-training quantisation,
  calibrated on the images being indexed (never queries). NNCF keeps the depthwise convolutions in
  floating point and quantises the pointwise ones per channel: P@10 moves by at most -0.0015 for
  +24-42% images/s over bf16 in the pipeline (BENCHMARKS.md, "CPU speed"). Static INT8 of the
  same graph through ONNX Runtime's QDQ quantiser was both less accurate and slower: not offered.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from fastret.engine.decode import Preprocessing, list_images
from fastret.export.onnx_export import (
    FP32_ONNX,
    Parity,
    add_artefact,
    compare_embeddings,
    decodable_crops,
    derive_onnx,
    onnx_embed,
    parity_pixels,
    read_metadata,
)

INT8_ONNX = "model.int8.onnx"
INT8_MIN_COSINE = 0.999
INT8_FAMILIES = ("clip",)

OPENVINO_INT8_DIR = "openvino-int8"
OPENVINO_INT8_XML = "model.xml"
OPENVINO_INT8_FAMILIES = ("efficientnet-lite",)
CALIBRATION_IMAGES = 128
"""NNCF's statistics over 128 images: 7 s on 2 cores; 300 gave the same P@10."""
MIN_CALIBRATION_IMAGES = 64
"""The INT8 model serves every later index of the model: a handful of images would calibrate it badly."""
OPENVINO_INT8_MIN_MEAN_COSINE = 0.98
"""Measured 0.987-0.993 mean (min 0.88-0.97) on wang1k / animals10-mini, with P@10 within 0.0015."""


def quantize_dynamic_int8(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"], per_channel=True
    )


def export_int8(export_dir: Path, *, image_dir: Path | None = None, log=print) -> tuple[Path, Parity]:
    """Write model.int8.onnx beside model.onnx when its parity against fp32 holds; record it."""
    family = read_metadata(export_dir)["family"]
    if family not in INT8_FAMILIES:
        raise ValueError(f"dynamic INT8 ONNX is offered for {', '.join(INT8_FAMILIES)} models, not {family}")
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


def nncf_missing() -> str | None:
    """Why static INT8 calibration cannot run here, or None when it can."""
    try:
        import nncf  # noqa: F401
    except ImportError:
        return "the nncf package is not installed (pip install nncf)"
    return None


def calibration_pixels(
    spec: Preprocessing, image_dir: Path, count: int = CALIBRATION_IMAGES, minimum: int = MIN_CALIBRATION_IMAGES
) -> np.ndarray:
    """Up to `count` decodable images spread evenly over the folder (every class, not the first)."""
    paths = list_images(image_dir)
    crops = decodable_crops(paths[:: max(1, len(paths) // count)], spec, count)
    if len(crops) < minimum:
        raise ValueError(f"static INT8 needs {minimum} images to calibrate on; {image_dir} has {len(crops)}")
    return np.stack(crops)


def openvino_embed(model_xml: Path, pixels: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """Embeddings from an OpenVINO IR on the CPU (fp32 for everything not quantised), for parity."""
    import openvino as ov

    compiled = ov.Core().compile_model(str(model_xml), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    parts = [np.array(compiled(pixels[i : i + batch_size])[0]) for i in range(0, len(pixels), batch_size)]
    return np.concatenate(parts).astype(np.float32)


def export_openvino_int8(
    export_dir: Path,
    image_dir: Path | None,
    *,
    count: int = CALIBRATION_IMAGES,
    minimum: int = MIN_CALIBRATION_IMAGES,
    log=print,
) -> tuple[Path, Parity]:
    """Calibrate and write openvino-int8/model.xml (+ .bin) beside model.onnx, if parity holds; record it.

    Both files are written into a staging directory that is renamed into place after the check, so
    an interrupted or failed run never leaves a half-written model that later runs would pick up.
    """
    metadata = read_metadata(export_dir)
    if metadata["family"] not in OPENVINO_INT8_FAMILIES:
        raise ValueError(
            f"static INT8 is offered for {', '.join(OPENVINO_INT8_FAMILIES)} models, not {metadata['family']}"
        )
    missing = nncf_missing()
    if missing:
        raise ValueError(f"static INT8 needs calibration: {missing}")
    if image_dir is None:
        raise ValueError("static INT8 needs calibration images: index a folder first (`fastret index DIR`)")
    import nncf
    import openvino as ov

    spec = Preprocessing.from_dict(metadata["preprocessing"])
    calibration = calibration_pixels(spec, image_dir, count, minimum)
    log(f"calibrating INT8 on {len(calibration)} images from {image_dir} (once per model)")
    model = ov.Core().read_model(str(export_dir / FP32_ONNX))
    dataset = nncf.Dataset([calibration[i : i + 1] for i in range(len(calibration))])
    with contextlib.redirect_stdout(sys.stderr):  # NNCF's progress bar: stdout is for results
        quantized = nncf.quantize(model, dataset, subset_size=len(calibration))
    staging = Path(tempfile.mkdtemp(dir=export_dir, prefix=f".{OPENVINO_INT8_DIR}."))
    try:
        ov.save_model(quantized, str(staging / OPENVINO_INT8_XML))
        pixels, source = parity_pixels(spec, image_dir)
        parity = compare_embeddings(
            onnx_embed(export_dir / FP32_ONNX, pixels), openvino_embed(staging / OPENVINO_INT8_XML, pixels), source
        )
        log(parity.line("OpenVINO int8 (static) vs ONNX fp32"))
        if parity.mean_cosine < OPENVINO_INT8_MIN_MEAN_COSINE:
            raise ValueError(
                f"OpenVINO int8 mean cosine {parity.mean_cosine:.5f} < {OPENVINO_INT8_MIN_MEAN_COSINE}; not kept"
            )
        target = export_dir / OPENVINO_INT8_DIR
        if target.exists():  # another process calibrated meanwhile: keep its model and its record
            return target / OPENVINO_INT8_XML, parity
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    add_artefact(
        export_dir,
        OPENVINO_INT8_DIR,
        {
            "precision": "int8-static",
            "calibration": {"images": len(calibration), "folder": str(image_dir)},
            "parity_vs_onnx_fp32": parity.to_dict(),
        },
    )
    return export_dir / OPENVINO_INT8_DIR / OPENVINO_INT8_XML, parity
