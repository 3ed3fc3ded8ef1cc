"""What Index.load reads now and what it leaves for later: a server reads everything at once (a writer may
remove the version's files while it serves), a one-shot search only what its search reads."""

from __future__ import annotations

import numpy as np
import pytest

import fastret.engine.index as index_module
from fastret.engine.decode import Preprocessing
from fastret.engine.encoders import ModelInfo
from fastret.engine.index import Additions, HnswParams, Index, IndexState, Item, Sources, live_version
from fastret.engine.rerank import RerankOptions
from fastret.service.duplicates import open_for_duplicates
from fastret.service.search import Retriever, SearchOptions

DIM = 16
INFO = ModelInfo("test-model", "ef" * 32, DIM, Preprocessing(32, 32, "bilinear", (0.0,) * 3, (1.0,) * 3))
SMALL = RerankOptions(pca_dim=8, dba_n=3, qe_n=2)
RERANKED = SearchOptions(k=5, rerank=SMALL)
PLAIN = SearchOptions(k=5, rerank=RerankOptions())


def unit_rows(count: int, seed: int) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((count, DIM))
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture
def saved(tmp_path):
    index = Index(INFO, "/gallery", [Item(f"c/{i}.jpg", "c") for i in range(300)], unit_rows(300, 0),
                  HnswParams(M=8, ef_construction=100), rerank_options=SMALL)
    index.save(tmp_path / "idx")
    return tmp_path / "idx"


def remove_one_item(index_dir) -> None:
    """An edit: the writer makes a new version live and removes the old version's names."""
    old = live_version(index_dir)
    IndexState.read(index_dir).write(Additions([], np.empty((0, DIM), np.float32), Sources.unknown(0)), [299])
    assert not old.exists()


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("options", [RERANKED, PLAIN], ids=["reranked", "plain"])
def test_a_search_service_opened_before_an_edit_answers_after_the_writer_removed_its_version(saved, options, exact):
    """Regression: the re-ranking state was read on the first re-ranked query, from the version's files,
    which an edit had removed meanwhile (FileNotFoundError from a server's first query after an edit)."""
    options = SearchOptions(k=options.k, rerank=options.rerank, exact=exact)
    retriever = Retriever(Index.load(saved))
    expected = retriever.search_item(7, options)
    fresh = Retriever(Index.load(saved))  # opened, never searched
    remove_one_item(saved)
    assert fresh.search_item(7, options) == expected


def test_a_one_shot_reranked_search_leaves_the_raw_graph_on_disk(saved, monkeypatch):
    expected = Retriever(Index.load(saved)).search_item(7, PLAIN)
    real_load = index_module.load_hnsw
    loads = []
    monkeypatch.setattr(index_module, "load_hnsw", lambda *a, **k: loads.append(a[0].name) or real_load(*a, **k))
    retriever = Retriever.open(saved, images=False, searches=RERANKED)
    retriever.search_item(7, RERANKED)
    assert retriever.describe(RERANKED)["rerank"]["source"] == "index"
    assert [name for name in loads if name.startswith("graph-")] == []
    assert retriever.search_item(7, PLAIN) == expected  # a plain search reads it on first use
    assert [name for name in loads if name.startswith("graph-")] == ["graph-000000.bin"]


@pytest.mark.parametrize(
    ("searches", "graph_read"),
    [(None, True), (PLAIN, True), (RERANKED, False), (SearchOptions(rerank=RerankOptions(), exact=True), False)],
    ids=["server", "plain", "reranked", "plain-exact"],
)
def test_a_search_service_reads_the_graph_only_when_its_searches_use_it(saved, monkeypatch, searches, graph_read):
    real_load = index_module.load_hnsw
    loads = []
    monkeypatch.setattr(index_module, "load_hnsw", lambda *a, **k: loads.append(a[0].name) or real_load(*a, **k))
    retriever = Retriever.open(saved, images=False, searches=searches)
    assert any(name.startswith("graph-") for name in loads) == graph_read
    assert retriever.index.search_kind(False) == "hnsw"  # the graph is there either way


def test_a_graph_with_a_bad_header_is_refused_when_the_index_is_opened_even_if_left_on_disk(saved):
    graph = live_version(saved) / "graph-000000.bin"
    data = bytearray(graph.read_bytes())
    data[16:24] = (10**6).to_bytes(8, "little")  # hnswlib's element count: it would read out of bounds
    graph.write_bytes(bytes(data))
    with pytest.raises(index_module.BadIndex, match="graph-000000.bin checksum mismatch"):
        Index.load(saved, graph=False, rerank=False)


def test_the_duplicate_finder_leaves_the_reranking_state_on_disk(saved):
    """It ranks candidates by plain cosines through the raw graph: the state would be read for nothing."""
    index = open_for_duplicates(saved).index
    assert index.reranking is None and index.search_kind(False) == "hnsw"
