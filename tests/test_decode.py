"""Decoding: odd modes become correct RGB crops, broken files become one-line ImageErrors."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import ExifTags, Image, ImageDraw
from test_pipeline import photo_like

from fastret.engine.decode import (
    ImageError,
    Preprocessing,
    list_images,
    load_pixels,
    resize_and_crop,
    to_rgb,
    transposed_box,
)
from fastret.engine.pipeline import decode_batch
from fastret.web.items import thumbnail_jpeg

SPEC = Preprocessing(size=32, resize=36, interpolation="bilinear", mean=(0.0,) * 3, std=(1.0,) * 3)


@pytest.mark.parametrize("draft", [True, False])
def test_odd_modes_decode_to_the_right_rgb(odd_mode_images, draft):
    for name, (path, rgb) in odd_mode_images.items():
        crop = load_pixels(path, SPEC, draft=draft)
        assert crop.shape == (32, 32, 3) and crop.dtype == np.uint8, name
        # JPEG (the CMYK file) is lossy; the PNGs must be exact.
        tolerance = 4 if path.suffix == ".jpg" else 0
        assert np.abs(crop.astype(int) - rgb).max() <= tolerance, (name, crop[16, 16], rgb)


def test_sixteen_bit_grey_scales_to_eight_bits(tmp_path):
    ramp = np.array([[0, 257, 32768, 65535]], np.uint16).repeat(4, axis=0)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    img = Image.open(tmp_path / "ramp.png")
    assert img.mode == "I;16"
    rgb = np.asarray(to_rgb(img))
    assert rgb[0, :, 0].tolist() == [0, 1, 127, 255]
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()


def test_alpha_is_composited_on_white():
    half = np.zeros((2, 2, 4), np.uint8)
    half[0] = (200, 0, 0, 255)  # opaque red row
    half[1] = (0, 0, 200, 0)  # fully transparent blue row
    rgb = np.asarray(to_rgb(Image.fromarray(half, "RGBA")))
    assert rgb[0].tolist() == [[200, 0, 0]] * 2
    assert rgb[1].tolist() == [[255, 255, 255]] * 2
    grey = np.asarray(to_rgb(Image.fromarray(np.array([[[50, 255], [50, 0]]], np.uint8), "LA")))
    assert grey[0].tolist() == [[50, 50, 50], [255, 255, 255]]


def test_palette_with_transparency_keeps_opaque_colours(tmp_path):
    img = Image.new("P", (2, 1), 0)
    img.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    img.putpixel((1, 0), 1)
    img.save(tmp_path / "p.png", transparency=0)
    assert np.asarray(to_rgb(Image.open(tmp_path / "p.png"))).tolist() == [[[255, 255, 255], [10, 200, 30]]]


@pytest.mark.parametrize("draft", [True, False])
def test_broken_files_raise_a_one_line_reason(bad_images, draft):
    for name, (path, fragment) in bad_images.items():
        with pytest.raises(ImageError) as caught:
            load_pixels(path, SPEC, draft=draft)
        reason = str(caught.value)
        assert fragment in reason, (name, reason)
        assert "\n" not in reason and reason.strip() == reason, name


def test_lowered_max_pixels_refuses_a_real_image(tmp_path):
    Image.new("RGB", (100, 80), (1, 2, 3)).save(tmp_path / "ok.png")
    assert load_pixels(tmp_path / "ok.png", SPEC, max_pixels=8000).shape == (32, 32, 3)
    with pytest.raises(ImageError, match=r"100x80 = 8,000 pixels exceeds the limit of 7,999"):
        load_pixels(tmp_path / "ok.png", SPEC, max_pixels=7999)


def test_decode_batch_skips_each_broken_file_naming_it(bad_images, odd_mode_images, tmp_path):
    good = [path for path, _ in odd_mode_images.values()]
    bad = [path for path, _ in bad_images.values()]
    mixed = [p for pair in zip(good, bad) for p in pair] + good[len(bad) :]
    batch = decode_batch(mixed, SPEC)
    assert batch.paths == good  # input order kept
    assert batch.pixels.shape == (len(good), 32, 32, 3)
    assert [s.path for s in batch.skipped] == bad
    for skip in batch.skipped:
        line = skip.line()
        assert line.startswith(f"skipped {skip.path}: ") and "\n" not in line
    # The same lowered limit the engine applies at open time reaches through the batch helper.
    lowered = decode_batch(good, SPEC, max_pixels=100)
    assert lowered.paths == [] and all("decompression bomb" in s.reason for s in lowered.skipped)


@pytest.mark.parametrize("size, expected", [((400, 100), (32, 32)), ((100, 400), (32, 32)), ((20, 10), (32, 32))])
def test_resize_and_crop_gives_the_model_square(size, expected):
    assert resize_and_crop(Image.new("RGB", size), SPEC).size == expected


def test_centre_crop_keeps_the_middle():
    # A wide image, left third red, middle green, right third blue: the crop sees only green.
    wide = np.zeros((60, 180, 3), np.uint8)
    wide[:, :60, 0] = wide[:, 60:120, 1] = wide[:, 120:, 2] = 255
    crop = np.asarray(resize_and_crop(Image.fromarray(wide), Preprocessing(32, 32, "bilinear", (0,) * 3, (1,) * 3)))
    assert (crop[:, 4:-4] == (0, 255, 0)).all()


def test_list_images_is_sorted_and_filters_by_suffix(tmp_path):
    for name in ["b/2.JPG", "a/1.png", "a/notes.txt", "b/1.jpeg", "c.webp", "d/e.tif"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "folder.jpg").mkdir()
    found = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)]
    assert found == ["a/1.png", "b/1.jpeg", "b/2.JPG", "c.webp", "d/e.tif"]
    with pytest.raises(FileNotFoundError):
        list_images(tmp_path / "missing")


STORED_AS = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}
"""EXIF orientation -> how a camera stores an upright scene under it (the inverse of the fix)."""


def save_oriented(upright: Image.Image, orientation: int, path, **options) -> None:
    turn = STORED_AS[orientation]
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    (upright if turn is None else upright.transpose(turn)).save(path, exif=exif, **options)


@pytest.mark.parametrize("orientation", STORED_AS)
@pytest.mark.parametrize(
    "suffix, draft, mean_abs_tolerance",
    # JPEG: re-encoding the turned pixels and the partial 8x8 blocks at other edges cost ~1/255.
    [(".jpg", True, 1.5), (".jpg", False, 1.5), (".png", True, 0.0), (".png", False, 0.0)],
)
def test_exif_orientation_is_applied(tmp_path, orientation, suffix, draft, mean_abs_tolerance):
    # 301 x 190 does not divide by the 1/4 DCT scale: the crop box must turn with the pixels.
    upright = photo_like(301, 190)
    save_oriented(upright, 1, tmp_path / f"upright{suffix}", quality=95)
    save_oriented(upright, orientation, tmp_path / f"stored{suffix}", quality=95)
    expected, crop = (load_pixels(tmp_path / f"{name}{suffix}", SPEC, draft=draft) for name in ("upright", "stored"))
    assert np.abs(crop.astype(int) - expected).mean() <= mean_abs_tolerance


@pytest.mark.parametrize("orientation", STORED_AS)
def test_thumbnails_are_upright(tmp_path, orientation):
    upright = photo_like(600, 380)
    save_oriented(upright, 1, tmp_path / "upright.jpg", quality=95)
    save_oriented(upright, orientation, tmp_path / "stored.jpg", quality=95)
    expected, thumbnail = (
        Image.open(io.BytesIO(thumbnail_jpeg(tmp_path / name, 128))) for name in ("upright.jpg", "stored.jpg")
    )
    assert thumbnail.size == expected.size == (128, 81)
    assert np.abs(np.asarray(thumbnail, dtype=int) - np.asarray(expected)).mean() <= 2.0


@pytest.mark.parametrize("transposition", list(Image.Transpose))
def test_transposed_box_follows_the_pixels(transposition):
    img = Image.new("L", (40, 30))
    ImageDraw.Draw(img).rectangle((3, 5, 16, 10), fill=255)  # covers the box (3, 5, 17, 11)
    assert transposed_box((3, 5, 17, 11), img.size, transposition) == img.transpose(transposition).getbbox()
