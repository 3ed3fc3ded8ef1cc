"""The re-ranking state an index holds: fitted by writers, kept current by edits, searched through HNSW."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

import fastret.engine.index as index_module
import fastret.engine.rerank as rerank_module
from fastret.engine.decode import Preprocessing
from fastret.engine.encoders import ModelInfo
from fastret.engine.index import (
    Additions,
    BadIndex,
    HnswParams,
    Index,
    IndexState,
    Item,
    Sources,
    fit_rerank,
    live_version,
    verify_index,
)
from fastret.engine.rerank import RECOMMENDED_RERANK, RerankOptions, graph_search, rerank_search
from fastret.service.search import Retriever, SearchOptions

DIM = 24
INFO = ModelInfo("test-model", "cd" * 32, DIM, Preprocessing(32, 32, "bilinear", (0.0,) * 3, (1.0,) * 3))
SMALL = RerankOptions(pca_dim=12, dba_n=3, qe_n=2)  # PCA, DBA and QE on a few hundred items


def clustered(count: int, seed: int = 0, clusters: int = 12, spread: float = 0.6) -> np.ndarray:
    """Unit rows around a few fixed centres (the same centres for every seed)."""
    centres = np.random.default_rng(1234).standard_normal((clusters, DIM))
    rng = np.random.default_rng(seed)
    rows = centres[rng.integers(0, clusters, count)] + spread * rng.standard_normal((count, DIM))
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(a[a >= 0], b[b >= 0])) / max(1, (b >= 0).sum()) for a, b in zip(found, truth)]))


def edit(index_dir, count: int, seed: int, removed=()):
    """Add `count` clustered items and remove the ids `removed`."""
    added = Additions([Item(f"new/{seed}-{i}.jpg", "new") for i in range(count)], clustered(count, seed=seed),
                      Sources.unknown(count))
    return IndexState.read(index_dir).write(added, removed)


def saved_index(tmp_path, count: int, options: RerankOptions | None = SMALL):
    items = [Item(f"c/{i}.jpg", "c") for i in range(count)]
    index = Index(INFO, "/gallery", items, clustered(count), HnswParams(M=8, ef_construction=100), rerank_options=options)
    index.save(tmp_path / "idx")
    return tmp_path / "idx"


def test_hnsw_reranked_search_agrees_with_exact_reranked_search():
    database, queries = clustered(3000, seed=1), clustered(300, seed=2)
    state = fit_rerank(database, np.arange(3000), replace(RECOMMENDED_RERANK, pca_dim=16), HnswParams())
    assert state.whitening is not None and state.ran.dba_n == 5 and state.recall >= 0.99
    found, found_scores = graph_search(state, queries, 10, RECOMMENDED_RERANK)
    truth, truth_scores = rerank_search(state.prepared(), queries, 10, RECOMMENDED_RERANK)
    assert recall_at(found, truth) >= 0.99
    same = (found == truth).all(axis=1)  # where the lists agree, so do the scores: both are exact cosines
    np.testing.assert_allclose(found_scores[same], truth_scores[same], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("query", [0, 77, 299])
def test_leave_one_out_through_the_graph_is_as_if_the_item_were_absent(query):
    database = clustered(300, seed=3)
    state = fit_rerank(database, np.arange(300), SMALL, HnswParams(M=8, ef_construction=100))
    ids, scores = graph_search(state, database[query], 20, SMALL, [frozenset({query})], ef=300)
    assert query not in ids[0]
    exact_ids, exact_scores = rerank_search(state.prepared(), database[query], 20, SMALL, [frozenset({query})])
    np.testing.assert_array_equal(ids, exact_ids)
    np.testing.assert_allclose(scores, exact_scores, rtol=1e-5, atol=1e-6)


def test_an_index_saves_its_state_and_search_goes_through_its_graph(tmp_path):
    index_dir = saved_index(tmp_path, 300)
    manifest = json.loads((live_version(index_dir) / "manifest.json").read_text())
    assert manifest["rerank"]["ran"]["pca_dim"] == 12 and manifest["rerank"]["recall"] >= 0.99
    state_files = {path.name for path in live_version(index_dir).iterdir() if path.name.startswith("rerank-")}
    assert len(state_files) == 8 and state_files <= set(manifest["files"])  # checksummed with the rest
    retriever = Retriever(Index.load(index_dir))
    options = SearchOptions(k=10, rerank=SMALL)
    described = retriever.describe(options)
    assert described["search"] == "hnsw" and described["rerank"]["source"] == "index"
    hnsw = retriever.search_vector(clustered(1, seed=9)[0], options)
    exact = retriever.search_vector(clustered(1, seed=9)[0], replace(options, exact=True))
    assert [hit.item_id for hit in hnsw] == [hit.item_id for hit in exact]
    assert retriever.describe(replace(options, exact=True))["search"] == "exact"
    other = retriever.describe(replace(options, rerank=replace(SMALL, pca_dim=6)))  # not the stored PCA
    assert other["search"] == "exact" and other["rerank"]["source"] == "memory"
    assert retriever.describe(replace(options, rerank=RerankOptions()))["rerank"] is None


@pytest.mark.parametrize("part", [0, -1])  # the full write's files, an edit's
def test_a_damaged_state_file_is_refused_naming_it(tmp_path, part):
    index_dir = saved_index(tmp_path, 300)
    edit(index_dir, 5, seed=11, removed=[3])
    manifest = json.loads((live_version(index_dir) / "manifest.json").read_text())
    assert len(manifest["rerank"]["parts"]) == 2
    vectors = live_version(index_dir) / f"{manifest['rerank']['parts'][part]['name']}.vectors.npy"
    data = bytearray(vectors.read_bytes())
    data[-5] ^= 0xFF
    vectors.write_bytes(bytes(data))
    assert any(vectors.name in problem for problem in verify_index(index_dir))
    vectors.write_bytes(bytes(data[:-4]))
    with pytest.raises(BadIndex, match=vectors.name):
        Index.load(index_dir)


@pytest.mark.parametrize("removed", [[], [5, 17, 250]])
def test_an_edit_updates_the_state_as_a_refit_with_the_same_pca_would(tmp_path, removed):
    index_dir = saved_index(tmp_path, 300)
    before = Index.load(index_dir).rerank_state()
    added = clustered(20, seed=7)
    written = IndexState.read(index_dir).write(
        Additions([Item(f"new/{i}.jpg", "new") for i in range(20)], added, Sources.unknown(20)), removed)
    index = Index.load(index_dir)
    state = index.rerank_state()
    assert state.added == 20 and state.fitted == 300  # updated, not refitted (20 < REFIT_SHARE of 300)
    np.testing.assert_array_equal(state.ids, index.ids)
    refit = fit_rerank(index.embeddings, index.ids, SMALL, HnswParams(M=8, ef_construction=100),
                       whitening=before.whitening)
    np.testing.assert_array_equal(state.neighbours, refit.neighbours)
    np.testing.assert_allclose(state.vectors, refit.vectors, atol=1e-5)
    # the new items are found through the graph, the removed ones never
    options = SearchOptions(k=5, rerank=SMALL, include_self=True)
    hits = Retriever(index).search_vector(added[3], options)
    assert hits[0].item_id == written.added_ids[3]
    found = Retriever(index).search_vectors(index.embeddings, replace(options, k=10))
    assert not {hit.item_id for row in found for hit in row} & set(removed)
    assert verify_index(index_dir) == []


def test_many_additions_refit_the_state(tmp_path):
    index_dir = saved_index(tmp_path, 300)
    added = clustered(100, seed=8)
    IndexState.read(index_dir).write(Additions([Item(f"new/{i}.jpg", "new") for i in range(100)], added,
                                               Sources.unknown(100)))
    state = Index.load(index_dir).rerank_state()
    assert state.fitted == 400 and state.added == 0


@pytest.mark.parametrize(("count", "ran"), [(6, {"pca_dim": None, "dba_n": 0}), (30, {"pca_dim": None, "dba_n": 3}),
                                            (300, {"pca_dim": 12, "dba_n": 3})])
def test_small_databases_fall_back_and_say_so(tmp_path, count, ran):
    retriever = Retriever(Index.load(saved_index(tmp_path, count, replace(SMALL, pca_dim=40))
                                     if count < 300 else saved_index(tmp_path, count)))
    options = SearchOptions(k=3, rerank=replace(SMALL, pca_dim=40) if count < 300 else SMALL)
    summary = retriever.describe(options)["rerank"]
    assert {key: summary[key] for key in ran} == ran and summary["source"] == "index"
    assert ("no PCA" in " ".join(summary["notes"])) == (ran["pca_dim"] is None)
    assert ("no DBA" in " ".join(summary["notes"])) == (ran["dba_n"] == 0)
    assert len(retriever.search_vector(clustered(1, seed=4)[0], options)) == 3


def test_an_index_without_state_reranks_in_memory_and_says_why(tmp_path):
    retriever = Retriever(Index.load(saved_index(tmp_path, 60, options=None)))
    described = retriever.describe(SearchOptions())
    assert described["search"] == "exact" and described["rerank"]["source"] == "memory"
    assert "holds no re-ranking state" in described["rerank"]["notes"][0]
    assert len(retriever.search_vector(clustered(1, seed=4)[0], SearchOptions(k=4))) == 4


def test_a_part_that_disagrees_with_its_entry_is_refused_naming_it(tmp_path):
    index_dir = saved_index(tmp_path, 300)
    edit(index_dir, 5, seed=11)
    path = live_version(index_dir) / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["rerank"]["parts"][-1]["rows"] += 1
    path.write_text(json.dumps(manifest))
    with pytest.raises(BadIndex, match=f"{manifest['rerank']['parts'][-1]['name']}.ids.npy"):
        Index.load(index_dir).rerank_state()


def test_edits_write_their_changed_rows_and_rank_as_a_fresh_write_of_the_state(tmp_path):
    index_dir = saved_index(tmp_path, 300)
    first = Index.load(index_dir).rerank_state()
    for seed, removed in [(21, [5, 17]), (22, [250]), (23, []), (24, [301, 40])]:  # 301: an item added by an edit
        written = edit(index_dir, 4, seed, removed)
    manifest = json.loads((written.version / "manifest.json").read_text())["rerank"]
    index = Index.load(index_dir)
    state = index.rerank_state()
    assert len(manifest["parts"]) > 1 and 15 < len(state.pending) < len(state)  # the graph kept, changed rows aside
    assert manifest["graph"]["file"] == f"{manifest['parts'][0]['name']}.graph.bin"
    fresh = fit_rerank(index.embeddings, index.ids, SMALL, HnswParams(M=8, ef_construction=100),
                       whitening=first.whitening)
    np.testing.assert_array_equal(state.neighbours, fresh.neighbours)
    queries = np.vstack([clustered(40, seed=25), np.asarray(index.embeddings[state.pending[:20]])])
    truth = rerank_search(fresh.prepared(), queries, 10, SMALL)[0]
    np.testing.assert_array_equal(rerank_search(state.prepared(), queries, 10, SMALL)[0], truth)
    np.testing.assert_array_equal(graph_search(state, queries, 10, SMALL, ef=len(state))[0], truth)
    excludes = [frozenset({int(row)}) for row in state.pending[:20]]  # leave-one-out of changed rows
    np.testing.assert_array_equal(graph_search(state, queries[40:], 10, SMALL, excludes, ef=len(state))[0],
                                  rerank_search(fresh.prepared(), queries[40:], 10, SMALL, excludes)[0])
    assert verify_index(index_dir) == []


def fresh_ranking(index, whitening, queries, excludes=None) -> np.ndarray:
    """Re-ranked top-10 of a fresh write of the index's state (the same PCA), searched exactly."""
    fresh = fit_rerank(index.embeddings, index.ids, SMALL, HnswParams(M=8, ef_construction=100), whitening=whitening)
    return rerank_search(fresh.prepared(), queries, 10, SMALL, excludes)[0]


