"""Text queries through the search service, `fastret search --text` and `POST /search/text`.

The service tests use a stand-in text tower that knows colour words (the mean-colour encoder's
space, a ground truth anyone can see); the end-to-end tests index random images with the tiny
random full CLIP of tests/conftest.py and search them by text through the CLI and the API.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from fastret.cli.main import main
from fastret.engine.index import Index
from fastret.engine.rerank import RerankOptions
from fastret.engine.retrieval import build_index
from fastret.engine.text import Tokens, check_query_text
from fastret.service.load import BackendUnavailable, TextUnavailable, text_encoder_for_index
from fastret.service.search import Retriever, SearchOptions, combine_query
from fakes import MeanColourEncoder

HIT_LINE = re.compile(r"^(\d+)\. (\S+) - (?:Similarity|Re-ranked) Score: (-?\d+\.\d\d)$")
COLOURS = {"red": (230, 20, 20), "green": (20, 230, 20), "blue": (20, 20, 230), "yellow": (230, 230, 20)}
WORDS = ["red", "green", "blue", "yellow"]


def unit(vector) -> np.ndarray:
    vector = np.asarray(vector, dtype=np.float32) - 127.5
    return vector / np.linalg.norm(vector)


class ColourWordTokenizer:
    """Each colour word is one token; other words are dropped; at most `context_length` tokens are read."""

    context_length = 3

    def __call__(self, texts):
        rows, ignored = [], []
        for text in (check_query_text(t) for t in texts):
            words = [w for w in text.lower().split() if w in WORDS]
            rows.append([WORDS.index(w) for w in words[: self.context_length]] or [0])
            ignored.append(" ".join(words[self.context_length:]))
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), -1, dtype=np.int64)
        for row, tokens in zip(ids, rows):
            row[: len(tokens)] = tokens
        return Tokens(ids=ids, lengths=tuple(len(r) for r in rows), ignored=tuple(ignored))


class ColourWordTextEncoder:
    """A text tower in the mean-colour encoder's space: a text's embedding is its colours' mean."""

    model_id, dim, backend, precision, artefact = "test-mean-colour", 3, "numpy", "fp32", "colour words"
    tokenizer = ColourWordTokenizer()

    def encode_ids(self, ids):
        vectors = np.array([np.mean([unit(COLOURS[WORDS[i]]) for i in row if i >= 0], axis=0) for row in ids])
        return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def solid(path, colour, shift=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), tuple(min(255, c + shift) for c in colour)).save(path)


@pytest.fixture(scope="module")
def colour_gallery(tmp_path_factory):
    root = tmp_path_factory.mktemp("colours")
    for name, colour in COLOURS.items():
        for n in range(3):
            solid(root / name / f"{n}.png", colour, shift=8 * n)
    return root


@pytest.fixture(scope="module")
def colour_retriever(colour_gallery):
    index, _ = build_index(colour_gallery, MeanColourEncoder(), workers=0)
    return Retriever(index, MeanColourEncoder(), text_encoder=ColourWordTextEncoder())


def labels(hits) -> list[str]:
    return [hit.label for hit in hits]


# --- the search service -----------------------------------------------------------------------------


@pytest.mark.parametrize("word", WORDS)
def test_a_text_query_finds_the_images_it_names(colour_retriever, word):
    assert labels(colour_retriever.search_text(f"a {word} picture", SearchOptions(k=3))) == [word] * 3


def test_a_negative_text_pushes_its_images_down(colour_retriever):
    options = SearchOptions(k=12, exact=True, rerank=RerankOptions())  # the vectors' arithmetic, ranked plainly
    plain = labels(colour_retriever.search_text("red yellow", options))
    minus = labels(colour_retriever.search_text("red yellow", options, negative="yellow"))
    assert set(plain[:6]) == {"red", "yellow"}
    assert minus[:3] == ["red"] * 3 and "yellow" not in minus[:6]  # rclip's `--not`: its vector subtracted


def test_image_plus_text_is_their_normalised_sum_and_leaves_the_query_file_out(colour_retriever, colour_gallery):
    options = SearchOptions(k=12, exact=True)
    query = colour_retriever.text_query("blue", options, image=colour_gallery / "red" / "0.png")
    image_vector = colour_retriever.embed(colour_retriever.decode(colour_gallery / "red" / "0.png")[None])[0]
    expected = image_vector + unit(COLOURS["blue"])
    np.testing.assert_allclose(query.vector, expected / np.linalg.norm(expected), atol=1e-6)
    assert query.description == f"{colour_gallery / 'red' / '0.png'} + text:blue"
    hits = colour_retriever.search_vector(query.vector, options, query.exclude)
    assert "red/0.png" not in [hit.path for hit in hits] and len(hits) == 11
    assert set(labels(hits)[:5]) == {"red", "blue"}


