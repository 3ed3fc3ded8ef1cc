"""Shared fixtures: real data when present, a tiny random CLIP, and an isolated model cache."""

from __future__ import annotations

import os
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("FASTRET_DATA", REPO.parent / "shared" / "data"))
WANG1K = DATA / "wang1k"
ANIMALS = DATA / "animals10-mini"

# Tests never reach a model hub: `auto` must fall back at once.
os.environ["HF_HUB_OFFLINE"] = "1"


def require_dir(path: Path) -> Path:
    if not path.is_dir():
        pytest.skip(f"{path} is absent (the shared evaluation images are not on this machine)")
    return path


@pytest.fixture(scope="session")
def wang1k() -> Path:
    return require_dir(WANG1K)


@pytest.fixture(scope="session")
def animals10() -> Path:
    return require_dir(ANIMALS)


@pytest.fixture(scope="session")
def wang1k_index(wang1k, tmp_path_factory) -> Path:
    """wang1k indexed by `fastret index` with the ONNX Runtime fp32 encoder (the bundled model as exported)."""
    from fastret.cli.main import main

    out = tmp_path_factory.mktemp("wang1k") / "index"
    argv = ["index", str(wang1k), "--model", "efficientnet-lite2", "--backend", "onnxruntime", "--out", str(out), "-q"]
    assert main(argv) == 0
    return out


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory) -> Path:
    """One export cache for the whole session, never the user's ~/.cache."""
    cache = tmp_path_factory.mktemp("fastret-cache")
    os.environ["FASTRET_CACHE"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """A randomly initialised CLIP vision tower + projection, saved like a real checkpoint."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=16,
    )
    directory = tmp_path_factory.mktemp("tiny-clip")
    CLIPVisionModelWithProjection(config).eval().save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def bundled_source():
    from fastret.export.models import bundled_source as make

    return make()


@pytest.fixture(scope="session")
def bundled_onnx(bundled_source, model_cache):
    """The bundled model's ONNX encoder (exported once per session)."""
    from fastret.service.load import encoder_for_source

    return encoder_for_source(bundled_source, "onnxruntime", log=lambda _: None)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    import struct
    import zlib

    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def header_bomb_png(side: int) -> bytes:
    """A valid 1-bit black PNG of side x side pixels: tens of KB on disk, side² pixels decoded."""
    import struct
    import zlib

    row = bytes(1 + (side + 7) // 8)  # filter byte + packed bits
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return (
        b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")
    )


@pytest.fixture(scope="session")
def bad_images(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """One file of each broken kind: name -> (path, a fragment its skip reason must contain)."""
    import io

    import numpy as np
    from PIL import Image

    folder = tmp_path_factory.mktemp("bad-images")
    rng = np.random.default_rng(0)
    jpeg = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)).save(jpeg, "JPEG", quality=90)
    contents = {
        "empty.jpg": (b"", "empty file"),
        "truncated.jpg": (jpeg.getvalue()[: len(jpeg.getvalue()) // 2], "truncated"),
        "corrupt.jpg": (rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(), "not an image"),
        "text.png": (b"this is a text file, not a picture\n", "not an image"),
        "bomb.png": (header_bomb_png(20_000), "decompression bomb"),
    }
    found = {}
    for name, (data, reason) in contents.items():
        (folder / name).write_bytes(data)
        found[name] = (folder / name, reason)
    return found


@pytest.fixture(scope="session")
def odd_mode_images(tmp_path_factory) -> dict[str, tuple[Path, tuple[int, int, int]]]:
    """Uniform images in unusual modes: name -> (path, the RGB every pixel must decode to)."""
    import numpy as np
    from PIL import Image

    folder = tmp_path_factory.mktemp("odd-modes")
    palette = [0, 0, 0, 10, 200, 30] + [0] * (256 * 3 - 6)
    made = {}

    def save(name: str, img: Image.Image, rgb: tuple[int, int, int], **options) -> None:
        img.save(folder / name, **options)
        made[name] = (folder / name, rgb)

    save("cmyk.jpg", Image.new("CMYK", (90, 60), (0, 255, 255, 0)), (255, 0, 0), quality=95)
    opaque = Image.new("P", (70, 50), 1)
    opaque.putpalette(palette)
    save("palette.png", opaque, (10, 200, 30))
    clear = Image.new("P", (70, 50), 0)  # index 0 is black in the palette, but transparent
    clear.putpalette(palette)
    save("palette-transparent.png", clear, (255, 255, 255), transparency=0)
    save("la.png", Image.new("LA", (50, 70), (0, 0)), (255, 255, 255))
    save("grey16.png", Image.fromarray(np.full((60, 80), 65535, np.uint16)), (255, 255, 255))
    save("rgba.png", Image.new("RGBA", (64, 64), (0, 0, 0, 0)), (255, 255, 255))
    return made


TINY_CLIP_VOCAB = (
    "l", "o", "w", "e", "r", "s", "t", "i", "d", "n", "lo", "l</w>", "w</w>", "r</w>", "t</w>",
    "low</w>", "er</w>", "lowest</w>", "newer</w>", "wider", "<unk>", "<|startoftext|>", "<|endoftext|>",
)
"""transformers' own CLIP tokenizer test vocabulary: a few byte-level BPE pieces and the special tokens."""
TINY_CLIP_MERGES = "#version: 0.2\nl o\nlo w</w>\ne r</w>\n"


@pytest.fixture(scope="session")
def tiny_full_clip_dir(tmp_path_factory) -> Path:
    """A randomly initialised full CLIP (vision and text towers, CLIPConfig) with a tiny tokenizer,
    saved as a real checkpoint is: config.json (whose sub-configs repeat transformers' default
    projection_dim 512 while the model projects to 16, as the bug report's checkpoints do),
    model.safetensors, vocab.json + merges.txt and what the tokenizer saves beside them."""
    import json

    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizerFast

    directory = tmp_path_factory.mktemp("tiny-full-clip")
    (directory / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(TINY_CLIP_VOCAB)}))
    (directory / "merges.txt").write_text(TINY_CLIP_MERGES)
    (directory / "special_tokens_map.json").write_text(json.dumps({"unk_token": "<unk>"}))
    tokenizer = CLIPTokenizerFast.from_pretrained(directory)
    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(TINY_CLIP_VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16, **special),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    CLIPModel(config).eval().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
# --- the browser tests (tests/test_web_*.py) ------------------------------------------------------

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]


@pytest.fixture(scope="session")
def browser():
    """Headless Chromium driven by Playwright, one for the whole session (its sync API does not nest)."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (dev extra)")
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} is absent: install it with `apt-get install chromium` (.ci/run does)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="session")
def live_server():
    """live_server(app): a context manager serving the app with uvicorn on a free loopback port, in a
    thread, yielding its base URL."""
    uvicorn = pytest.importorskip("uvicorn", reason="the web extra is not installed: pip install 'fastret[web]'")

    @contextmanager
    def serve(app):
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        try:
            yield f"http://127.0.0.1:{listener.getsockname()[1]}"
        finally:
            server.should_exit = True
            thread.join(timeout=10)
            listener.close()

    return serve
