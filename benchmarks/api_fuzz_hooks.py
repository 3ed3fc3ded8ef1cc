"""schemathesis hooks for benchmarks/api_fuzz.sh: real, odd and broken images for `POST /search`.

The schema can only say "binary", so schemathesis alone sends random bytes, which the server
refuses before its decoder does any work. This hook keeps those and adds generated image files:
every format the server reads, unusual pixel modes, sizes on both sides of the server's pixel cap,
headers that lie about the size, truncated files and flipped bytes.
"""

from __future__ import annotations

import io
import struct
import zlib

import schemathesis
from hypothesis import strategies as st
from PIL import Image

FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF", "PPM")
MODES = ("RGB", "RGBA", "L", "LA", "P", "1", "CMYK", "I;16", "I", "F")
MAX_SIDE = 3000  # up to 9 Mpx: api_fuzz.sh serves with --max-pixels 4000000
UNCOMPRESSED = ("BMP", "TIFF", "PPM")
MAX_SIDE_UNCOMPRESSED = 700  # at most 4 bytes a pixel: under api_fuzz.sh's --max-upload-mb 2


def encode(mode: str, size: tuple[int, int], colour: int, image_format: str) -> bytes:
    """A solid image in this format, in this mode where the format can store it, else in RGB."""
    image = Image.new(mode, size, colour if mode in ("I;16", "I", "F", "L", "1", "P") else (colour,) * len(mode))
    out = io.BytesIO()
    try:
        image.save(out, format=image_format)
    except (OSError, ValueError, KeyError):
        out = io.BytesIO()
        image.convert("RGB").save(out, format=image_format)
    return out.getvalue()


def png_lying_about_its_size(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims width x height (valid CRC): the decoder must not trust it."""
    data = bytearray(encode("RGB", (1, 1), 7, "PNG"))
    header = b"IHDR" + struct.pack(">II", width, height) + bytes(data[24:29])
    data[12:29] = header
    data[29:33] = struct.pack(">I", zlib.crc32(header))
    return bytes(data)


@st.composite
def image_files(draw) -> bytes:
    if draw(st.integers(0, 9)) == 0:
        data = png_lying_about_its_size(draw(st.integers(1, 2**31 - 1)), draw(st.integers(1, 2**31 - 1)))
    else:
        image_format = draw(st.sampled_from(FORMATS))
        side = st.integers(1, MAX_SIDE_UNCOMPRESSED if image_format in UNCOMPRESSED else MAX_SIDE)
        data = encode(draw(st.sampled_from(MODES)), (draw(side), draw(side)), draw(st.integers(0, 255)), image_format)
    damage = draw(st.sampled_from(("none", "none", "truncate", "flip")))
    if damage == "truncate":
        return data[: draw(st.integers(0, len(data) - 1))]
    if damage == "flip":
        flipped = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            flipped[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
        return bytes(flipped)
    return data


@schemathesis.hook
def flatmap_body(context, body):
    """For POST /search: schemathesis's own body, or the same with a generated image file.

    Only where `image` is already a file's bytes: a body generated to break the schema stays broken."""
    operation = context.operation
    if operation is None or operation.path != "/search" or not isinstance(body, dict):
        return st.just(body)
    if not isinstance(body.get("image"), (bytes, str)):
        return st.just(body)
    return st.one_of(st.just(body), image_files().map(lambda image: {**body, "image": image}))
