"""The CNN's static INT8 model is calibrated from a graph whose paddings are folded into its
convolutions (so its depthwise convolutions run in INT8); a job replaces an INT8 model made the older
way, and keeps it when a current one cannot be made."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from fastret.engine.openvino_runtime import openvino_missing
from fastret.export import quantize
from fastret.export.onnx_export import METADATA_FILE, export_dir_for, find_artefact, read_metadata
from fastret.export.quantize import OPENVINO_INT8_KIND, OPENVINO_STATIC_INT8_GRAPH, fold_paddings
from fastret.service import load

pytestmark = pytest.mark.skipif(openvino_missing() is not None, reason=str(openvino_missing()))


def padded_convolution(kind: str, begin: list[int], end: list[int], stride: int):
    """A model: input (1, 4, 9, 9) -> zero Pad -> 3x3 convolution (plain, or depthwise)."""
    import openvino as ov
    from openvino import opset13

    rng = np.random.default_rng(0)
    data = opset13.parameter([1, 4, 9, 9], np.float32)
    padded = opset13.pad(data, opset13.constant(np.array(begin)), opset13.constant(np.array(end)), "constant",
                         opset13.constant(np.float32(0)))
    if kind == "Convolution":
        conv = opset13.convolution(padded, opset13.constant(rng.standard_normal((6, 4, 3, 3)).astype(np.float32)),
                                   [stride, stride], [0, 0], [0, 0], [1, 1])
    else:
        conv = opset13.group_convolution(padded, opset13.constant(rng.standard_normal((4, 1, 1, 3, 3)).astype(np.float32)),
                                         [stride, stride], [0, 0], [0, 0], [1, 1])
    return ov.Model([conv], [data])


def run(model, pixels: np.ndarray) -> np.ndarray:
    import openvino as ov

    return np.array(ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(pixels)[0])


@pytest.mark.parametrize("kind", ["Convolution", "GroupConvolution"])
@pytest.mark.parametrize("begin, end, stride", [([0, 0, 1, 1], [0, 0, 1, 1], 1), ([0, 0, 0, 0], [0, 0, 1, 1], 2),
                                                ([0, 0, 2, 1], [0, 0, 0, 2], 1)])
def test_folding_paddings_keeps_the_arithmetic(kind, begin, end, stride):
    pixels = np.random.default_rng(1).standard_normal((1, 4, 9, 9)).astype(np.float32)
    expected = run(padded_convolution(kind, begin, end, stride), pixels)
    model = padded_convolution(kind, begin, end, stride)
    assert fold_paddings(model) == 1
    assert "Pad" not in {op.get_type_name() for op in model.get_ordered_ops()}
    np.testing.assert_allclose(run(model, pixels), expected, rtol=1e-5, atol=1e-5)


def test_a_padding_of_the_channels_is_not_folded():
    import openvino as ov
    from openvino import opset13

    data = opset13.parameter([1, 3, 8, 8], np.float32)
    padded = opset13.pad(data, opset13.constant(np.array([0, 1, 1, 1])), opset13.constant(np.array([0, 0, 1, 1])),
                         "constant", opset13.constant(np.float32(0)))
    weights = opset13.constant(np.ones((2, 4, 3, 3), np.float32))
    channels = ov.Model([opset13.convolution(padded, weights, [1, 1], [0, 0], [0, 0], [1, 1])], [data])
    assert fold_paddings(channels) == 0


@pytest.mark.data
def test_the_cnn_int8_model_feeds_its_convolutions_directly(bundled_source, bundled_onnx, wang1k, tmp_path, monkeypatch):
    import openvino as ov

    export_dir = tmp_path / "export"
    export_dir.mkdir()
    for name in ("model.onnx", METADATA_FILE):
        shutil.copy(export_dir_for(bundled_source) / name, export_dir / name)
    monkeypatch.setattr(quantize, "OPENVINO_INT8_MIN_MEAN_COSINE", 0.9)  # 16 images calibrate coarsely
    path, _ = quantize.export_openvino_int8(export_dir, wang1k, count=16, minimum=16)
    model = ov.Core().read_model(str(path))
    feeding = {op.input(0).get_source_output().get_node().get_type_name()
               for op in model.get_ordered_ops() if op.get_type_name() in ("Convolution", "GroupConvolution")}
    assert "Pad" not in feeding
    assert read_metadata(export_dir)["artefacts"][f"{path.parent.name}/{path.name}"]["graph"] == OPENVINO_STATIC_INT8_GRAPH


@pytest.fixture
def export_with_an_old_model(tmp_path) -> Path:
    """An export whose metadata records one INT8 model made before the graph revision."""
    old = tmp_path / "openvino-int8.old" / "model.xml"
    old.parent.mkdir(parents=True)
    old.write_text("<net/>")
    old.with_suffix(".bin").write_bytes(b"")
    record = {"kind": OPENVINO_INT8_KIND, "made": 1.0, "precision": "int8-static"}
    (tmp_path / METADATA_FILE).write_text(json.dumps({"artefacts": {"openvino-int8.old/model.xml": record}}))
    return tmp_path


def derived(export_dir: Path, make, said: list[str]) -> Path | None:
    return load._derived_model(
        export_dir, OPENVINO_INT8_KIND, make, required=True, fallback="bf16", log=said.append,
        current=lambda record: record.get("graph") == OPENVINO_STATIC_INT8_GRAPH,
    )


def test_a_job_replaces_an_int8_model_made_the_older_way(export_with_an_old_model):
    made = export_with_an_old_model / "openvino-int8.new" / "model.xml"
    assert derived(export_with_an_old_model, lambda: made, []) == made


def test_the_older_int8_model_serves_when_a_current_one_cannot_be_made(export_with_an_old_model):
    def cannot() -> Path:
        raise ValueError("static INT8 needs calibration images")

    said: list[str] = []
    old = find_artefact(export_with_an_old_model, OPENVINO_INT8_KIND)[0]
    assert derived(export_with_an_old_model, cannot, said) == old
    assert said == [f"keeping {old} (static INT8 needs calibration images)"]
