"""Every command on a LanceDB store, as on an hnswlib index: duplicates (CLI and GET /duplicates),
serve following the store's edits, verify, compact (extra fastret[lancedb]; skipped without it)."""

from __future__ import annotations

import json
import shutil
import threading
from dataclasses import asdict

import numpy as np
import pytest

from fakes import MeanColourEncoder
from fastret.cli.main import main
from fastret.engine.index import Additions, Item, Sources
from fastret.engine.lance_store import AnnParams, LanceState, connect
from fastret.engine.retrieval import build_index
from fastret.engine.update import apply_changes, find_changes
from fastret.service.live import LiveRetriever
from fastret.service.search import Retriever, SearchOptions
from fastret.service.stores import open_index, save_lance
from test_duplicates import library  # noqa: F401 (fixture: a photo, its copies and two others)
from test_scale_out import PLAIN, QUERY, lance, synthetic_store, wang1k_lance  # noqa: F401 (fixtures)
from test_update import gallery, wait_for, write_image  # noqa: F401 (fixture: 12 solid colours)

YELLOW = (230, 230, 20)


def store_of(root, out):
    """ROOT indexed with the mean-colour fake and written to a LanceDB store at OUT (no ANN index: under 4,096 rows)."""
    index, _ = build_index(root, MeanColourEncoder(), workers=0)
    save_lance(index, out)
    return out


@pytest.fixture
def colour_store(lance, gallery, tmp_path):  # noqa: F811
    return store_of(gallery, tmp_path / "store")


def add_files(index_dir, root) -> None:
    """`fastret index ROOT --out INDEX` again, with the fake encoder: the new files go in by LanceDB's add."""
    state = LanceState.read(index_dir)
    apply_changes(state, find_changes(state, root), MeanColourEncoder(), workers=0)


def change_manifest(index_dir, change) -> None:
    manifest = json.loads((index_dir / "lancedb.json").read_text())
    change(manifest)
    (index_dir / "lancedb.json").write_text(json.dumps(manifest))


def yellow_query() -> np.ndarray:
    return MeanColourEncoder().encode(np.full((1, 32, 32, 3), YELLOW, np.uint8))[0]


# --- fastret duplicates, GET /duplicates ---------------------------------------------------------


