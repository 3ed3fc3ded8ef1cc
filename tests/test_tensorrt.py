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
from fastret.engine.encoders import EncoderRecipe
from fastret.service.load import BackendUnavailable, encoder_for_source, encoder_from_recipe, model_info
from fastret.engine.tensorrt_runtime import PLAN_FILE, PlanTarget, plan_problem, tensorrt_missing
from fastret.export.models import clip_source
from fastret.export.fp16 import FP16_KIND, export_fp16
from fastret.export.onnx_export import FP32_ONNX, METADATA_FILE, ensure_exported, find_artefact, read_metadata
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


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_prepared_onnx_feeds_uint8_into_a_cast_in_sorted_order_and_computes_the_same(tiny_export, precision):
    import onnx
    import onnxruntime as ort

    path = tiny_export / FP32_ONNX if precision == "fp32" else export_fp16(tiny_export)[0]
    original = onnx.load(str(path))
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
    assert find_artefact(out, FP16_KIND) is not None and not (out / PLAN_FILE).exists()

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


@pytest.mark.parametrize("backend", ["tensorrt", "onnxruntime-trt", "torch-cuda-fp16"])
def test_a_recipe_whose_gpu_runtime_is_missing_here_is_refused_with_the_reason(
    tiny_clip_dir, tiny_export, no_tensorrt, backend
):
    import onnxruntime as ort
    import torch

    from fastret.export.models import resolve_model

    if torch.cuda.is_available() or "TensorrtExecutionProvider" in ort.get_available_providers():
        pytest.skip("a GPU runtime is present: the recorded runtime could run here")
    artefact = None if backend.startswith("torch") else tiny_export / FP32_ONNX
    source, _ = resolve_model(str(tiny_clip_dir))  # the PyTorch backends find their weights by model id
    recipe = EncoderRecipe(
        model_info(source), backend, "fp16", artefact and str(artefact), None, artefact and artefact.stat().st_size
    )
    with pytest.raises(BackendUnavailable, match=rf"embedded on {backend} \(fp16\).*cannot run here: .*pass --backend"):
        encoder_from_recipe(recipe)


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
    assert isinstance(encoder, TensorRTEncoder) and (encoder.backend, encoder.precision) == ("tensorrt", "fp16")
    assert encoder.recipe.artefact == str(tiny_plan.resolve()) and encoder.recipe.artefact_sha256 is not None
    assert isinstance(encoder_from_recipe(encoder.recipe), TensorRTEncoder)
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


# --- the builder's TensorRT calls, against a stand-in module (runs everywhere) ----------------------


class _FakeTensorRT:
    """Just enough of the `tensorrt` module to record what build_serialized_plan asks of it."""

    def __init__(self, parses: bool = True, builds: bool = True):
        self.calls: dict = {}
        self.parses, self.builds = parses, builds
        fake = self

        class Logger:
            WARNING = 2

            def __init__(self, level):
                fake.calls["logger_level"] = level

        class TimingCache:
            def __init__(self, data: bytes):
                self.data = bytes(data)

            def serialize(self):
                return bytearray(self.data + b"+timings")

        class Config:
            def set_memory_pool_limit(self, pool, size):
                fake.calls["pool"] = (pool, size)

            def add_optimization_profile(self, profile):
                fake.calls["profile"] = profile.shapes

            def create_timing_cache(self, data):
                fake.calls.setdefault("cache_in", []).append(bytes(data))
                return TimingCache(data)

            def set_timing_cache(self, cache, ignore_mismatch):
                self.cache = cache
                return True

            def get_timing_cache(self):
                return self.cache

        class Profile:
            def set_shape(self, name, low, opt, high):
                self.shapes = (name, low, opt, high)

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                fake.calls["network_flags"] = flags
                return "network"

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                return bytearray(b"PLAN") if fake.builds else None

        class OnnxParser:
            num_errors = 1

            def __init__(self, network, logger):
                pass

            def parse(self, data):
                fake.calls["parsed"] = bytes(data)
                return fake.parses

            def get_error(self, i):
                return "In node 3 (Transpose): UINT8 is not supported"

        self.module = type(sys)("tensorrt")
        self.module.__dict__.update(
            Logger=Logger,
            Builder=Builder,
            OnnxParser=OnnxParser,
            NetworkDefinitionCreationFlag=type("Flags", (), {"STRONGLY_TYPED": 3}),
            MemoryPoolType=type("Pools", (), {"WORKSPACE": "workspace"}),
        )


@pytest.fixture
def fake_tensorrt(monkeypatch):
    from fastret.engine import tensorrt_runtime

    def install(**kwargs) -> _FakeTensorRT:
        fake = _FakeTensorRT(**kwargs)
        monkeypatch.setitem(sys.modules, "tensorrt", fake.module)
        monkeypatch.setattr(tensorrt_runtime, "_LOGGER", None)
        return fake

    return install


