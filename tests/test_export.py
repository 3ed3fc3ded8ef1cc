"""Model registry and ONNX export: parity with PyTorch, metadata, the cache, offline fallbacks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fastret.export.onnx_export as onnx_export
from fastret.engine.decode import Preprocessing, list_images, load_pixels
from fastret.engine.encoders import EncoderRecipe, OnnxEncoder
from fastret.engine.files import sha256_files
from fastret.engine.index import Index
from fastret.engine.retrieval import build_index
from fastret.export.models import BUNDLED, ModelNotFound, clip_preprocessing, resolve_model
from fastret.export.onnx_export import (
    FP32_KIND,
    FP32_ONNX,
    INPUT_NAME,
    OUTPUT_NAME,
    PARITY_MIN_COSINE,
    ExportError,
    compare_embeddings,
    ensure_exported,
    export_dir_for,
    export_onnx,
    onnx_embed,
    parity_pixels,
    read_metadata,
    torch_embed,
)
from fastret.export.torch_models import load_torch_model
from fastret.service import load
from fastret.service.load import (
    BackendUnavailable,
    encoder_for_index,
    encoder_for_source,
    encoder_from_recipe,
    model_info,
    open_encoder,
)

CLIP_MEAN_255 = tuple(255.0 * m for m in (0.48145466, 0.4578275, 0.40821073))


def write_photos(folder: Path, count: int, side: int = 48) -> list[Path]:
    """Distinct seeded images in two label folders."""
    rng = np.random.default_rng(1)
    paths = []
    for i in range(count):
        path = folder / f"class{i % 2}" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (side, side + 8, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def tiny_export(tiny_clip_dir, tmp_path_factory) -> tuple[Path, object]:
    source, _ = resolve_model(str(tiny_clip_dir))
    out = export_onnx(source, tmp_path_factory.mktemp("tiny-export") / "export", )
    return out, source


def test_local_checkpoint_resolves_with_its_own_shape(tiny_clip_dir):
    source, why = resolve_model(str(tiny_clip_dir))
    assert source.family == "clip" and source.dim == 16
    assert source.model_id == f"local:{tiny_clip_dir.resolve()}"
    assert "local CLIP checkpoint" in why
    # No preprocessor_config.json: CLIP's defaults at the model's own input size.
    assert source.preprocessing == Preprocessing(32, 32, "bicubic", CLIP_MEAN_255, source.preprocessing.std)
    assert len(source.weights_sha256) == 64


def test_tiny_clip_export_metadata(tiny_export):
    out, source = tiny_export
    metadata = read_metadata(out)
    assert metadata["model_id"] == source.model_id
    assert metadata["weights_sha256"] == source.weights_sha256
    assert metadata["dim"] == 16
    assert Preprocessing.from_dict(metadata["preprocessing"]) == source.preprocessing
    assert metadata["opset"] >= 17
    assert (metadata["input"], metadata["output"]) == (INPUT_NAME, OUTPUT_NAME)
    record = metadata["artefacts"][FP32_ONNX]
    assert record["parity_vs_torch"]["min_cosine"] >= PARITY_MIN_COSINE and record["parity_vs_torch"]["images"] > 0
    assert (record["kind"], record["sha256"]) == (FP32_KIND, sha256_files([out / FP32_ONNX]))


def test_tiny_clip_onnx_graph_takes_uint8_nhwc_with_dynamic_batch(tiny_export):
    import onnx

    model = onnx.load(str(tiny_export[0] / FP32_ONNX))
    assert max(op.version for op in model.opset_import if op.domain in ("", "ai.onnx")) >= 17
    (graph_input,) = model.graph.input
    assert graph_input.name == INPUT_NAME
    assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = graph_input.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [32, 32, 3]


def test_clip_patch_embedding_is_exported_as_a_matrix_product(tiny_export):
    """INT8 runtimes quantise MatMuls, not Convs: the patch embedding must reach ONNX as a MatMul."""
    import onnx

    ops = {node.op_type for node in onnx.load(str(tiny_export[0] / FP32_ONNX)).graph.node}
    assert "Conv" not in ops and "MatMul" in ops


def test_patch_matmul_computes_the_convolution():
    import torch

    from fastret.export.torch_models import _PatchMatMul

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 8, kernel_size=4, stride=4)
    x = torch.randn(2, 3, 12, 16)
    torch.testing.assert_close(_PatchMatMul(conv)(x), conv(x), rtol=1e-5, atol=1e-5)


def test_tiny_clip_onnx_matches_torch(tiny_export):
    out, source = tiny_export
    pixels, _ = parity_pixels(source.preprocessing, None, count=8)
    reference = torch_embed(load_torch_model(source), pixels)
    exported = onnx_embed(out / FP32_ONNX, pixels)
    parity = compare_embeddings(reference, exported, "synthetic")
    assert parity.min_cosine >= PARITY_MIN_COSINE, parity.line("tiny CLIP")
    np.testing.assert_allclose(np.linalg.norm(exported, axis=1), 1.0, atol=1e-5)


def test_tiny_clip_export_builds_a_searchable_index(tiny_export, tmp_path):
    out, source = tiny_export
    paths = write_photos(tmp_path / "gallery", 6)
    encoder = OnnxEncoder(out / FP32_ONNX, model_info(source), threads=1)
    index, result = build_index(tmp_path / "gallery", encoder, batch_size=4, workers=0)
    assert len(index) == 6 and not result.skipped
    assert sorted(item.path for item in index.items) == sorted(p.relative_to(tmp_path / "gallery").as_posix() for p in paths)
    ids, scores = index.search(index.embeddings, 1, exact=True)
    np.testing.assert_array_equal(ids[:, 0], np.arange(6))
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)


def test_ensure_exported_exports_once(tiny_clip_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTRET_CACHE", str(tmp_path / "cache"))
    source, _ = resolve_model(str(tiny_clip_dir))
    calls = []
    real_export = onnx_export.export_onnx

    def counting_export(*args, **kwargs):
        calls.append(args[0].model_id)
        return real_export(*args, **kwargs)

    monkeypatch.setattr(onnx_export, "export_onnx", counting_export)
    lines: list[str] = []
    first = ensure_exported(source, log=lines.append)
    assert first == export_dir_for(source) and first.is_relative_to(tmp_path / "cache")
    assert len(calls) == 1 and any(line.startswith("exporting") for line in lines)
    lines.clear()
    assert ensure_exported(source, log=lines.append) == first
    assert len(calls) == 1 and lines == []
    # A cache entry whose metadata names other weights is not trusted: export again.
    metadata = read_metadata(first)
    metadata["weights_sha256"] = "0" * 64
    (first / "metadata.json").write_text(json.dumps(metadata))
    ensure_exported(source, )
    assert len(calls) == 2 and read_metadata(first)["weights_sha256"] == source.weights_sha256


def test_too_old_opset_is_refused(tiny_clip_dir, tmp_path):
    source, _ = resolve_model(str(tiny_clip_dir))
    with pytest.raises(ExportError, match="opset 16 is too old"):
        export_onnx(source, tmp_path / "out", opset=16, )


def test_preprocessing_comes_from_the_checkpoint(tiny_clip_dir, tmp_path):
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(tiny_clip_dir, checkpoint)
    (checkpoint / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "size": {"shortest_edge": 40},
                "crop_size": {"height": 32, "width": 32},
                "resample": 2,
                "image_mean": [0.5, 0.25, 0.0],
                "image_std": [0.5, 0.5, 1.0],
            }
        )
    )
    expected = Preprocessing(32, 40, "bilinear", (127.5, 63.75, 0.0), (127.5, 127.5, 255.0))
    assert clip_preprocessing(checkpoint) == expected
    assert resolve_model(str(checkpoint))[0].preprocessing == expected


def test_a_folder_that_is_not_a_checkpoint_is_refused(tmp_path):
    with pytest.raises(ModelNotFound, match="not a Hugging Face CLIP checkpoint"):
        resolve_model(str(tmp_path))


def test_unknown_model_name_lists_the_choices():
    with pytest.raises(ModelNotFound) as caught:
        resolve_model("no-such-model")
    message = str(caught.value)
    assert "unknown model 'no-such-model'" in message
    for choice in ("auto", BUNDLED, "clip-vit-b32", "hf:ORG/NAME", "directory"):
        assert choice in message


@pytest.fixture()
def empty_hub_cache(tmp_path, monkeypatch):
    """No Hugging Face weights cached (HF_HUB_OFFLINE=1 is set by conftest)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


