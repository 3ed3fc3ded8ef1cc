"""Stored reference embeddings (open_clip style): a change to preprocessing constants, decoding or
the bundled weights fails here even where ../shared/data is absent.

Regenerate on purpose with `python tests/golden/make_golden.py`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent / "golden"))
from make_golden import GOLDEN, bundled_embeddings, synthetic_images  # noqa: E402


@pytest.fixture(scope="module")
def golden() -> np.ndarray:
    return np.load(GOLDEN)


def test_bundled_model_reproduces_the_golden_embeddings(golden, tmp_path):
    fresh = bundled_embeddings(tmp_path)
    assert fresh.shape == golden.shape
    np.testing.assert_allclose(fresh, golden, atol=2e-4)
    assert (np.sum(fresh * golden, axis=1) > 0.99999).all()


def test_the_golden_images_are_told_apart(golden):
    """The stored vectors are informative: no two synthetic images embed alike."""
    cosines = golden @ golden.T
    assert cosines[~np.eye(len(golden), dtype=bool)].max() < 0.95


@pytest.mark.parametrize("change", ["resize", "mean"])
def test_a_changed_preprocessing_constant_moves_the_embeddings(golden, tmp_path, change, monkeypatch):
    """The check above has teeth: one preprocessing constant changed moves some embedding past its tolerance."""
    from dataclasses import replace

    import fastret.export.models as models

    made = models.bundled_source

    def altered():
        source = made()
        spec = source.preprocessing
        spec = replace(spec, resize=spec.resize + 16) if change == "resize" else replace(
            spec, mean=tuple(m + 8 for m in spec.mean))
        return replace(source, preprocessing=spec)

    monkeypatch.setattr(models, "bundled_source", altered)
    assert len(synthetic_images(tmp_path)) == len(golden)
    moved = bundled_embeddings(tmp_path)
    assert np.abs(moved - golden).max() > 1e-3
