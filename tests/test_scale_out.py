"""Past one machine: the Ray engine embeds exactly as the local job does (a full build or only what
changed), and a LanceDB store answers the search service as the hnswlib index does and keeps the
stable item ids of index format 2 through adds and removes (extras fastret[ray], fastret[lancedb])."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest

from fastret.cli.main import main
from fastret.engine.index import CURRENT, BadIndex, Index, Item, index_writer_lock
from fastret.engine.rerank import RerankOptions
from fastret.service.search import Retriever, SearchOptions

QUERY = "buildings/299.jpg"
FP32 = ["--model", "efficientnet-lite2", "--backend", "onnxruntime", "--precision", "fp32"]


def search_hits(capsys, index, query, *flags) -> list[dict]:
    """The hits of `fastret search --json` (the plain ranking unless the flags ask for re-ranking)."""
    plain = [] if "--rerank" in flags or "--no-rerank" in flags else ["--no-rerank"]
    assert main(["search", str(query), "--index", str(index), "--json", *plain, *flags]) == 0
    return json.loads(capsys.readouterr().out)["results"]


def search_paths(capsys, index, query, *flags) -> list[str]:
    return [hit["path"] for hit in search_hits(capsys, index, query, *flags)]


@pytest.fixture
def gallery(wang1k, bad_images, tmp_path):
    """A dozen wang1k photos in two classes, plus one file of each broken kind (a fresh copy per
    test: the edit tests change it)."""
    root = tmp_path / "gallery"
    for name in ("buildings", "buses"):
        (root / name).mkdir(parents=True)
        for path in sorted((wang1k / name).glob("*.jpg"))[:6]:
            shutil.copy(path, root / name / path.name)
    (root / "broken").mkdir()
    for path, _ in bad_images.values():
        shutil.copy(path, root / "broken" / path.name)
    return root


def spare_photo(wang1k):
    """A wang1k photo that is not in `gallery`."""
    return sorted((wang1k / "buses").glob("*.jpg"))[10]


# --- Ray ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray cluster of 2 CPUs for the module; the jobs join it instead of starting their own."""
    ray = pytest.importorskip("ray", reason="the ray extra is not installed: pip install 'fastret[ray]'")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def same_index(a: Index, b: Index) -> None:
    assert [item.path for item in a.items] == [item.path for item in b.items]
    assert np.array_equal(a.ids, b.ids)
    assert np.abs(np.asarray(a.embeddings) - np.asarray(b.embeddings)).max() <= 1e-5


@pytest.mark.data
def test_ray_engine_embeds_and_skips_like_the_local_job(ray_cluster, gallery, bad_images, tmp_path, capsys):
    assert main(["index", str(gallery), *FP32, "--out", str(tmp_path / "local"), "-q"]) == 0
    capsys.readouterr()
    assert main(["index", str(gallery), *FP32, "--engine", "ray", "--out", str(tmp_path / "ray"), "-q"]) == 0
    err = capsys.readouterr().err
    for name, (_, reason) in bad_images.items():
        assert f"skipped {gallery / 'broken' / name}: " in err and reason in err
    local, ray = Index.load(tmp_path / "local"), Index.load(tmp_path / "ray")
    assert len(ray) == 12
    same_index(ray, local)
    assert ray.encoder == local.encoder  # the driver's recipe: workers open the same artefact
    assert np.array_equal(ray.sources.sha256, local.sources.sha256)  # file records for later updates
    query = gallery / "buildings" / sorted(p.name for p in (gallery / "buildings").iterdir())[0]
    assert search_paths(capsys, tmp_path / "ray", query, "--exact") == search_paths(capsys, tmp_path / "local", query, "--exact")


