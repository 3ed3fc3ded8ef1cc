"""fp32 ONNX -> INT8 models for CPUs, each kept only when its parity against fp32 holds.

* Transformers (CLIP): INT8 weights, activations quantised per batch at run time, so no
  calibration data is needed, and the embeddings stay within min cosine 0.999 of fp32 while the
  matrix products run on VNNI integer units. Two forms, equally fast on our CPU (BENCHMARKS.md,
  "CPU speed"): a dynamic INT8 ONNX for ONNX Runtime (`auto`'s choice: quicker to start, half the
  memory), which scales a whole batch's activations together, and an OpenVINO IR whose weights
  NNCF compresses to INT8, the CPU plugin quantising activations per row in groups, so an image
  embeds the same alone or in any batch.
* CNNs (EfficientNet-Lite): static INT8 OpenVINO IR from NNCF post-training quantisation,
  calibrated on the images being indexed (never queries): a sorted, evenly strided list of the
  folder's images, recorded with the model, so calibrating on the same images makes the same
  model at the same path, and on other images a new model beside it. The export pads each
  convolution's input with a separate Pad (TensorFlow's "same" padding); it is folded into the
  convolutions first (`fold_paddings`), so that the quantised input reaches the convolution itself
  and the CPU plugin runs the depthwise convolutions in INT8 too, instead of bf16 with a layout
  reorder on each side (1.6x fewer core-ms per image; BENCHMARKS.md, "CPU round 2"). Static INT8
  of the same graph through ONNX Runtime's QDQ quantiser was both less accurate and slower: not offered.
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
from fastret.engine.files import sha256_files
from fastret.engine.log import Log, no_log
from fastret.export.onnx_export import (
    FP32_ONNX,
    Parity,
    add_artefact,
    addressed_name,
    compare_embeddings,
    decodable_crops,
    derive_onnx,
    fp32_sha256,
    onnx_embed,
    parity_pixels,
    read_metadata,
    recorded_parity,
)

INT8_ONNX_STEM = "model.int8"
INT8_ONNX_KIND = "onnx-int8-dynamic"
INT8_MIN_COSINE = 0.999
INT8_DYNAMIC_SETTINGS = {"precision": "int8-dynamic", "ops": ["MatMul", "Gemm"]}
"""What a dynamic INT8 derivation records (its files are named by a digest that includes it)."""
INT8_FAMILIES = ("clip",)

OPENVINO_INT8_STEM = "openvino-int8"
"""A directory, openvino-int8.DIGEST/, holding model.xml and model.bin."""
OPENVINO_INT8_XML = "model.xml"
OPENVINO_INT8_KIND = "openvino-int8"
OPENVINO_STATIC_INT8_FAMILIES = ("efficientnet-lite",)
"""Calibrated: weights and activations quantised ahead, from the images being indexed."""
OPENVINO_WEIGHT_INT8_FAMILIES = ("clip",)
"""INT8 weights; the CPU plugin quantises activations at run time, per row (no calibration)."""
OPENVINO_INT8_FAMILIES = OPENVINO_STATIC_INT8_FAMILIES + OPENVINO_WEIGHT_INT8_FAMILIES
CALIBRATION_IMAGES = 128
"""NNCF's statistics over 128 images: 7 s on 2 cores; 300 gave the same P@10."""
MIN_CALIBRATION_IMAGES = 64
"""The INT8 model serves every later index of the model: a handful of images would calibrate it badly."""
OPENVINO_STATIC_INT8_GRAPH = 2
"""Revision of the graph a CNN's static INT8 model is calibrated from: 2 = paddings folded into the
convolutions. A job finding only an older model of the kind makes a current one (keeps the old when it cannot)."""
OPENVINO_INT8_MIN_MEAN_COSINE = 0.98
"""Measured 0.987-0.993 mean (min 0.88-0.97) on wang1k / animals10-mini, with P@10 within 0.0015."""


def quantize_dynamic_int8(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"], per_channel=True
    )


