"""Backend and precision choice on a CPU machine, and the parity of each shipped CPU precision."""

from __future__ import annotations

import numpy as np
import pytest

from fastret.engine.load import BackendUnavailable, encoder_for_source
from fastret.engine.openvino_runtime import cpu_supports_bf16, openvino_missing
from fastret.export.models import resolve_model
from fastret.export.onnx_export import parity_pixels

pytestmark = pytest.mark.skipif(openvino_missing() is not None, reason=str(openvino_missing()))

QUIET = {"log": lambda _: None}


@pytest.fixture(scope="module")
def tiny_clip(tiny_clip_dir):
    return resolve_model(str(tiny_clip_dir))[0]


def embed_both(reference, candidate, spec):
    pixels, _ = parity_pixels(spec, None, count=8)
    return reference.encode(pixels), candidate.encode(pixels)


def test_auto_on_cpu_is_openvino(bundled_source):
    encoder = encoder_for_source(bundled_source, "auto", **QUIET)
    assert encoder.backend == "openvino"
    assert encoder.precision == ("bf16" if cpu_supports_bf16() else "fp32")


def test_openvino_fp32_matches_onnxruntime(bundled_source, bundled_onnx):
    ov = encoder_for_source(bundled_source, "openvino", precision="fp32", **QUIET)
    a, b = embed_both(bundled_onnx, ov, bundled_source.preprocessing)
    assert b.shape == a.shape and b.dtype == np.float32
    assert np.allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
    assert (a * b).sum(1).min() >= 0.9999


@pytest.mark.skipif(not cpu_supports_bf16(), reason="this CPU has no native bfloat16")
def test_openvino_bf16_stays_close(bundled_source, bundled_onnx):
    ov = encoder_for_source(bundled_source, "openvino", precision="bf16", **QUIET)
    a, b = embed_both(bundled_onnx, ov, bundled_source.preprocessing)
    assert np.allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
    # bf16 keeps 8 mantissa bits: measured min cosine ~0.96-0.99 on real photos, P@10 unchanged.
    assert (a * b).sum(1).min() >= 0.95


def test_int8_is_refused_for_the_cnn(bundled_source):
    with pytest.raises(BackendUnavailable, match="int8 is offered for clip"):
        encoder_for_source(bundled_source, "onnxruntime", precision="int8", **QUIET)


def test_bf16_needs_openvino(bundled_source):
    with pytest.raises(BackendUnavailable, match="bf16 runs on the openvino backend"):
        encoder_for_source(bundled_source, "onnxruntime", precision="bf16", **QUIET)


def test_unknown_precision(bundled_source):
    with pytest.raises(BackendUnavailable, match="unknown precision"):
        encoder_for_source(bundled_source, "auto", precision="fp8", **QUIET)


def test_clip_int8_parity_and_routing(tiny_clip):
    fp32 = encoder_for_source(tiny_clip, "onnxruntime", precision="fp32", **QUIET)
    int8 = encoder_for_source(tiny_clip, "auto", precision="int8", **QUIET)
    assert (int8.backend, int8.precision) == ("onnxruntime", "int8")
    assert int8.path.name == "model.int8.onnx"
    a, b = embed_both(fp32, int8, tiny_clip.preprocessing)
    assert (a * b).sum(1).min() >= 0.999


def test_auto_on_cpu_gives_clip_int8(tiny_clip):
    encoder = encoder_for_source(tiny_clip, "auto", **QUIET)
    assert (encoder.backend, encoder.precision) == ("onnxruntime", "int8")


def test_auto_fp32_on_cpu_is_onnxruntime(bundled_source):
    encoder = encoder_for_source(bundled_source, "auto", precision="fp32", **QUIET)
    assert (encoder.backend, encoder.precision) == ("onnxruntime", "fp32")
