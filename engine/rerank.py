"""Retrieval beyond plain nearest neighbours: PCA / whitening, DBA, alpha-QE, k-reciprocal re-ranking.

All off by default (RerankOptions()), all pure numpy over unit embeddings, in one pipeline:

1. PCA (centre, project to fewer dimensions, optionally whiten) learned on the DATABASE vectors
   only, applied to database and queries alike, rows renormalised;
2. database-side augmentation (alpha-DBA): each database vector becomes the weighted sum of
   itself and its n nearest database neighbours;
3. alpha query expansion (alpha-QE): the query becomes the weighted sum of itself and its
   top-n results, then searches again;
4. k-reciprocal re-ranking (Zhong et al., CVPR 2017) of the top candidates, on a local graph of
   the query and those candidates.

Exclusions: `excludes[q]` are database ids treated as ABSENT for query q, not merely hidden
from its results: they are never ranked, never used to expand the query, never k-reciprocal
candidates, and removed from every other item's DBA neighbourhood. In leave-one-out the query
is a database item, so excluding its own id means no copy of the query ever helps rank it.

The search is exact (brute force) over the transformed vectors: the HNSW graph of an index is
built on the raw embeddings and would not match whitened or augmented ones. The learned state is
prepared in memory by the search service (the application layer); search never writes it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from fastret.engine.metrics import leave_one_out_ranking
from fastret.engine.tta import l2_normalise


@dataclass(frozen=True)
class RerankOptions:
    """Which re-ranking steps run, and their parameters; the defaults change nothing."""

    pca_dim: int | None = None  # PCA to this many dimensions, fitted on the database (None: off)
    pca_power: float = 0.0  # divide component i by eigenvalue_i ** power: 0 plain PCA, 0.5 whitening
    dba_n: int = 0  # database-side augmentation with n neighbours (0: off)
    dba_alpha: float = 1.0  # neighbour weight = similarity ** alpha (1 beat 3 and 5 here)
    qe_n: int = 0  # alpha query expansion with the top n results (0: off)
    qe_alpha: float = 1.0
    kreciprocal: bool = False  # k-reciprocal re-ranking of the top `candidates`
    k1: int = 20
    k2: int = 6
    lam: float = 0.3  # weight of the original distance in the final distance
    candidates: int = 100

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def active(self) -> bool:
        return bool(self.pca_dim or self.dba_n or self.qe_n or self.kreciprocal)

    def __post_init__(self) -> None:
        if self.pca_dim is not None and self.pca_dim < 1:
            raise ValueError(f"pca_dim must be a positive number of dimensions, got {self.pca_dim}")
        if min(self.dba_n, self.qe_n) < 0:
            raise ValueError("dba_n and qe_n must be >= 0")
        if self.kreciprocal and (self.k1 < 1 or self.k2 < 1 or self.candidates < 2 or not 0 <= self.lam <= 1):
            raise ValueError("k-reciprocal needs k1, k2 >= 1, candidates >= 2 and 0 <= lam <= 1")


RECOMMENDED_RERANK = RerankOptions(pca_dim=256, dba_n=5, qe_n=5)
"""`--rerank` in the CLI: PCA 256 + alpha-DBA 5 + alpha-QE 5 won P@10 and mAP on all four sets
measured, for at most about 1 ms a query (BENCHMARKS.md, 'Re-ranking and query expansion')."""


# --- PCA-whitening -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PcaWhitening:
    """x -> (x - mean) @ projection; projection columns are principal axes / eigenvalue**power."""

    mean: np.ndarray  # (D,)
    projection: np.ndarray  # (D, d)

    def apply(self, vectors: np.ndarray, normalise: bool = True) -> np.ndarray:
        out = (np.asarray(vectors, dtype=np.float32) - self.mean) @ self.projection
        return l2_normalise(out) if normalise else out.astype(np.float32)


def fit_pca_whitening(database: np.ndarray, dim: int | None = None, power: float = 0.5) -> PcaWhitening:
    """Learn PCA-whitening on database vectors (never on queries).

    With power 0.5 the training vectors come out with identity covariance (ddof 1) before the
    final renormalisation. `dim` is capped at the rank the data supports (count - 1).
    """
    x = np.asarray(database, dtype=np.float64)
    if len(x) < 2:
        raise ValueError("PCA-whitening needs at least 2 database vectors")
    mean = x.mean(axis=0)
    centred = x - mean
    eigenvalues, axes = np.linalg.eigh(centred.T @ centred / (len(x) - 1))  # (D, D): cheap for 10k x 1280
    eigenvalues, axes = eigenvalues[::-1], axes[:, ::-1]
    keep = int(np.sum(eigenvalues > eigenvalues[0] * 1e-9))  # directions the data really spans
    keep = min(keep, dim) if dim else keep
    projection = axes[:, :keep] / eigenvalues[:keep] ** power
    return PcaWhitening(mean.astype(np.float32), projection.astype(np.float32))


# --- top k of a score matrix ---------------------------------------------------------------------


def top_rows(scores: np.ndarray, k: int) -> np.ndarray:
    """(R, k) ids of the k highest scores of each row, best first, ties broken by lower id."""
    k = min(k, scores.shape[1])
    if k < scores.shape[1]:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    else:
        part = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    order = np.lexsort((part, -np.take_along_axis(scores, part, axis=1)), axis=1)
    return np.take_along_axis(part, order, axis=1)


# --- database-side augmentation ------------------------------------------------------------------


def weighted_sum(vectors: np.ndarray, similarities: np.ndarray, alpha: float) -> np.ndarray:
    """(R, n, d) vectors, (R, n) similarities -> (R, d) unit sums weighted by max(sim, 0) ** alpha.

    A similarity of -inf marks an absent vector: weight 0 whatever alpha.
    """
    weights = np.where(np.isfinite(similarities), np.clip(similarities, 0.0, None) ** alpha, 0.0)
    return l2_normalise(np.einsum("rn,rnd->rd", weights, vectors))


def dba_neighbours(database: np.ndarray, n: int) -> np.ndarray:
    """(N, n+1) ids: each item itself first, then its n nearest other items (ties: lower id)."""
    nearest = leave_one_out_ranking(database, n)
    return np.hstack([np.arange(len(database))[:, None], nearest])


def database_augmentation(database: np.ndarray, neighbours: np.ndarray, alpha: float) -> np.ndarray:
    """alpha-DBA: each neighbourhood row (an item first, then its neighbours) -> weighted sum."""
    vectors = database[neighbours]
    return weighted_sum(vectors, np.einsum("rd,rnd->rn", vectors[:, 0], vectors), alpha)


# --- alpha query expansion -----------------------------------------------------------------------


def alpha_query_expansion(
    queries: np.ndarray, top_vectors: np.ndarray, alpha: float, top_similarities: np.ndarray | None = None
) -> np.ndarray:
    """alpha-QE: (R, d) queries + their (R, n, d) top results weighted by similarity ** alpha.

    The query itself weighs 1; `top_similarities` (default: computed) may hold -inf for absent ones.
    """
    if top_similarities is None:
        top_similarities = np.einsum("rd,rnd->rn", queries, top_vectors)
    vectors = np.concatenate([queries[:, None], top_vectors], axis=1)
    similarities = np.hstack([np.ones((len(queries), 1), np.float32), top_similarities])
    return weighted_sum(vectors, similarities, alpha)


# --- k-reciprocal re-ranking ---------------------------------------------------------------------


def kreciprocal_distance(vectors: np.ndarray, k1: int, k2: int, lam: float) -> np.ndarray:
    """Final distance from node 0 (the query) to every node of a local graph (Zhong et al. 2017).

    vectors: (M, D) unit rows, row 0 the query, rows 1.. its candidates. The k-reciprocal sets
    (expanded with half-size reciprocal sets that overlap by more than 2/3) become Gaussian-
    weighted encodings, smoothed over each node's k2 nearest; the Jaccard distance of the
    encodings is blended with the original distance: (1 - lam) * jaccard + lam * original.
    """
    m = len(vectors)
    k1 = min(k1, m - 1)
    distance = np.clip(2.0 - 2.0 * (vectors @ vectors.T), 0.0, None)  # squared euclidean
    distance /= distance.max(axis=1, keepdims=True) + 1e-12  # per row, as in the paper's code
    order = np.argsort(distance, axis=1, kind="stable")  # each row: itself first
    rank_of = np.empty_like(order)
    np.put_along_axis(rank_of, order, np.arange(m)[None].repeat(m, 0), axis=1)

    def reciprocal(k: int) -> np.ndarray:
        within = rank_of <= k  # j among the k nearest of i (plus i itself)
        return within & within.T

    full, half = reciprocal(k1), reciprocal(max(1, int(round(k1 / 2))))
    overlap = full.astype(np.float32) @ half.T.astype(np.float32)  # |R(i) & R_half(j)|
    grows = full & (overlap > (2.0 / 3.0) * half.sum(axis=1)[None, :])
    expanded = full | ((grows.astype(np.float32) @ half.astype(np.float32)) > 0)
    encoding = np.where(expanded, np.exp(-distance), 0.0)
    encoding /= encoding.sum(axis=1, keepdims=True)
    if k2 > 1:
        encoding = encoding[order[:, : min(k2, m)]].mean(axis=1)
    minimum = np.minimum(encoding[0][None, :], encoding).sum(axis=1)
    maximum = np.maximum(encoding[0][None, :], encoding).sum(axis=1)
    jaccard = 1.0 - minimum / maximum
    return (1.0 - lam) * jaccard + lam * distance[0]


# --- the pipeline --------------------------------------------------------------------------------


@dataclass
class PreparedDatabase:
    """Database vectors in the space queries are compared in, and what is needed to get there."""

    base: np.ndarray  # (N, d) whitened (or raw) unit vectors, before DBA
    vectors: np.ndarray  # (N, d) what queries are scored against (DBA'd when DBA is on)
    whitening: PcaWhitening | None
    neighbours: np.ndarray | None  # (N, n+1) DBA neighbourhoods (item itself first)


def prepare_database(
    embeddings: np.ndarray,
    options: RerankOptions,
    *,
    whitening: PcaWhitening | None = None,
    neighbours: np.ndarray | None = None,
) -> PreparedDatabase:
    """Index-time work: fit the whitening on the database, augment the database vectors.

    `whitening` and `neighbours` (learned state saved by an earlier call) skip the fitting.
    PCA is skipped for a database of no more items than `pca_dim`: too few to fit the axes.
    """
    embeddings = np.asarray(embeddings, dtype=np.float32)
    if not options.pca_dim or len(embeddings) <= options.pca_dim:  # too few items to fit that many axes
        whitening = None
    elif whitening is None:
        whitening = fit_pca_whitening(embeddings, options.pca_dim, options.pca_power)
    base = whitening.apply(embeddings) if whitening else embeddings
    if options.dba_n and len(base) > 1:
        neighbours = dba_neighbours(base, options.dba_n) if neighbours is None else neighbours
        return PreparedDatabase(base, database_augmentation(base, neighbours, options.dba_alpha), whitening, neighbours)
    return PreparedDatabase(base, base, whitening, None)


@dataclass(frozen=True)
class Patch:
    """DBA'd rows that change when some items are absent: their ids and their new vectors."""

    rows: np.ndarray
    vectors: np.ndarray

    def scores(self, prepared: PreparedDatabase, queries: np.ndarray) -> np.ndarray:
        """(Q, N) cosines of query rows against the (patched) database vectors."""
        scores = queries @ prepared.vectors.T
        if len(self.rows):
            scores[:, self.rows] = queries @ self.vectors.T
        return scores

    def gather(self, prepared: PreparedDatabase, ids: np.ndarray) -> np.ndarray:
        out = prepared.vectors[ids]
        if not len(self.rows):
            return out
        where = np.searchsorted(self.rows, ids)
        patched = (where < len(self.rows)) & (self.rows[np.minimum(where, len(self.rows) - 1)] == ids)
        out[patched] = self.vectors[where[patched]]
        return out


