"""Image files -> model-ready uint8 pixels.

Decoding is where batch jobs meet the real world: truncated downloads, CMYK scans, 16-bit PNGs,
palette GIFs, decompression bombs. Everything that can go wrong with one file raises
`ImageError` with a one-line reason, so a batch job can skip that file and go on.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

# Pillow's own guard raises only above 2x its limit; we apply our limit ourselves, at open time.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False

DEFAULT_MAX_PIXELS = 100_000_000
"""Largest image (width x height) we decode; larger ones are treated as decompression bombs."""

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)

_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


class ImageError(Exception):
    """A file that cannot be turned into pixels; str() is a one-line reason."""


@dataclass(frozen=True)
class Preprocessing:
    """How a model wants its pixels: resize the short side, centre-crop a square.

    Mean and std are in 0-255 pixel units; they are applied inside the exported graph, so the
    host only produces uint8 HWC crops (4x less memory traffic than float CHW).
    """

    size: int
    resize: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Preprocessing":
        return cls(
            size=int(data["size"]),
            resize=int(data["resize"]),
            interpolation=str(data["interpolation"]),
            mean=tuple(float(v) for v in data["mean"]),  # type: ignore[arg-type]
            std=tuple(float(v) for v in data["std"]),  # type: ignore[arg-type]
        )


def open_image(path: str | Path | BinaryIO, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open lazily and check the header: type, size and the decompression-bomb bound.

    `path` may also be a seekable binary file (an upload held in memory).
    """
    path = path if hasattr(path, "read") else Path(path)
    try:
        if _byte_size(path) == 0:
            raise ImageError("empty file (0 bytes)")
        img = Image.open(path)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("not an image (unrecognised format)") from None
    except OSError as exc:
        raise ImageError(f"cannot open: {exc}") from None
    width, height = img.size
    if width * height > max_pixels:
        img.close()
        raise ImageError(
            f"too large: {width}x{height} = {width * height:,} pixels exceeds the limit of "
            f"{max_pixels:,} (possible decompression bomb)"
        )
    if width < 1 or height < 1:
        raise ImageError(f"degenerate size {width}x{height}")
    return img


def _byte_size(source: Path | BinaryIO) -> int:
    if isinstance(source, Path):
        return source.stat().st_size
    size = source.seek(0, 2)
    source.seek(0)
    return size


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparency is composited onto white."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        arr = np.clip(arr * (255.0 / top), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        img.mode == "P" and "transparency" in img.info
    )
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def resize_and_crop(
    img: Image.Image, spec: Preprocessing, extent: tuple[float, float] | None = None
) -> Image.Image:
    """Resize the short side to `spec.resize`, then take the centre `spec.size` square.

    `extent` is the full image's size in `img`'s pixels after a JPEG draft decode (1333 rows at
    1/4 decode to 334 rows but span 333.25): the crop box then matches a full decode's.
    """
    width, height = extent or img.size
    scale = spec.resize / min(width, height)
    new_w = max(spec.size, round(width * scale))
    new_h = max(spec.size, round(height * scale))
    left = (new_w - spec.size) // 2
    top = (new_h - spec.size) // 2
    # Crop box in source coordinates, so Pillow resamples only the pixels we keep.
    box = (left / scale, top / scale, (left + spec.size) / scale, (top + spec.size) / scale)
    return img.resize((spec.size, spec.size), _RESAMPLE[spec.interpolation], box=box)


def load_pixels(
    path: str | Path | BinaryIO,
    spec: Preprocessing,
    *,
    draft: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Decode one file into a (size, size, 3) uint8 crop, or raise ImageError.

    `draft` lets the JPEG decoder downscale by 1/2, 1/4 or 1/8 in the DCT domain while the
    short side stays >= the resize target: large photos decode several times faster.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img = open_image(path, max_pixels)
        try:
            with img:
                drafted = None  # (mode, box): box spans the full image in decoded pixels
                if draft and img.format == "JPEG":
                    drafted = img.draft("RGB", (spec.resize, spec.resize))
                img.load()
                rgb = to_rgb(img)
                out = resize_and_crop(rgb, spec, drafted[1][2:] if drafted else None)
        except ImageError:
            raise
        except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombWarning) as exc:
            raise ImageError(f"cannot decode: {exc}") from None
    return np.asarray(out, dtype=np.uint8)


def list_images(root: str | Path) -> list[Path]:
    """Every file under root with an image suffix, sorted for a deterministic index order."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a directory")
    return sorted(
        p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    )
