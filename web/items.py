"""Indexed items -> files on disk, for the thumbnails and images the page shows.

The web app serves only files that are in the index, addressed by item id. A path is resolved
under the index root and refused if its real path (symlinks followed) leaves that root.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from PIL import Image

from fastret.engine.decode import DEFAULT_MAX_PIXELS, IMAGE_SUFFIXES, decode_rgb
from fastret.engine.index import Index

THUMBNAIL_SIZE = 256
MAX_ID_DIGITS = 19  # ids are int64: a longer string is no item, and int() of thousands of digits is refused


class ItemNotFound(Exception):
    """No servable file for this item id; str() says why."""


def parse_item_id(index: Index, raw: str) -> int:
    """A decimal item id within the index, or ItemNotFound (never an arbitrary string)."""
    if not (raw.isascii() and raw.isdigit()) or len(raw) > MAX_ID_DIGITS or index.find_row(int(raw)) is None:
        shown = raw if len(raw) <= MAX_ID_DIGITS else raw[:MAX_ID_DIGITS] + "…"
        raise ItemNotFound(f"no item {shown!r} in the index ({len(index)} items)")
    return int(raw)


def item_file(index: Index, item_id: int) -> Path:
    """The real path of an indexed item, only if it is a regular image file inside the root."""
    row = index.find_row(item_id)
    if row is None:
        raise ItemNotFound(f"no item {item_id} in the index")
    root = os.path.realpath(index.root)
    real = os.path.realpath(os.path.join(root, index.items[row].path))
    if os.path.commonpath([root, real]) != root:
        raise ItemNotFound(f"item {item_id} resolves outside the index root")
    path = Path(real)
    if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
        raise ItemNotFound(f"item {item_id} is no longer a file")
    return path


def thumbnail_jpeg(path: Path, size: int = THUMBNAIL_SIZE, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> bytes:
    """An upright JPEG no larger than size x size, aspect kept; raises ImageError for unreadable files."""
    rgb, _ = decode_rgb(path, max_pixels=max_pixels, reduce_to=size)
    rgb.thumbnail((size, size), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=85, optimize=True)
    return out.getvalue()