NO_PATCH = Patch(np.empty(0, np.int64), np.empty((0, 0), np.float32))


def patch_without(prepared: PreparedDatabase, exclude: frozenset[int], alpha: float) -> Patch:
    """The DBA'd rows rebuilt as if `exclude` were not in the database (only affected rows).

    Cost: one row of scores per item that had an excluded item among its DBA neighbours.
    """
    if prepared.neighbours is None or not exclude:
        return NO_PATCH
    excluded = list(exclude)
    hit = np.isin(prepared.neighbours[:, 1:], excluded).any(axis=1)
    hit[excluded] = False  # absent items are never scored: no need to rebuild them
    rows = np.flatnonzero(hit)
    if not len(rows):
        return NO_PATCH
    scores = prepared.base[rows] @ prepared.base.T
    scores[:, excluded] = -np.inf
    scores[np.arange(len(rows)), rows] = -np.inf  # an item's own slot is the first, below
    nearest = top_rows(scores, prepared.neighbours.shape[1] - 1)
    similarities = np.hstack([np.ones((len(rows), 1), np.float32), np.take_along_axis(scores, nearest, axis=1)])
    neighbourhoods = np.hstack([rows[:, None], nearest])  # -inf similarity (too few items left): weight 0
    return Patch(rows, weighted_sum(prepared.base[neighbourhoods], similarities, alpha))


