"""Compiled query models: the job that writes an OpenVINO artefact also saves the batch-1 model that
searches compile, and searches import it (never write it); a changed artefact or a damaged blob is
compiled in memory instead."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fastret.engine.openvino_runtime import QUERY_MODELS_DIR, OpenVinoEncoder, openvino_missing, save_query_model
from fastret.export.onnx_export import export_dir_for, parity_pixels
from fastret.service.load import encoder_for_source, encoder_from_recipe, model_info

pytestmark = pytest.mark.skipif(openvino_missing() is not None, reason=str(openvino_missing()))


@pytest.fixture
def artefact(bundled_source, bundled_onnx, tmp_path) -> Path:
    """A private copy of the bundled fp32 ONNX, free to change."""
    path = tmp_path / "model.onnx"
    shutil.copy(export_dir_for(bundled_source) / "model.onnx", path)
    return path


@pytest.fixture
def info(bundled_source):
    return model_info(bundled_source)


def reader(path: Path, info, folder: Path) -> OpenVinoEncoder:
    return OpenVinoEncoder(path, info, precision="fp32", query_models=folder)


def test_the_job_saves_the_query_model_that_the_search_imports(bundled_source, bundled_onnx):
    job = encoder_for_source(bundled_source, "openvino", precision="fp32", workload="throughput")
    saved = list((export_dir_for(bundled_source) / QUERY_MODELS_DIR).glob("*.blob"))
    search = encoder_from_recipe(job.recipe)
    assert search.imported_query_model
    assert search.query_model_file(search.query_models) in saved
    compiled_here = OpenVinoEncoder(search.path, search.info, precision="fp32")
    pixels, _ = parity_pixels(bundled_source.preprocessing, None, count=2)
    for row in pixels:
        np.testing.assert_allclose(search.encode(row[None]), compiled_here.encode(row[None]), atol=1e-6)


def test_a_search_never_writes_query_models(info, artefact, tmp_path):
    folder = tmp_path / "query-models"
    assert not reader(artefact, info, folder).imported_query_model
    assert not folder.exists()


@pytest.mark.parametrize("change", ["rewritten", "touched", "another sha256"])
def test_a_changed_artefact_misses_its_saved_query_model(info, artefact, tmp_path, change):
    folder = tmp_path / "query-models"
    save_query_model(artefact, info, "fp32", folder, artefact_sha256="a" * 64)
    sha256 = "a" * 64
    assert OpenVinoEncoder(artefact, info, precision="fp32", query_models=folder, artefact_sha256=sha256).imported_query_model
    if change == "rewritten":
        artefact.write_bytes(artefact.read_bytes())
    elif change == "touched":
        stat = artefact.stat()
        os.utime(artefact, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    else:
        sha256 = "b" * 64
    search = OpenVinoEncoder(artefact, info, precision="fp32", query_models=folder, artefact_sha256=sha256)
    assert not search.imported_query_model


def test_a_damaged_query_model_is_compiled_in_memory(bundled_source, info, artefact, tmp_path):
    folder = tmp_path / "query-models"
    blob = save_query_model(artefact, info, "fp32", folder)
    blob.write_bytes(blob.read_bytes()[:1000])
    search = reader(artefact, info, folder)
    assert not search.imported_query_model
    pixels, _ = parity_pixels(bundled_source.preprocessing, None, count=1)
    assert search.encode(pixels).shape == (1, info.dim)


def test_the_search_path_imports_no_heavy_library(wang1k_index, wang1k):
    """`fastret search` stays quick to start: none of the libraries only jobs or the web app need."""
    query = next(wang1k.glob("*/*.jpg"))
    heavy = ["torch", "transformers", "fastapi", "tqdm", "cv2", "onnx", "nncf", "openvino.tools.ovc", "numpy.ma",
             "multiprocessing"]
    script = (
        "import sys; from fastret.cli.main import main; "
        f"main(['search', {str(query)!r}, '--index', {str(wang1k_index)!r}]); "
        f"print(sorted(name for name in {heavy!r} if name in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