@pytest.mark.parametrize("name", ["clip-vit-b32", "hf:someone/some-clip"])
def test_hub_models_offline_say_what_to_do(empty_hub_cache, name):
    with pytest.raises(ModelNotFound, match=rf"hub is unreachable.*--model {BUNDLED}"):
        resolve_model(name)


def test_auto_falls_back_to_the_bundled_model_offline(empty_hub_cache, bundled_onnx):
    source, why = resolve_model("auto")
    assert source.model_id == BUNDLED
    assert "not cached" in why and "unreachable" in why and why.endswith(f"using the bundled {BUNDLED}")
    lines: list[str] = []
    encoder = open_encoder("auto", "onnxruntime", log=lines.append)
    assert encoder.info == bundled_onnx.info and encoder.backend == "onnxruntime"
    assert lines[0] == f"model: {BUNDLED} ({why})"


def empty_index(info, encoder: dict | None = None) -> Index:
    return Index(info, "/gallery", [], np.empty((0, info.dim), np.float32), encoder=encoder)


def test_index_made_with_other_weights_is_refused(bundled_onnx):
    from dataclasses import replace

    stale = replace(bundled_onnx.info, weights_sha256="f" * 64)
    with pytest.raises(BackendUnavailable, match=r"weights sha256 ffffffffffff.*re-index"):
        encoder_for_index(empty_index(stale), "onnxruntime")
    with pytest.raises(BackendUnavailable, match="unknown backend"):
        encoder_for_index(empty_index(bundled_onnx.info), "cuda-magic")


