"""GPU backends: PyTorch fp32 eager / FP16 + CUDA graphs, ONNX Runtime CUDA and TensorRT EP.

The staging pipeline and the FP16 precision logic are also checked on the CPU (they run
everywhere); the tests marked `gpu` need a CUDA device and skip with the reason elsewhere
(benchmarks/gpu_check.sh runs them on a lent GPU). TensorRT plan tests: tests/test_tensorrt.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from fastret.engine.cuda_torch import TorchCudaEncoder, cuda_missing
from fastret.engine.encoders import EncoderRecipe
from fastret.engine.pipeline import embed_files
from fastret.export.fp16 import FP16_KIND
from fastret.export.models import clip_source
from fastret.export.onnx_export import ensure_exported, find_artefact
from fastret.export.torch_models import load_torch_model
from fastret.service.load import encoder_for_source, model_info

CUDA_MISSING = cuda_missing()
needs_cuda = pytest.mark.skipif(CUDA_MISSING is not None, reason=f"needs a CUDA GPU: {CUDA_MISSING}")
QUIET = {"log": lambda _: None}


@pytest.fixture(scope="module")
def tiny_source(tiny_clip_dir):
    return clip_source(tiny_clip_dir, "tiny-clip")


@pytest.fixture(scope="module")
def cpu_reference(tiny_source):
    return encoder_for_source(tiny_source, "torch", **QUIET)


def pixels(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.min(np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def test_staged_pipeline_keeps_order_across_slots_and_chunks():
    import torch

    from fastret.engine.cuda_torch import StagedPipeline, staged_encode_batches

    def launch(device_in):  # row -> [first value, row sum]: shows which row landed where
        flat = device_in.reshape(len(device_in), -1).float()
        return torch.stack([flat[:, 0], flat.sum(1)], dim=1)

    pipeline = StagedPipeline(launch, 4, (2, 2, 3), 2, device="cpu")
    sizes = [1, 9, 0, 4, 3, 12]
    batches = [pixels(n, size=2, seed=i) for i, n in enumerate(sizes)]
    results = list(staged_encode_batches(pipeline, batches))
    assert [r.shape for r in results] == [(n, 2) for n in sizes]
    for batch, got in zip(batches, results):
        flat = batch.reshape(len(batch), 12).astype(np.float64)
        np.testing.assert_array_equal(got, np.stack([flat[:, 0], flat.sum(1)], axis=1).astype(np.float32))
    with pytest.raises(ValueError, match="exceeds the maximum batch 4"):
        list(pipeline.map([pixels(5, size=2)]))


def test_fp16_autocast_logic_on_cpu_matches_fp32(tiny_source, cpu_reference):
    encoder = TorchCudaEncoder(
        load_torch_model(tiny_source), model_info(tiny_source), half=True, graphs=False, max_batch=8, device="cpu"
    )
    assert (encoder.precision, encoder.parallel_requests) == ("fp16", 1)
    assert encoder.recipe == EncoderRecipe(model_info(tiny_source), "torch-cuda-fp16", "fp16")
    batch = pixels(11)
    got = encoder.encode(batch)
    assert got.dtype == np.float32 and got.shape == (11, tiny_source.dim)
    assert min_cosine(got, cpu_reference.encode(batch)) >= 0.999
    with pytest.raises(ValueError, match="CUDA graphs need device 'cuda'"):
        TorchCudaEncoder(load_torch_model(tiny_source), model_info(tiny_source), graphs=True, device="cpu")


def test_embed_files_streams_batches_into_the_staging_two_in_flight(tiny_source, cpu_reference, tmp_path, monkeypatch):
    from PIL import Image

    from fastret.engine.decode import load_pixels

    encoder = TorchCudaEncoder(
        load_torch_model(tiny_source), model_info(tiny_source), half=False, graphs=False, max_batch=8, device="cpu"
    )
    events: list[tuple[str, int]] = []
    pipeline = encoder.pipeline
    enqueue, collect = pipeline._enqueue, pipeline._collect

    def logged_enqueue(slot, chunk):
        events.append(("in", len(chunk)))
        enqueue(slot, chunk)

    def logged_collect(slot, n):
        events.append(("out", n))
        return collect(slot, n)

    monkeypatch.setattr(pipeline, "_enqueue", logged_enqueue)
    monkeypatch.setattr(pipeline, "_collect", logged_collect)
    paths = []
    for i in range(7):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(pixels(1, size=40, seed=i)[0]).save(paths[-1])
    result = embed_files(paths, encoder, batch_size=3, workers=0)
    # The next batch is staged before the previous one is collected: two in flight, as in encode_batches.
    assert events == [("in", 3), ("in", 3), ("out", 3), ("in", 1), ("out", 3), ("out", 1)]
    assert result.paths == paths
    reference = cpu_reference.encode(np.stack([load_pixels(p, tiny_source.preprocessing) for p in paths]))
    assert min_cosine(result.embeddings, reference) >= 0.9999


@pytest.mark.gpu
@needs_cuda
def test_fp32_eager_on_gpu_matches_the_cpu_reference(tiny_source, cpu_reference):
    encoder = encoder_for_source(tiny_source, "torch-cuda", **QUIET)
    assert encoder.backend == "torch-cuda" and not encoder.half and not encoder.graphs
    batch = pixels(9)
    got = encoder.encode(batch)
    assert got.dtype == np.float32 and got.shape == (9, tiny_source.dim)
    assert min_cosine(got, cpu_reference.encode(batch)) >= 0.9999


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("sizes", [[1], [3, 5, 70], [300, 1, 0, 2]])
def test_fp16_graphs_match_fp32_in_order_for_any_batch_size(tiny_source, cpu_reference, sizes):
    encoder = encoder_for_source(tiny_source, "torch-cuda-fp16", **QUIET)
    assert encoder.backend == "torch-cuda-fp16" and encoder.graphs
    batches = [pixels(n, seed=i) for i, n in enumerate(sizes)]
    streamed = list(encoder.encode_batches(batches))
    assert [len(s) for s in streamed] == sizes
    for batch, got in zip(batches, streamed):
        if len(batch):
            assert min_cosine(got, cpu_reference.encode(batch)) >= 0.999
            assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-3)
            np.testing.assert_allclose(encoder.encode(batch), got, atol=2e-3)  # replay == replay


@pytest.mark.gpu
@needs_cuda
def test_fp16_graph_padding_never_changes_real_rows(tiny_source):
    graphs = TorchCudaEncoder(load_torch_model(tiny_source), model_info(tiny_source), half=True, graphs=True)
    eager = TorchCudaEncoder(load_torch_model(tiny_source), model_info(tiny_source), half=True, graphs=False)
    batch = pixels(5)  # runs in the 8-row graph
    assert min_cosine(graphs.encode(batch), eager.encode(batch)) >= 0.9999


@pytest.mark.gpu
@needs_cuda
def test_onnxruntime_on_cuda_uses_the_fp16_onnx(tiny_source, cpu_reference):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip(f"this onnxruntime has no CUDA provider ({', '.join(ort.get_available_providers())}); install fastret[gpu]")
    encoder = encoder_for_source(tiny_source, "onnxruntime", **QUIET)
    assert encoder.providers[0] == "CUDAExecutionProvider"
    assert encoder.path == find_artefact(ensure_exported(tiny_source, **QUIET), FP16_KIND)[0]
    assert encoder.precision == encoder.recipe.precision == "fp16"
    batch = pixels(7)
    assert min_cosine(encoder.encode(batch), cpu_reference.encode(batch)) >= 0.999


@pytest.mark.gpu
@needs_cuda
def test_onnxruntime_tensorrt_provider(tiny_source, cpu_reference):
    import onnxruntime as ort

    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime has no TensorRT provider; install fastret[gpu] with TensorRT libraries")
    encoder = encoder_for_source(tiny_source, "onnxruntime-trt", **QUIET)
    assert encoder.backend == "onnxruntime-trt" and encoder.providers[0] == "TensorrtExecutionProvider"
    assert encoder.precision == "fp16"
    batch = pixels(4)
    assert min_cosine(encoder.encode(batch), cpu_reference.encode(batch)) >= 0.999
