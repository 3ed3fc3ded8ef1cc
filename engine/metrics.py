"""Retrieval quality from ranked id lists: precision@k, recall@k, average precision, per class.

Pure numpy, no model and no index: every function takes what a search already returned.

Conventions (the course's):

* ``ranked`` is a ``(Q, K)`` int array of database ids, best first; ``-1`` pads a short list and
  never counts as relevant. Ranks are taken as given: the engine's ``exact_search`` breaks equal
  scores by lower id first (``np.lexsort``), so rankings and therefore every figure here are
  deterministic; no tie averaging is done.
* Relevant = same label as the query.
* precision@k = relevant retrieved in the first k / k (a list padded with -1 still divides by k).
* recall@k = relevant retrieved in the first k / relevant in the database. In leave-one-out the
  query is not in its own relevant count (wang1k: 99 per query) and never in its own results
  (use :func:`leave_one_out_ranking`).
* AP = mean over the relevant database items of the precision at the rank where each was found;
  one never found contributes 0. Over a full ranking that is the usual AP; over a top-K list it is
  AP@K with the same denominator (a lower bound on the full AP).
* A query with no relevant item in the database (a single-member class in leave-one-out) has
  recall and AP undefined: they are NaN for that query and left out of every mean (the count of
  such queries is reported by :func:`summarize`). Its precision is defined (0).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from fastret.engine.index import exact_search

QUERY_CHUNK = 1024  # rows of queries ranked at a time, to bound the (chunk, N) score matrix


def relevance(ranked: np.ndarray, db_labels: np.ndarray, query_labels: np.ndarray) -> np.ndarray:
    """(Q, K) bool: whether each ranked id has the query's label (padding -1 is never relevant)."""
    ranked = np.asarray(ranked)
    db_labels = np.asarray(db_labels)
    query_labels = np.asarray(query_labels)
    if ranked.ndim != 2 or len(ranked) != len(query_labels):
        raise ValueError(f"ranked must be (Q, K) with Q = {len(query_labels)} queries, got {ranked.shape}")
    valid = ranked >= 0
    found = db_labels[np.where(valid, ranked, 0)]
    return valid & (found == query_labels[:, None])


def relevant_counts(db_labels: np.ndarray, query_labels: np.ndarray, leave_one_out: bool = False) -> np.ndarray:
    """(Q,) number of database items sharing each query's label; minus the query itself in leave-one-out."""
    classes, counts = np.unique(np.asarray(db_labels), return_counts=True)
    per_label = dict(zip(classes.tolist(), counts.tolist()))
    totals = np.array([per_label.get(label, 0) for label in np.asarray(query_labels).tolist()], dtype=np.int64)
    return totals - 1 if leave_one_out else totals


def precision_at_k(relevant: np.ndarray, k: int) -> np.ndarray:
    """(Q,) relevant in the first k / k."""
    _check_k(relevant, k)
    return relevant[:, :k].sum(axis=1) / float(k)


def recall_at_k(relevant: np.ndarray, n_relevant: np.ndarray, k: int) -> np.ndarray:
    """(Q,) relevant in the first k / relevant in the database; NaN where there is none."""
    _check_k(relevant, k)
    return _divide_or_nan(relevant[:, :k].sum(axis=1), n_relevant)


def average_precision(relevant: np.ndarray, n_relevant: np.ndarray) -> np.ndarray:
    """(Q,) AP of each ranked list, denominator = relevant in the database; NaN where there is none."""
    hits = np.cumsum(relevant, axis=1)
    ranks = np.arange(1, relevant.shape[1] + 1)
    precision_at_hits = np.where(relevant, hits / ranks, 0.0).sum(axis=1)
    return _divide_or_nan(precision_at_hits, n_relevant)


def nan_mean(values: np.ndarray) -> float:
    """Mean over the defined values; NaN when none is."""
    values = np.asarray(values, dtype=np.float64)
    defined = values[~np.isnan(values)]
    return float(defined.mean()) if len(defined) else float("nan")


def per_class(values: np.ndarray, query_labels: np.ndarray) -> dict[str, float]:
    """Mean of a per-query figure over the queries of each class (NaN-safe), classes sorted."""
    query_labels = np.asarray(query_labels)
    return {str(label): nan_mean(values[query_labels == label]) for label in np.unique(query_labels)}


def macro_mean(by_class: dict[str, float]) -> float:
    """Unweighted mean over classes: every class counts once whatever its size."""
    return nan_mean(np.array(list(by_class.values()), dtype=np.float64))


