"""Image files -> model-ready uint8 pixels.

Decoding is where batch jobs meet the real world: truncated downloads, CMYK scans, 16-bit PNGs,
palette GIFs, decompression bombs. Everything that can go wrong with one file raises
`ImageError` with a one-line reason, so a batch job can skip that file and go on.
"""

from __future__ import annotations

import os
import stat
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np
from PIL import ExifTags, Image, ImageFile, UnidentifiedImageError, features

# Pillow's own guard raises only above 2x its limit; we apply our limit ourselves, at open time.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False

DEFAULT_MAX_PIXELS = 100_000_000
"""Largest image (width x height) we decode; larger ones are treated as decompression bombs."""

DEFAULT_SERVER_MAX_PIXELS = 50_000_000
"""The limit for images a server takes from anyone: the full resolution of current phone and most
camera sensors (48-50 MP) still fits, and one decode at the limit holds a few hundred MB."""

_SUFFIXES = {
    "JPEG": (".jpg", ".jpeg"),
    "PNG": (".png",),
    "WEBP": (".webp",),
    "GIF": (".gif",),
    "TIFF": (".tif", ".tiff"),
    "BMP": (".bmp",),
    "PPM": (".ppm", ".pgm"),
    "HEIF": (".heic", ".heif"),
    "AVIF": (".avif",),
}
"""Pillow formats we decode, and their suffixes. Everything else (EPS, which runs Ghostscript;
JPEG 2000, DDS, SGI, SPIDER, IM, PSD, ...) is refused before its Pillow plugin reads a byte."""

_NEEDS_PLUGIN = {
    "HEIF": "HEIC needs the pillow-heif plugin: pip install pillow-heif",
    "AVIF": "AVIF needs Pillow built with libavif, or the plugin: pip install pillow-avif-plugin",
}
"""Formats decoded only when their decoder is installed, and what to install."""


def _installed_plugin_formats() -> tuple[str, ...]:
    """Register the optional HEIF/AVIF openers that are installed; return the formats they add."""
    found = []
    try:
        from pillow_heif import register_heif_opener
    except ImportError:
        pass
    else:
        register_heif_opener()
        found.append("HEIF")
    if "avif" in features.modules and features.check("avif"):  # Pillow >= 11.2 built with libavif
        found.append("AVIF")
    else:
        try:
            import pillow_avif  # noqa: F401 -- registers its AVIF opener on import
        except ImportError:
            pass
        else:
            found.append("AVIF")
    return tuple(found)


ALLOWED_FORMATS: tuple[str, ...] = (
    tuple(name for name in _SUFFIXES if name not in _NEEDS_PLUGIN) + _installed_plugin_formats()
)
"""What `Image.open` may identify a file as (GIF and TIFF: the first frame or page)."""

IMAGE_SUFFIXES = frozenset(suffix for name in ALLOWED_FORMATS for suffix in _SUFFIXES[name])
"""Suffixes `list_images` picks up: those of ALLOWED_FORMATS."""

_MISSING_PLUGIN = {
    suffix: hint for name, hint in _NEEDS_PLUGIN.items() if name not in ALLOWED_FORMATS for suffix in _SUFFIXES[name]
}
"""Image suffixes whose decoder is not installed -> what to install."""

_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


class ImageError(Exception):
    """A file that cannot be turned into pixels; str() is a one-line reason."""


@dataclass(frozen=True)
class Skipped:
    """A file (or folder) a job left out, and why."""

    path: Path
    reason: str

    def line(self) -> str:
        return f"skipped {self.path}: {self.reason}"


Box = tuple[float, float, float, float]
"""(left, top, right, bottom) in an image's pixels."""


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


def _failure(step: str, exc: BaseException) -> ImageError:
    """One line naming the step that failed and what Pillow said (its messages may span lines)."""
    detail = " ".join(str(exc).split()) or type(exc).__name__
    return ImageError(f"{step}: {detail}")


def _open(source: Path | BinaryIO, max_pixels: int) -> Image.Image:
    """Open lazily as one of ALLOWED_FORMATS and check the header, before a pixel is decoded."""
    try:
        if _byte_size(source) == 0:
            raise ImageError("empty file (0 bytes)")
        try:
            img = Image.open(source, formats=ALLOWED_FORMATS)
        except UnidentifiedImageError:
            raise ImageError(_unidentified(_head(source))) from None
    except ImageError:
        raise
    except Exception as exc:  # any Pillow plugin error is this file's problem, not the job's
        raise _failure("cannot open", exc) from None
    try:
        _check_size(img, max_pixels)
    except ImageError:
        img.close()
        raise
    return img