@pytest.mark.data
def test_ray_engine_on_an_existing_index_embeds_only_what_changed(ray_cluster, gallery, wang1k, tmp_path, capsys):
    out = tmp_path / "index"
    assert main(["index", str(gallery), *FP32, "--out", str(out), "-q"]) == 0
    before = Index.load(out)
    gone = gallery / before.items[0].path
    gone.unlink()
    shutil.copy(spare_photo(wang1k), gallery / "buses" / "new.jpg")
    capsys.readouterr()
    assert main(["index", str(gallery), "--engine", "ray", "--out", str(out), "-q"]) == 0
    err = capsys.readouterr().err
    assert "added 1, updated 0, removed 1, unchanged 11" in err
    assert f"skipped {gallery / 'broken' / 'empty.jpg'}" in err  # bad files are tried again, reported again
    after = Index.load(out)
    kept = before.ids[1:]
    assert np.array_equal(after.ids, np.append(kept, before.next_id))  # old ids kept, the new item the next id
    assert np.array_equal(after.embeddings[:-1], before.embeddings[1:])
    assert main(["index", str(gallery), *FP32, "--out", str(tmp_path / "fresh"), "-q"]) == 0
    fresh = Index.load(tmp_path / "fresh")
    new_row = [item.path for item in fresh.items].index("buses/new.jpg")
    assert np.abs(after.embeddings[-1] - fresh.embeddings[new_row]).max() <= 1e-5


@pytest.mark.data
def test_a_worker_without_the_artefact_uses_the_shipped_bytes(ray_cluster, bundled_onnx, tmp_path):
    from dataclasses import replace

    from fastret.service.load import BackendUnavailable
    from fastret.service.ray_job import local_recipe

    recipe = bundled_onnx.recipe
    elsewhere = replace(recipe, artefact=str(tmp_path / "not-here" / "model.onnx"))
    data = open(recipe.artefact, "rb").read()
    shipped = local_recipe(elsewhere, {"model.onnx": ray_cluster.put(data)})
    assert shipped.artefact != elsewhere.artefact and open(shipped.artefact, "rb").read() == data
    with pytest.raises(BackendUnavailable, match="sha256"):
        local_recipe(elsewhere, {"model.onnx": ray_cluster.put(data[:-1] + b"\0")})
    assert local_recipe(recipe, {}) == recipe  # a shared disk: the recorded file, nothing fetched


def test_ray_engine_without_its_extra_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray.data", None)  # import ray.data raises ImportError
    assert main(["index", str(tmp_path), "--engine", "ray", "--out", str(tmp_path / "index")]) == 2
    assert "pip install 'fastret[ray]'" in capsys.readouterr().err
    assert not (tmp_path / "index").exists()


@pytest.mark.slow
@pytest.mark.data
def test_wang1k_on_ray_matches_the_local_index(ray_cluster, wang1k, wang1k_index, tmp_path, capsys):
    """The issue's acceptance: same items, embeddings within 1e-5, same exact top-10 for 299.jpg."""
    local = Index.load(wang1k_index)
    recipe = local.encoder
    flags = ["--model", "efficientnet-lite2", "--backend", recipe["backend"], "--precision", recipe["precision"]]
    assert main(["index", str(wang1k), *flags, "--engine", "ray", "--out", str(tmp_path / "ray"), "-q"]) == 0
    ray = Index.load(tmp_path / "ray")
    assert ray.items == local.items
    same_index(ray, local)
    capsys.readouterr()
    query = wang1k / QUERY
    assert search_paths(capsys, tmp_path / "ray", query, "--exact") == search_paths(capsys, wang1k_index, query, "--exact")


# --- LanceDB ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lance():
    from fastret.engine.lance_store import lancedb_missing

    if lancedb_missing():  # not imported here: the store imports it after quieting lance's log
        pytest.skip(lancedb_missing())


@pytest.fixture(scope="module")
def wang1k_lance(lance, wang1k_index, tmp_path_factory):
    """wang1k_index's items, ids and embeddings written to a LanceDB store (no re-embedding)."""
    from fastret.service.stores import save_lance

    out = tmp_path_factory.mktemp("wang1k-lance") / "index"
    save_lance(Index.load(wang1k_index), out)
    return out


@pytest.mark.data
def test_lance_store_gives_the_hnswlib_top_10_in_exact_mode(wang1k, wang1k_index, wang1k_lance, capsys):
    query = wang1k / QUERY
    lance_hits = search_hits(capsys, wang1k_lance, query, "--exact")
    hnsw_hits = search_hits(capsys, wang1k_index, query, "--exact")
    assert [(h["path"], h["id"]) for h in lance_hits] == [(h["path"], h["id"]) for h in hnsw_hits]
    assert len(lance_hits) == 10 and QUERY not in [h["path"] for h in lance_hits]  # the query's own item stays out