# --- recipes: an index's encoder, reopened exactly ------------------------------------------------------


def test_every_encoder_states_its_recipe(tiny_export):
    out, source = tiny_export
    encoder = OnnxEncoder(out / FP32_ONNX, model_info(source), threads=1, artefact_sha256="ab" * 32)
    recipe = encoder.recipe
    path = (out / FP32_ONNX).resolve()
    assert recipe == EncoderRecipe(model_info(source), "onnxruntime", "fp32", str(path), "ab" * 32, path.stat().st_size)
    assert EncoderRecipe.from_dict(json.loads(json.dumps(recipe.to_dict()))) == recipe
    with pytest.raises(ValueError, match="malformed encoder recipe"):
        EncoderRecipe.from_dict({"backend": "onnxruntime"})


def test_an_index_records_its_encoders_recipe(tiny_export, tmp_path):
    out, source = tiny_export
    write_photos(tmp_path / "gallery", 3)
    encoder = OnnxEncoder(out / FP32_ONNX, model_info(source), threads=1)
    index, _ = build_index(tmp_path / "gallery", encoder, workers=0)
    assert index.encoder == encoder.recipe.to_dict()


@pytest.fixture
def recipe_in_cache_a(tiny_clip_dir, tmp_path, monkeypatch):
    """The recipe of the tiny CLIP's fp32 ONNX encoder made in cache A, and an empty cache B in use."""
    monkeypatch.setenv("FASTRET_CACHE", str(tmp_path / "A"))
    source, _ = resolve_model(str(tiny_clip_dir))
    made = encoder_for_source(source, "onnxruntime", precision="fp32")
    (tmp_path / "B").mkdir()
    monkeypatch.setenv("FASTRET_CACHE", str(tmp_path / "B"))
    return made, tmp_path / "A", tmp_path / "B"


def test_a_recipe_reopens_its_artefact_from_another_cache_without_hashing_weights(recipe_in_cache_a, monkeypatch):
    made, cache_a, cache_b = recipe_in_cache_a
    recipe = made.recipe
    artefact = Path(recipe.artefact)
    assert artefact.name == FP32_ONNX and artefact.is_relative_to(cache_a)
    assert recipe.artefact_sha256 == sha256_files([artefact])
    monkeypatch.setattr(load, "resolve_model", lambda name: pytest.fail("the query path resolved (hashed) the weights"))
    reopened = encoder_for_index(empty_index(made.info, recipe.to_dict()))
    assert reopened.recipe == recipe
    pixels, _ = parity_pixels(made.info.preprocessing, None, count=8)
    assert (reopened.encode(pixels) * made.encode(pixels)).sum(1).min() >= 0.999
    assert list(cache_b.iterdir()) == []  # nothing written into the cache in use


