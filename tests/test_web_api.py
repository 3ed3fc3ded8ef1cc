"""The HTTP API: search results, error handling of hostile uploads, path safety, batching.

Most tests use a 3-d "mean colour" encoder over generated solid-colour images: no model, no
data, and a ground truth anyone can see (a red query's nearest items are red).
"""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the web extra is not installed: pip install 'fastret[web]'")
httpx = pytest.importorskip("httpx", reason="httpx is not installed (dev extra)")
from fastapi.testclient import TestClient  # noqa: E402

from fastret.engine.decode import load_pixels  # noqa: E402
from fastret.engine.index import FORMAT_VERSION, BadIndex  # noqa: E402
from fastret.engine.retrieval import build_index  # noqa: E402
from fastret.service.search import Retriever  # noqa: E402
from fastret.web.app import create_app  # noqa: E402
from fastret.web.batcher import MicroBatcher  # noqa: E402
from fakes import COLOUR_SPEC as SPEC, MeanColourEncoder  # noqa: E402

COLOURS = {"red": (230, 20, 20), "green": (20, 230, 20), "blue": (20, 20, 230), "yellow": (230, 230, 20)}


def solid_jpeg(colour: tuple[int, int, int], size=(300, 200), shift: int = 0) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, tuple(min(255, c + shift) for c in colour)).save(out, format="JPEG")
    return out.getvalue()


def noise_jpeg() -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(out, format="JPEG")
    return out.getvalue()


NOISE_JPEG = noise_jpeg()


@pytest.fixture(scope="module")
def gallery(tmp_path_factory) -> Path:
    """4 colour classes x 3 JPEGs, plus red/escape.jpg: a symlink to a file outside the root."""
    base = tmp_path_factory.mktemp("web-gallery")
    root = base / "gallery"
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True)
        for n in range(3):
            (root / name / f"{n}.jpg").write_bytes(solid_jpeg(colour, shift=10 * n))
    secret = base / "outside" / "secret.jpg"
    secret.parent.mkdir()
    secret.write_bytes(solid_jpeg(COLOURS["red"]))
    (root / "red" / "escape.jpg").symlink_to(secret)
    return root


@pytest.fixture(scope="module")
def colour_index(gallery):
    index, _ = build_index(gallery, MeanColourEncoder(), workers=0)
    return index


@pytest.fixture()
def client(colour_index):
    with TestClient(create_app(Retriever(colour_index, MeanColourEncoder()), max_upload_bytes=100_000)) as client:
        yield client


def item_id(index, path: str) -> int:
    return next(i for i, item in enumerate(index.items) if item.path == path)


def upload(client, data: bytes, name: str = "q.jpg", **params):
    return client.post("/search", files={"image": (name, data, "image/jpeg")}, params=params)


def test_load_pixels_reads_an_in_memory_file_like_the_same_file_on_disk(gallery):
    path = gallery / "blue" / "1.jpg"
    from_disk = load_pixels(path, SPEC)
    from_memory = load_pixels(io.BytesIO(path.read_bytes()), SPEC)
    np.testing.assert_array_equal(from_memory, from_disk)


def test_health_names_model_count_and_format(client, colour_index):
    body = client.get("/health").json()
    assert body["model"] == "test-mean-colour"
    assert body["count"] == len(colour_index) == 13
    assert body["index_format_version"] == FORMAT_VERSION
    assert body["dim"] == 3


def test_upload_search_ranks_the_query_colour_first(client):
    response = upload(client, solid_jpeg(COLOURS["green"], shift=5), k=3)
    assert response.status_code == 200
    body = response.json()
    assert [hit["label"] for hit in body["results"]] == ["green"] * 3
    assert [hit["rank"] for hit in body["results"]] == [1, 2, 3]
    assert set(body["results"][0]) == {"rank", "id", "path", "path_bytes_b64", "label", "score"}
    scores = [hit["score"] for hit in body["results"]]
    assert scores == sorted(scores, reverse=True) and scores[0] > 0.99
    assert body["query"] == "upload:q.jpg" and body["timing"]["batch_size"] >= 1


def test_softmax_scores_are_probabilities(client):
    body = upload(client, solid_jpeg(COLOURS["blue"]), k=13, score="softmax", exact=True).json()
    total = sum(hit["score"] for hit in body["results"])
    assert body["score"] == "softmax" and total == pytest.approx(1.0, abs=1e-5)