PLAIN = RerankOptions()
OPTIONS = [
    SearchOptions(exact=True, include_self=True, rerank=PLAIN),
    SearchOptions(k=5, score="softmax", rerank=PLAIN),
    SearchOptions(k=20, rerank=PLAIN),
]


@pytest.mark.data
@pytest.mark.parametrize("options", OPTIONS, ids=["exact", "softmax", "k20"])
def test_lance_store_answers_item_queries_as_hnswlib(wang1k_index, wang1k_lance, options):
    from fastret.service.stores import open_index

    hnsw, lance = Retriever(Index.load(wang1k_index)), Retriever(open_index(wang1k_lance))
    assert lance.index.items == hnsw.index.items and np.array_equal(lance.index.ids, hnsw.index.ids)
    item_id = int(hnsw.index.ids[123])
    got, want = lance.search_item(item_id, options), hnsw.search_item(item_id, options)
    assert [(h.path, h.item_id) for h in got] == [(h.path, h.item_id) for h in want]
    assert np.allclose([h.score for h in got], [h.score for h in want], atol=1e-4)


@pytest.mark.data
def test_the_web_api_serves_a_lance_store(wang1k_index, wang1k_lance):
    from fastapi.testclient import TestClient

    from fastret.web.app import create_app

    item_id = int(Index.load(wang1k_index).ids[123])
    want = [h.path for h in Retriever(Index.load(wang1k_index)).search_item(item_id, SearchOptions(exact=True, rerank=PLAIN))]
    client = TestClient(create_app(Retriever.open(wang1k_lance)))  # its encoder from the recorded recipe
    for rerank in (False, True):  # re-ranking, the default, falls back to the plain ranking on this store
        response = client.post(f"/search/item/{item_id}", params={"exact": True, "rerank": rerank})
        assert response.status_code == 200, response.text
        assert [hit["path"] for hit in response.json()["results"]] == want


