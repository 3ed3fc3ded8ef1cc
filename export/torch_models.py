"""PyTorch modules of the registry's models: pixels (or CLIP token ids) in, L2-normalised embeddings out."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from fastret.engine.decode import Preprocessing
from fastret.export.models import ModelNotFound, ModelSource, clip_projection_dim, efficientnet_architecture


class EmbeddingModel(nn.Module):
    """uint8 (N, H, W, 3) pixels -> L2-normalised float32 (N, D) embeddings."""

    def __init__(self, backbone: nn.Module, preprocessing: Preprocessing) -> None:
        super().__init__()
        self.backbone = backbone
        self.register_buffer("mean", torch.tensor(preprocessing.mean).view(1, 3, 1, 1))
        self.register_buffer("inv_std", 1.0 / torch.tensor(preprocessing.std).view(1, 3, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = (pixels.permute(0, 3, 1, 2).float() - self.mean) * self.inv_std
        features = self.backbone(x)
        return features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)


class _EfficientNetFeatures(nn.Module):
    """EfficientNet trunk + global average pool: the 1280-d penultimate features."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x).mean(dim=(2, 3))


class _ClipImageEmbeds(nn.Module):
    """CLIPVisionModelWithProjection -> image_embeds (the projected, CLIP-space vector)."""

    def __init__(self, clip_vision: nn.Module) -> None:
        super().__init__()
        self.clip_vision = clip_vision

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.clip_vision(pixel_values=x).image_embeds


class _PatchMatMul(nn.Module):
    """A ViT patch embedding (a convolution whose stride is its kernel) as reshape + matrix product.

    The same sums, but ONNX then holds a MatMul, and the INT8 paths (OpenVINO weight compression with
    dynamic activation quantisation, ONNX Runtime dynamic INT8) quantise MatMuls, not Convs: the
    patch embedding, ~6% of CLIP B/32's time in bf16, then runs in INT8 too.
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.patch = conv.kernel_size[0]
        self.weight = conv.weight  # (out, in, patch, patch): the model's code reads .weight.dtype
        self.bias = conv.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, channels, height, width = x.shape
        p, rows, cols = self.patch, height // self.patch, width // self.patch
        patches = x.reshape(n, channels, rows, p, cols, p).permute(0, 2, 4, 1, 3, 5).reshape(n, rows * cols, -1)
        out = patches @ self.weight.reshape(self.weight.shape[0], -1).T
        if self.bias is not None:
            out = out + self.bias
        return out.transpose(1, 2).reshape(n, -1, rows, cols)


def _is_patch_convolution(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.Conv2d)
        and module.kernel_size == module.stride
        and module.kernel_size[0] == module.kernel_size[1]
        and module.padding == (0, 0)
        and module.dilation == (1, 1)
        and module.groups == 1
    )


def exportable(model: EmbeddingModel) -> EmbeddingModel:
    """The same model (changed in place) with ops the ONNX runtimes quantise: patch convolutions as
    matrix products. PyTorch backends and the benchmarks' baseline keep the original modules."""
    for module in list(model.modules()):
        conv = getattr(module, "patch_embedding", None)
        if conv is not None and _is_patch_convolution(conv):
            module.patch_embedding = _PatchMatMul(conv)
    return model


def _efficientnet_backbone(weights: Path, architecture: str) -> nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name(architecture)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelNotFound(f"{weights}: weights do not match {architecture} ({missing or unexpected})")
    return _EfficientNetFeatures(net)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No loading reports or progress bars from transformers on stderr (a full CLIP checkpoint
    loaded one tower at a time lists the other tower's weights as unused)."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def load_clip_tower(model_class, directory: Path, tower: str) -> nn.Module:
    """One tower (+ projection) of a CLIP checkpoint, in eval mode; ModelNotFound in one line if it
    does not load. The projection size is the checkpoint's (clip_projection_dim), not a sub-config's."""
    try:
        with _quiet_transformers():
            # Eager attention traces to plain MatMul/Softmax ops every ONNX runtime supports.
            model = model_class.from_pretrained(
                directory, attn_implementation="eager", projection_dim=clip_projection_dim(directory)
            )
    except ModelNotFound:
        raise
    except Exception as exc:  # transformers raises many kinds (OSError, RuntimeError, ValueError, ...)
        reason = (str(exc).strip().splitlines() or [""])[0]
        raise ModelNotFound(
            f"{directory}: cannot load the CLIP {tower} tower ({type(exc).__name__}: {reason})"
        ) from None
    return model.eval()


def _clip_backbone(directory: Path) -> nn.Module:
    from transformers import CLIPVisionModelWithProjection

    return _ClipImageEmbeds(load_clip_tower(CLIPVisionModelWithProjection, directory, "image"))


def load_torch_model(source: ModelSource) -> EmbeddingModel:
    """The fp32 PyTorch EmbeddingModel of a ModelSource, in eval mode: the reference every runtime matches."""
    if source.family == "efficientnet-lite":
        backbone = _efficientnet_backbone(source.location, efficientnet_architecture(source.model_id))
    elif source.family == "clip":
        backbone = _clip_backbone(source.location)
    else:
        raise ModelNotFound(f"unknown model family {source.family!r}")
    return EmbeddingModel(backbone, source.preprocessing).eval()


class TextEmbeddingModel(nn.Module):
    """CLIP token ids (N, L) int64 -> L2-normalised float32 (N, D) text embeddings.

    The ids are what the checkpoint's tokenizer makes (start token, words, end token, padding);
    the text tower is causal and reads the end token's state, so padding after it changes
    nothing and no attention mask is needed.
    """

    def __init__(self, clip_text: nn.Module) -> None:
        super().__init__()
        self.clip_text = clip_text

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        features = self.clip_text(input_ids=input_ids).text_embeds
        return features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def load_torch_text_model(source: ModelSource) -> TextEmbeddingModel:
    """The fp32 PyTorch text tower of a full CLIP checkpoint: the reference the exported text tower matches."""
    from transformers import CLIPTextModelWithProjection

    if source.family != "clip" or not source.text_tower:
        raise ModelNotFound(f"{source.model_id} has no text tower")
    return TextEmbeddingModel(load_clip_tower(CLIPTextModelWithProjection, source.location, "text")).eval()