def _byte_size(source: Path | BinaryIO) -> int:
    if isinstance(source, Path):
        return source.stat().st_size
    size = source.seek(0, 2)
    source.seek(0)
    return size


def _head(source: Path | BinaryIO, size: int = 128) -> bytes:
    if isinstance(source, Path):
        with open(source, "rb") as file:
            return file.read(size)
    source.seek(0)
    head = source.read(size)
    source.seek(0)
    return head


def _check_size(img: Image.Image, max_pixels: int) -> None:
    """Refuse an image whose decoding would hold more than `max_pixels` pixels.

    The header's full size counts even when a JPEG is decoded reduced: progressive and multi-scan
    JPEGs buffer coefficients for every pixel of the full image. A tiled TIFF's tile counts too:
    libtiff allocates a whole tile, however small the image.
    """
    width, height = img.size
    if width * height > max_pixels:
        raise ImageError(
            f"too large: {width}x{height} = {width * height:,} pixels exceeds the limit of "
            f"{max_pixels:,} (possible decompression bomb)"
        )
    if width < 1 or height < 1:
        raise ImageError(f"degenerate size {width}x{height}")
    if img.format == "TIFF":
        tile = img.tag_v2.get(ExifTags.Base.TileWidth), img.tag_v2.get(ExifTags.Base.TileLength)
        if all(isinstance(side, int) for side in tile) and tile[0] * tile[1] > max_pixels:
            raise ImageError(
                f"too large: TIFF tiles of {tile[0]}x{tile[1]} = {tile[0] * tile[1]:,} pixels exceed "
                f"the limit of {max_pixels:,} (possible decompression bomb)"
            )


