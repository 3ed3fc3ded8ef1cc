"""Hostile and odd files: refused formats, decompression bombs, Pillow errors, awkward folders."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import header_bomb_png
from PIL import Image, ImageFile, features
from test_pipeline import ProjectionEncoder, write_images

from fastret.engine.decode import (
    ALLOWED_FORMATS,
    DEFAULT_MAX_PIXELS,
    DEFAULT_SERVER_MAX_PIXELS,
    IMAGE_SUFFIXES,
    ImageError,
    Preprocessing,
    Skipped,
    list_images,
    load_pixels,
)
from fastret.engine.pipeline import decoded_batches
from fastret.engine.retrieval import build_index

SPEC = Preprocessing(size=16, resize=16, interpolation="bilinear", mean=(0.0,) * 3, std=(1.0,) * 3)
RED = (200, 30, 40)
HEIC = struct.pack(">I", 24) + b"ftypheic" + bytes(4) + b"mif1heic" + bytes(64)
"""The start of an iPhone photo: an ISO base media `ftyp` box with the HEIC brands."""


def reason_for(path: Path, **options) -> str:
    with pytest.raises(ImageError) as caught:
        load_pixels(path, SPEC, **options)
    reason = str(caught.value)
    assert "\n" not in reason and reason.strip() == reason
    return reason


def never(*args, **kwargs):
    raise AssertionError("must not be called")


@pytest.fixture
def no_decoding(monkeypatch):
    """Any attempt to decode pixels fails the test."""
    monkeypatch.setattr(ImageFile.ImageFile, "load", never)


def save_frames(path: Path, fmt: str, mode: str, colours: list, **options) -> None:
    frames = [Image.new(mode, (24, 20), colour) for colour in colours]
    frames[0].save(path, fmt, save_all=len(frames) > 1, append_images=frames[1:], **options)


@pytest.mark.parametrize(
    "name, fmt, mode, colours, expected, tolerance",
    [
        ("a.jpg", "JPEG", "RGB", [RED], RED, 4),
        ("a.png", "PNG", "RGB", [RED], RED, 0),
        ("a.webp", "WEBP", "RGB", [RED], RED, 0),
        ("a.gif", "GIF", "RGB", [RED, (0, 0, 255)], RED, 0),  # first frame
        ("a.tiff", "TIFF", "RGB", [RED, (0, 0, 255)], RED, 0),  # first page
        ("a.bmp", "BMP", "RGB", [RED], RED, 0),
        ("a.ppm", "PPM", "RGB", [RED], RED, 0),
        ("a.pgm", "PPM", "L", [90], (90, 90, 90), 0),
        ("a.avif", "AVIF", "RGB", [RED], RED, 6),
    ],
)
def test_allowed_formats_decode(tmp_path, name, fmt, mode, colours, expected, tolerance):
    if fmt not in ALLOWED_FORMATS:
        pytest.skip(f"{fmt} needs a decoder this Pillow lacks")
    options = {"lossless": True} if fmt == "WEBP" else {}
    save_frames(tmp_path / name, fmt, mode, colours, **options)
    crop = load_pixels(tmp_path / name, SPEC)
    assert np.abs(crop.astype(int) - expected).max() <= tolerance


def test_suffixes_are_those_pillow_registers_for_the_allowed_formats():
    registered = Image.registered_extensions()
    assert {registered[suffix] for suffix in IMAGE_SUFFIXES} == set(ALLOWED_FORMATS)
    assert "EPS" not in ALLOWED_FORMATS and ".eps" not in IMAGE_SUFFIXES


@pytest.mark.parametrize(
    "fmt, mode, suffix",
    [("EPS", "RGB", ".eps"), ("JPEG2000", "RGB", ".jp2"), ("DDS", "RGB", ".dds"), ("SGI", "RGB", ".sgi"),
     ("SPIDER", "F", ".spi"), ("IM", "RGB", ".im")],
)
@pytest.mark.parametrize("disguised", [False, True])
@pytest.mark.filterwarnings("ignore:IM image format is deprecated:DeprecationWarning")
def test_refused_formats_are_named_without_their_plugin_reading_them(
    tmp_path, monkeypatch, fmt, mode, suffix, disguised
):
    if fmt == "JPEG2000" and not features.check("jpg_2000"):
        pytest.skip("Pillow cannot write JPEG 2000 here")
    path = tmp_path / f"photo{suffix}"
    Image.new(mode, (8, 8)).save(path, fmt)  # its own suffix: saving SPIDER registers the one it is given
    if disguised:
        path = path.rename(tmp_path / "photo.jpg")
    Image.init()  # all plugins, in Pillow's order, before reaching into them
    from PIL import EpsImagePlugin

    monkeypatch.setattr(Image.OPEN[fmt][0], "_open", never)
    monkeypatch.setattr(EpsImagePlugin, "has_ghostscript", never)
    assert reason_for(path).startswith(f"{fmt} files are not accepted (accepted formats: JPEG, PNG,")


@pytest.mark.skipif("HEIF" in ALLOWED_FORMATS, reason="pillow-heif is installed")
def test_heic_without_its_plugin_says_what_to_install(tmp_path):
    (tmp_path / "IMG_0001.HEIC").write_bytes(HEIC)
    assert reason_for(tmp_path / "IMG_0001.HEIC") == "HEIC needs the pillow-heif plugin: pip install pillow-heif"


def test_server_limit_refuses_a_header_bomb_before_decoding(tmp_path, no_decoding):
    # 10000 x 10000 pixels in ~12 KB: the default limit's size, over the server's.
    (tmp_path / "bomb.png").write_bytes(header_bomb_png(10_000))
    assert (tmp_path / "bomb.png").stat().st_size < 300_000
    assert 10_000 * 10_000 <= DEFAULT_MAX_PIXELS
    reason = reason_for(tmp_path / "bomb.png", max_pixels=DEFAULT_SERVER_MAX_PIXELS)
    assert reason == (
        f"too large: 10000x10000 = 100,000,000 pixels exceeds the limit of {DEFAULT_SERVER_MAX_PIXELS:,} "
        "(possible decompression bomb)"
    )


def tiled_tiff(side: int, tile: int) -> bytes:
    """A deflated greyscale TIFF of side x side pixels in one declared tile of tile x tile."""
    data = zlib.compress(bytes(side * side))
    # (tag, type: 3 short / 4 long, value), in tag order; little-endian, a short fills a long's slot
    tags = [
        (256, 4, side), (257, 4, side), (258, 3, 8), (259, 3, 8), (262, 3, 1), (277, 3, 1),
        (322, 4, tile), (323, 4, tile), (324, 4, 8), (325, 4, len(data)),
    ]
    ifd = struct.pack("<H", len(tags)) + b"".join(struct.pack("<HHII", tag, kind, 1, value) for tag, kind, value in tags)
    return b"II*\x00" + struct.pack("<I", 8 + len(data)) + data + ifd + bytes(4)


def test_tiff_tiles_count_against_the_limit(tmp_path, no_decoding):
    # libtiff allocates a whole tile: 32768 x 32768 declared for a 16 x 16 image is 1 GiB.
    (tmp_path / "tiles.tif").write_bytes(tiled_tiff(16, 32768))
    assert reason_for(tmp_path / "tiles.tif").startswith(
        f"too large: TIFF tiles of 32768x32768 = 1,073,741,824 pixels exceed the limit of {DEFAULT_MAX_PIXELS:,}"
    )


def test_small_tiff_tiles_decode(tmp_path):
    (tmp_path / "tiles.tif").write_bytes(tiled_tiff(16, 16))
    assert (load_pixels(tmp_path / "tiles.tif", SPEC) == 0).all()


@pytest.mark.parametrize(
    "error, reason",
    [
        (struct.error("unpack requires a buffer of 4 bytes"), "cannot decode: unpack requires a buffer of 4 bytes"),
        (ValueError("tile cannot extend\noutside image"), "cannot decode: tile cannot extend outside image"),
        (KeyError("mode"), "cannot decode: 'mode'"),
        (MemoryError(), "cannot decode: MemoryError"),
    ],
)
def test_any_decoder_error_is_a_one_line_image_error(tmp_path, monkeypatch, error, reason):
    Image.new("RGB", (20, 20)).save(tmp_path / "a.png")

    def fail(self):
        raise error

    monkeypatch.setattr(ImageFile.ImageFile, "load", fail)
    assert reason_for(tmp_path / "a.png") == reason


@pytest.mark.parametrize(
    "error, reason",
    [
        (ValueError("bad\nheader"), "cannot open: bad header"),
        (struct.error("short header"), "damaged PNG header"),  # Pillow itself turns this into 'unidentified'
    ],
)
def test_any_opener_error_is_a_one_line_image_error(tmp_path, monkeypatch, error, reason):
    Image.new("RGB", (20, 20)).save(tmp_path / "a.png")

    def fail(self):
        raise error

    Image.init()
    monkeypatch.setattr(Image.OPEN["PNG"][0], "_open", fail)
    assert reason_for(tmp_path / "a.png") == reason


def test_lowered_limit_reaches_the_decoder_threads(tmp_path):
    paths = write_images(tmp_path, 3)
    batches = list(decoded_batches(paths, SPEC, batch_size=2, workers=1, max_pixels=100))
    assert [s.path for b in batches for s in b.skipped] == paths


def make_tree(root: Path, names: list[str]) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")


def relative(root: Path, paths) -> list[str]:
    return [Path(p).relative_to(root).as_posix() for p in paths]


HIDDEN_TREE = ["a.jpg", ".b.jpg", "._a.jpg", ".thumbnails/t.jpg", "sub/.cache/x.png", "sub/c.png"]


@pytest.mark.parametrize(
    "include_hidden, expected",
    [(False, ["a.jpg", "sub/c.png"]), (True, sorted(HIDDEN_TREE, key=Path))],
)
def test_hidden_files_and_folders_are_left_out_by_default(tmp_path, include_hidden, expected):
    make_tree(tmp_path, HIDDEN_TREE)
    skipped = []
    assert relative(tmp_path, list_images(tmp_path, include_hidden=include_hidden, on_skip=skipped.append)) == expected
    assert skipped == []


def test_unlistable_things_are_reported_and_links_do_not_loop(tmp_path, monkeypatch):
    make_tree(tmp_path, ["a.jpg", "sub/c.png", "locked/d.png", "notes.txt"])
    (tmp_path / "IMG_1.heic").write_bytes(HEIC)
    (tmp_path / "link.jpg").symlink_to("a.jpg")  # a symlink to a file in the tree: listed
    (tmp_path / "gone.jpg").symlink_to("missing.jpg")
    (tmp_path / "gone.txt").symlink_to("missing.txt")  # not an image name: not reported
    (tmp_path / "loop1.png").symlink_to("loop2.png")
    (tmp_path / "loop2.png").symlink_to("loop1.png")
    (tmp_path / "sub" / "up").symlink_to("..")  # a folder loop
    (tmp_path / "alias").symlink_to("sub")
    real_scandir = os.scandir

    def scandir(path):  # chmod 000 does not stop root, so refuse the folder here
        if Path(path) == tmp_path / "locked":
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    skipped: list[Skipped] = []
    assert relative(tmp_path, list_images(tmp_path, on_skip=skipped.append)) == ["a.jpg", "link.jpg", "sub/c.png"]
    reasons = {Path(s.path).relative_to(tmp_path).as_posix(): s.reason for s in skipped}
    heic_reason = "HEIC needs the pillow-heif plugin: pip install pillow-heif"
    heic = {} if "HEIF" in ALLOWED_FORMATS else {"IMG_1.heic": heic_reason}
    assert reasons == {
        "alias": "symlinked folder, not followed",
        "gone.jpg": "broken symlink: No such file or directory",
        "locked": "cannot list folder: Permission denied",
        "loop1.png": "broken symlink: Too many levels of symbolic links",
        "loop2.png": "broken symlink: Too many levels of symbolic links",
        "sub/up": "symlinked folder, not followed",
        **heic,
    }
    assert [s.path for s in skipped] == sorted(s.path for s in skipped)


def test_build_index_counts_and_reports_what_the_listing_left_out(tmp_path):
    write_images(tmp_path / "cats", 2)
    write_images(tmp_path / ".trash", 1)
    (tmp_path / "cats" / "gone.png").symlink_to("missing.png")
    reported: list[Skipped] = []
    index, result = build_index(tmp_path, ProjectionEncoder(), workers=0, on_skip=reported.append)
    assert [item.path for item in index.items] == ["cats/00.png", "cats/01.png"]
    assert [s.path.name for s in result.skipped] == [s.path.name for s in reported] == ["gone.png"]
    with_hidden, _ = build_index(tmp_path, ProjectionEncoder(), workers=0, include_hidden=True)
    assert len(with_hidden) == 3