def test_a_query_past_the_context_length_carries_a_note(colour_retriever):
    query = colour_retriever.text_query("red green blue yellow", SearchOptions())
    assert query.notes == ("the model reads the first 3 tokens of a query; it ignored 'yellow'",)
    assert colour_retriever.text_query("red", SearchOptions()).notes == ()


@pytest.mark.parametrize(
    "text, negative, message",
    [
        ("", None, "empty text query"),
        ("   ", None, "empty text query"),
        ("x" * 1001, None, "too long"),
        ("red", "", "empty text query"),
        ("red", "red", "cancel out"),
        (None, None, "needs an image, a text, or both"),
    ],
)
def test_bad_text_queries_are_refused_with_the_reason(colour_retriever, text, negative, message):
    with pytest.raises(ValueError, match=message):
        colour_retriever.search_text(text, SearchOptions(), negative=negative)


def test_combine_query_sums_and_subtracts_unit_vectors():
    a, b = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
    np.testing.assert_allclose(combine_query([a, b], []), np.array([1, 1, 0]) / np.sqrt(2), atol=1e-7)
    np.testing.assert_allclose(combine_query([a], [b]), np.array([1, -1, 0]) / np.sqrt(2), atol=1e-7)
    with pytest.raises(ValueError, match="cancel out"):
        combine_query([a], [a])


def test_an_index_without_a_text_tower_refuses_text_queries_once_with_the_reason(colour_gallery):
    index, _ = build_index(colour_gallery, MeanColourEncoder(), workers=0)
    retriever = Retriever(index, MeanColourEncoder())
    reason = retriever.text_unavailable()
    assert reason is not None and "no export of test-mean-colour" in reason
    with pytest.raises(BackendUnavailable, match="no export of test-mean-colour"):
        retriever.search_text("red", SearchOptions())


# --- end to end with the tiny random CLIP ---------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_index(tiny_full_clip_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("clip-gallery")
    rng = np.random.default_rng(3)
    for i in range(12):
        path = root / f"class{i % 3}" / f"{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path, quality=90)
    out = tmp_path_factory.mktemp("clip-index") / "index"
    assert main(["index", str(root), "--model", str(tiny_full_clip_dir), "--out", str(out), "-q"]) == 0
    return root, out


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("k", [1, 5, 12])
def test_cli_text_search_prints_k_results_in_the_usual_form(clip_index, capsys, k):
    _, index = clip_index
    code, out, err = run(capsys, "search", "--index", index, "--text", "lower newer", "-k", k)
    assert code == 0, err
    header, *lines = out.strip().splitlines()
    assert header == f"Top {k} most similar images:" and len(lines) == k
    matches = [HIT_LINE.match(line) for line in lines]
    assert all(matches) and [int(m[1]) for m in matches] == list(range(1, k + 1))
    scores = [float(m[3]) for m in matches]
    assert scores == sorted(scores, reverse=True)


def test_cli_and_api_agree_on_a_text_query(clip_index, capsys):
    from fastapi.testclient import TestClient

    from fastret.web.app import create_app

    _, index = clip_index
    code, out, err = run(capsys, "search", "--index", index, "-t", "lowest wider", "--not", "low", "-k", 6, "--json")
    assert code == 0, err
    cli = json.loads(out)
    assert cli["query"] == "text:lowest wider - text:low" and len(cli["results"]) == 6
    with TestClient(create_app(Retriever.open(index))) as client:
        health = client.get("/health").json()
        assert health["text_queries"] is True and health["text_unavailable"] is None
        response = client.post("/search/text", params={"k": 6}, json={"text": "lowest wider", "negative": "low"})
    assert response.status_code == 200, response.text
    api = response.json()
    assert api["query"] == cli["query"] and api["backend"] == cli["backend"] == "onnxruntime"
    assert [(h["path"], round(h["score"], 4)) for h in api["results"]] == [
        (h["path"], round(h["score"], 4)) for h in cli["results"]
    ]
    assert api["notes"] == [] and api["text"] == "lowest wider" and api["negative"] == "low"