_HEIF_BRANDS = frozenset({b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"})
_AVIF_BRANDS = frozenset({b"avif", b"avis"})


def _sniff_format(head: bytes) -> str | None:
    """A file's format from its first bytes, by Pillow's own signature checks where it has one.

    Only signatures are compared: no plugin of a refused format ever parses the file.
    """
    if head[4:8] == b"ftyp":  # ISO base media file: major brand, version, compatible brands
        brands = {head[i : i + 4] for i in range(8, min(len(head), int.from_bytes(head[:4], "big")), 4)}
        if brands & _AVIF_BRANDS:
            return "AVIF"
        if brands & _HEIF_BRANDS:
            return "HEIF"
    Image.init()  # every plugin, in Pillow's order (importing one ourselves would reorder Image.ID)
    from PIL import SpiderImagePlugin

    for name in [*ALLOWED_FORMATS, *(name for name in Image.OPEN if name not in ALLOWED_FORMATS)]:
        accept = Image.OPEN[name][1] if name in Image.OPEN else None
        try:
            matched = accept is not None and accept(head[:16])
        except (IndexError, TypeError, struct.error):  # Pillow's own open ignores these too
            continue
        if matched and not isinstance(matched, str):  # a str is Pillow's "missing decoder" note
            return name
    # Two refused formats with no signature check in Pillow.
    if head.startswith(b"Image type:"):
        return "IM"
    if len(head) >= 92 and any(
        SpiderImagePlugin.isSpiderHeader(struct.unpack(f"{order}23f", head[:92])) for order in "<>"
    ):
        return "SPIDER"
    return None


def _unidentified(head: bytes) -> str:
    """Why no allowed format opened a file, naming the format it is when that can be told."""
    name = _sniff_format(head)
    if name is None:
        return "not an image (unrecognised format)"
    if name in ALLOWED_FORMATS:
        return f"damaged {name} header"
    if name in _NEEDS_PLUGIN:
        return _NEEDS_PLUGIN[name]
    return f"{name} files are not accepted (accepted formats: {', '.join(ALLOWED_FORMATS)})"


_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
"""EXIF orientation -> the transposition that shows the image upright (as ImageOps.exif_transpose)."""


def _upright_transposition(img: Image.Image) -> Image.Transpose | None:
    try:
        orientation = img.getexif().get(ExifTags.Base.Orientation)
    except Exception:  # a damaged EXIF block: use the pixels as stored, as browsers do
        return None
    return _UPRIGHT.get(orientation) if isinstance(orientation, int) else None


def transposed_box(box: Box, size: tuple[int, int], transposition: Image.Transpose) -> Box:
    """Where `box` of an image of `size` lies once the image is transposed."""
    left, top, right, bottom = box
    width, height = size
    return {
        Image.Transpose.FLIP_LEFT_RIGHT: (width - right, top, width - left, bottom),
        Image.Transpose.FLIP_TOP_BOTTOM: (left, height - bottom, right, height - top),
        Image.Transpose.ROTATE_180: (width - right, height - bottom, width - left, height - top),
        Image.Transpose.TRANSPOSE: (top, left, bottom, right),
        Image.Transpose.ROTATE_90: (top, width - right, bottom, width - left),
        Image.Transpose.ROTATE_270: (height - bottom, left, height - top, right),
        Image.Transpose.TRANSVERSE: (height - bottom, width - right, height - top, width - left),
    }[transposition]


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparency is composited onto white.

    Written to hold few full-size copies at once: at the pixel limit each costs hundreds of MB.
    """
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img).astype(np.float32)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        arr *= 255.0 / top
        grey = np.clip(arr, 0, 255, out=arr).astype(np.uint8)
        del arr
        return Image.fromarray(grey, mode="L").convert("RGB")
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        img.mode == "P" and "transparency" in img.info
    )
    if has_alpha:
        rgba = img if img.mode == "RGBA" else img.convert("RGBA")
        composite = Image.new("RGB", rgba.size, (255, 255, 255))
        composite.paste(rgba, mask=rgba)  # the alpha band is the mask: alpha compositing onto white
        return composite
    return img.convert("RGB")


@dataclass(frozen=True)
class Decoded:
    """A decoded image: upright 8-bit RGB (maybe reduced), where the full image lies in its pixels,
    the full image's upright size, and the file's format (Pillow's name)."""

    rgb: Image.Image
    content: Box
    size: tuple[int, int]
    format: str | None


_SWAPS_SIDES = {Image.Transpose.TRANSPOSE, Image.Transpose.TRANSVERSE, Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_270}


def upright_size(img: Image.Image) -> tuple[int, int]:
    """An opened image's (width, height) once its EXIF orientation is applied, from the header alone."""
    width, height = img.size
    return (height, width) if _upright_transposition(img) in _SWAPS_SIDES else (width, height)


def decode_image(
    source: str | Path | BinaryIO, *, max_pixels: int = DEFAULT_MAX_PIXELS, reduce_to: int | None = None
) -> Decoded:
    """Decode one file to upright (EXIF orientation applied) 8-bit RGB, or raise ImageError.

    `source` may also be a seekable binary file (an upload held in memory). `reduce_to` lets the
    JPEG decoder downscale by 1/2, 1/4 or 1/8 in the DCT domain while both sides stay >= it: large
    photos decode several times faster. `content` is where the full image lies in the result's
    pixels, fractional after a reduced decode (1333 rows at 1/4 decode to 334 but span 333.25).
    """
    img = _open(source if hasattr(source, "read") else Path(source), max_pixels)
    with img:
        full_size, file_format = img.size, img.format
        try:
            drafted = img.draft("RGB", (reduce_to, reduce_to)) if reduce_to else None
            img.load()
            rgb = to_rgb(img)
        except Exception as exc:  # any Pillow decoder error is this file's problem, not the job's
            raise _failure("cannot decode", exc) from None
        transposition = _upright_transposition(img)
    box = drafted[1] if drafted else (0.0, 0.0, float(rgb.width), float(rgb.height))
    if transposition is None:
        return Decoded(rgb, box, full_size, file_format)
    size = (full_size[1], full_size[0]) if transposition in _SWAPS_SIDES else full_size
    return Decoded(rgb.transpose(transposition), transposed_box(box, rgb.size, transposition), size, file_format)


def decode_rgb(
    source: str | Path | BinaryIO, *, max_pixels: int = DEFAULT_MAX_PIXELS, reduce_to: int | None = None
) -> tuple[Image.Image, Box]:
    """decode_image's pixels and where the full image lies in them."""
    decoded = decode_image(source, max_pixels=max_pixels, reduce_to=reduce_to)
    return decoded.rgb, decoded.content


def resize_and_crop(img: Image.Image, spec: Preprocessing, content: Box | None = None) -> Image.Image:
    """Resize the short side to `spec.resize`, then take the centre `spec.size` square.

    `content` is where the full image lies in `img` after a reduced decode (see decode_rgb): the
    crop box then matches a full decode's.
    """
    left_edge, top_edge, right_edge, bottom_edge = content or (0.0, 0.0, float(img.width), float(img.height))
    width, height = right_edge - left_edge, bottom_edge - top_edge
    scale = spec.resize / min(width, height)
    new_w = max(spec.size, round(width * scale))
    new_h = max(spec.size, round(height * scale))
    left = (new_w - spec.size) // 2
    top = (new_h - spec.size) // 2
    # Crop box in source coordinates, so Pillow resamples only the pixels we keep.
    box = (
        left_edge + left / scale,
        top_edge + top / scale,
        left_edge + (left + spec.size) / scale,
        top_edge + (top + spec.size) / scale,
    )
    return img.resize((spec.size, spec.size), _RESAMPLE[spec.interpolation], box=box)


def load_pixels(
    path: str | Path | BinaryIO,
    spec: Preprocessing,
    *,
    draft: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Decode one file into a (size, size, 3) uint8 crop, or raise ImageError.

    `draft` decodes JPEGs reduced in the DCT domain, never below the resize target.
    """
    return load_pixels_and_image(path, spec, draft=draft, max_pixels=max_pixels)[0]


def load_pixels_and_image(
    path: str | Path | BinaryIO,
    spec: Preprocessing,
    *,
    draft: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[np.ndarray, Decoded]:
    """load_pixels' crop and the decoded image it was cut from (for what else an index keeps of it)."""
    decoded = decode_image(path, max_pixels=max_pixels, reduce_to=spec.resize if draft else None)
    return np.asarray(resize_and_crop(decoded.rgb, spec, decoded.content), dtype=np.uint8), decoded


def list_images(
    root: str | Path, *, include_hidden: bool = False, on_skip: Callable[[Skipped], None] | None = None
) -> list[Path]:
    """Every image file under root, sorted for a deterministic index order.

    Hidden names (a leading '.': dotfiles, macOS `._*` resource forks, `.thumbnails/`) are left out
    unless `include_hidden`. Symlinks to files are listed; symlinked folders are not followed (as
    pathlib's rglob), so a link loop cannot recur. What cannot be listed or read as an image -- an
    unreadable folder, a broken symlink, a format whose plugin is missing, a symlinked folder --
    is reported through `on_skip`, in path order.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a directory")
    found: list[Path] = []
    skipped: list[Skipped] = []
    folders = [root]
    while folders:
        folder = folders.pop()
        try:
            with os.scandir(folder) as listing:
                entries = list(listing)
        except OSError as exc:
            skipped.append(Skipped(folder, f"cannot list folder: {exc.strerror or exc}"))
            continue
        for entry in entries:
            if entry.name.startswith(".") and not include_hidden:
                continue
            path = folder / entry.name
            if entry.is_dir(follow_symlinks=False):
                folders.append(path)
                continue
            suffix = os.path.splitext(entry.name)[1].lower()
            image_name = suffix in IMAGE_SUFFIXES or suffix in _MISSING_PLUGIN
            if not (image_name or entry.is_symlink()):
                continue
            try:
                mode = os.stat(entry.path).st_mode  # through symlinks
            except OSError as exc:
                if image_name:
                    what = "broken symlink" if entry.is_symlink() else "cannot read"
                    skipped.append(Skipped(path, f"{what}: {exc.strerror or exc}"))
                continue
            if stat.S_ISDIR(mode):
                skipped.append(Skipped(path, "symlinked folder, not followed"))
            elif stat.S_ISREG(mode) and suffix in _MISSING_PLUGIN:
                skipped.append(Skipped(path, _MISSING_PLUGIN[suffix]))
            elif stat.S_ISREG(mode) and suffix in IMAGE_SUFFIXES:
                found.append(path)
    if on_skip is not None:
        for skip in sorted(skipped, key=lambda skip: skip.path):
            on_skip(skip)
    return sorted(found)