def test_a_take_in_writes_the_graph_and_links_the_parts(tmp_path, monkeypatch):
    index_dir = saved_index(tmp_path, 300)
    whitening = Index.load(index_dir).rerank_state().whitening
    edit(index_dir, 4, seed=31, removed=[8])
    old = json.loads((live_version(index_dir) / "manifest.json").read_text())["rerank"]
    inodes = {path.name: path.stat().st_ino for path in live_version(index_dir).iterdir()}
    monkeypatch.setattr(index_module, "RERANK_PENDING_FLOOR", 10)
    written = edit(index_dir, 4, seed=32, removed=[9])
    manifest = json.loads((written.version / "manifest.json").read_text())["rerank"]
    assert manifest["parts"][0] == old["parts"][0] and manifest["graph"]["parts"] == len(manifest["parts"])
    for name in index_module._rerank_part_files(old["parts"][0]["name"]).values():  # linked, not rewritten
        assert (written.version / name).stat().st_ino == inodes[name]
    state_files = list(written.version.glob("rerank-*"))
    new_files = [path for path in state_files if inodes.get(path.name) != path.stat().st_ino]
    new_parts = [part for part in manifest["parts"] if part not in old["parts"]]
    assert {path.name for path in new_files} == {manifest["graph"]["file"], manifest["graph"]["ids"], *(
        name for part in new_parts for name in index_module._rerank_part_files(part["name"]).values())}
    index = Index.load(index_dir)
    state = index.rerank_state()
    assert not len(state.pending) and state.fitted == 300
    assert sorted(set(state.graph.get_ids_list()) - {8, 9}) == state.ids.tolist()  # removed items' slots marked
    queries = clustered(40, seed=33)
    truth = fresh_ranking(index, whitening, queries)
    np.testing.assert_array_equal(graph_search(state, queries, 10, SMALL, ef=len(state))[0], truth)
    np.testing.assert_array_equal(rerank_search(state.prepared(), queries, 10, SMALL)[0], truth)
    hits = Retriever(index).search_vector(clustered(4, seed=32)[2], SearchOptions(k=1, rerank=SMALL))
    assert hits[0].item_id == written.added_ids[2]
    assert verify_index(index_dir) == []


