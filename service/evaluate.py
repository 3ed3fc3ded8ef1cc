"""`fastret eval` as a job: open the encoder, embed the database (or load an index), embed the
queries, search, score, timing each stage. The metrics themselves are fastret.engine.evaluation."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Sequence

from fastret.engine.decode import list_images
from fastret.engine.encoders import describe_runtime
from fastret.engine.evaluation import DEFAULT_KS, evaluate_embeddings, folder_labels
from fastret.engine.index import Index, fit_rerank
from fastret.engine.lance_store import LanceIndex
from fastret.engine.pipeline import Skipped, embed_files
from fastret.engine.retrieval import build_index
from fastret.engine.tta import FlipAveragedEncoder
from fastret.service.load import encoder_for_index, open_encoder
from fastret.service.search import Retriever, SearchOptions
from fastret.service.stores import open_index


def evaluate_folders(
    db_dir: str | Path,
    queries_dir: str | Path | None,
    ks: Sequence[int] = DEFAULT_KS,
    *,
    model: str = "auto",
    backend: str = "auto",
    precision: str = "auto",
    threads: int | None = None,
    index_dir: str | Path | None = None,
    options: SearchOptions = SearchOptions(),
    log: Callable[[str], None] = lambda _: None,
) -> dict:
    """The whole evaluation from folders, timing model load, database, query embedding and search.

    queries_dir=None means leave-one-out over the database. With ``index_dir`` the database
    embeddings come from that index (which must have been built from ``db_dir``) and its model.
    Rankings come from the search service with `options` (its k is unused: `ks` are the cut-offs);
    with flip_tta, a database embedded here is flip-averaged too, an index's is as it was built.
    """
    if index_dir is not None and model != "auto":
        raise ValueError(f"--model {model}: an index is searched with the model that built it; drop --model or --index")
    db_dir = Path(db_dir).resolve()
    seconds: dict[str, float] = {}
    skipped: list[Skipped] = []

    def on_skip(skip: Skipped) -> None:
        skipped.append(skip)
        log(skip.line())

    started = time.perf_counter()
    if index_dir is not None:
        index = open_index(index_dir)  # an hnswlib index or a LanceDB store
        if Path(index.root).resolve() != db_dir:
            raise ValueError(f"{index_dir}: the index was built from {index.root}, not {db_dir}")
        seconds["index_load"] = _since(started)
        started = time.perf_counter()
        encoder = encoder_for_index(index, backend, threads=threads, precision=precision, workload="throughput", log=log)
        retriever = Retriever(index, encoder)
        encoder = FlipAveragedEncoder(encoder) if options.flip_tta else encoder  # queries only: the index is built
        seconds["model_load"] = _since(started)
    else:
        encoder = open_encoder(
            model, backend, threads=threads, image_dir=db_dir, precision=precision, workload="throughput", log=log
        )
        encoder = FlipAveragedEncoder(encoder) if options.flip_tta else encoder
        seconds["model_load"] = _since(started)
        started = time.perf_counter()
        index, _ = build_index(db_dir, encoder, on_skip=on_skip, thumbnails=False)  # searched, then gone
        retriever = Retriever(index, encoder)
        seconds["database_embedding"] = _since(started)
    if len(index) == 0:
        raise ValueError(f"{db_dir}: no image could be embedded")

    query_embeddings = query_labels = None
    query_paths: list[Path] = []
    if queries_dir is not None:
        started = time.perf_counter()
        embedded = embed_files(list_images(queries_dir, on_skip=on_skip), encoder, on_skip=on_skip)
        seconds["query_embedding"] = _since(started)
        query_paths, query_embeddings = embedded.paths, embedded.embeddings
        query_labels = folder_labels(query_paths)
        if not query_paths:
            raise ValueError(f"{queries_dir}: no query image could be embedded")

    full_search = None
    if options.rerank.active and retriever.can_rerank:  # the mAP ranks the whole database in the re-ranked space too
        started = time.perf_counter()
        if index.rerank_state() is None:  # built here: fitted as `fastret index` would
            index.reranking = fit_rerank(index.embeddings, index.ids, options.rerank, index.hnsw_params)
        retriever.ranker(options)  # loads the state, or prepares options the index does not hold
        seconds["rerank_prepare"] = _since(started)
        full_search = retriever.ranker(options, leave_one_out=queries_dir is None)
    summary = evaluate_embeddings(
        index.embeddings,
        [item.label for item in index.items],
        query_embeddings,
        query_labels,
        ks,
        search=retriever.ranker(options, leave_one_out=queries_dir is None),
        full_search=full_search,
    )
    seconds["search"] = summary.pop("search_seconds")
    described = retriever.describe(options)
    return {
        "protocol": "leave-one-out" if queries_dir is None else "split",
        "db": str(db_dir),
        "queries_dir": None if queries_dir is None else str(Path(queries_dir).resolve()),
        "model": encoder.info.model_id,
        "backend": describe_runtime(encoder),
        "search": _describe_search(index, described),
        "rerank": described["rerank"],
        "flip_tta": options.flip_tta,
        "db_images": len(index),
        "skipped": [skip.line() for skip in skipped],
        "seconds": seconds,
        **summary,
    }


def _describe_search(index: Index, described: dict) -> str:
    """'exact', or 'hnsw (...)' with the graph's parameters and the ef it searched with."""
    if isinstance(index, LanceIndex):  # its own ANN index (re-ranking falls back to the plain ranking)
        return index.describe_search("exact" if described["exact"] else "hnsw", described["ef"])
    if described["search"] != "hnsw":
        return "exact"
    params = index.hnsw_params
    rerank = described["rerank"]
    ef = rerank["ef"] if rerank else described["ef"] or params.ef_search
    space = f"re-ranked {rerank['dim']}-d" if rerank else "raw"
    return f"hnsw ({space}, M={params.M}, ef_construction={params.ef_construction}, ef={ef})"


def _since(started: float) -> float:
    return round(time.perf_counter() - started, 4)

