"""TensorRT path: plan compatibility, batch profiles, the uint8 cast rewrite, CLI and backend fallbacks.

The CPU-side tests run everywhere (TensorRT is made absent where it matters). The build / run
tests at the end need the tensorrt package and a CUDA GPU and skip with the reason otherwise.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from fastret.engine.cuda_torch import batch_bucket, split_rows
from fastret.engine.encoders import BACKENDS, OnnxEncoder, ort_providers, ort_tensorrt_options
from fastret.engine.load import BackendUnavailable, encoder_for_source
from fastret.engine.tensorrt_runtime import PLAN_FILE, PlanTarget, plan_problem, tensorrt_missing
from fastret.export.models import clip_source
from fastret.export.onnx_export import FP16_ONNX, FP32_ONNX, METADATA_FILE, ensure_exported, read_metadata
from fastret.export.tensorrt_build import (
    BatchProfile,
    parse_profile,
    prepare_onnx_for_tensorrt,
    timing_cache_path,
    topological_order,
)

H100 = PlanTarget("10.13.0.35", "NVIDIA H100 80GB HBM3", "9.0")
QUIET = {"log": lambda _: None}


@pytest.fixture
def no_tensorrt(monkeypatch):
    """Make `import tensorrt` fail, as on a machine without it (also where it is installed)."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)


@pytest.fixture(scope="module")
def tiny_source(tiny_clip_dir):
    return clip_source(tiny_clip_dir, "tiny-clip")


@pytest.fixture(scope="module")
def tiny_export(tiny_source):
    return ensure_exported(tiny_source, **QUIET)


def pixels(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


# --- plan compatibility -------------------------------------------------------------------------


def test_plan_built_here_may_run():
    assert plan_problem(H100.to_dict(), H100) is None


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("gpu_name", "NVIDIA H200", ["GPU NVIDIA H200", "GPU NVIDIA H100 80GB HBM3"]),
        ("tensorrt_version", "10.0.1.6", ["TensorRT 10.0.1.6", "TensorRT 10.13.0.35"]),
        ("compute_capability", "8.0", ["compute capability 8.0", "compute capability 9.0"]),
    ],
)
def test_plan_for_another_gpu_or_tensorrt_is_refused(field, value, words):
    recorded = {**H100.to_dict(), field: value}
    problem = plan_problem(recorded, H100)
    assert problem is not None
    for word in words:
        assert word in problem
    assert "export-engine --fp16" in problem


@pytest.mark.parametrize("recorded", [None, {}])
def test_plan_without_build_record_is_refused(recorded):
    assert "no build record" in plan_problem(recorded, H100)


def test_timing_cache_is_per_gpu_and_tensorrt_version(tmp_path):
    path = timing_cache_path(H100, tmp_path)
    assert path.parent == tmp_path / "tensorrt"
    assert path.name == "timing-NVIDIA-H100-80GB-HBM3-sm9.0-trt10.13.0.35.cache"
    assert timing_cache_path(PlanTarget("10.13.0.35", "NVIDIA H200", "9.0"), tmp_path) != path


# --- batch profiles -----------------------------------------------------------------------------


def test_parse_profile_and_shapes():
    profile = parse_profile(" 1, 64,256")
    assert profile == BatchProfile(1, 64, 256) == BatchProfile()
    assert profile.shapes(224) == ((1, 224, 224, 3), (64, 224, 224, 3), (256, 224, 224, 3))
    assert profile.to_dict() == {"min": 1, "opt": 64, "max": 256}


@pytest.mark.parametrize("text", ["64,1,256", "0,1,2", "1,300,256", "1,64", "1,64,256,512", "a,b,c", "1,-2,3", ""])
def test_parse_profile_rejects_bad_text(text):
    with pytest.raises(ValueError, match="batch profile"):
        parse_profile(text)


def test_export_engine_rejects_bad_profile(capsys):
    from fastret.cli.export_engine import build_parser

    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["--trt-batch", "8,4,16"])
    assert exc.value.code == 2
    assert "min <= opt <= max" in capsys.readouterr().err
    args = build_parser().parse_args(["--trt-batch", "2,8,32", "--trt-workspace-gib", "1.5"])
    assert args.trt_batch == BatchProfile(2, 8, 32) and args.trt_workspace_gib == 1.5


# --- pure helpers of the GPU runtimes ---------------------------------------------------------------


@pytest.mark.parametrize("n, bucket", [(1, 1), (2, 2), (3, 4), (64, 64), (65, 128), (200, 256), (256, 256)])
def test_batch_bucket(n, bucket):
    assert batch_bucket(n, 256) == bucket


