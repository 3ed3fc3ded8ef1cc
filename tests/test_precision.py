"""Backend and precision choice on a CPU machine, and the parity of each shipped CPU precision."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from fastret.engine.decode import list_images, load_pixels
from fastret.service.load import BackendUnavailable, encoder_for_source
from fastret.engine.openvino_runtime import cpu_supports_bf16, openvino_missing
from fastret.export import quantize
from fastret.export.models import resolve_model
from fastret.export.onnx_export import export_dir_for, parity_pixels, read_metadata
from fastret.export.quantize import CALIBRATION_IMAGES, OPENVINO_INT8_DIR, OPENVINO_INT8_MIN_MEAN_COSINE

pytestmark = pytest.mark.skipif(openvino_missing() is not None, reason=str(openvino_missing()))

QUIET = {"log": lambda _: None}


@pytest.fixture(scope="module")
def tiny_clip(tiny_clip_dir):
    return resolve_model(str(tiny_clip_dir))[0]


def embed_both(reference, candidate, spec):
    pixels, _ = parity_pixels(spec, None, count=8)
    return reference.encode(pixels), candidate.encode(pixels)


def test_auto_on_cpu_is_openvino(private_cache, bundled_source):
    encoder = encoder_for_source(bundled_source, "auto", **QUIET)  # no INT8 calibrated in this cache
    assert encoder.backend == "openvino"
    assert encoder.precision == ("bf16" if cpu_supports_bf16() else "fp32")


def test_openvino_fp32_matches_onnxruntime(bundled_source, bundled_onnx):
    ov = encoder_for_source(bundled_source, "openvino", precision="fp32", **QUIET)
    a, b = embed_both(bundled_onnx, ov, bundled_source.preprocessing)
    assert b.shape == a.shape and b.dtype == np.float32
    assert np.allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
    assert (a * b).sum(1).min() >= 0.9999


def test_openvino_throughput_workload_serves_concurrent_batches(bundled_source, bundled_onnx):
    from concurrent.futures import ThreadPoolExecutor

    ov = encoder_for_source(bundled_source, "openvino", precision="fp32", workload="throughput", **QUIET)
    assert ov.parallel_requests >= 1
    pixels, _ = parity_pixels(bundled_source.preprocessing, None, count=8)
    with ThreadPoolExecutor(4) as pool:
        parts = list(pool.map(ov.encode, [pixels[i : i + 2] for i in range(0, 8, 2)]))
    assert (np.concatenate(parts) * bundled_onnx.encode(pixels)).sum(1).min() >= 0.9999


def test_openvino_latency_single_images_match_batches(bundled_source):
    ov = encoder_for_source(bundled_source, "openvino", workload="latency", **QUIET)
    pixels, _ = parity_pixels(bundled_source.preprocessing, None, count=4)
    one_by_one = np.concatenate([ov.encode(pixels[i : i + 1]) for i in range(4)])  # the batch-1 static model
    assert (one_by_one * ov.encode(pixels)).sum(1).min() >= 0.999  # the dynamic-batch model


def test_openvino_refuses_an_unknown_workload(bundled_source):
    with pytest.raises(ValueError, match="workload must be one of"):
        encoder_for_source(bundled_source, "openvino", precision="fp32", workload="fast", **QUIET)


@pytest.mark.skipif(not cpu_supports_bf16(), reason="this CPU has no native bfloat16")
def test_openvino_bf16_stays_close(bundled_source, bundled_onnx):
    ov = encoder_for_source(bundled_source, "openvino", precision="bf16", **QUIET)
    a, b = embed_both(bundled_onnx, ov, bundled_source.preprocessing)
    assert np.allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
    # bf16 keeps 8 mantissa bits: measured min cosine ~0.96-0.99 on real photos, P@10 unchanged.
    assert (a * b).sum(1).min() >= 0.95


def test_cnn_int8_is_an_openvino_precision(bundled_source):
    with pytest.raises(BackendUnavailable, match="int8 for efficientnet-lite models runs on the openvino backend"):
        encoder_for_source(bundled_source, "onnxruntime", precision="int8", **QUIET)


@pytest.fixture
def private_cache(bundled_source, bundled_onnx, tmp_path, monkeypatch) -> Path:
    """A cache holding a copy of the bundled fp32 export only: an INT8 model made here stays here."""
    shared = export_dir_for(bundled_source)
    monkeypatch.setenv("FASTRET_CACHE", str(tmp_path))
    private = export_dir_for(bundled_source)
    private.mkdir(parents=True)
    for name in ("model.onnx", "metadata.json"):
        shutil.copy(shared / name, private / name)
    return private


def held_out_pixels(folder: Path, spec, count: int = 20) -> np.ndarray:
    """Images the calibration (every k-th file from the first) does not see."""
    return np.stack([load_pixels(path, spec) for path in list_images(folder)[5::50][:count]])


def test_auto_calibrates_cnn_int8_on_the_indexed_folder(private_cache, bundled_source, bundled_onnx, wang1k):
    encoder = encoder_for_source(bundled_source, "auto", image_dir=wang1k, workload="throughput", **QUIET)
    assert (encoder.backend, encoder.precision) == ("openvino", "int8")
    recorded = read_metadata(private_cache)["artefacts"][OPENVINO_INT8_DIR]
    assert recorded["calibration"] == {"images": CALIBRATION_IMAGES, "folder": str(wang1k)}
    pixels = held_out_pixels(wang1k, bundled_source.preprocessing)
    cosines = (encoder.encode(pixels) * bundled_onnx.encode(pixels)).sum(1)
    # Measured on wang1k / animals10-mini: mean 0.987-0.993, min 0.88-0.97; P@10 within 0.0015 of fp32.
    assert cosines.mean() >= OPENVINO_INT8_MIN_MEAN_COSINE and cosines.min() >= 0.85
    later = encoder_for_source(bundled_source, "auto", **QUIET)  # a later process, no folder: reuses it
    assert later.precision == "int8"


@pytest.mark.parametrize(
    "recorded, backend, precision",
    [
        ({"backend": "onnxruntime", "precision": "fp32"}, "onnxruntime", "fp32"),
        ({"backend": "openvino", "precision": "fp32"}, "openvino", "fp32"),
        (None, "openvino", None),
    ],
)
def test_queries_embed_on_the_runtime_the_index_recorded(private_cache, bundled_source, recorded, backend, precision):
    from fastret.service.load import encoder_for_index, model_info

    encoder = encoder_for_index(model_info(bundled_source), recorded=recorded, **QUIET)
    assert encoder.backend == backend and encoder.precision == (precision or encoder.precision)


def test_an_unavailable_recorded_runtime_falls_back_and_says_so(private_cache, bundled_source):
    from fastret.service.load import encoder_for_index, model_info

    said: list[str] = []
    recorded = {"backend": "tensorrt", "precision": "fp16"}
    encoder = encoder_for_index(model_info(bundled_source), recorded=recorded, log=said.append)
    assert encoder.backend == "openvino"
    assert any("embedded on tensorrt (fp16), not available here" in line for line in said)


def test_cnn_int8_without_calibration_images(private_cache, bundled_source):
    said: list[str] = []
    encoder = encoder_for_source(bundled_source, "auto", log=said.append)
    assert encoder.backend == "openvino" and encoder.precision in ("bf16", "fp32")
    assert any("instead of int8" in line and "calibration images" in line for line in said)
    with pytest.raises(BackendUnavailable, match="needs calibration images"):
        encoder_for_source(bundled_source, "openvino", precision="int8", **QUIET)
    assert not (private_cache / OPENVINO_INT8_DIR).exists()


def test_cnn_int8_failing_parity_leaves_nothing(private_cache, wang1k, monkeypatch):
    monkeypatch.setattr(quantize, "OPENVINO_INT8_MIN_MEAN_COSINE", 1.01)
    with pytest.raises(ValueError, match="mean cosine .* < 1.01; not kept"):
        quantize.export_openvino_int8(private_cache, wang1k, count=8, minimum=8, log=lambda _: None)
    assert sorted(p.name for p in private_cache.iterdir()) == ["metadata.json", "model.onnx"]
    assert OPENVINO_INT8_DIR not in read_metadata(private_cache).get("artefacts", {})


def test_cnn_int8_made_meanwhile_by_another_process_is_kept_with_its_record(private_cache, wang1k):
    theirs = private_cache / OPENVINO_INT8_DIR
    theirs.mkdir()
    (theirs / "model.xml").write_text("their model")  # appears while this process calibrates
    path, _ = quantize.export_openvino_int8(private_cache, wang1k, count=64, log=lambda _: None)
    assert path == theirs / "model.xml" and path.read_text() == "their model"
    assert OPENVINO_INT8_DIR not in read_metadata(private_cache).get("artefacts", {})  # theirs to write
    assert sorted(p.name for p in private_cache.iterdir()) == ["metadata.json", "model.onnx", OPENVINO_INT8_DIR]


def test_cnn_int8_refuses_a_small_calibration_folder(private_cache, bundled_source, wang1k, tmp_path):
    few = tmp_path / "few"
    few.mkdir()
    for path in list_images(wang1k)[:10]:
        shutil.copy(path, few / path.name)
    with pytest.raises(BackendUnavailable, match="needs 64 images to calibrate on; .* has 10"):
        encoder_for_source(bundled_source, "openvino", precision="int8", image_dir=few, **QUIET)
    assert not (private_cache / OPENVINO_INT8_DIR).exists()


def test_clip_gets_int8_weights_without_calibration(tiny_clip, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTRET_CACHE", str(tmp_path))
    fp32 = encoder_for_source(tiny_clip, "onnxruntime", precision="fp32", **QUIET)
    int8 = encoder_for_source(tiny_clip, "openvino", precision="int8", **QUIET)  # no image folder
    assert (int8.backend, int8.precision) == ("openvino", "int8")
    assert int8.config["DYNAMIC_QUANTIZATION_GROUP_SIZE"] > 0
    record = read_metadata(export_dir_for(tiny_clip))["artefacts"][OPENVINO_INT8_DIR]
    assert record["precision"] == "int8-weights" and "calibration" not in record
    assert record["parity_vs_onnx_fp32"]["min_cosine"] >= 0.999
    a, b = embed_both(fp32, int8, tiny_clip.preprocessing)
    assert (a * b).sum(1).min() >= 0.999


def test_bf16_needs_openvino(bundled_source):
    with pytest.raises(BackendUnavailable, match="bf16 runs on the openvino backend"):
        encoder_for_source(bundled_source, "onnxruntime", precision="bf16", **QUIET)


def test_unknown_precision(bundled_source):
    with pytest.raises(BackendUnavailable, match="unknown precision"):
        encoder_for_source(bundled_source, "auto", precision="fp8", **QUIET)


def test_clip_dynamic_int8_onnx_parity(tiny_clip):
    fp32 = encoder_for_source(tiny_clip, "onnxruntime", precision="fp32", **QUIET)
    int8 = encoder_for_source(tiny_clip, "onnxruntime", precision="int8", **QUIET)
    assert (int8.backend, int8.precision) == ("onnxruntime", "int8")
    assert int8.path.name == "model.int8.onnx"
    a, b = embed_both(fp32, int8, tiny_clip.preprocessing)
    assert (a * b).sum(1).min() >= 0.999


@pytest.mark.parametrize("precision", ["auto", "int8"])
def test_auto_on_cpu_gives_clip_dynamic_int8(tiny_clip, precision):
    encoder = encoder_for_source(tiny_clip, "auto", precision=precision, **QUIET)
    assert (encoder.backend, encoder.precision) == ("onnxruntime", "int8")


def test_clip_openvino_int8_embeds_an_image_the_same_alone_or_in_a_batch(tiny_clip):
    """Its activation scales are per row: unlike ONNX Runtime's dynamic INT8, which scales a whole
    batch together (random CLIP B/32: self cosine 0.99987 alone vs in a batch of 8)."""
    encoder = encoder_for_source(tiny_clip, "openvino", precision="int8", **QUIET)
    pixels, _ = parity_pixels(tiny_clip.preprocessing, None, count=8)
    alone = np.concatenate([encoder.encode(pixels[i : i + 1]) for i in range(8)])
    assert (alone * encoder.encode(pixels)).sum(1).min() >= 0.99999


def test_onnxruntime_throughput_workload_runs_one_thread_calls_side_by_side(tiny_clip):
    from concurrent.futures import ThreadPoolExecutor

    latency = encoder_for_source(tiny_clip, "onnxruntime", precision="int8", threads=2, **QUIET)
    batch_job = encoder_for_source(tiny_clip, "onnxruntime", precision="int8", threads=2, workload="throughput", **QUIET)
    assert (latency.parallel_requests, batch_job.parallel_requests) == (1, 2)
    pixels, _ = parity_pixels(tiny_clip.preprocessing, None, count=8)
    with ThreadPoolExecutor(2) as pool:
        parts = list(pool.map(batch_job.encode, [pixels[i : i + 2] for i in range(0, 8, 2)]))
    # Same batches (dynamic INT8 scales each batch's activations as a whole): same embeddings.
    alone = [latency.encode(pixels[i : i + 2]) for i in range(0, 8, 2)]
    np.testing.assert_allclose(np.concatenate(parts), np.concatenate(alone), atol=1e-5)


def test_auto_fp32_on_cpu_is_onnxruntime(bundled_source):
    encoder = encoder_for_source(bundled_source, "auto", precision="fp32", **QUIET)
    assert (encoder.backend, encoder.precision) == ("onnxruntime", "fp32")
