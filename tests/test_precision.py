"""Backend and precision choice on a CPU machine, the parity of each shipped CPU precision, INT8
artefacts named by their inputs, and INT8 recipes reopened exactly from another cache."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from fastret.engine.decode import list_images, load_pixels
from fastret.engine.encoders import ModelInfo
from fastret.engine.index import Index
from fastret.engine.openvino_runtime import cpu_supports_bf16, openvino_missing
from fastret.export import quantize
from fastret.export.models import resolve_model
from fastret.export.onnx_export import export_dir_for, find_artefact, parity_pixels, read_metadata
from fastret.export.quantize import (
    CALIBRATION_IMAGES,
    INT8_ONNX_KIND,
    OPENVINO_INT8_KIND,
    OPENVINO_INT8_MIN_MEAN_COSINE,
)
from fastret.service.load import BackendUnavailable, encoder_for_index, encoder_for_source, encoder_from_recipe

pytestmark = pytest.mark.skipif(openvino_missing() is not None, reason=str(openvino_missing()))


@pytest.fixture(scope="module")
def tiny_clip(tiny_clip_dir):
    return resolve_model(str(tiny_clip_dir))[0]


def embed_both(reference, candidate, spec):
    pixels, _ = parity_pixels(spec, None, count=8)
    return reference.encode(pixels), candidate.encode(pixels)


@pytest.fixture
def private_cache(bundled_source, bundled_onnx, tmp_path, monkeypatch) -> Path:
    """A cache holding a copy of the bundled fp32 export only: an INT8 model made here stays here."""
    shared = export_dir_for(bundled_source)
    monkeypatch.setenv("FASTRET_CACHE", str(tmp_path / "cache"))
    private = export_dir_for(bundled_source)
    private.mkdir(parents=True)
    for name in ("model.onnx", "metadata.json"):
        shutil.copy(shared / name, private / name)
    return private


def int8_models(export_dir: Path) -> list[str]:
    return sorted(p.name for p in export_dir.glob("openvino-int8*"))


# --- the runtime each request gets on a CPU: one table ----------------------------------------------

BF16 = cpu_supports_bf16()
OPENVINO_FLOAT = "bf16" if BF16 else "fp32"
OPENVINO_BF16 = ("openvino", "bf16") if BF16 else "this CPU has no native bfloat16 arithmetic"
NOT_CALIBRATED = "static INT8 needs calibration images"
CPU_RUNTIMES = {
    # (model family, --backend, --precision): the (backend, precision) that runs, or the refusal's words.
    # No image folder is given: the CNN has no calibrated INT8 model.
    ("cnn", "auto", "auto"): ("openvino", OPENVINO_FLOAT),
    ("cnn", "auto", "fp32"): ("onnxruntime", "fp32"),
    ("cnn", "auto", "bf16"): OPENVINO_BF16,
    ("cnn", "auto", "int8"): NOT_CALIBRATED,
    ("cnn", "onnxruntime", "auto"): ("onnxruntime", "fp32"),
    ("cnn", "onnxruntime", "fp32"): ("onnxruntime", "fp32"),
    ("cnn", "onnxruntime", "bf16"): "precision bf16 runs on the openvino backend, not onnxruntime",
    ("cnn", "onnxruntime", "int8"): "precision int8 for efficientnet-lite models runs on the openvino backend",
    ("cnn", "openvino", "auto"): ("openvino", OPENVINO_FLOAT),
    ("cnn", "openvino", "fp32"): ("openvino", "fp32"),
    ("cnn", "openvino", "bf16"): OPENVINO_BF16,
    ("cnn", "openvino", "int8"): NOT_CALIBRATED,
    ("cnn", "torch", "auto"): ("torch", "fp32"),
    ("cnn", "torch", "fp32"): ("torch", "fp32"),
    ("cnn", "torch", "bf16"): "backend torch runs fp32, not bf16",
    ("cnn", "torch", "int8"): "backend torch runs fp32, not int8",
    ("clip", "auto", "auto"): ("onnxruntime", "int8"),
    ("clip", "auto", "fp32"): ("onnxruntime", "fp32"),
    ("clip", "auto", "bf16"): OPENVINO_BF16,
    ("clip", "auto", "int8"): ("onnxruntime", "int8"),
    ("clip", "onnxruntime", "auto"): ("onnxruntime", "int8"),
    ("clip", "onnxruntime", "fp32"): ("onnxruntime", "fp32"),
    ("clip", "onnxruntime", "bf16"): "precision bf16 runs on the openvino backend, not onnxruntime",
    ("clip", "onnxruntime", "int8"): ("onnxruntime", "int8"),
    ("clip", "openvino", "auto"): ("openvino", "int8"),
    ("clip", "openvino", "fp32"): ("openvino", "fp32"),
    ("clip", "openvino", "bf16"): OPENVINO_BF16,
    ("clip", "openvino", "int8"): ("openvino", "int8"),
    ("clip", "torch", "auto"): ("torch", "fp32"),
    ("clip", "torch", "fp32"): ("torch", "fp32"),
    ("clip", "torch", "bf16"): "backend torch runs fp32, not bf16",
    ("clip", "torch", "int8"): "backend torch runs fp32, not int8",
}


@pytest.mark.parametrize("family", ["cnn", "clip"])
@pytest.mark.parametrize("backend", ["auto", "onnxruntime", "openvino", "torch"])
@pytest.mark.parametrize("precision", ["auto", "fp32", "bf16", "int8"])
def test_the_runtime_each_request_gets_on_a_cpu(family, backend, precision, request):
    source = request.getfixturevalue("bundled_source" if family == "cnn" else "tiny_clip")
    if family == "cnn":
        request.getfixturevalue("private_cache")
    expected = CPU_RUNTIMES[(family, backend, precision)]
    if isinstance(expected, str):
        with pytest.raises(BackendUnavailable, match=expected):
            encoder_for_source(source, backend, precision=precision)
        return
    encoder = encoder_for_source(source, backend, precision=precision)
    assert (encoder.backend, encoder.precision) == expected
    assert (encoder.recipe.backend, encoder.recipe.precision) == expected


def test_unknown_precision(bundled_source):
    with pytest.raises(BackendUnavailable, match="unknown precision"):
        encoder_for_source(bundled_source, "auto", precision="fp8")


# --- OpenVINO and ONNX Runtime on the CPU: parity, workloads --------------------------------------------


def test_openvino_fp32_matches_onnxruntime(bundled_source, bundled_onnx):
    ov = encoder_for_source(bundled_source, "openvino", precision="fp32")
    a, b = embed_both(bundled_onnx, ov, bundled_source.preprocessing)
    assert b.shape == a.shape and b.dtype == np.float32
    assert np.allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
    assert (a * b).sum(1).min() >= 0.9999


def test_openvino_throughput_workload_streams_batches_through_concurrent_requests(bundled_source, bundled_onnx):
    latency = encoder_for_source(bundled_source, "openvino", precision="fp32", threads=2)
    batch_job = encoder_for_source(bundled_source, "openvino", precision="fp32", threads=2, workload="throughput")
    assert (latency.parallel_requests, batch_job.parallel_requests) == (1, 2)  # one stream per core
    pixels, _ = parity_pixels(bundled_source.preprocessing, None, count=8)
    parts = list(batch_job.encode_batches(pixels[i : i + 2] for i in range(0, 8, 2)))
    assert [len(part) for part in parts] == [2, 2, 2, 2]
    assert (np.concatenate(parts) * bundled_onnx.encode(pixels)).sum(1).min() >= 0.9999


def test_openvino_latency_single_images_match_batches(bundled_source):
    ov = encoder_for_source(bundled_source, "openvino", workload="latency")
    pixels, _ = parity_pixels(bundled_source.preprocessing, None, count=4)
    one_by_one = np.concatenate([ov.encode(pixels[i : i + 1]) for i in range(4)])  # the batch-1 static model
    assert (one_by_one * ov.encode(pixels)).sum(1).min() >= 0.999  # the dynamic-batch model


def test_openvino_refuses_an_unknown_workload(bundled_source):
    with pytest.raises(ValueError, match="workload must be one of"):
        encoder_for_source(bundled_source, "openvino", precision="fp32", workload="fast")


@pytest.mark.skipif(not BF16, reason="this CPU has no native bfloat16")
def test_openvino_bf16_stays_close(bundled_source, bundled_onnx):
    ov = encoder_for_source(bundled_source, "openvino", precision="bf16")
    a, b = embed_both(bundled_onnx, ov, bundled_source.preprocessing)
    assert np.allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
    # bf16 keeps 8 mantissa bits: measured min cosine ~0.96-0.99 on real photos, P@10 unchanged.
    assert (a * b).sum(1).min() >= 0.95


def test_onnxruntime_throughput_workload_runs_one_thread_calls_side_by_side(tiny_clip):
    latency = encoder_for_source(tiny_clip, "onnxruntime", precision="int8", threads=2)
    batch_job = encoder_for_source(tiny_clip, "onnxruntime", precision="int8", threads=2, workload="throughput")
    assert (latency.parallel_requests, batch_job.parallel_requests) == (1, 2)
    pixels, _ = parity_pixels(tiny_clip.preprocessing, None, count=8)
    parts = list(batch_job.encode_batches(pixels[i : i + 2] for i in range(0, 8, 2)))
    # Same batches (dynamic INT8 scales each batch's activations as a whole): same embeddings.
    alone = [latency.encode(pixels[i : i + 2]) for i in range(0, 8, 2)]
    np.testing.assert_allclose(np.concatenate(parts), np.concatenate(alone), atol=1e-5)


# --- INT8: the CNN's static INT8, calibrated on the indexed folder ------------------------------------


def held_out_pixels(folder: Path, spec, count: int = 20) -> np.ndarray:
    """Images the calibration (every k-th file from the first) does not see."""
    return np.stack([load_pixels(path, spec) for path in list_images(folder)[5::50][:count]])


def test_auto_calibrates_cnn_int8_on_the_indexed_folder_and_its_recipe_reopens_it_elsewhere(
    private_cache, bundled_source, bundled_onnx, wang1k, tmp_path, monkeypatch
):
    encoder = encoder_for_source(bundled_source, "auto", image_dir=wang1k, workload="throughput")
    assert (encoder.backend, encoder.precision) == ("openvino", "int8")
    path, record = find_artefact(private_cache, OPENVINO_INT8_KIND)
    calibration = record["calibration"]
    assert (calibration["images"], calibration["folder"], len(calibration["files"])) == (
        CALIBRATION_IMAGES, str(wang1k), CALIBRATION_IMAGES
    )
    assert calibration["files"] == sorted(calibration["files"]) and calibration["files"][0] == "africans/0.jpg"
    pixels = held_out_pixels(wang1k, bundled_source.preprocessing)
    embedded = encoder.encode(pixels)
    cosines = (embedded * bundled_onnx.encode(pixels)).sum(1)
    # Measured on wang1k / animals10-mini: mean 0.987-0.993, min 0.88-0.97; P@10 within 0.0015 of fp32.
    assert cosines.mean() >= OPENVINO_INT8_MIN_MEAN_COSINE and cosines.min() >= 0.85
    later = encoder_for_source(bundled_source, "auto")  # a later process, no folder: reuses it
    assert later.precision == "int8" and later.recipe.artefact == str(path)

    recipe = encoder.recipe
    assert (recipe.artefact, recipe.artefact_sha256) == (str(path), record["sha256"])
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    monkeypatch.setenv("FASTRET_CACHE", str(empty))
    reopened = encoder_from_recipe(recipe)
    assert reopened.recipe == recipe
    assert (reopened.encode(pixels) * embedded).sum(1).min() >= 0.999
    shutil.rmtree(path.parent)
    with pytest.raises(BackendUnavailable, match=f"artefact {path} is not on this machine; re-run `fastret index"):
        encoder_from_recipe(recipe)
    assert list(empty.iterdir()) == []  # nothing written into the cache in use


@pytest.fixture
def two_folders(wang1k, tmp_path) -> tuple[Path, Path]:
    """Two folders of 40 wang1k photos each (links to them), from different classes."""
    folders = []
    for name, classes in (("first", ["beach", "buses"]), ("second", ["dinosaurs", "flowers"])):
        for label in classes:
            (tmp_path / name / label).mkdir(parents=True)
            for photo in list_images(wang1k / label)[:20]:
                (tmp_path / name / label / photo.name).symlink_to(photo)
        folders.append(tmp_path / name)
    return folders[0], folders[1]


@pytest.mark.data
def test_recalibrating_on_other_images_makes_a_new_model_and_keeps_the_first(private_cache, two_folders, monkeypatch):
    monkeypatch.setattr(quantize, "OPENVINO_INT8_MIN_MEAN_COSINE", 0.9)  # 16 images calibrate coarsely
    first, second = two_folders
    said: list[str] = []
    path_a, _ = quantize.export_openvino_int8(private_cache, first, count=16, minimum=16, log=said.append)
    made = (path_a.read_bytes(), path_a.with_suffix(".bin").read_bytes())
    path_b, _ = quantize.export_openvino_int8(private_cache, second, count=16, minimum=16, log=said.append)
    assert path_a != path_b and path_a.parent.name.startswith("openvino-int8.")
    assert (path_a.read_bytes(), path_a.with_suffix(".bin").read_bytes()) == made  # the first is intact
    assert find_artefact(private_cache, OPENVINO_INT8_KIND)[0] == path_b  # new jobs use the newest
    assert sum(line.startswith("calibrating INT8") for line in said) == 2
    said.clear()
    again, _ = quantize.export_openvino_int8(private_cache, first, count=16, minimum=16, log=said.append)
    assert again == path_a and not any(line.startswith("calibrating INT8") for line in said)  # same images, same model
    records = read_metadata(private_cache)["artefacts"]
    folders = {records[f"{p.parent.name}/{p.name}"]["calibration"]["folder"] for p in (path_a, path_b)}
    assert folders == {str(first), str(second)}


def test_cnn_int8_without_calibration_images(private_cache, bundled_source):
    said: list[str] = []
    encoder = encoder_for_source(bundled_source, "auto", log=said.append)
    assert (encoder.backend, encoder.precision) == ("openvino", OPENVINO_FLOAT)
    assert any("instead of int8" in line and "calibration images" in line for line in said)
    assert int8_models(private_cache) == []


@pytest.mark.data
def test_cnn_int8_failing_parity_leaves_nothing(private_cache, wang1k, monkeypatch):
    monkeypatch.setattr(quantize, "OPENVINO_INT8_MIN_MEAN_COSINE", 1.01)
    with pytest.raises(ValueError, match="mean cosine .* < 1.01; not kept"):
        quantize.export_openvino_int8(private_cache, wang1k, count=8, minimum=8)
    assert sorted(p.name for p in private_cache.iterdir()) == ["metadata.json", "model.onnx"]
    assert find_artefact(private_cache, OPENVINO_INT8_KIND) is None


@pytest.mark.data
def test_cnn_int8_made_meanwhile_by_another_process_is_kept(private_cache, wang1k, monkeypatch):
    monkeypatch.setattr(quantize, "OPENVINO_INT8_MIN_MEAN_COSINE", 0.9)
    path, _ = quantize.export_openvino_int8(private_cache, wang1k, count=8, minimum=8)
    metadata = read_metadata(private_cache)
    del metadata["artefacts"][f"{path.parent.name}/{path.name}"]  # theirs: renamed into place, not yet recorded
    (private_cache / "metadata.json").write_text(json.dumps(metadata))
    path.write_text("their model")
    again, _ = quantize.export_openvino_int8(private_cache, wang1k, count=8, minimum=8)
    assert again == path and path.read_text() == "their model"
    assert find_artefact(private_cache, OPENVINO_INT8_KIND) is None  # theirs to record
    assert int8_models(private_cache) == [path.parent.name]


@pytest.mark.data
def test_cnn_int8_refuses_a_small_calibration_folder(private_cache, bundled_source, wang1k, tmp_path):
    few = tmp_path / "few"
    few.mkdir()
    for path in list_images(wang1k)[:10]:
        shutil.copy(path, few / path.name)
    with pytest.raises(BackendUnavailable, match="needs 64 images to calibrate on; .* has 10"):
        encoder_for_source(bundled_source, "openvino", precision="int8", image_dir=few)
    assert int8_models(private_cache) == []


# --- INT8 for CLIP: no calibration -------------------------------------------------------------------


def test_clip_gets_int8_weights_without_calibration(tiny_clip, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTRET_CACHE", str(tmp_path))
    fp32 = encoder_for_source(tiny_clip, "onnxruntime", precision="fp32")
    int8 = encoder_for_source(tiny_clip, "openvino", precision="int8")  # no image folder
    assert (int8.backend, int8.precision) == ("openvino", "int8")
    assert int8.config["DYNAMIC_QUANTIZATION_GROUP_SIZE"] > 0
    path, record = find_artefact(export_dir_for(tiny_clip), OPENVINO_INT8_KIND)
    assert int8.path == path and record["precision"] == "int8-weights" and "calibration" not in record
    assert record["parity_vs_onnx_fp32"]["min_cosine"] >= 0.999
    a, b = embed_both(fp32, int8, tiny_clip.preprocessing)
    assert (a * b).sum(1).min() >= 0.999


def test_clip_dynamic_int8_onnx_parity_and_name(tiny_clip):
    fp32 = encoder_for_source(tiny_clip, "onnxruntime", precision="fp32")
    int8 = encoder_for_source(tiny_clip, "onnxruntime", precision="int8")
    path, record = find_artefact(export_dir_for(tiny_clip), INT8_ONNX_KIND)
    assert int8.path == path and path.name.startswith("model.int8.") and path.suffix == ".onnx"
    assert quantize.export_int8(path.parent)[0] == path  # same inputs, same file: recorded, not made again
    assert int8.recipe.artefact_sha256 == record["sha256"]
    a, b = embed_both(fp32, int8, tiny_clip.preprocessing)
    assert (a * b).sum(1).min() >= 0.999


def test_clip_openvino_int8_embeds_an_image_the_same_alone_or_in_a_batch(tiny_clip):
    """Its activation scales are per row: unlike ONNX Runtime's dynamic INT8, which scales a whole
    batch together (random CLIP B/32: self cosine 0.99987 alone vs in a batch of 8)."""
    encoder = encoder_for_source(tiny_clip, "openvino", precision="int8")
    pixels, _ = parity_pixels(tiny_clip.preprocessing, None, count=8)
    alone = np.concatenate([encoder.encode(pixels[i : i + 1]) for i in range(8)])
    assert (alone * encoder.encode(pixels)).sum(1).min() >= 0.99999


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_an_int8_recipe_reopens_its_artefact_from_another_cache_and_writes_nothing(
    tiny_clip, tmp_path, monkeypatch, backend
):
    monkeypatch.setenv("FASTRET_CACHE", str(tmp_path / "A"))
    made = encoder_for_source(tiny_clip, backend, precision="int8")
    recipe = made.recipe
    assert (recipe.backend, recipe.precision) == (backend, "int8")
    assert Path(recipe.artefact).is_relative_to(tmp_path / "A")
    empty = tmp_path / "B"
    empty.mkdir()
    monkeypatch.setenv("FASTRET_CACHE", str(empty))
    reopened = encoder_from_recipe(recipe)
    assert reopened.recipe == recipe
    pixels, _ = parity_pixels(tiny_clip.preprocessing, None, count=8)
    assert (reopened.encode(pixels) * made.encode(pixels)).sum(1).min() >= 0.999
    shutil.rmtree(tmp_path / "A")
    with pytest.raises(BackendUnavailable, match="is not on this machine; re-run `fastret index DIR --out INDEX`"):
        encoder_from_recipe(recipe)
    assert list(empty.iterdir()) == []


def test_a_bf16_recipe_is_refused_on_a_cpu_without_bf16(bundled_source, bundled_onnx, monkeypatch):
    from dataclasses import replace

    from fastret.service import load

    recipe = replace(bundled_onnx.recipe, backend="openvino", precision="bf16")
    monkeypatch.setattr(load, "cpu_supports_bf16", lambda: False)
    refusal = r"embedded on openvino \(bf16\) .*cannot run here: this CPU has no native bfloat16"
    with pytest.raises(BackendUnavailable, match=refusal):
        encoder_from_recipe(recipe)


# --- indexes made before recipes were recorded ----------------------------------------------------------


def index_without_recipe(info: ModelInfo, runtime: dict | None) -> Index:
    return Index(info, "/gallery", [], np.empty((0, info.dim), np.float32), runtime=runtime)


@pytest.mark.parametrize(
    "recorded, expected",
    [
        ({"backend": "onnxruntime", "precision": "fp32"}, ("onnxruntime", "fp32")),
        ({"backend": "openvino", "precision": "fp32"}, ("openvino", "fp32")),
        (None, ("openvino", OPENVINO_FLOAT)),  # auto
    ],
)
def test_queries_embed_on_the_runtime_an_index_without_recipe_recorded(private_cache, bundled_onnx, recorded, expected):
    encoder = encoder_for_index(index_without_recipe(bundled_onnx.info, recorded))
    assert (encoder.backend, encoder.precision) == expected


def test_an_unavailable_recorded_runtime_falls_back_and_says_so(private_cache, bundled_onnx):
    said: list[str] = []
    index = index_without_recipe(bundled_onnx.info, {"backend": "tensorrt", "precision": "fp16"})
    encoder = encoder_for_index(index, log=said.append)
    assert encoder.backend == "openvino"
    assert any("embedded on tensorrt (fp16), not available here" in line for line in said)