@pytest.mark.parametrize("n", [0, 257])
def test_batch_bucket_rejects_out_of_range(n):
    with pytest.raises(ValueError):
        batch_bucket(n, 256)


def test_split_rows_keeps_order_and_sizes():
    data = np.arange(10)
    assert [c.tolist() for c in split_rows(data, 4)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [len(c) for c in split_rows(data[:0], 4)] == [0]


def test_ort_tensorrt_options_and_cpu_build_providers(tmp_path):
    options = ort_tensorrt_options(tmp_path, "pixels", 224, (1, 64, 256))
    assert options["trt_profile_min_shapes"] == "pixels:1x224x224x3"
    assert options["trt_profile_max_shapes"] == "pixels:256x224x224x3"
    assert options["trt_fp16_enable"] and options["trt_layer_norm_fp32_fallback"]
    assert ort_providers("cpu", tensorrt_options=options) == ["CPUExecutionProvider"]


def test_cli_backend_choices_follow_backends():
    from fastret.cli.main import build_parser

    for backend in BACKENDS:
        assert build_parser().parse_args(["index", "somewhere", "--backend", backend]).backend == backend


# --- the ONNX graph TensorRT parses (NVIDIA/TensorRT#3985) ------------------------------------------


@pytest.mark.parametrize("name", [FP32_ONNX, FP16_ONNX])
def test_prepared_onnx_feeds_uint8_into_a_cast_in_sorted_order_and_computes_the_same(tiny_export, name):
    import onnx
    import onnxruntime as ort

    if name == FP16_ONNX and not (tiny_export / FP16_ONNX).is_file():
        from fastret.export.fp16 import export_fp16

        export_fp16(tiny_export, **QUIET)
    original = onnx.load(str(tiny_export / name))
    prepared = prepare_onnx_for_tensorrt(original)
    consumers = [node for node in prepared.graph.node if "pixels" in node.input]
    assert [(node.op_type, node.name) for node in consumers] == [("Cast", "fastret_input_cast")]
    assert prepared.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert prepare_onnx_for_tensorrt(prepared) == prepared  # idempotent
    onnx.checker.check_model(prepared)  # includes the topological-order check

    batch = pixels(5)
    run = lambda model: ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"pixels": batch}
    )[0]
    np.testing.assert_array_equal(run(prepared), run(original))


def test_topological_order_puts_producers_first_and_rejects_dangling_inputs():
    from fastret.export.onnx_export import ExportError

    nodes = [(["b"], ["c"]), (["x"], ["a"]), (["a", "w"], ["b"])]
    assert topological_order(nodes, {"x", "w", ""}) == [1, 2, 0]
    assert topological_order([(["x"], ["y"]), (["y"], ["z"])], {"x"}) == [0, 1]
    with pytest.raises(ExportError, match="undefined inputs: nowhere"):
        topological_order([(["nowhere"], ["y"])], {"x"})
    with pytest.raises(ExportError, match="cycle"):
        topological_order([(["b"], ["a"]), (["a"], ["b"])], {"x"})


# --- export-engine and backends without TensorRT --------------------------------------------------


def test_export_engine_without_tensorrt_says_why_and_exits_0_or_1(tiny_clip_dir, tmp_path, no_tensorrt, capsys):
    from fastret.cli.export_engine import main

    out = tmp_path / "export"
    assert main(["--model", str(tiny_clip_dir), "--out", str(out), "--fp16"]) == 0
    err = capsys.readouterr().err
    assert "no TensorRT plan built: the tensorrt package is not installed" in err
    assert "pip install 'fastret[tensorrt]'" in err
    assert (out / FP16_ONNX).is_file() and not (out / PLAN_FILE).exists()

    assert main(["--model", str(tiny_clip_dir), "--out", str(out), "--require-trt"]) == 1
    assert "no TensorRT plan built" in capsys.readouterr().err


def test_tensorrt_backend_without_tensorrt_is_unavailable(tiny_source, tiny_export, no_tensorrt):
    with pytest.raises(BackendUnavailable, match="backend tensorrt: the tensorrt package is not installed"):
        encoder_for_source(tiny_source, "tensorrt", **QUIET)