def rerank_rows(
    prepared: PreparedDatabase,
    queries: np.ndarray,
    k: int,
    options: RerankOptions,
    excludes: Sequence[frozenset[int]],
    patch: Patch = NO_PATCH,
) -> tuple[np.ndarray, np.ndarray]:
    """(R, k) ids and scores of a block of queries, scored together; -1 / -inf pad short rows.

    Scores are cosines in the final space (whitened / expanded when those are on); with
    k-reciprocal they are 1 - final distance for the re-ranked candidates, and the rest keep
    their order with scores capped at the lowest candidate's.
    """
    q = prepared.whitening.apply(queries) if prepared.whitening else l2_normalise(queries)

    def masked_scores(vectors: np.ndarray) -> np.ndarray:
        scores = patch.scores(prepared, vectors)
        for row, exclude in enumerate(excludes):
            scores[row, list(exclude)] = -np.inf
        return scores

    scores = masked_scores(q)
    if options.qe_n:
        top = top_rows(scores, options.qe_n)
        top_scores = np.take_along_axis(scores, top, axis=1)
        q = alpha_query_expansion(q, patch.gather(prepared, top), options.qe_alpha, top_scores)
        scores = masked_scores(q)
    depth = max(k, options.candidates if options.kreciprocal else 0)
    ranked = top_rows(scores, depth)
    values = np.take_along_axis(scores, ranked, axis=1)
    if options.kreciprocal:
        for row in range(len(q)):
            ranked[row], values[row] = kreciprocal_rerank(q[row], ranked[row], values[row], prepared, patch, options)
    ranked, values = ranked[:, :k], values[:, :k]
    return np.where(np.isfinite(values), ranked, -1), values.astype(np.float32)