def test_edits_after_a_take_in_keep_its_parts_covered_and_rank_as_a_fresh_write(tmp_path, monkeypatch):
    index_dir = saved_index(tmp_path, 300)
    whitening = Index.load(index_dir).rerank_state().whitening
    monkeypatch.setattr(index_module, "RERANK_PENDING_FLOOR", 30)
    for seed, removed in [(51, [3]), (52, [4, 300]), (53, []), (54, [7, 302]), (55, [11]), (56, [12, 13]), (57, [14])]:
        written = edit(index_dir, 3, seed, removed)
        manifest = json.loads((written.version / "manifest.json").read_text())["rerank"]
        index = Index.load(index_dir)
        state = index.rerank_state()
        covered = manifest["graph"]["parts"]
        later = [np.load(written.version / f"{part['name']}.ids.npy") for part in manifest["parts"][covered:]]
        assert set(state.ids[state.pending]) == set(np.concatenate([np.empty(0, np.int64), *later]).tolist())
        newest = np.arange(len(state) - 5, len(state))  # rows the last edits changed
        queries = np.vstack([clustered(20, seed=seed + 100), np.asarray(index.embeddings[newest])])
        truth = fresh_ranking(index, whitening, queries)
        np.testing.assert_array_equal(graph_search(state, queries, 10, SMALL, ef=len(state))[0], truth)
        excludes = [frozenset({int(row)}) for row in newest]  # leave-one-out
        np.testing.assert_array_equal(graph_search(state, queries[20:], 10, SMALL, excludes, ef=len(state))[0],
                                      fresh_ranking(index, whitening, queries[20:], excludes))
    assert verify_index(index_dir) == []
    assert "ids" in manifest["graph"]  # the graph was taken in at least once