def test_auto_falls_back_to_onnxruntime_and_says_why_a_plan_is_skipped(
    tiny_source, tiny_export, no_tensorrt, monkeypatch
):
    monkeypatch.setitem(sys.modules, "openvino", None)  # auto prefers OpenVINO on a CPU that has it
    encoder = encoder_for_source(tiny_source, "auto", **QUIET)
    assert isinstance(encoder, OnnxEncoder) and encoder.backend == "onnxruntime"
    assert encoder.encode(pixels(2)).shape == (2, tiny_source.dim)

    (tiny_export / PLAN_FILE).write_bytes(b"a plan from elsewhere")
    try:
        lines: list[str] = []
        encoder = encoder_for_source(tiny_source, "auto", log=lines.append)
        assert encoder.backend == "onnxruntime"
        assert any("not using the TensorRT plan" in line and "not installed" in line for line in lines)
    finally:
        (tiny_export / PLAN_FILE).unlink()


@pytest.mark.parametrize("backend", ["torch-cuda", "torch-cuda-fp16"])
def test_torch_cuda_backends_without_cuda_are_unavailable(tiny_source, backend):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present; tests/test_gpu.py covers these backends")
    with pytest.raises(BackendUnavailable, match=f"backend {backend}: no CUDA device is visible"):
        encoder_for_source(tiny_source, backend, **QUIET)


def test_onnxruntime_trt_without_tensorrt_provider_is_unavailable(tiny_source, tiny_export):
    import onnxruntime as ort

    if "TensorrtExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the TensorRT provider; tests/test_gpu.py covers it")
    with pytest.raises(BackendUnavailable, match="onnxruntime-trt needs an onnxruntime build with the TensorRT"):
        encoder_for_source(tiny_source, "onnxruntime-trt", **QUIET)


# --- with TensorRT and a GPU ------------------------------------------------------------------------

TRT_MISSING = tensorrt_missing()
needs_tensorrt = pytest.mark.skipif(TRT_MISSING is not None, reason=f"TensorRT cannot run here: {TRT_MISSING}")


@pytest.fixture(scope="module")
def tiny_plan(tiny_export):
    from fastret.export.tensorrt_build import build_plan_for_export

    return build_plan_for_export(tiny_export, profile=BatchProfile(1, 4, 8), workspace_gib=1.0, **QUIET)


@pytest.mark.gpu
@needs_tensorrt
def test_plan_is_built_checked_and_recorded(tiny_plan, tiny_export):
    from fastret.engine.tensorrt_runtime import current_target

    record = read_metadata(tiny_export)["artefacts"][PLAN_FILE]
    assert tiny_plan == tiny_export / PLAN_FILE and tiny_plan.stat().st_size > 0
    assert plan_problem(record, current_target()) is None
    assert record["batch_profile"] == {"min": 1, "opt": 4, "max": 8}
    assert record["parity_vs_onnx_fp32"]["min_cosine"] >= 0.999
    assert timing_cache_path(current_target()).is_file()


@pytest.mark.gpu
@needs_tensorrt
def test_tensorrt_encoder_matches_onnxruntime_in_order(tiny_plan, tiny_source):
    from fastret.engine.tensorrt_runtime import TensorRTEncoder

    encoder = encoder_for_source(tiny_source, "auto", **QUIET)
    assert isinstance(encoder, TensorRTEncoder) and encoder.backend == "tensorrt"
    reference = encoder_for_source(tiny_source, "onnxruntime", **QUIET)
    batch = pixels(21)  # > max batch 8: three chunks through the two staging slots
    got = encoder.encode(batch)
    want = reference.encode(batch)
    assert got.shape == want.shape == (21, tiny_source.dim)
    assert np.min(np.sum(got * want, axis=1)) >= 0.999
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-3)
    streamed = list(encoder.encode_batches([batch[:1], batch[1:12], batch[:0], batch[12:]]))
    assert [len(s) for s in streamed] == [1, 11, 0, 9]
    np.testing.assert_allclose(np.concatenate(streamed), got, atol=1e-5)


@pytest.mark.gpu
@needs_tensorrt
def test_plan_recorded_for_another_gpu_is_refused(tiny_plan, tiny_export, tiny_source):
    metadata_path = tiny_export / METADATA_FILE
    original = metadata_path.read_text()
    metadata = json.loads(original)
    metadata["artefacts"][PLAN_FILE]["gpu_name"] = "NVIDIA A100-SXM4-40GB"
    metadata_path.write_text(json.dumps(metadata))
    try:
        with pytest.raises(BackendUnavailable, match="built for GPU NVIDIA A100-SXM4-40GB"):
            encoder_for_source(tiny_source, "tensorrt", **QUIET)
        assert encoder_for_source(tiny_source, "auto", **QUIET).backend.startswith("onnxruntime")
    finally:
        metadata_path.write_text(original)
