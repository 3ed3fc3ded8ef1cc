"""Retrieval evaluation: folders of labelled images -> P@k, R@k, mAP overall and per class, with stage times.

:func:`evaluate_embeddings` is the seam: database embeddings + labels and query embeddings +
labels in, metrics out. It knows nothing about files or models, so a caller can hand it
embeddings from anywhere (cached .npy, a re-ranked list through ``search``, ...). The whole job
from folders, the way `fastret eval` runs it, is service/evaluate.py.

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

from fastret.engine.index import Index
from fastret.engine.metrics import drop_self, exact_ranking, leave_one_out_ranking, summarize

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