def export_int8(export_dir: Path, *, image_dir: Path | None = None, log: Log = no_log) -> tuple[Path, Parity]:
    """The export's model.int8.DIGEST.onnx, written beside model.onnx when its parity against fp32 holds."""
    family = read_metadata(export_dir)["family"]
    if family not in INT8_FAMILIES:
        raise ValueError(f"dynamic INT8 ONNX is offered for {', '.join(INT8_FAMILIES)} models, not {family}")
    return derive_onnx(
        export_dir,
        INT8_ONNX_STEM,
        quantize_dynamic_int8,
        kind=INT8_ONNX_KIND,
        label="ONNX int8 (dynamic)",
        min_cosine=INT8_MIN_COSINE,
        settings=INT8_DYNAMIC_SETTINGS,
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


def calibration_set(
    spec: Preprocessing, image_dir: Path, count: int = CALIBRATION_IMAGES, minimum: int = MIN_CALIBRATION_IMAGES
) -> tuple[list[Path], np.ndarray]:
    """Up to `count` decodable images spread evenly over the sorted folder (every class, not the
    first), and their pixels: the same folder always gives the same list."""
    paths = list_images(image_dir)
    files, crops = decodable_crops(paths[:: max(1, len(paths) // count)], spec, count)
    if len(crops) < minimum:
        raise ValueError(f"static INT8 needs {minimum} images to calibrate on; {image_dir} has {len(crops)}")
    return files, np.stack(crops)


def openvino_embed(model_xml: Path, pixels: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """Embeddings from an INT8 OpenVINO IR on the CPU, compiled as the int8 encoder runs it, for parity."""
    import openvino as ov

    from fastret.engine.encoders import default_threads
    from fastret.engine.openvino_runtime import compile_config

    config = compile_config("int8", "latency", default_threads())
    compiled = ov.Core().compile_model(str(model_xml), "CPU", config)
    parts = [np.array(compiled(pixels[i : i + batch_size])[0]) for i in range(0, len(pixels), batch_size)]
    return np.concatenate(parts).astype(np.float32)


def fold_paddings(model) -> int:
    """Fold each zero-valued constant Pad of a convolution's input (spatial axes only) into the
    convolution's own padding, in place; returns how many were folded. The same arithmetic; what
    changes is that a quantised input then feeds the convolution directly."""
    from openvino import opset13
    from openvino.passes import ConstantFolding, Manager

    manager = Manager()
    manager.register_pass(ConstantFolding())  # the pads are computed from constants in the exported graph
    manager.run_passes(model)
    makers = {"Convolution": opset13.convolution, "GroupConvolution": opset13.group_convolution}
    folded = 0
    for conv in model.get_ordered_ops():
        pad = conv.input(0).get_source_output().get_node() if conv.get_type_name() in makers else None
        if pad is None or pad.get_type_name() != "Pad" or pad.get_attributes().get("pad_mode") != "constant":
            continue
        values = [pad.input(i).get_source_output().get_node() for i in range(1, pad.get_input_size())]
        if any(node.get_type_name() != "Constant" for node in values):
            continue
        begin, end = (np.asarray(node.get_data()).astype(int).tolist() for node in values[:2])
        if any(begin[:2] + end[:2]) or (len(values) > 2 and np.any(values[2].get_data() != 0)):
            continue
        attributes = conv.get_attributes()
        replacement = makers[conv.get_type_name()](
            pad.input(0).get_source_output(),
            conv.input(1).get_source_output(),
            attributes["strides"],
            [a + b for a, b in zip(attributes["pads_begin"], begin[2:])],
            [a + b for a, b in zip(attributes["pads_end"], end[2:])],
            attributes["dilations"],
        )
        replacement.set_friendly_name(conv.get_friendly_name())
        conv.output(0).replace(replacement.output(0))
        folded += 1
    model.validate_nodes_and_infer_types()
    return folded


def _calibrated_int8(model, calibration: np.ndarray):
    """NNCF static INT8 of an OpenVINO model, its statistics over every calibration image, in order."""
    import nncf

    dataset = nncf.Dataset([calibration[i : i + 1] for i in range(len(calibration))])
    with contextlib.redirect_stdout(sys.stderr):  # NNCF's progress bar: stdout is for results
        return nncf.quantize(model, dataset, subset_size=len(calibration))


def _weight_int8(model, log: Log):
    """INT8 weights (symmetric, per output channel) for every matrix product; activations stay float
    in the IR and the CPU plugin quantises them at run time (compile_config)."""
    import nncf

    log("compressing weights to INT8 (once per model)")
    with contextlib.redirect_stdout(sys.stderr):
        return nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_SYM)


def _openvino_int8_plan(
    export_dir: Path, family: str, spec: Preprocessing, image_dir: Path | None, count: int, minimum: int
) -> tuple[dict, dict, np.ndarray | None]:
    """What the INT8 model is made from (its name's digest), the record it gets, and the calibration pixels."""
    from fastret.engine.openvino_runtime import DYNAMIC_QUANTIZATION_GROUP_SIZE

    inputs: dict = {"kind": OPENVINO_INT8_KIND, "from": fp32_sha256(export_dir)}
    if family in OPENVINO_WEIGHT_INT8_FAMILIES:
        record = {"precision": "int8-weights", "activations": f"dynamic, groups of {DYNAMIC_QUANTIZATION_GROUP_SIZE}"}
        return {**inputs, "precision": "int8-weights", "mode": "INT8_SYM"}, record, None
    if image_dir is None:
        raise ValueError("static INT8 needs calibration images: index a folder first (`fastret index DIR`)")
    files, calibration = calibration_set(spec, image_dir, count, minimum)
    names = [path.relative_to(image_dir).as_posix() for path in files]
    calibrated_on = {"images": len(files), "folder": str(image_dir), "files": names}
    record = {"precision": "int8-static", "calibration": calibrated_on, "graph": OPENVINO_STATIC_INT8_GRAPH}
    images = [[name, sha256_files([path])] for name, path in zip(names, files)]
    plan = {**inputs, "precision": "int8-static", "calibration": images, "graph": OPENVINO_STATIC_INT8_GRAPH}
    return plan, record, calibration


def export_openvino_int8(
    export_dir: Path,
    image_dir: Path | None,
    *,
    count: int = CALIBRATION_IMAGES,
    minimum: int = MIN_CALIBRATION_IMAGES,
    log: Log = no_log,
) -> tuple[Path, Parity]:
    """The export's openvino-int8.DIGEST/model.xml (+ .bin), made when its parity holds, and recorded.

    CNNs are calibrated on `image_dir` (static INT8, kept at mean cosine >= 0.98); CLIP gets INT8
    weights (kept at min cosine >= 0.999, as the ONNX Runtime INT8). DIGEST hashes the fp32 graph
    and, for CNNs, the calibration images (names and bytes): the same images give the same path,
    returned as it is when recorded; other images a new one. Both files are written into a staging
    directory renamed into place after the check, so an interrupted or failed run never leaves a
    half-written model that later runs would pick up.
    """
    metadata = read_metadata(export_dir)
    family = metadata["family"]
    if family not in OPENVINO_INT8_FAMILIES:
        raise ValueError(f"OpenVINO INT8 is offered for {', '.join(OPENVINO_INT8_FAMILIES)} models, not {family}")
    spec = Preprocessing.from_dict(metadata["preprocessing"])
    inputs, record, calibration = _openvino_int8_plan(export_dir, family, spec, image_dir, count, minimum)
    name = addressed_name(OPENVINO_INT8_STEM, inputs)
    target = export_dir / name
    recorded = metadata.get("artefacts", {}).get(f"{name}/{OPENVINO_INT8_XML}")
    if recorded is not None and (target / OPENVINO_INT8_XML).is_file():
        return target / OPENVINO_INT8_XML, recorded_parity(recorded)
    missing = nncf_missing()
    if missing:
        raise ValueError(f"OpenVINO INT8 needs NNCF: {missing}")
    import openvino as ov

    model = ov.Core().read_model(str(export_dir / FP32_ONNX))
    if calibration is not None:
        log(f"calibrating INT8 on {len(calibration)} images from {image_dir} (once per model)")
        fold_paddings(model)
        quantized = _calibrated_int8(model, calibration)
    else:
        quantized = _weight_int8(model, log)
    staging = Path(tempfile.mkdtemp(dir=export_dir, prefix=f".{name}."))
    try:
        ov.save_model(quantized, str(staging / OPENVINO_INT8_XML))
        pixels, source = parity_pixels(spec, image_dir)
        parity = compare_embeddings(
            onnx_embed(export_dir / FP32_ONNX, pixels), openvino_embed(staging / OPENVINO_INT8_XML, pixels), source
        )
        log(parity.line(f"OpenVINO {record['precision']} vs ONNX fp32"))
        if family in OPENVINO_STATIC_INT8_FAMILIES and parity.mean_cosine < OPENVINO_INT8_MIN_MEAN_COSINE:
            raise ValueError(
                f"OpenVINO int8 mean cosine {parity.mean_cosine:.5f} < {OPENVINO_INT8_MIN_MEAN_COSINE}; not kept"
            )
        if family in OPENVINO_WEIGHT_INT8_FAMILIES and parity.min_cosine < INT8_MIN_COSINE:
            raise ValueError(f"OpenVINO int8 min cosine {parity.min_cosine:.5f} < {INT8_MIN_COSINE}; not kept")
        if target.exists():  # another process made it from the same inputs meanwhile: keep its model and its record
            return target / OPENVINO_INT8_XML, parity
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    add_artefact(
        export_dir, f"{name}/{OPENVINO_INT8_XML}", OPENVINO_INT8_KIND, **record, parity_vs_onnx_fp32=parity.to_dict()
    )
    return target / OPENVINO_INT8_XML, parity