@pytest.mark.data
def test_re_ranking_on_a_lance_store_falls_back_to_the_plain_ranking_and_says_so(wang1k, wang1k_lance, capsys):
    query = wang1k / QUERY
    assert main(["search", str(query), "--index", str(wang1k_lance), "--json", "--rerank", "--exact"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["rerank"] is None and "plain ranking" in answer["rerank_unavailable"]
    assert [hit["path"] for hit in answer["results"]] == search_paths(capsys, wang1k_lance, query, "--exact")


@pytest.mark.data
def test_eval_reads_a_lance_store(wang1k, wang1k_index, wang1k_lance, tmp_path, capsys):
    results = []
    for index in (wang1k_index, wang1k_lance):
        out = tmp_path / f"{index.parent.name}.json"
        assert main(["eval", "--db", str(wang1k), "--leave-one-out", "--index", str(index), "--exact", "--no-rerank",
                     "--json", str(out)]) == 0
        results.append(json.loads(out.read_text()))
    capsys.readouterr()
    assert results[1]["search"] == "exact (LanceDB scan)"
    assert results[1]["overall"] == pytest.approx(results[0]["overall"], abs=1e-3)


@pytest.mark.data
def test_lance_store_round_trip_keeps_ids_stable(lance, gallery, wang1k, tmp_path, capsys):
    """index --store lancedb, then add, remove and index again: LanceDB's own add and delete with the
    ids of format 2 (kept by unchanged items, never reused), every write under the writer lock."""
    from fastret.engine.lance_store import LanceState
    from fastret.service.stores import open_index

    out = tmp_path / "index"
    assert main(["index", str(gallery), *FP32, "--store", "lancedb", "--out", str(out), "-q"]) == 0
    assert not (out / CURRENT).exists() and (out / "lancedb.json").is_file()
    summary = capsys.readouterr().err.splitlines()[-1]
    assert summary.endswith(f"-> {out} (lancedb-v1)") and "HNSW" not in summary  # no graph built, no manifest file named
    first = open_index(out)
    assert list(first.ids) == list(range(12)) and first.next_id == 12
    ids = dict(zip((item.path for item in first.items), first.ids.tolist()))

    shutil.copy(spare_photo(wang1k), gallery / "buses" / "added.jpg")
    assert main(["add", str(out), str(gallery / "buses" / "added.jpg"), "-q"]) == 0
    assert main(["remove", str(out), "buildings"]) == 0
    (gallery / "buses" / "added.jpg").unlink()
    shutil.copy(spare_photo(wang1k), gallery / "buses" / "again.jpg")
    capsys.readouterr()
    assert main(["index", str(gallery), "--out", str(out), "-q"]) == 0  # the store it holds: no --store needed
    assert "added 7, updated 0, removed 1, unchanged 6" in capsys.readouterr().err  # buildings/ come back

    store = open_index(out)
    now = dict(zip((item.path for item in store.items), store.ids.tolist()))
    assert {path: now[path] for path in ids if path.startswith("buses/")} == {p: i for p, i in ids.items() if p.startswith("buses/")}
    # 12 was added.jpg, removed with its file: never given again; new files get ids in path order
    assert sorted(now[p] for p in now if p.startswith("buildings/")) == list(range(13, 19))
    assert now["buses/again.jpg"] == 19
    assert store.next_id == 20 and LanceState.read(out).next_id == 20
    hits = Retriever(store).search_vector(store.embeddings[store.find_row(19)], SearchOptions(k=1, rerank=PLAIN))
    assert (hits[0].item_id, hits[0].path) == (19, "buses/again.jpg")


@pytest.mark.data
def test_lance_writes_hold_the_writer_lock(lance, gallery, tmp_path, capsys):
    out = tmp_path / "index"
    assert main(["index", str(gallery), *FP32, "--store", "lancedb", "--out", str(out), "-q"]) == 0
    held, release = threading.Event(), threading.Event()

    def writer():
        with index_writer_lock(out):
            held.set()
            release.wait(30)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        held.wait(30)
        capsys.readouterr()
        assert main(["remove", str(out), "buses", "--no-wait"]) == 2
        assert "another fastret writer" in capsys.readouterr().err
    finally:
        release.set()
        thread.join()
    from fastret.service.stores import open_index

    assert len(open_index(out)) == 12  # nothing removed while another writer held the lock


def unit_rows(count: int, dim: int, seed: int) -> np.ndarray:
    """Clustered unit vectors with a low intrinsic dimension, as image embeddings have."""
    centres = np.random.default_rng(0).standard_normal((20, dim)).astype(np.float32)
    basis = np.random.default_rng(1).standard_normal((8, dim)).astype(np.float32) / np.sqrt(8)
    rng = np.random.default_rng(seed)
    rows = centres[rng.integers(0, 20, count)] + rng.standard_normal((count, 8)).astype(np.float32) @ basis
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture
def synthetic_store(lance, tmp_path):
    """A LanceDB store of 5,000 clustered vectors with ids from 100 (large enough for its IVF-PQ index)."""
    from fastret.engine.decode import Preprocessing
    from fastret.engine.encoders import ModelInfo
    from fastret.service.stores import save_lance

    vectors = unit_rows(5000, 64, seed=0)
    info = ModelInfo("synthetic", "0" * 64, 64, Preprocessing(size=8, resize=8, interpolation="bilinear",
                                                               mean=(0.0,) * 3, std=(1.0,) * 3))
    items = [Item(path=f"c/{i:05d}.jpg", label="c") for i in range(len(vectors))]
    ids = np.arange(100, 100 + len(vectors))
    save_lance(Index(info, str(tmp_path), items, vectors, ids=ids), tmp_path / "index")
    return tmp_path / "index", vectors


def test_lance_ann_index_finds_the_exact_neighbours(synthetic_store):
    from fastret.engine.index import exact_search
    from fastret.service.stores import open_index

    index_dir, vectors = synthetic_store
    store = open_index(index_dir)
    assert store.ann is not None and store.ann.kind == "IVF_PQ"
    assert store.ids[0] == 100 and store.next_id == 5100
    queries = unit_rows(50, 64, seed=1)
    ann_rows, _ = store.search(queries, 10)
    exact_rows, _ = exact_search(vectors, queries, 10)
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(ann_rows, exact_rows)])
    assert recall >= 0.9