def test_builder_asks_for_a_strongly_typed_network_profile_workspace_and_reuses_the_timing_cache(
    fake_tensorrt, tmp_path
):
    from fastret.export.tensorrt_build import build_serialized_plan

    fake = fake_tensorrt()
    cache = tmp_path / "tensorrt" / "timing.cache"
    plan = build_serialized_plan(b"onnx-bytes", "pixels", 224, BatchProfile(1, 64, 256), 1 << 30, cache, **QUIET)
    assert plan == b"PLAN"
    assert fake.calls["parsed"] == b"onnx-bytes"
    assert fake.calls["network_flags"] == 1 << 3
    assert fake.calls["pool"] == ("workspace", 1 << 30)
    assert fake.calls["profile"] == ("pixels", (1, 224, 224, 3), (64, 224, 224, 3), (256, 224, 224, 3))
    assert fake.calls["cache_in"] == [b""] and cache.read_bytes() == b"+timings"

    build_serialized_plan(b"onnx-bytes", "pixels", 224, BatchProfile(), 1 << 30, cache, **QUIET)
    assert fake.calls["cache_in"] == [b"", b"+timings"]  # the saved cache seeds the next build
    assert cache.read_bytes() == b"+timings+timings"


@pytest.mark.parametrize(
    "failure, message",
    [({"parses": False}, "could not parse the ONNX model: In node 3"), ({"builds": False}, "build_serialized_network failed")],
)
def test_builder_failures_are_export_errors_with_the_reason(fake_tensorrt, tmp_path, failure, message):
    from fastret.export.onnx_export import ExportError
    from fastret.export.tensorrt_build import build_serialized_plan

    fake_tensorrt(**failure)
    with pytest.raises(ExportError, match=message):
        build_serialized_plan(b"x", "pixels", 32, BatchProfile(), 1 << 20, tmp_path / "t.cache", **QUIET)


@pytest.fixture
def stand_in_gpu(fake_tensorrt, monkeypatch):
    """build_plan_for_export with the fake TensorRT, an H100 'here', and a plan runner given per test."""
    from fastret.export import tensorrt_build

    fake_tensorrt()
    monkeypatch.setattr(tensorrt_build, "tensorrt_missing", lambda: None)
    monkeypatch.setattr(tensorrt_build, "current_target", lambda: H100)

    def runner(embed):
        class PlanRunner:
            def __init__(self, path, info):
                assert path.read_bytes() == b"PLAN"

            def encode(self, pixels):
                return embed(pixels)

        monkeypatch.setattr(tensorrt_build, "TensorRTEncoder", PlanRunner)

    return runner


def test_plan_is_kept_and_recorded_only_when_it_matches_onnxruntime(stand_in_gpu, tiny_source, tmp_path):
    from fastret.export.onnx_export import export_onnx, onnx_embed
    from fastret.export.tensorrt_build import build_plan_for_export

    export_dir = export_onnx(tiny_source, tmp_path / "export", **QUIET)
    stand_in_gpu(lambda pixels: onnx_embed(export_dir / FP32_ONNX, pixels))
    plan = build_plan_for_export(export_dir, profile=BatchProfile(1, 8, 32), workspace_gib=0.5, **QUIET)
    assert plan == export_dir / PLAN_FILE and plan.read_bytes() == b"PLAN"
    fp16_onnx, _ = find_artefact(export_dir, FP16_KIND)  # written first: the plan is parsed from it
    record = read_metadata(export_dir)["artefacts"][PLAN_FILE]
    assert plan_problem(record, H100) is None
    assert record["batch_profile"] == {"min": 1, "opt": 8, "max": 32} and record["workspace_gib"] == 0.5
    assert record["parity_vs_onnx_fp32"]["min_cosine"] > 0.9999
    assert record["precision"] == f"fp16, strongly typed from {fp16_onnx.name}"
    assert "LayerNormalization" in record["fp32_ops"]
    assert record["kind"] == "tensorrt-plan" and len(record["sha256"]) == 64

    rng = np.random.default_rng(1)
    stand_in_gpu(lambda pixels: rng.normal(size=(len(pixels), tiny_source.dim)).astype(np.float32))
    plan.unlink()
    from fastret.export.onnx_export import ExportError

    with pytest.raises(ExportError, match="TensorRT plan min cosine .* < 0.999; not kept"):
        build_plan_for_export(export_dir, **QUIET)
    assert not plan.exists() and not list(export_dir.glob(f".{PLAN_FILE}.tmp-*"))
