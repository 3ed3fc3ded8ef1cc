"""The HTTP API: search results, error handling of hostile uploads, path safety, batching.

Most tests use a 3-d "mean colour" encoder over generated solid-colour images: no model, no
data, and a ground truth anyone can see (a red query's nearest items are red).
"""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
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
from fastret.service.search import PREPARED_DATABASES, Retriever  # noqa: E402
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
    body = upload(client, solid_jpeg(COLOURS["blue"]), k=13, score="softmax", exact=True, rerank=False).json()
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


BIG_SIDE = 6000  # a 6000 x 6000 RGB PNG of one colour: ~120 KB on disk, 36 Mpx to decode
PEAK_SLACK_MB = 100


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM) so far, in MiB."""
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) / 1024


def upload_peak_rss(big_png: str, bomb_png: str, copies: int, max_decodes: int) -> None:
    """Run in a fresh interpreter by the test below: send `copies` big PNGs and one bomb at once to an
    app with a 40 Mpx cap; print the statuses, the bomb's reason and the growth of the peak RSS."""
    index, _ = build_index(_colour_gallery(Path(big_png).parent / "gallery"), MeanColourEncoder(), workers=0)
    app = create_app(Retriever(index, MeanColourEncoder()), max_pixels=40_000_000, max_decodes=max_decodes)
    files = [Path(big_png).read_bytes()] * copies + [Path(bomb_png).read_bytes()]

    async def send(images: list[bytes]) -> list:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await asyncio.gather(
                *(client.post("/search", files={"image": (f"{n}.png", data)}, params={"k": 1}) for n, data in enumerate(images))
            )

    asyncio.run(send([solid_jpeg(COLOURS["red"])]))  # warm up: imports, threadpool, encoder thread
    before = peak_rss_mb()
    responses = asyncio.run(send(files))
    growth = peak_rss_mb() - before
    print(json.dumps({"statuses": [r.status_code for r in responses], "bomb": responses[-1].json()["detail"],
                      "growth_mb": growth}))


def _colour_gallery(root: Path) -> Path:
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True)
        (root / name / "0.jpg").write_bytes(solid_jpeg(colour))
    return root


def test_concurrent_huge_uploads_stay_within_a_memory_budget(tmp_path, bad_images):
    """Six 36 Mpx PNGs at once, max_decodes=2: the peak RSS grows by at most two decodes, not six.
    An upload over the pixel cap gets 400 with a one-line reason, before any decoding."""
    # Pillow holds RGB at 4 bytes a pixel: one decode peaks near 137 MiB. Measured on the 2-core VM:
    # +149 to +288 MiB at max_decodes=2 (one or two decodes overlapping), +703 to +830 MiB with the
    # bound lifted. Budget: two whole decodes plus 100 MiB (bodies, crops, allocator slack) = 375 MiB.
    big = tmp_path / "big.png"
    Image.new("RGB", (BIG_SIDE, BIG_SIDE), (200, 30, 30)).save(big)
    bomb, reason = bad_images["bomb.png"]
    max_decodes = 2
    program = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_web_api; "
        f"test_web_api.upload_peak_rss({str(big)!r}, {str(bomb)!r}, copies=6, max_decodes={max_decodes})"
    )
    run = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    measured = json.loads(run.stdout.splitlines()[-1])
    assert measured["statuses"] == [200] * 6 + [400]
    assert reason in measured["bomb"] and "\n" not in measured["bomb"]
    budget_mb = max_decodes * BIG_SIDE**2 * 4 / 2**20 + PEAK_SLACK_MB
    assert measured["growth_mb"] < budget_mb, measured


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


@pytest.mark.parametrize(
    ("path", "method", "statuses"),
    [
        ("/search", "post", {"200", "400", "413", "422"}),
        ("/search/item/{item_id}", "post", {"200", "400", "404", "413", "422"}),
        ("/items/{item_id}/thumbnail", "get", {"200", "404", "413", "422"}),
        ("/items/{item_id}/image", "get", {"200", "404", "413", "422"}),
        ("/health", "get", {"200", "413"}),
    ],
)
def test_openapi_documents_every_status_an_endpoint_answers(client, path, method, statuses):
    """Regression: 413 (any body over the cap) was undocumented except on the searches, and the
    original image's content type was not documented at all."""
    responses = client.get("/openapi.json").json()["paths"][path][method]["responses"]
    assert set(responses) == statuses
    for status in statuses - {"200", "422"}:
        assert responses[status]["content"]["application/json"]["schema"]["$ref"].endswith("/Problem")
    assert responses["200"]["content"]


def test_any_endpoint_refuses_a_body_over_the_cap_with_413(client):
    response = client.request("GET", "/health", content=b"x" * 200_000)
    assert response.status_code == 413 and "limit" in response.json()["detail"]