@pytest.mark.parametrize("exact, kind", [(False, "ivf_pq"), (True, "exact")])
def test_the_search_service_names_the_lance_search_that_ran(synthetic_store, exact, kind):
    """Regression: every plain search of a LanceDB store was described as "exact"."""
    from fastret.service.search import Retriever, SearchOptions
    from fastret.service.stores import open_index

    described = Retriever(open_index(synthetic_store[0])).describe(SearchOptions(exact=exact))
    assert described["search"] == kind and described["rerank"] is None


def test_lance_state_write_adds_and_deletes_by_id(synthetic_store):
    from fastret.engine.index import Additions, Sources
    from fastret.engine.lance_store import LanceState
    from fastret.service.stores import open_index

    index_dir, vectors = synthetic_store
    new = unit_rows(2, 64, seed=7)
    state = LanceState.read(index_dir)
    written = state.write(Additions([Item("d/new0.jpg", "d"), Item("d/new1.jpg", "d")], new, Sources.unknown(2)), [100, 101])
    assert list(written.added_ids) == [5100, 5101] and list(written.removed_ids) == [100, 101] and written.count == 5000
    with pytest.raises(BadIndex, match="another writer"):
        state.write(removed=[102])  # read before the write above
    store = open_index(index_dir)
    assert store.find_row(100) is None and store.find_row(5101) == len(store) - 1
    rows, _ = store.search(new, 1)
    assert [int(store.ids[r]) for r in rows[:, 0]] == [5100, 5101]
    assert np.array_equal(store.embeddings[store.find_row(102)], vectors[2])
    with pytest.raises(ValueError, match="no item 100"):
        LanceState.read(index_dir).write(removed=[100])  # already gone


def test_compact_folds_every_row_into_the_lance_index(synthetic_store, capsys):
    from fastret.engine.index import Additions, Sources
    from fastret.engine.lance_store import VECTOR_INDEX, LanceState
    from fastret.service.stores import open_index

    index_dir, _ = synthetic_store
    LanceState.read(index_dir).write(Additions([Item("d/new.jpg", "d")], unit_rows(1, 64, seed=7), Sources.unknown(1)), [100])
    before = open_index(index_dir)
    assert before.table.index_stats(VECTOR_INDEX).num_unindexed_rows == 1  # under 1% of the table: scanned
    assert main(["compact", str(index_dir)]) == 0
    assert "LanceDB files compacted" in capsys.readouterr().err
    after = open_index(index_dir)
    assert after.table.index_stats(VECTOR_INDEX).num_unindexed_rows == 0
    assert np.array_equal(after.ids, before.ids) and after.items == before.items


def test_a_folder_with_both_stores_is_refused(synthetic_store):
    from fastret.service.stores import open_index

    index_dir, _ = synthetic_store
    (index_dir / CURRENT).write_text("v-x\n")
    with pytest.raises(BadIndex, match="both"):
        open_index(index_dir)


def test_a_damaged_lance_manifest_is_refused_with_what_to_do(synthetic_store):
    from fastret.service.stores import open_index

    index_dir, _ = synthetic_store
    (index_dir / "lancedb.json").write_text("{not json")
    with pytest.raises(BadIndex, match="--store lancedb"):
        open_index(index_dir)


@pytest.mark.parametrize("flags, message", [
    (["--store", "hnswlib"], "holds a lancedb index"),
    (["--hnsw-m", "8"], "HNSW options do not apply"),
    (["--lance-uri", "x", "--store", "hnswlib"], "holds a lancedb index"),
    (["--ray-address", "auto"], "--ray-address goes with --engine ray"),
])
def test_options_that_do_not_fit_a_lance_store_are_refused_before_any_work(synthetic_store, flags, message, capsys):
    index_dir, _ = synthetic_store
    before = (index_dir / "lancedb.json").read_text()
    assert main(["index", str(index_dir.parent), "--out", str(index_dir), *flags]) == 2
    assert message in capsys.readouterr().err
    assert (index_dir / "lancedb.json").read_text() == before


def test_default_paths_import_neither_extra():
    code = "import sys, fastret.cli.main, fastret.service.search; print(sorted({'ray', 'lancedb'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