def test_a_state_written_before_states_had_parts_reads_as_one_part(tmp_path):
    index_dir = saved_index(tmp_path, 300)
    path = live_version(index_dir) / "manifest.json"
    manifest = json.loads(path.read_text())
    entry = manifest["rerank"]
    files = {array: f"{entry['parts'][0]['name']}.{array}.npy" for array in index_module.RERANK_ARRAYS}
    manifest["rerank"] = {**{key: value for key, value in entry.items() if key not in ("parts", "graph", "pca")},
                          "files": {**files, "graph": entry["graph"]["file"], **entry["pca"]},
                          "slots": entry["graph"]["slots"]}
    path.write_text(json.dumps(manifest))
    state = Index.load(index_dir).rerank_state()
    assert len(state) == 300 and not len(state.pending)
    edit(index_dir, 4, seed=41)
    assert Index.load(index_dir).rerank_state().ids[-4:].tolist() == [300, 301, 302, 303]
    assert verify_index(index_dir) == []


def test_a_state_with_parts_written_before_take_ins_kept_them_loads_and_edits(tmp_path, monkeypatch):
    """main's manifests before this change: a graph entry without `parts` / `ids` covers the first part."""
    index_dir = saved_index(tmp_path, 300)
    whitening = Index.load(index_dir).rerank_state().whitening
    edit(index_dir, 4, seed=61, removed=[2])
    edit(index_dir, 4, seed=62, removed=[301])
    path = live_version(index_dir) / "manifest.json"
    manifest = json.loads(path.read_text())
    assert len(manifest["rerank"]["parts"]) > 1
    manifest["rerank"]["graph"] = {key: manifest["rerank"]["graph"][key] for key in ("file", "slots", "marked")}
    path.write_text(json.dumps(manifest))
    stored = [np.load(path.parent / f"{part['name']}.ids.npy") for part in manifest["rerank"]["parts"][1:]]
    state = Index.load(index_dir).rerank_state()
    assert set(state.ids[state.pending]) == set(np.concatenate(stored).tolist()) & set(state.ids.tolist())
    monkeypatch.setattr(index_module, "RERANK_PENDING_FLOOR", 10)
    edit(index_dir, 4, seed=63, removed=[5])
    index = Index.load(index_dir)
    state = index.rerank_state()
    assert not len(state.pending)
    queries = clustered(20, seed=64)
    np.testing.assert_array_equal(graph_search(state, queries, 10, SMALL, ef=len(state))[0],
                                  fresh_ranking(index, whitening, queries))
    assert verify_index(index_dir) == []