@pytest.mark.parametrize(
    "request_args",
    [
        {"data": {"image": "x" * 50_000}},  # a form field, not a file
        {"files": {"image": (None, "x" * 50_000)}},  # a multipart part without a file name
    ],
    ids=["urlencoded", "multipart-text-part"],
)
def test_text_instead_of_a_file_is_422_without_echoing_it(client, request_args):
    """Regression: FastAPI's 422 repeated each error's input, here the whole would-be upload."""
    response = client.post("/search", **request_args)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "image"]
    assert "xxxxxxxx" not in response.text and len(response.content) < 1000


def multipart(disposition: bytes, boundary: bytes = b"zz") -> bytes:
    part = b"Content-Disposition: " + disposition + b"\r\nContent-Type: image/jpeg\r\n\r\n" + solid_jpeg(COLOURS["red"])
    return b"--" + boundary + b"\r\n" + part + b"\r\n--" + boundary + b"--\r\n"


@pytest.mark.parametrize(
    ("body", "content_type", "status", "query"),
    [
        (multipart(b'form-data; name="image"; filename="caf\xe9.jpg"'), "multipart/form-data; boundary=zz", 200,
         "upload:caf\u00e9.jpg"),  # a Latin-1 byte, not UTF-8: read as Latin-1
        (multipart(b'form-data; name="image"; filename="\xff\xfe.jpg"'), "multipart/form-data; boundary=zz", 200,
         "upload:\u00ff\u00fe.jpg"),
        (multipart(b"form-data; name=\"image\"; filename*=UTF-8''caf%C3%A9.jpg"), "multipart/form-data; boundary=zz",
         422, None),  # RFC 5987 names are not read: no file name, so no file
        (multipart(b'form-data; name="image"; filename="q.jpg"'), "multipart/form-data", 400, None),
        (multipart(b'form-data; name="image"; filename="q.jpg"'), "multipart/form-data; boundary=other", 400, None),
        (b"\xff" * 1000, "multipart/form-data; boundary=zz", 400, None),
    ],
    ids=["latin-1-name", "undecodable-name", "rfc5987-name", "no-boundary", "wrong-boundary", "garbage"],
)
def test_hostile_multipart_bodies_get_an_answer_not_a_crash(client, body, content_type, status, query):
    response = client.post("/search", content=body, headers={"content-type": content_type})
    assert response.status_code == status
    if query is not None:
        assert response.json()["query"] == query
    elif status == 400:
        assert "\n" not in response.json()["detail"]


@pytest.mark.parametrize(
    "params",
    [{"k": "9" * 5000}, {"ef": "9" * 40}, {"pca": "-" + "9" * 40}, {"alpha": "nan"}, {"alpha": "1e400"},
     {"pca_power": "inf"}, {"dba": "1e3"}, {"score": "\x00"}],
    ids=["k-5000-digits", "ef-40-digits", "pca-negative", "alpha-nan", "alpha-overflow", "power-inf", "dba-float",
         "score-nul"],
)
def test_huge_or_odd_query_values_get_422(client, params):
    response = client.post("/search/item/0", params=params)
    assert response.status_code == 422
    assert len(response.content) < 1000


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
                *(client.post("/search", files={"image": (q.name, q.read_bytes())}, params={"k": 3, "rerank": False}) for q in queries)
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


def test_distinct_reranking_requests_keep_a_bounded_number_of_prepared_databases(colour_index):
    """Regression: each new (pca, pca_power, dba, alpha) a client sent prepared, and kept for good,
    another copy of the database (a PCA fit each): memory grew without bound."""
    retriever = Retriever(colour_index, MeanColourEncoder())
    with TestClient(create_app(retriever)) as client:
        labels = [
            client.post("/search/item/0", params={"dba": 1, "alpha": 1 + n / 10, "k": 1}).json()["results"][0]["label"]
            for n in range(PREPARED_DATABASES + 4)
        ]
    assert labels == [colour_index.items[0].label] * (PREPARED_DATABASES + 4)
    assert len(retriever._prepared) == PREPARED_DATABASES


@pytest.mark.parametrize("limits", [{"max_upload_bytes": 0}, {"max_pixels": 0}, {"max_decodes": 0}])
def test_app_refuses_limits_below_one(colour_index, limits):
    with pytest.raises(ValueError, match=next(iter(limits))):
        create_app(Retriever(colour_index, MeanColourEncoder()), **limits)


@pytest.mark.parametrize("value", ["1e-9", "nan", "inf", "0"])
def test_serve_refuses_an_upload_limit_under_one_byte_before_loading(value, tmp_path, capsys):
    """Regression: --max-upload-mb 1e-9 came to a 0-byte limit, and the server started refusing everything."""
    from fastret.cli.main import main

    with pytest.raises(SystemExit) as stopped:
        main(["serve", "--index", str(tmp_path / "nothing"), "--max-upload-mb", value])
    assert stopped.value.code == 2
    assert "--max-upload-mb" in capsys.readouterr().err


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