def test_a_recipe_finds_its_artefact_in_a_moved_cache_and_refuses_when_it_is_gone(recipe_in_cache_a, monkeypatch):
    made, cache_a, cache_b = recipe_in_cache_a
    moved = cache_a.with_name("C")
    cache_a.rename(moved)
    monkeypatch.setenv("FASTRET_CACHE", str(moved))
    said: list[str] = []
    reopened = encoder_from_recipe(made.recipe, log=said.append)
    assert reopened.path.is_relative_to(moved) and reopened.recipe.artefact_sha256 == made.recipe.artefact_sha256
    assert said == [
        f"the index's encoder artefact {made.recipe.artefact} is not on this machine; using the same file in {moved}"
    ]
    monkeypatch.setenv("FASTRET_CACHE", str(cache_b))
    with pytest.raises(
        BackendUnavailable,
        match=rf"artefact {made.recipe.artefact} is not on this machine; re-run `fastret index DIR --out INDEX` "
        r"\(it embeds the gallery again with an artefact made here\), or point FASTRET_CACHE at the cache that made it",
    ):
        encoder_from_recipe(made.recipe)
    assert list(cache_b.iterdir()) == []


def test_a_recipe_refuses_an_artefact_of_another_size(recipe_in_cache_a):
    from dataclasses import replace

    made, _, _ = recipe_in_cache_a
    other = replace(made.recipe, artefact_bytes=made.recipe.artefact_bytes + 1)
    with pytest.raises(BackendUnavailable, match="bytes, the index recorded .*not the file the gallery was embedded"):
        encoder_from_recipe(other)


def test_explicit_runtime_options_override_the_recipe_and_say_so(recipe_in_cache_a):
    made, _, _ = recipe_in_cache_a
    said: list[str] = []
    index = empty_index(made.info, made.recipe.to_dict())
    encoder = encoder_for_index(index, "onnxruntime", precision="int8", log=said.append)
    assert (encoder.backend, encoder.precision) == ("onnxruntime", "int8")
    assert said[-1] == (
        f"the index was embedded on {made.recipe.line()}; queries run on {encoder.recipe.line()} as asked: "
        "scores may differ slightly"
    )


def test_a_damaged_recipe_is_refused(bundled_onnx):
    with pytest.raises(BackendUnavailable, match="encoder record is damaged .*re-index"):
        encoder_for_index(empty_index(bundled_onnx.info, {"backend": "onnxruntime"}))


def test_bundled_export_metadata(bundled_source, bundled_onnx):
    metadata = read_metadata(export_dir_for(bundled_source))
    assert metadata["model_id"] == BUNDLED and metadata["dim"] == 1280
    assert metadata["weights_sha256"] == bundled_source.weights_sha256
    assert Preprocessing.from_dict(metadata["preprocessing"]) == bundled_source.preprocessing
    assert metadata["opset"] >= 17
    assert metadata["artefacts"][FP32_ONNX]["parity_vs_torch"]["min_cosine"] >= PARITY_MIN_COSINE


def bundled_parity(bundled_source, paths: list[Path]):
    """The fp32 ONNX file (whatever backend `auto` prefers) against the PyTorch reference."""
    pixels = np.stack([load_pixels(p, bundled_source.preprocessing) for p in paths])
    reference = torch_embed(load_torch_model(bundled_source), pixels, batch_size=32)
    exported = onnx_embed(ensure_exported(bundled_source, ) / FP32_ONNX, pixels, batch_size=32)
    return compare_embeddings(reference, exported, f"{len(paths)} wang1k images")


@pytest.mark.data
def test_bundled_onnx_matches_torch_on_real_photos(wang1k, bundled_source):
    paths = list_images(wang1k)[::31][:32]  # spread over all ten classes
    parity = bundled_parity(bundled_source, paths)
    assert parity.images == 32
    assert parity.min_cosine >= PARITY_MIN_COSINE, parity.line("ONNX vs torch")


@pytest.mark.slow
@pytest.mark.data
def test_bundled_onnx_matches_torch_on_all_of_wang1k(wang1k, bundled_source):
    parity = bundled_parity(bundled_source, list_images(wang1k))
    assert parity.images == 1000
    assert parity.min_cosine >= PARITY_MIN_COSINE, parity.line("ONNX vs torch")


@pytest.mark.parametrize("backend, artefact", [("torch", "/somewhere/model.onnx"), ("onnxruntime", None), ("auto", None)])
def test_a_recipe_no_runtime_opens_is_refused(bundled_onnx, backend, artefact):
    recipe = EncoderRecipe(bundled_onnx.info, backend, "fp32", artefact)
    with pytest.raises(BackendUnavailable, match="which no runtime opens; re-index"):
        encoder_from_recipe(recipe)
