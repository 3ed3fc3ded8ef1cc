"""End to end: headless Chromium opens the page's Duplicates view against a live server.

The gallery is a few wang1k photos plus copies of some of them made here (resized, cropped,
brightened, mirrored), indexed with the bundled model. Needs /usr/bin/chromium and playwright
(skips with the reason otherwise): the `browser` and `live_server` fixtures of conftest.py. Set
FASTRET_DUPLICATES_SCREENSHOT=PATH to keep the screenshot (docs/web-duplicates.png is made this way).
"""

from __future__ import annotations

import os
import shutil

import pytest
from PIL import Image, ImageEnhance

pytestmark = pytest.mark.data
pytest.importorskip("uvicorn", reason="the web extra is not installed: pip install 'fastret[web]'")
pytest.importorskip("playwright.sync_api", reason="playwright is not installed (dev extra)")
ORIGINALS = ["beach/117.jpg", "buses/330.jpg", "flowers/640.jpg", "horses/705.jpg", "mountains/837.jpg", "food/918.jpg",
             "food/924.jpg", "elephants/521.jpg", "elephants/564.jpg"]
COPIES = {  # original -> {copy name: how it is made}
    "beach/117.jpg": {"117-chat.jpg": lambda img: img.resize((192, 128), Image.Resampling.LANCZOS),
                      "117-mirror.jpg": lambda img: img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)},
    "buses/330.jpg": {"330-crop.jpg": lambda img: img.crop((30, 20, 370, 246))},
    "flowers/640.jpg": {"640-bright.jpg": lambda img: ImageEnhance.Brightness(img).enhance(1.35)},
}


@pytest.fixture(scope="module")
def duplicates_server(wang1k, bundled_onnx, live_server, tmp_path_factory):
    from fastret.engine.retrieval import build_index
    from fastret.service.search import Retriever
    from fastret.web.app import create_app

    gallery = tmp_path_factory.mktemp("gallery")
    for name in ORIGINALS:
        shutil.copy(wang1k / name, gallery / name.replace("/", "-"))
    for original, copies in COPIES.items():
        with Image.open(wang1k / original) as img:
            for name, make in copies.items():
                make(img.convert("RGB")).save(gallery / name, quality=60)
    index, _ = build_index(gallery, bundled_onnx)
    with live_server(create_app(Retriever(index, bundled_onnx))) as url:
        yield url


def test_duplicates_view_shows_each_group_with_the_kept_photo_first(duplicates_server, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1100, "height": 760})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(duplicates_server)
    assert page.locator("#duplicates-view").is_hidden()
    page.click("#tab-duplicates")
    assert page.locator("#search-view").is_hidden()
    page.wait_for_function("() => document.getElementById('duplicate-status').textContent.includes('groups,')")
    page.wait_for_function("() => [...document.querySelectorAll('#groups img')].every(i => i.complete && i.naturalWidth > 0)")

    groups = page.locator("#groups .group")
    found = [groups.nth(n).locator(".path").all_text_contents() for n in range(groups.count())]
    # The kept photo first (largest resolution, then largest file); food 918/924 is one photo
    # re-cropped, while the elephants 521/564, shot a moment apart, are no duplicates.
    assert {paths[0]: set(paths[1:]) for paths in found} == {
        "beach-117.jpg": {"117-mirror.jpg", "117-chat.jpg"},
        "buses-330.jpg": {"330-crop.jpg"},
        "flowers-640.jpg": {"640-bright.jpg"},
        "food-918.jpg": {"food-924.jpg"},
    }
    roles = [groups.nth(n).locator(".role").all_text_contents() for n in range(groups.count())]
    assert all(role[0] == "keep" and set(role[1:]) == {"duplicate"} for role in roles)
    assert page.locator("#groups .copy.kept").count() == groups.count()
    status = page.locator("#duplicate-status").text_content()
    assert "(auto)" in status and "kept: largest resolution, then largest file, then oldest" in status
    mirrored = page.locator("#groups .copy", has_text="117-mirror.jpg").locator(".reason").text_content()
    assert mirrored.startswith("near-duplicate") and mirrored.endswith("mirrored")

    page.screenshot(path=str(tmp_path / "web-duplicates.png"), full_page=True)
    if os.environ.get("FASTRET_DUPLICATES_SCREENSHOT"):
        shutil.copy(tmp_path / "web-duplicates.png", os.environ["FASTRET_DUPLICATES_SCREENSHOT"])

    page.select_option("#threshold", "0.9")
    page.wait_for_function("() => document.getElementById('duplicate-status').textContent.includes('threshold 0.9 ·')")
    page.click("#tab-search")
    assert page.locator("#duplicates-view").is_hidden() and page.locator("#search-view").is_visible()
    assert errors == []