def random_rows(count: int, dim: int, seed: int) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((count, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_an_edit_after_a_fit_through_a_graph_changes_about_the_rows_an_exact_fit_would(monkeypatch):
    """Random 256-d rows and a sparse graph: the graph fit's 5th neighbours are too far for nearly
    every row, so many rows seem to let a new item in; only those whose 5 nearest truly change move."""
    count, options = 3000, RerankOptions(dba_n=5)
    embeddings, ids = random_rows(count, 256, seed=0), np.arange(count)
    make_graph = lambda vectors, labels: index_module.build_hnsw(vectors, HnswParams(M=4, ef_construction=8), labels)  # noqa: E731
    exact = rerank_module.fit_state(embeddings, ids, options, make_graph)
    monkeypatch.setattr(rerank_module, "EXACT_NEIGHBOURS", 100)
    approximate = rerank_module.fit_state(embeddings, ids, options, make_graph)
    assert "through a graph" in approximate.notes[-1] and np.mean(approximate.reach < exact.reach - 1e-6) > 0.9
    added, new_ids, removed = random_rows(10, 256, seed=1), np.arange(count, count + 10), np.arange(5, 3000, 300)
    changed = {name: set(rerank_module.update_state(state, added, new_ids, removed)[1].tolist())
               for name, state in (("exact", exact), ("approximate", approximate))}
    lost = {name: set(state.ids[np.isin(state.neighbours[:, 1:], removed).any(axis=1)].tolist()) - set(removed.tolist())
            for name, state in (("exact", exact), ("approximate", approximate))}
    either_lost = lost["exact"] | lost["approximate"]  # the fits' neighbourhoods differ, so do these
    assert changed["approximate"] - either_lost == changed["exact"] - either_lost  # new items, rows they enter
    assert len(changed["approximate"]) <= 1.5 * len(changed["exact"])