def duplicates_json(capsys, index_dir) -> dict:
    assert main(["duplicates", str(index_dir), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_duplicates_of_a_lance_store_are_those_of_its_hnswlib_index(lance, library, tmp_path, capsys):  # noqa: F811
    """Regression: `fastret duplicates STORE` took the store's folder for a folder of images."""
    index, _ = build_index(library, MeanColourEncoder(), workers=0)
    index.save(tmp_path / "hnswlib")
    store = store_of(library, tmp_path / "store")
    from_store, from_hnswlib = duplicates_json(capsys, store), duplicates_json(capsys, tmp_path / "hnswlib")
    assert from_store["items"] == 6 and from_store["duplicates"] == 3
    assert files_of(from_store) == files_of(from_hnswlib) and from_store["skipped"] == []


def files_of(report: dict) -> list[list[tuple]]:
    """Each group's files (the kept one first) and why they are in it; the agreements differ a little,
    an hnswlib index comparing the thumbnails it kept where a store's are decoded now."""
    return [[(copy["id"], copy["path"], copy["reason"]) for copy in [group["kept"], *group["duplicates"]]]
            for group in report["groups"]]


@pytest.mark.parametrize("follow", [False, True], ids=["no-follow", "follow"])
@pytest.mark.parametrize("store", ["hnswlib", "lancedb"])
def test_get_duplicates_answers_for_the_served_index(request, library, tmp_path, store, follow):  # noqa: F811
    """Regression: GET /duplicates failed (500) on a LanceDB store, and on any index `fastret serve` follows."""
    pytest.importorskip("fastapi", reason="the web extra is not installed")
    from fastapi.testclient import TestClient

    from fastret.web.app import create_app

    if store == "lancedb":
        request.getfixturevalue("lance")  # skips without the extra
        index_dir = store_of(library, tmp_path / "store")
    else:
        build_index(library, MeanColourEncoder(), workers=0)[0].save(tmp_path / "hnswlib")
        index_dir = tmp_path / "hnswlib"
    retriever = Retriever(open_index(index_dir), MeanColourEncoder())
    client = TestClient(create_app(LiveRetriever(index_dir, retriever) if follow else retriever))
    response = client.get("/duplicates")
    assert response.status_code == 200, response.text
    assert response.json()["duplicates"] == 3
    assert [group["kept"]["path"] for group in response.json()["groups"]] == ["a/photo.png"]


def test_get_duplicates_reports_the_version_served_after_an_edit(lance, library, tmp_path):  # noqa: F811
    pytest.importorskip("fastapi", reason="the web extra is not installed")
    from fastapi.testclient import TestClient

    from fastret.web.app import create_app

    index_dir = store_of(library, tmp_path / "store")
    live = LiveRetriever(index_dir, Retriever(open_index(index_dir), MeanColourEncoder()))
    client = TestClient(create_app(live))
    assert client.get("/duplicates").json()["duplicates"] == 3
    state = LanceState.read(index_dir)
    state.write(removed=[int(state.ids[state.paths.index("b/photo-small.jpg")])])
    assert live.refresh()
    report = client.get("/duplicates").json()
    assert report["items"] == 5 and report["duplicates"] == 2  # not the report of the version served before


# --- fastret serve follows the store --------------------------------------------------------------


def test_a_live_retriever_follows_the_stores_table_version(colour_store, gallery):  # noqa: F811
    """Regression: `fastret serve` on a LanceDB store never saw its edits (it followed an hnswlib CURRENT)."""
    logged: list[str] = []
    live = LiveRetriever(colour_store, Retriever(open_index(colour_store), MeanColourEncoder()), log=logged.append)
    served = live.current()
    assert not live.refresh()  # nothing changed
    options = SearchOptions(k=3, rerank=PLAIN)
    assert not any(hit.path.startswith("yellow/") for hit in served.search_vector(yellow_query(), options))
    for n in range(3):
        write_image(gallery / "yellow" / f"{n}.png", YELLOW, shift=3 * n)
    add_files(colour_store, gallery)

    assert live.refresh() and live.current() is not served
    assert len(live.current().index) == 15 and len(served.index) == 12  # a request under way keeps its version
    found = [hit.path for hit in live.current().search_vector(yellow_query(), options)]
    assert sorted(found) == ["yellow/0.png", "yellow/1.png", "yellow/2.png"]
    assert not live.refresh()
    assert logged == [f"serving index version {live.current().index.version_name}: 15 images"]


def test_a_store_version_of_another_model_is_refused_once(colour_store):
    logged: list[str] = []
    live = LiveRetriever(colour_store, Retriever(open_index(colour_store), MeanColourEncoder()), log=logged.append)
    served = live.current()
    change_manifest(colour_store, lambda manifest: manifest["model"].update(model_id="another-model"))
    LanceState.read(colour_store).write(removed=[0])  # a new table version
    assert not live.refresh() and not live.refresh()
    assert live.current() is served
    assert len(logged) == 1 and "another-model" in logged[0] and "still serving lancedb-v" in logged[0]


def test_serve_follows_a_lance_store_with_only_200s(colour_store, gallery):  # noqa: F811
    pytest.importorskip("fastapi", reason="the web extra is not installed")
    from fastapi.testclient import TestClient

    from fastret.web.app import create_app

    live = LiveRetriever(colour_store, Retriever(open_index(colour_store), MeanColourEncoder()), poll_s=0.05).start()
    statuses: list[int] = []
    stop = threading.Event()
    try:
        with TestClient(create_app(live)) as client:
            first = client.get("/health").json()
            assert (first["store"], first["count"]) == ("lancedb", 12)
            assert first["index_version"] == open_index(colour_store).version_name

            def searches():
                while not stop.is_set():
                    statuses.append(client.post("/search/item/0", params={"k": 3, "rerank": False}).status_code)

            searcher = threading.Thread(target=searches)
            searcher.start()
            for n in range(3):
                write_image(gallery / "yellow" / f"{n}.png", YELLOW, shift=3 * n)
            add_files(colour_store, gallery)
            waited = wait_for(lambda: client.get("/health").json()["count"] == 15, timeout_s=10)
            stop.set()
            searcher.join(timeout=30)
            health = client.get("/health").json()
            assert health["index_version"] == open_index(colour_store).version_name != first["index_version"]
    finally:
        stop.set()
        live.close()
    assert waited < 10 and statuses and set(statuses) == {200}


# --- fastret verify ---------------------------------------------------------------------------------


def verify(capsys, index_dir) -> tuple[int, str, str]:
    code = main(["verify", str(index_dir)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_verify_checks_a_small_lance_store_and_says_what(colour_store, capsys):
    """Regression: `fastret verify` on a LanceDB store looked for hnswlib files and failed."""
    code, out, _ = verify(capsys, colour_store)
    assert code == 0 and ": ok, manifest lancedb.json (test-mean-colour, dim 3, next id 12)" in out
    assert "12 rows: unique ids below the next id, unique paths, finite unit vectors of dim 3" in out
    assert "no ANN index (under 4096 rows: searches scan)" in out


def test_verify_checks_the_ann_index_of_a_lance_store(synthetic_store, capsys):  # noqa: F811
    code, out, _ = verify(capsys, synthetic_store[0])
    assert code == 0 and "5000 rows" in out and "IVF_PQ index (cosine) over 5000 rows" in out


def add_rows(index_dir, paths: list[str], vectors) -> None:
    items = [Item(path, path.split("/")[0]) for path in paths]
    LanceState.read(index_dir).write(Additions(items, np.asarray(vectors, np.float32), Sources.unknown(len(items))))


DAMAGES = {
    "manifest": (lambda d: (d / "lancedb.json").write_text("{not json"), "unreadable LanceDB manifest"),
    "table gone": (lambda d: shutil.rmtree(d / "lance"), "cannot open the LanceDB table"),
    "dim": (lambda d: change_manifest(d, lambda m: m["model"].update(dim=4)), "column `vector` is fixed_size_list"),
    "next id": (lambda d: change_manifest(d, lambda m: m.update(next_id=5)),
                "the manifest's next id is 5 (new items would reuse ids)"),
    "ann missing": (lambda d: change_manifest(d, lambda m: m.update(ann=asdict(AnnParams()))),
                    "the manifest records an IVF_PQ index, the table has none; `fastret compact"),
    "not unit": (lambda d: add_rows(d, ["red/long.png"], [[3.0, 0.0, 0.0]]), "1 vectors not finite or not of unit length (first: id 12)"),
    "path twice": (lambda d: add_rows(d, ["red/0.png"], [[1.0, 0.0, 0.0]]), "1 paths held twice (first 'red/0.png')"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_verify_reports_a_damaged_lance_store_and_exits_1(colour_store, capsys, damage):
    spoil, message = DAMAGES[damage]
    spoil(colour_store)
    code, out, err = verify(capsys, colour_store)
    assert code == 1 and message in out
    assert "is damaged" in err


# --- fastret compact --------------------------------------------------------------------------------


def test_compact_compacts_a_small_stores_files(colour_store, capsys):
    """Regression: compact on a store without an ANN index did nothing, and said it folded rows into one."""
    add_rows(colour_store, ["red/x.png"], [[1.0, 0.0, 0.0]])
    add_rows(colour_store, ["red/y.png"], [[0.0, 1.0, 0.0]])
    uri = json.loads((colour_store / "lancedb.json").read_text())["uri"]

    def fragments() -> int:
        return connect(uri).open_table("items").stats()["fragment_stats"]["num_fragments"]

    assert fragments() == 3
    assert main(["compact", str(colour_store)]) == 0
    assert "LanceDB files compacted, no ANN index (a table this small is scanned)" in capsys.readouterr().err
    assert fragments() == 1 and len(open_index(colour_store)) == 14


# --- fastret search and eval: what ran ------------------------------------------------------------


@pytest.mark.data
def test_search_on_a_lance_store_calls_its_plain_scores_what_they_are(wang1k, wang1k_lance, capsys):  # noqa: F811
    """Regression: the default search (re-ranking on) printed "Re-ranked Score" for a store's plain cosines."""
    assert main(["search", str(wang1k / QUERY), "--index", str(wang1k_lance), "-k", "3"]) == 0
    out, err = capsys.readouterr()
    assert out.count("Similarity Score") == 3 and "Re-ranked" not in out
    assert "note: LanceIndex holds no re-ranking state: the plain ranking" in err


@pytest.mark.data
def test_eval_of_a_lance_store_with_re_ranking_on_runs_the_plain_ranking(wang1k, wang1k_lance, tmp_path, capsys):  # noqa: F811
    """Regression: `fastret eval --index STORE` without --no-rerank crashed (AttributeError)."""
    out = tmp_path / "eval.json"
    assert main(["eval", "--db", str(wang1k), "--leave-one-out", "--index", str(wang1k_lance), "--exact",
                 "--json", str(out)]) == 0
    capsys.readouterr()
    result = json.loads(out.read_text())
    assert result["rerank"] is None and result["search"] == "exact (LanceDB scan)" and result["db_images"] == 1000