def summarize(
    ranked: np.ndarray,
    db_labels: np.ndarray,
    query_labels: np.ndarray,
    ks: Sequence[int],
    *,
    leave_one_out: bool = False,
    full_ranking: np.ndarray | None = None,
) -> dict:
    """P@k, R@k for each k and mAP: overall (mean over queries), macro and per class.

    ``full_ranking`` (every database id per query) gives the mAP; without it the mAP is AP@K of
    ``ranked``. Undefined values (NaN) appear as None so the dict is valid JSON.
    """
    query_labels = np.asarray(query_labels)
    n_relevant = relevant_counts(db_labels, query_labels, leave_one_out)
    relevant = relevance(ranked, db_labels, query_labels)
    per_query: dict[str, np.ndarray] = {}
    for k in ks:
        per_query[f"P@{k}"] = precision_at_k(relevant, k)
        per_query[f"R@{k}"] = recall_at_k(relevant, n_relevant, k)
    ap_source = relevant if full_ranking is None else relevance(full_ranking, db_labels, query_labels)
    per_query["mAP"] = average_precision(ap_source, n_relevant)
    classes = {name: per_class(values, query_labels) for name, values in per_query.items()}
    return {
        "queries": int(len(query_labels)),
        "queries_without_relevant": int((n_relevant == 0).sum()),
        "map_over": "full ranking" if full_ranking is not None else f"top {relevant.shape[1]}",
        "overall": {name: _json_float(nan_mean(values)) for name, values in per_query.items()},
        "macro": {name: _json_float(macro_mean(by_class)) for name, by_class in classes.items()},
        "per_class": {
            label: {name: _json_float(classes[name][label]) for name in per_query}
            for label in sorted(classes["mAP"])
        },
    }


def leave_one_out_ranking(embeddings: np.ndarray, k: int) -> np.ndarray:
    """(N, k) exact top-k of every row against all the others, the row itself never included.

    Ranks k + 1 with ``exact_search`` (ties: lower id first), then :func:`drop_self`.
    """
    embeddings = np.asarray(embeddings, dtype=np.float32)
    count = len(embeddings)
    k = max(min(k, count - 1), 0)
    ranked = np.empty((count, k), dtype=np.int64)
    for start in range(0, count, QUERY_CHUNK):
        stop = min(start + QUERY_CHUNK, count)
        ids, _ = exact_search(embeddings, embeddings[start:stop], k + 1)
        ranked[start:stop] = drop_self(ids, np.arange(start, stop))
    return ranked


def drop_self(ranked: np.ndarray, query_ids: np.ndarray) -> np.ndarray:
    """(Q, K) -> (Q, K - 1): remove each query's own id wherever it lands (a duplicate image can
    outrank it); a row that does not hold it loses its last entry instead."""
    ranked = np.asarray(ranked)
    is_self = ranked == np.asarray(query_ids)[:, None]
    first_self = np.argmax(is_self, axis=1)
    drop = np.where(is_self.any(axis=1), first_self, ranked.shape[1] - 1)
    keep = np.ones(ranked.shape, dtype=bool)
    keep[np.arange(len(ranked)), drop] = False
    return ranked[keep].reshape(len(ranked), ranked.shape[1] - 1)


def exact_ranking(db_embeddings: np.ndarray, query_embeddings: np.ndarray, k: int) -> np.ndarray:
    """(Q, k) exact top-k ids per query (ties: lower id first), ranked in chunks to bound memory."""
    db_embeddings = np.asarray(db_embeddings, dtype=np.float32)
    query_embeddings = np.asarray(query_embeddings, dtype=np.float32)
    k = min(k, len(db_embeddings))
    ranked = np.empty((len(query_embeddings), k), dtype=np.int64)
    for start in range(0, len(query_embeddings), QUERY_CHUNK):
        stop = min(start + QUERY_CHUNK, len(query_embeddings))
        ranked[start:stop], _ = exact_search(db_embeddings, query_embeddings[start:stop], k)
    return ranked


def _check_k(relevant: np.ndarray, k: int) -> None:
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if k > relevant.shape[1]:
        raise ValueError(f"k = {k} but the ranked lists hold only {relevant.shape[1]} results")


def _divide_or_nan(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    denominator = np.asarray(denominator, dtype=np.float64)
    out = np.full(len(denominator), np.nan)
    defined = denominator > 0
    out[defined] = np.asarray(numerator, dtype=np.float64)[defined] / denominator[defined]
    return out


def _json_float(value: float) -> float | None:
    return None if np.isnan(value) else round(float(value), 6)
