"""The EfficientNet-Lite choices: names and input sides, each exported model against its PyTorch
reference, and its INT8 model against its fp32 one."""

from __future__ import annotations

import numpy as np
import pytest

from fastret.engine.decode import list_images, load_pixels
from fastret.export.models import EFFICIENTNET_LITE, ModelNotFound, resolve_model
from fastret.export.onnx_export import (
    FP32_ONNX,
    PARITY_MIN_COSINE,
    compare_embeddings,
    ensure_exported,
    onnx_embed,
    torch_embed,
)
from fastret.export.quantize import OPENVINO_INT8_MIN_MEAN_COSINE
from fastret.export.torch_models import load_torch_model
from fastret.service.load import encoder_for_source


@pytest.mark.parametrize(
    "name, model_id, side",
    [
        ("efficientnet-lite0", "efficientnet-lite0", 224),
        ("efficientnet-lite1", "efficientnet-lite1", 240),
        ("efficientnet-lite2", "efficientnet-lite2", 260),
        ("efficientnet-lite0@192", "efficientnet-lite0@192", 192),
        ("efficientnet-lite2@260", "efficientnet-lite2", 260),  # its own side: the plain name
    ],
)
def test_efficientnet_names_resolve_to_their_input_side(name, model_id, side):
    source, _ = resolve_model(name)
    assert (source.model_id, source.preprocessing.size, source.preprocessing.resize, source.dim) == (
        model_id, side, side, 1280
    )


def test_the_variants_have_their_own_weights():
    hashes = {resolve_model(name)[0].weights_sha256 for name in EFFICIENTNET_LITE}
    assert len(hashes) == len(EFFICIENTNET_LITE)


@pytest.mark.parametrize(
    "name, message",
    [
        ("efficientnet-lite3", "EfficientNet-Lite comes as"),
        ("efficientnet-lite0@", "whole number of pixels"),
        ("efficientnet-lite0@big", "whole number of pixels"),
        ("efficientnet-lite0@64", "128-512"),
        ("efficientnet-lite0@1024", "128-512"),
    ],
)
def test_bad_efficientnet_names_are_refused(name, message):
    with pytest.raises(ModelNotFound, match=message):
        resolve_model(name)


def wang1k_pixels(wang1k, source, count: int = 24) -> np.ndarray:
    paths = list_images(wang1k)[:: len(list_images(wang1k)) // count][:count]  # spread over the classes
    return np.stack([load_pixels(p, source.preprocessing) for p in paths])


@pytest.mark.data
@pytest.mark.parametrize(
    "name", ["efficientnet-lite0", pytest.param("efficientnet-lite1", marks=pytest.mark.slow),
             pytest.param("efficientnet-lite2@224", marks=pytest.mark.slow)]
)
def test_exported_model_matches_torch_on_real_photos(wang1k, name):
    source, _ = resolve_model(name)
    pixels = wang1k_pixels(wang1k, source)
    reference = torch_embed(load_torch_model(source), pixels)
    parity = compare_embeddings(reference, onnx_embed(ensure_exported(source) / FP32_ONNX, pixels), "wang1k")
    assert parity.min_cosine >= PARITY_MIN_COSINE, parity.line(f"{name} ONNX vs torch")


@pytest.mark.slow
@pytest.mark.data
@pytest.mark.parametrize("name", ["efficientnet-lite0", "efficientnet-lite1"])
def test_int8_model_keeps_to_its_fp32_model(wang1k, name):
    source, _ = resolve_model(name)
    int8 = encoder_for_source(source, "openvino", image_dir=wang1k, precision="int8")
    fp32 = encoder_for_source(source, "onnxruntime", precision="fp32")
    pixels = wang1k_pixels(wang1k, source)
    parity = compare_embeddings(fp32.encode(pixels), int8.encode(pixels), "wang1k")
    assert int8.precision == "int8"
    assert parity.mean_cosine >= OPENVINO_INT8_MIN_MEAN_COSINE, parity.line(f"{name} int8 vs fp32")