def test_search_by_item_leaves_the_item_out(client, colour_index):
    query = item_id(colour_index, "yellow/0.jpg")
    body = client.post(f"/search/item/{query}", params={"k": 2}).json()
    assert body["query"] == f"item:{query}"
    assert query not in [hit["id"] for hit in body["results"]]
    assert [hit["label"] for hit in body["results"]] == ["yellow", "yellow"]


@pytest.mark.parametrize(
    ("data", "status", "reason"),
    [
        (b"", 400, "empty upload"),
        (b"just some text, not an image", 400, "not an image"),
        (NOISE_JPEG[: len(NOISE_JPEG) * 2 // 3], 400, "truncated"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, 400, "q.jpg"),
        (b"x" * 100_001, 413, "limit"),  # over the upload cap, within the body allowance
        (b"x" * 1_000_000, 413, "limit"),  # over the whole-body cap: refused before parsing
    ],
    ids=["empty", "text", "truncated-jpeg", "broken-png", "oversized", "far-oversized"],
)
def test_bad_uploads_get_a_4xx_with_a_reason(client, data, status, reason):
    response = upload(client, data)
    assert response.status_code == status
    assert reason in response.json()["detail"]


def test_decompression_bomb_is_refused(colour_index):
    with TestClient(create_app(Retriever(colour_index, MeanColourEncoder()), max_pixels=100 * 100)) as client:
        response = upload(client, solid_jpeg(COLOURS["red"], size=(101, 100)))
    assert response.status_code == 400
    assert "decompression bomb" in response.json()["detail"]


@pytest.mark.parametrize(
    "request_args",
    [
        {"data": {"k": "3"}},  # no file field at all
        {"params": {"k": 0}, "files": {"image": ("q.jpg", solid_jpeg((1, 2, 3)))}},
        {"params": {"score": "dot"}, "files": {"image": ("q.jpg", solid_jpeg((1, 2, 3)))}},
    ],
    ids=["missing-file", "k-zero", "unknown-score"],
)
def test_malformed_requests_get_422(client, request_args):
    response = client.post("/search", **request_args)
    assert response.status_code == 422
    assert response.json()["detail"]


def test_thumbnail_is_a_small_jpeg_of_the_item(client, colour_index):
    response = client.get(f"/items/{item_id(colour_index, 'blue/0.jpg')}/thumbnail")
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    thumb = Image.open(io.BytesIO(response.content))
    assert thumb.size == (256, 171)
    assert np.asarray(thumb)[80, 120, 2] > 200  # still blue


def test_original_image_is_served_byte_for_byte(client, colour_index, gallery):
    response = client.get(f"/items/{item_id(colour_index, 'green/2.jpg')}/image")
    assert response.status_code == 200
    assert response.content == (gallery / "green" / "2.jpg").read_bytes()


@pytest.mark.parametrize(
    "url",
    [
        "/items/../../etc/passwd",
        "/items/..%2f..%2fetc%2fpasswd/thumbnail",
        "/items/%2e%2e%2f%2e%2e%2fetc%2fpasswd/image",
        "/items/%2e%2e/image",
        "/items/%2fetc%2fpasswd/image",
        "/items//etc/passwd/image",
        "/items/-1/thumbnail",
        "/items/1e1/image",
        "/items/%EF%BC%91/image",  # a full-width digit: isdigit() but not an ASCII id
        "/items/13/image",  # one past the last item
        "/static/..%2f..%2fapp.py",
        "/static/%2e%2e/%2e%2e/engine/index.py",
    ],
)
def test_traversal_attempts_are_404(client, url):
    assert client.get(url).status_code == 404


def test_symlink_escaping_the_root_is_not_served(client, colour_index):
    escape = item_id(colour_index, "red/escape.jpg")
    for kind in ("thumbnail", "image"):
        response = client.get(f"/items/{escape}/{kind}")
        assert response.status_code == 404
        assert "outside the index root" in response.json()["detail"]


def test_item_replaced_by_an_escaping_symlink_after_indexing_is_not_served(colour_index, gallery, tmp_path):
    victim = gallery / "green" / "1.jpg"
    original = victim.read_bytes()
    (tmp_path / "elsewhere.jpg").write_bytes(original)
    victim.unlink()
    victim.symlink_to(tmp_path / "elsewhere.jpg")
    try:
        with TestClient(create_app(Retriever(colour_index, MeanColourEncoder()))) as client:
            assert client.get(f"/items/{item_id(colour_index, 'green/1.jpg')}/image").status_code == 404
    finally:
        victim.unlink()
        victim.write_bytes(original)


def test_encoder_of_another_model_is_refused(colour_index):
    with pytest.raises(BadIndex, match="re-index"):
        create_app(Retriever(colour_index, MeanColourEncoder(model_id="another-model")))


def test_openapi_schema_lists_the_endpoints(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/search", "/search/item/{item_id}", "/items/{item_id}/thumbnail", "/health"} <= set(paths)


def test_page_and_its_assets_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and "app.js" in page.text
    assert client.get("/static/app.js").status_code == 200
    assert page.headers["x-content-type-options"] == "nosniff"


def test_concurrent_uploads_are_batched_and_each_gets_its_own_results(colour_index):
    """24 queries at once through a slow encoder: fewer encoder calls, every answer its own colour."""
    encoder = MeanColourEncoder(delay_s=0.05)
    app = create_app(Retriever(colour_index, encoder))
    names = list(COLOURS) * 6

    async def run_all():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await asyncio.gather(
                *(
                    client.post("/search", files={"image": (f"{n}.jpg", solid_jpeg(COLOURS[name]))}, params={"k": 3})
                    for n, name in enumerate(names)
                )
            )

    responses = asyncio.run(run_all())
    for n, (name, response) in enumerate(zip(names, responses)):
        body = response.json()
        assert body["query"] == f"upload:{n}.jpg"
        assert [hit["label"] for hit in body["results"]] == [name] * 3
    assert sum(encoder.batch_sizes) == len(names)
    assert max(encoder.batch_sizes) > 1
    assert max(r.json()["timing"]["batch_size"] for r in responses) == max(encoder.batch_sizes)


def test_batcher_passes_encoder_errors_to_callers_and_keeps_serving():
    class Flaky(MeanColourEncoder):
        def encode(self, pixels):
            if pixels[0, 0, 0, 0] == 0:
                raise RuntimeError("encoder failed")
            return super().encode(pixels)

    batcher = MicroBatcher(Flaky(), max_batch=1)
    try:
        bad = batcher.submit(np.zeros((32, 32, 3), np.uint8))
        good = batcher.submit(np.full((32, 32, 3), 200, np.uint8))
        with pytest.raises(RuntimeError, match="encoder failed"):
            bad.result(timeout=10)
        assert good.result(timeout=10).embedding.shape == (3,)
    finally:
        batcher.close()


def test_batcher_refuses_a_zero_batch():
    with pytest.raises(ValueError, match="max_batch"):
        MicroBatcher(MeanColourEncoder(), max_batch=0)


@pytest.mark.data
def test_concurrent_wang1k_uploads_find_themselves_with_the_real_model(wang1k, bundled_onnx, tmp_path):
    """A few real photos, indexed with the bundled model; each upload, sent at once, finds itself first."""
    classes = ["buildings", "horses", "flowers", "dinosaurs"]
    for name in classes:
        (tmp_path / name).mkdir()
        for path in sorted((wang1k / name).glob("*.jpg"))[:3]:
            (tmp_path / name / path.name).write_bytes(path.read_bytes())
    index, _ = build_index(tmp_path, bundled_onnx, workers=0)
    app = create_app(Retriever(index, bundled_onnx))
    queries = [p for p in sorted(tmp_path.rglob("*.jpg"))]

    async def run_all():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await asyncio.gather(
                *(client.post("/search", files={"image": (q.name, q.read_bytes())}, params={"k": 3}) for q in queries)
            )

    for query, response in zip(queries, asyncio.run(run_all())):
        top = response.json()["results"][0]
        assert top["path"] == query.relative_to(tmp_path).as_posix()
        assert top["score"] == pytest.approx(1.0, abs=1e-3)


def test_streamed_body_over_the_cap_is_refused_without_a_length(client):
    def chunks():
        for _ in range(50):
            yield b"y" * 10_000

    response = client.post(
        "/search", content=chunks(), headers={"content-type": "multipart/form-data; boundary=zz"}
    )
    assert response.status_code == 413
    assert "limit" in response.json()["detail"]


def test_serve_binds_to_loopback_by_default_and_refuses_a_missing_index(tmp_path, capsys):
    from fastret.cli.main import build_parser, main
    from fastret.cli.serve import is_loopback

    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port) == ("127.0.0.1", 8000)
    assert [is_loopback(h) for h in ("127.0.0.1", "::1", "localhost", "0.0.0.0", "192.168.1.2")] == [
        True, True, True, False, False,
    ]
    assert main(["serve", "--index", str(tmp_path / "nothing")]) == 2
    assert "no index here" in capsys.readouterr().err
