"""Shared fixtures: real data when present, a tiny random CLIP, and an isolated model cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("FASTRET_DATA", REPO.parent / "shared" / "data"))
WANG1K = DATA / "wang1k"
ANIMALS = DATA / "animals10-mini"

# Tests never reach a model hub: `auto` must fall back at once.
os.environ["HF_HUB_OFFLINE"] = "1"


def require_dir(path: Path) -> Path:
    if not path.is_dir():
        pytest.skip(f"{path} is absent (the shared evaluation images are not on this machine)")
    return path


@pytest.fixture(scope="session")
def wang1k() -> Path:
    return require_dir(WANG1K)


@pytest.fixture(scope="session")
def animals10() -> Path:
    return require_dir(ANIMALS)


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory) -> Path:
    """One export cache for the whole session, never the user's ~/.cache."""
    cache = tmp_path_factory.mktemp("fastret-cache")
    os.environ["FASTRET_CACHE"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """A randomly initialised CLIP vision tower + projection, saved like a real checkpoint."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=16,
    )
    directory = tmp_path_factory.mktemp("tiny-clip")
    CLIPVisionModelWithProjection(config).eval().save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def bundled_source():
    from fastret.export.models import bundled_source as make

    return make()


@pytest.fixture(scope="session")
def bundled_onnx(bundled_source, model_cache):
    """The bundled model's ONNX encoder (exported once per session)."""
    from fastret.engine.load import encoder_for_source

    return encoder_for_source(bundled_source, "onnxruntime", log=lambda _: None)
