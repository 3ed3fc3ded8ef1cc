"""Retrieval evaluation: folders of labelled images -> P@k, R@k, mAP overall and per class, with stage times.

Two layers:

* :func:`evaluate_embeddings` is the seam: database embeddings + labels and query embeddings +
  labels in, metrics out. It knows nothing about files or models, so a caller can hand it
  embeddings from anywhere (cached .npy, a re-ranked list through ``search``, ...).
* :func:`evaluate_folders` does the whole job the way `fastret eval` runs it: open the encoder,
  embed the database (or load an index), embed the queries, search, score, timing each stage.

Labels are folder names (the image's parent directory). Leave-one-out uses every database image
as a query against all the others, itself excluded. P@k and R@k are measured on the search that
was asked for (HNSW by default, or exact); the mAP is always over the exact full ranking, since
an approximate index does not rank the whole database.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from fastret.engine.decode import list_images
from fastret.engine.encoders import describe_runtime
from fastret.engine.index import Index
from fastret.engine.load import encoder_for_index, open_encoder
from fastret.engine.metrics import drop_self, exact_ranking, leave_one_out_ranking, summarize
from fastret.engine.pipeline import Skipped, embed_files
from fastret.engine.rerank import RerankOptions, prepare_database, rerank_ranker
from fastret.engine.retrieval import build_index
from fastret.engine.tta import FlipAveragedEncoder

DEFAULT_KS = (1, 5, 10)
Search = Callable[[np.ndarray, int], np.ndarray]
"""(queries (Q, D), k) -> ranked database ids (Q, k), best first."""


def exact_search_over(db_embeddings: np.ndarray) -> Search:
    return lambda queries, k: exact_ranking(db_embeddings, queries, k)


def index_search(index: Index, *, exact: bool = False, ef: int | None = None) -> Search:
    """Search through an Index: its HNSW graph, or brute force with exact=True."""
    return lambda queries, k: index.search(queries, k, exact=exact, ef=ef)[0]


def evaluate_embeddings(
    db_embeddings: np.ndarray,
    db_labels: Sequence[str],
    query_embeddings: np.ndarray | None,
    query_labels: Sequence[str] | None,
    ks: Sequence[int] = DEFAULT_KS,
    *,
    search: Search | None = None,
    full_search: Search | None = None,
) -> dict:
    """Metrics of ranking the queries against the database; query_embeddings=None means leave-one-out.

    ``full_search`` ranks the whole database for the mAP (default: exact cosine); re-ranking
    passes its own, since its order differs from plain cosine.

    ``search`` ranks (default: exact cosine, ties to the lower id). In leave-one-out it is asked
    for k + 1 and each query's own id is removed. Returns :func:`summarize`'s dict plus
    ``search_seconds`` (the timed call of ``search`` over all queries at once).
    """
    db_embeddings = np.asarray(db_embeddings, dtype=np.float32)
    db_labels = np.asarray(db_labels)
    leave_one_out = query_embeddings is None
    queries = db_embeddings if leave_one_out else np.asarray(query_embeddings, dtype=np.float32)
    labels = db_labels if leave_one_out else np.asarray(query_labels)
    max_results = len(db_embeddings) - 1 if leave_one_out else len(db_embeddings)
    ks = sorted({k for k in ks if k <= max_results})
    if not ks:
        raise ValueError(f"every k is larger than the {max_results} images a query can retrieve")
    search = search or exact_search_over(db_embeddings)
    started = time.perf_counter()
    if leave_one_out:
        ranked = drop_self(search(queries, ks[-1] + 1), np.arange(len(queries)))
        full = (
            drop_self(full_search(queries, max_results + 1), np.arange(len(queries)))
            if full_search
            else leave_one_out_ranking(db_embeddings, max_results)
        )
    else:
        ranked = search(queries, ks[-1])
        full = None
    search_seconds = time.perf_counter() - started
    if full is None:
        full = full_search(queries, max_results) if full_search else exact_ranking(db_embeddings, queries, max_results)
    summary = summarize(ranked, db_labels, labels, ks, leave_one_out=leave_one_out, full_ranking=full)
    summary["ks"] = ks
    summary["search_seconds"] = round(search_seconds, 4)
    return summary


def folder_labels(paths: Sequence[Path]) -> list[str]:
    """Label of each image = its parent folder's name."""
    return [Path(p).parent.name for p in paths]


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
    exact: bool = False,
    ef: int | None = None,
    rerank: RerankOptions = RerankOptions(),
    flip_tta: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """The whole evaluation from folders, timing model load, database, query embedding and search.

    queries_dir=None means leave-one-out over the database. With ``index_dir`` the database
    embeddings come from that index (which must have been built from ``db_dir``) and its model.
    """
    db_dir = Path(db_dir).resolve()
    seconds: dict[str, float] = {}
    skipped: list[Skipped] = []

    def on_skip(skip: Skipped) -> None:
        skipped.append(skip)
        log(skip.line())

    started = time.perf_counter()
    if index_dir is not None:
        index = Index.load(index_dir)
        if Path(index.root).resolve() != db_dir:
            raise ValueError(f"{index_dir}: the index was built from {index.root}, not {db_dir}")
        seconds["index_load"] = _since(started)
        started = time.perf_counter()
        encoder = encoder_for_index(
            index.model,
            backend,
            threads=threads,
            precision=precision,
            workload="throughput",
            recorded=index.runtime,
            log=log,
        )
        encoder = FlipAveragedEncoder(encoder) if flip_tta else encoder  # queries only: the index is built
        seconds["model_load"] = _since(started)
    else:
        encoder = open_encoder(
            model, backend, threads=threads, image_dir=db_dir, precision=precision, workload="throughput", log=log
        )
        encoder = FlipAveragedEncoder(encoder) if flip_tta else encoder
        seconds["model_load"] = _since(started)
        started = time.perf_counter()
        index, _ = build_index(db_dir, encoder, on_skip=on_skip)
        seconds["database_embedding"] = _since(started)
    if len(index) == 0:
        raise ValueError(f"{db_dir}: no image could be embedded")

    query_embeddings = query_labels = None
    query_paths: list[Path] = []
    if queries_dir is not None:
        started = time.perf_counter()
        embedded = embed_files(list_images(queries_dir), encoder, on_skip=on_skip)
        seconds["query_embedding"] = _since(started)
        query_paths, query_embeddings = embedded.paths, embedded.embeddings
        query_labels = folder_labels(query_paths)
        if not query_paths:
            raise ValueError(f"{queries_dir}: no query image could be embedded")

    search = full_search = None
    if rerank.active:  # exact search over the prepared vectors, for the top k and the mAP alike
        started = time.perf_counter()
        prepared = prepare_database(index.embeddings, rerank)
        seconds["rerank_prepare"] = _since(started)
        search = full_search = rerank_ranker(prepared, rerank, leave_one_out=queries_dir is None)
    summary = evaluate_embeddings(
        index.embeddings,
        [item.label for item in index.items],
        query_embeddings,
        query_labels,
        ks,
        search=search or index_search(index, exact=exact, ef=ef),
        full_search=full_search,
    )
    seconds["search"] = summary.pop("search_seconds")
    return {
        "protocol": "leave-one-out" if queries_dir is None else "split",
        "db": str(db_dir),
        "queries_dir": None if queries_dir is None else str(Path(queries_dir).resolve()),
        "model": encoder.info.model_id,
        "backend": describe_runtime(encoder),
        "search": "exact + re-ranking" if rerank.active else "exact" if exact or index.hnsw is None else _hnsw_description(index, ef),
        "rerank": rerank.to_dict() if rerank.active else None,
        "flip_tta": flip_tta,
        "db_images": len(index),
        "skipped": [skip.line() for skip in skipped],
        "seconds": seconds,
        **summary,
    }


def _hnsw_description(index: Index, ef: int | None) -> str:
    params = index.hnsw_params
    return f"hnsw (M={params.M}, ef_construction={params.ef_construction}, ef={ef or params.ef_search})"


def _since(started: float) -> float:
    return round(time.perf_counter() - started, 4)

