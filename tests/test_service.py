"""The search service behind every front end: the CLI and the web API give the same answers,
file names of any bytes come out safely, and bad arguments are refused before any work."""

from __future__ import annotations

import base64
import json
import os
import socket

import numpy as np
import pytest
from PIL import Image

from fastret.cli.main import main
from fastret.engine.decode import Preprocessing
from fastret.engine.index import Index, Item
from fastret.engine.retrieval import display_path, raw_path_b64
from fastret.service.search import Retriever, SearchOptions
from fakes import MeanColourEncoder

QUERY = "buildings/299.jpg"
SPEC = Preprocessing(size=8, resize=8, interpolation="bilinear", mean=(0.0,) * 3, std=(1.0,) * 3)


def cli_json(capsys, *argv) -> dict:
    assert main(["search", *map(str, argv), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


# --- one service: CLI and API agree -----------------------------------------------------------


@pytest.fixture(scope="module")
def wang1k_client(wang1k_index):
    pytest.importorskip("fastapi", reason="the web extra is not installed: pip install 'fastret[web]'")
    from fastapi.testclient import TestClient

    from fastret.web.app import create_app

    with TestClient(create_app(Retriever.open(wang1k_index))) as client:
        yield client


OPTION_SETS = [
    ([], {}),
    (["--exact"], {"exact": "true"}),
    (["--rerank"], {"rerank": "true"}),
    (["--rerank", "--qe", "2", "--exact"], {"rerank": "true", "qe": "2", "exact": "true"}),
    (["--no-rerank"], {"rerank": "false"}),
    (["--no-rerank", "--exact"], {"rerank": "false", "exact": "true"}),
    (["--score", "softmax", "-k", "5", "--no-rerank"], {"score": "softmax", "k": "5", "rerank": "false"}),
    (["--flip-tta", "--ef", "16"], {"flip_tta": "true", "ef": "16"}),
]


@pytest.mark.data
@pytest.mark.parametrize(("flags", "params"), OPTION_SETS, ids=[" ".join(f) or "default" for f, _ in OPTION_SETS])
def test_cli_and_api_return_the_same_ranking(wang1k, wang1k_index, wang1k_client, capsys, flags, params):
    # An upload is not a file of the index: the CLI keeps the query's own item too, to compare.
    cli = cli_json(capsys, wang1k / QUERY, "--index", wang1k_index, "--include-self", *flags)
    assert cli["results"][0]["path"] == QUERY
    with open(wang1k / QUERY, "rb") as image:
        api = wang1k_client.post("/search", params=params, files={"image": ("299.jpg", image, "image/jpeg")})
    assert api.status_code == 200, api.text
    assert [hit["path"] for hit in api.json()["results"]] == [hit["path"] for hit in cli["results"]]
    np.testing.assert_allclose([h["score"] for h in api.json()["results"]], [h["score"] for h in cli["results"]],
                               rtol=1e-4, atol=1e-6)
    for key in ("k", "exact", "ef", "score", "rerank", "flip_tta", "search"):
        assert api.json()[key] == cli[key], key


@pytest.mark.data
@pytest.mark.parametrize("flags", [[], ["--rerank"], ["--exact"]])
def test_item_search_equals_searching_that_file(wang1k, wang1k_index, wang1k_client, capsys, flags):
    cli = cli_json(capsys, wang1k / QUERY, "--index", wang1k_index, *flags)
    item_id = [item.path for item in Index.load(wang1k_index).items].index(QUERY)
    params = {flag.lstrip("-"): "true" for flag in flags}
    api = wang1k_client.post(f"/search/item/{item_id}", params=params)
    assert api.status_code == 200, api.text
    assert [hit["path"] for hit in api.json()["results"]] == [hit["path"] for hit in cli["results"]]
    assert QUERY not in [hit["path"] for hit in api.json()["results"]]


@pytest.mark.data
def test_an_option_refused_in_one_front_end_is_refused_in_the_other(wang1k, wang1k_index, wang1k_client, capsys):
    assert main(["search", str(wang1k / QUERY), "--index", str(wang1k_index), "--rerank", "--score", "softmax"]) == 2
    assert "does not combine" in capsys.readouterr().err
    response = wang1k_client.post("/search/item/0", params={"rerank": "true", "score": "softmax"})
    assert response.status_code == 400 and "does not combine" in response.json()["detail"]


# --- file names of any bytes ---------------------------------------------------------------


HOSTILE_NAMES = [b"\xff\xfe.png", "new\nline.png".encode(), "tab\there.png".encode(), "caf\u00e9.png".encode()]


@pytest.fixture()
def hostile_index(tmp_path, monkeypatch):
    """Red images named with non-UTF-8 bytes, a newline, a tab and plain UTF-8, plus blue ones."""
    import fastret.service.search as service

    encoder = MeanColourEncoder(spec=SPEC)
    monkeypatch.setattr(service, "encoder_for_index", lambda *args, **kwargs: encoder)
    root = tmp_path / "gallery"
    (root / "red").mkdir(parents=True)
    (root / "blue").mkdir()
    red, blue = np.full((8, 8, 3), (220, 20, 20), np.uint8), np.full((8, 8, 3), (20, 20, 220), np.uint8)
    for name in HOSTILE_NAMES:
        Image.fromarray(red).save(os.fsdecode(os.fsencode(root / "red") + b"/" + name), format="PNG")
    for n in range(3):
        Image.fromarray(blue).save(root / "blue" / f"{n}.png")
    query = tmp_path / "query.png"
    Image.fromarray(red).save(query)
    from fastret.engine.retrieval import build_index

    index, _ = build_index(root, encoder, workers=0)
    index.save(tmp_path / "index")
    return query, tmp_path / "index", encoder


def test_hostile_names_print_as_one_safe_line_each(hostile_index, capsys):
    query, index_dir, _ = hostile_index
    assert main(["search", str(query), "--index", str(index_dir), "-k", "4"]) == 0
    out = capsys.readouterr().out
    out.encode("utf-8", "strict")  # raised UnicodeEncodeError (surrogates) before the fix
    lines = out.splitlines()
    assert lines[0] == "Top 4 most similar images:" and len(lines) == 5
    shown = {line.split(". ", 1)[1].rsplit(" - ", 1)[0] for line in lines[1:]}
    assert shown == {"red/\\xff\\xfe.png", "red/new\\nline.png", "red/tab\\there.png", "red/caf\u00e9.png"}


def test_hostile_names_in_json_keep_their_raw_bytes(hostile_index, capsys):
    query, index_dir, _ = hostile_index
    results = cli_json(capsys, query, "--index", index_dir, "-k", "4")["results"]
    raw = {base64.b64decode(h["path_bytes_b64"]) if h["path_bytes_b64"] else h["path"].encode() for h in results}
    assert raw == {b"red/" + name for name in HOSTILE_NAMES}


def test_hostile_names_through_the_api(hostile_index):
    pytest.importorskip("fastapi", reason="the web extra is not installed: pip install 'fastret[web]'")
    from fastapi.testclient import TestClient

    from fastret.web.app import create_app

    query, index_dir, encoder = hostile_index
    with TestClient(create_app(Retriever(Index.load(index_dir), encoder))) as client:
        response = client.post("/search", params={"k": 4}, files={"image": ("q.png", query.read_bytes(), "image/png")})
        assert response.status_code == 200, response.text  # was a 500 (PydanticSerializationError)
        hits = response.json()["results"]
        assert {base64.b64decode(h["path_bytes_b64"]) for h in hits if h["path_bytes_b64"]} == {
            b"red/" + name for name in HOSTILE_NAMES if name != "caf\u00e9.png".encode()
        }
        assert client.get(f"/items/{hits[0]['id']}/thumbnail").status_code == 200


@pytest.mark.parametrize(
    ("stored", "shown", "raw"),
    [
        ("a/b.jpg", "a/b.jpg", None),
        ("a\\b.jpg", "a\\b.jpg", None),  # a plain name is never rewritten
        (os.fsdecode(b"\xff.jpg"), "\\xff.jpg", b"\xff.jpg"),
        ("a\nb.jpg", "a\\nb.jpg", b"a\nb.jpg"),
        ("a\x1bb.jpg", "a\\x1bb.jpg", b"a\x1bb.jpg"),
    ],
)
def test_display_path(stored, shown, raw):
    assert display_path(stored) == shown
    assert raw_path_b64(stored) == (None if raw is None else base64.b64encode(raw).decode())


# --- arguments are checked before any work --------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["index", "DIR", "--hnsw-m", "0"],
        ["index", "DIR", "--hnsw-m", "1"],
        ["index", "DIR", "--ef-search", "-5"],
        ["index", "DIR", "--ef-construction", "0"],
        ["index", "DIR", "--batch-size", "0"],
        ["index", "DIR", "--workers", "-1"],
        ["index", "DIR", "--threads", "0"],
        ["search", "Q", "-k", "-1"],
        ["search", "Q", "-k", "-1", "--exact"],
        ["search", "Q", "-k", "0"],
        ["search", "Q", "--ef", "0"],
        ["search", "Q", "--dba", "-2"],
        ["serve", "--port", "70000"],
        ["serve", "--port", "0"],
        ["serve", "--max-upload-mb", "-1"],
        ["serve", "--max-batch", "0"],
        ["serve", "--max-decodes", "0"],
        ["eval", "--db", "D", "--leave-one-out", "-k", "0"],
    ],
    ids=lambda argv: " ".join(argv),
)
def test_bad_arguments_exit_2_with_one_line(argv, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("fastret ") and "error:" in err.splitlines()[-1]


def test_search_options_refuse_bad_values():
    for bad in ({"k": 0}, {"k": 1001}, {"ef": 0}, {"score": "dot"}):
        with pytest.raises(ValueError):
            SearchOptions(**bad)


def test_serve_on_a_busy_port_fails_before_loading(tmp_path, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = main(["serve", "--index", str(tmp_path / "no-index"), "--port", str(port)])
    err = capsys.readouterr().err
    assert code == 2 and "serving" not in err
    assert err.strip() == f"fastret: error: cannot listen on 127.0.0.1:{port}: Address already in use"


def test_eval_refuses_model_with_index(tmp_path, capsys):
    code = main(["eval", "--db", str(tmp_path), "--leave-one-out", "--index", str(tmp_path), "--model", "clip-vit-b32"])
    assert code == 2 and "drop --model or --index" in capsys.readouterr().err


def test_a_retriever_without_an_encoder_answers_item_queries_only():
    index = Index(MeanColourEncoder(spec=SPEC).info, "/nowhere", [Item(f"{i}.png", "x") for i in range(3)],
                  np.eye(3, dtype=np.float32))
    retriever = Retriever(index)
    assert [hit.item_id for hit in retriever.search_item(0, SearchOptions(k=2, exact=True))] == [1, 2]
    with pytest.raises(ValueError, match="no encoder"):
        retriever.embed(np.zeros((1, 8, 8, 3), np.uint8))


# --- the index's encoder on another machine's cache -----------------------------------------


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_search_with_another_cache_uses_the_recorded_artefact_or_refuses(tiny_clip_dir, tmp_path, monkeypatch,
                                                                         capsys, precision):
    """Index with FASTRET_CACHE=A, search with an empty FASTRET_CACHE=B: the same artefact (found at
    its recorded path) embeds the query, or, once A is gone, exit 2 saying how to get it; B stays empty."""
    rng = np.random.default_rng(5)
    gallery = tmp_path / "gallery" / "things"
    gallery.mkdir(parents=True)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(gallery / f"{i}.png")
    cache_a, cache_b = tmp_path / "A", tmp_path / "B"
    cache_b.mkdir()
    monkeypatch.setenv("FASTRET_CACHE", str(cache_a))
    argv = ["index", tmp_path / "gallery", "--model", tiny_clip_dir, "--backend", "onnxruntime",
            "--precision", precision, "--out", tmp_path / "index", "-q"]
    assert main([str(a) for a in argv]) == 0
    assert Index.load(tmp_path / "index").encoder["precision"] == precision
    monkeypatch.setenv("FASTRET_CACHE", str(cache_b))
    query = gallery / "3.png"
    found = cli_json(capsys, query, "--index", tmp_path / "index", "--include-self", "-k", "1",
                     "--no-rerank")["results"][0]  # a plain cosine: 1 for itself
    assert found["path"] == "things/3.png" and found["score"] >= 0.999
    cache_a.rename(tmp_path / "A-moved")
    assert main(["search", str(query), "--index", str(tmp_path / "index")]) == 2
    err = capsys.readouterr().err
    assert "is not on this machine" in err and f"fastret index {(tmp_path / 'gallery').resolve()}" in err
    assert list(cache_b.iterdir()) == []


@pytest.mark.parametrize("endpoint", ["/items/{}/image", "/items/{}/thumbnail", "/search/item/{}"])
@pytest.mark.parametrize("raw", ["9" * 5000, "18446744073709551616", "-1", "1e3"])
def test_item_ids_of_any_length_are_404_not_500(endpoint, raw, hostile_index):
    pytest.importorskip("fastapi", reason="the web extra is not installed: pip install 'fastret[web]'")
    from fastapi.testclient import TestClient

    from fastret.web.app import create_app

    _, index_dir, encoder = hostile_index
    with TestClient(create_app(Retriever(Index.load(index_dir), encoder))) as client:
        method = client.post if endpoint.startswith("/search") else client.get
        response = method(endpoint.format(raw))
    assert response.status_code == 404 and len(response.json()["detail"]) < 200
