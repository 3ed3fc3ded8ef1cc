"""A CLIP ViT-B/32-shaped vision tower with RANDOM weights, for timing the transformer architecture.

The real openai/clip-vit-base-patch32 weights cannot be fetched here, so the speed benchmarks
time the same architecture (transformers' default CLIPVisionConfig: ViT-B/32, 224 px, projection
512) with seeded random weights, saved once as a local checkpoint. Its figures are labelled
"random weights, timing only" and are never quality figures.

    python benchmarks/clip_random.py   # prints the checkpoint directory
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

CLIP_RANDOM = "clip-random"
LABEL = "CLIP ViT-B/32 architecture, random weights, timing only"
DEFAULT_DIR = Path(os.environ.get("FASTRET_CLIP_RANDOM", "/tmp/fastret-clip-random"))


def clip_random_dir(directory: Path = DEFAULT_DIR, seed: int = 0) -> Path:
    """Create the random checkpoint once (config.json + model.safetensors) and return its directory."""
    if (directory / "config.json").is_file() and (directory / "model.safetensors").is_file():
        return directory
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(projection_dim=512)).eval()
    staging = directory.with_name(directory.name + f".tmp-{os.getpid()}")
    model.save_pretrained(staging)
    staging.rename(directory)
    return directory


def model_argument(name: str) -> str:
    """A benchmark's --model value -> what fastret.service.load.open_encoder accepts."""
    return str(clip_random_dir()) if name == CLIP_RANDOM else name


def model_label(name: str) -> str:
    return LABEL if name == CLIP_RANDOM else name


if __name__ == "__main__":
    print(clip_random_dir())
    sys.exit(0)