def kreciprocal_rerank(
    query: np.ndarray, ranked: np.ndarray, values: np.ndarray, prepared: PreparedDatabase, patch: Patch,
    options: RerankOptions,
) -> tuple[np.ndarray, np.ndarray]:
    """Re-order the first `candidates` of one ranked row (absent items, -inf, stay at the end)."""
    head = ranked[: min(options.candidates, int(np.isfinite(values).sum()))]
    if len(head) < 2:
        return ranked, values
    local = np.vstack([query[None], patch.gather(prepared, head)])
    final = kreciprocal_distance(local, options.k1, options.k2, options.lam)[1:]
    order = np.lexsort((head, final))
    head_scores = 1.0 - final[order]  # the tail keeps its order, scored no higher than the head
    return np.r_[head[order], ranked[len(head) :]], np.r_[head_scores, np.minimum(values[len(head) :], head_scores.min())]


QUERY_BLOCK = 256  # queries scored together: bounds the (block, N) score matrix


def rerank_search(
    prepared: PreparedDatabase,
    queries: np.ndarray,
    k: int,
    options: RerankOptions,
    excludes: Sequence[frozenset[int]] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(Q, k) ids and scores; rows shorter than k (exclusions) are padded with id -1, score -inf.

    Queries are scored in blocks (matrix products); a query whose exclusions change DBA
    neighbourhoods (leave-one-out with DBA) runs alone with its own patched database rows.
    """
    queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
    excludes = [frozenset(e) for e in excludes] if excludes is not None else [frozenset()] * len(queries)
    if len(excludes) != len(queries):
        raise ValueError(f"{len(excludes)} exclusion sets for {len(queries)} queries")
    k = min(k, len(prepared.vectors))
    ids = np.full((len(queries), k), -1, dtype=np.int64)
    scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    patched = prepared.neighbours is not None and any(excludes)
    blocks = [[i] for i in range(len(queries))] if patched else [
        list(range(start, min(start + QUERY_BLOCK, len(queries)))) for start in range(0, len(queries), QUERY_BLOCK)
    ]
    for rows in blocks:
        block_excludes = [excludes[i] for i in rows]
        patch = patch_without(prepared, block_excludes[0], options.dba_alpha) if patched else NO_PATCH
        ids[rows], scores[rows] = rerank_rows(prepared, queries[rows], k, options, block_excludes, patch)
    return ids, scores


def rerank_ranker(prepared: PreparedDatabase, options: RerankOptions, *, leave_one_out: bool = False):
    """A search for engine.evaluation: (queries (Q, D), k) -> (Q, k) ids, best first.

    In leave-one-out query row i IS database item i, so item i is absent for query i (its
    rows come back one short, padded with -1, which `drop_self` then drops).
    """

    def search(queries: np.ndarray, k: int) -> np.ndarray:
        excludes = [frozenset({i}) for i in range(len(queries))] if leave_one_out else None
        return rerank_search(prepared, queries, k, options, excludes=excludes)[0]

    return search