@pytest.mark.parametrize("body, message", [({"text": ""}, "empty text query"), ({"text": "a" * 1001}, "too long"),
                                           ({"text": "low", "negative": "low"}, "cancel out")])
def test_api_refuses_bad_text_with_400_and_the_reason(clip_index, body, message):
    from fastapi.testclient import TestClient

    from fastret.web.app import create_app

    with TestClient(create_app(Retriever.open(clip_index[1]))) as client:
        response = client.post("/search/text", json=body)
    assert response.status_code == 400 and message in response.json()["detail"]


def test_cli_text_plus_image_leaves_the_query_image_out(clip_index, capsys):
    root, index = clip_index
    query = root / "class0" / "0.jpg"
    code, out, err = run(capsys, "search", query, "--index", index, "-t", "lower", "-k", 12, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["query"] == f"{query} + text:lower" and len(result["results"]) == 11
    assert "class0/0.jpg" not in [hit["path"] for hit in result["results"]]


def test_cli_notes_words_past_the_context_length(clip_index, capsys):
    code, out, err = run(capsys, "search", "--index", clip_index[1], "-t", "lower newer " * 6 + "wider", "-k", 2)
    assert code == 0 and "note: the model reads the first 16 tokens of a query; it ignored '" in err
    assert out.startswith("Top 2 most similar images:")


@pytest.mark.parametrize(
    "argv, message",
    [(["-t", ""], "empty text query"), (["-t", "x" * 1001], "too long"), ([], "give a query image, --text"),
     (["--not", "low"], "give a query image, --text")],
)
def test_cli_refuses_bad_text_queries_with_exit_2(clip_index, capsys, argv, message):
    code, out, err = run(capsys, "search", "--index", clip_index[1], *argv)
    assert code == 2 and out == "" and message in err and len(err.strip().splitlines()) == 1


def test_text_search_writes_nothing_and_runs_fp32_when_the_int8_text_tower_is_gone(clip_index, model_cache):
    from fastret.export.onnx_export import find_artefact
    from fastret.export.text_tower import TEXT_INT8_KIND
    from fastret.service.load import model_export_dir

    index = Index.load(clip_index[1])
    export_dir = model_export_dir(index)
    assert export_dir is not None and export_dir.parent.parent == model_cache
    files_before = sorted(p.name for p in export_dir.rglob("*"))
    encoder = text_encoder_for_index(index)
    found = find_artefact(export_dir, TEXT_INT8_KIND)
    assert (encoder.precision, encoder.artefact) == (("int8", found[0]) if found else ("fp32", export_dir / "text.onnx"))
    if found is not None:
        moved = found[0].with_name("elsewhere.onnx")
        found[0].rename(moved)
        try:
            lines: list[str] = []
            fallback = text_encoder_for_index(index, log=lines.append)
            assert fallback.precision == "fp32" and any("no int8 text tower" in line for line in lines)
        finally:
            moved.rename(found[0])
    assert sorted(p.name for p in export_dir.rglob("*")) == files_before


def test_bundled_model_refuses_text_with_exit_2_and_names_a_clip_model(bundled_onnx, tmp_path, capsys):
    root = tmp_path / "gallery"
    for i, colour in enumerate(COLOURS.values()):
        solid(root / f"{i}.png", colour)
    index, _ = build_index(root, bundled_onnx, workers=0)
    index.save(tmp_path / "index")
    code, out, err = run(capsys, "search", "--index", tmp_path / "index", "--text", "x")
    assert code == 2 and out == ""
    (line,) = err.strip().splitlines()
    assert line.startswith("fastret: error: text queries need a CLIP model")
    assert "efficientnet-lite2, an image-only model" in line and "--model clip-vit-b32" in line
    with pytest.raises(TextUnavailable):
        text_encoder_for_index(Index.load(tmp_path / "index"))


def test_a_vision_only_clip_index_says_its_export_has_no_text_tower(tiny_clip_dir, tmp_path, capsys):
    root = tmp_path / "gallery"
    for i, colour in enumerate(COLOURS.values()):
        solid(root / f"{i}.png", colour)
    assert main(["index", str(root), "--model", str(tiny_clip_dir), "--out", str(tmp_path / "index"), "-q"]) == 0
    capsys.readouterr()
    code, out, err = run(capsys, "search", "--index", tmp_path / "index", "-t", "red")
    assert code == 2 and "has none (the checkpoint is a vision tower alone" in err and "--model clip-vit-b32" in err
