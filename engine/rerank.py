"""Retrieval beyond plain nearest neighbours: PCA / whitening, DBA, alpha-QE, k-reciprocal re-ranking.

RerankOptions() runs none of them (the plain ranking); RECOMMENDED_RERANK is fastret's default
ranking. Pure numpy over unit embeddings (hnswlib for the graph), in one pipeline:

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

Two ways to hold the learned state:

* `RerankState`: part of an index version, made by its writers (`fit_state` on a full build or a
  refit, `update_state` on an edit): the PCA, the projected and DBA'd vectors of the live items
  (in id order), each item's DBA neighbourhood and an HNSW graph over the DBA'd vectors (labels =
  item ids) with the `ef` that measured `target` recall@10 on the items themselves. Rows an edit
  changed since the graph was written are `pending`: their old nodes are marked deleted and they
  are searched exactly until `take_in` moves them into the graph. `graph_search` runs the
  pipeline through the graph (and the pending rows); `rerank_search` over `state.prepared()` runs
  it exactly.
* `prepare_database`: the same space prepared in memory, for options an index does not hold
  (another PCA dimension, say), searched exactly.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Sequence

import numpy as np

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
"""The default ranking everywhere (`--no-rerank` turns it off): PCA 256 + alpha-DBA 5 + alpha-QE 5
won P@10 and mAP on all four sets measured (BENCHMARKS.md, 'Re-ranking and query expansion')."""


def dba_items(n: int) -> int:
    """The fewest items DBA with n neighbours runs on: each item's neighbourhood (itself and n
    others) at most half the database; below, it would blur the database rather than denoise it."""
    return 2 * (n + 1)


def fitted_options(count: int, options: RerankOptions) -> tuple[RerankOptions, tuple[str, ...]]:
    """The steps that can run on a database of `count` items, and one note per step dropped."""
    notes = []
    pca_dim, dba_n = options.pca_dim, options.dba_n
    if pca_dim and count <= pca_dim:
        notes.append(f"no PCA: {count} items are too few to fit {pca_dim} axes (it needs more than {pca_dim})")
        pca_dim = None
    if dba_n and count < dba_items(dba_n):
        notes.append(f"no DBA: {count} items are too few for {dba_n} neighbours each (it needs {dba_items(dba_n)})")
        dba_n = 0
    return replace(options, pca_dim=pca_dim, dba_n=dba_n), tuple(notes)


# --- PCA-whitening -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PcaWhitening:
    """x -> (x - mean) @ projection; projection columns are principal axes / eigenvalue**power."""

    mean: np.ndarray  # (D,)
    projection: np.ndarray  # (D, d)

    def apply(self, vectors: np.ndarray, normalise: bool = True) -> np.ndarray:
        out = (np.asarray(vectors, dtype=np.float32) - self.mean) @ self.projection
        return l2_normalise(out) if normalise else out.astype(np.float32)


PCA_SAMPLE = 50_000
"""Items the PCA is fitted on at most (a seeded random sample of larger databases)."""


def fit_pca_whitening(database: np.ndarray, dim: int | None = None, power: float = 0.5) -> PcaWhitening:
    """Learn PCA-whitening on database vectors (never on queries).

    With power 0.5 the training vectors come out with identity covariance (ddof 1) before the
    final renormalisation. `dim` is capped at the rank the data supports (count - 1).
    """
    x = np.asarray(database, dtype=np.float32)
    if len(x) < 2:
        raise ValueError("PCA-whitening needs at least 2 database vectors")
    if len(x) > PCA_SAMPLE:  # the axes of a million items are those of a large sample of them
        x = x[np.sort(np.random.default_rng(0).choice(len(x), PCA_SAMPLE, replace=False))]
    mean = x.mean(axis=0, dtype=np.float64)
    centred = (x - mean).astype(np.float32)
    covariance = (centred.T @ centred).astype(np.float64) / (len(x) - 1)  # a float32 product: 4x faster
    eigenvalues, axes = np.linalg.eigh(covariance)  # (D, D)
    eigenvalues, axes = eigenvalues[::-1], axes[:, ::-1]
    keep = int(np.sum(eigenvalues > eigenvalues[0] * 1e-6))  # directions the data really spans (float32 noise below)
    keep = min(keep, dim) if dim else keep
    projection = axes[:, :keep] / eigenvalues[:keep] ** power
    return PcaWhitening(mean.astype(np.float32), projection.astype(np.float32))


# --- top k of a score matrix ---------------------------------------------------------------------


def distinct(values: np.ndarray) -> np.ndarray:
    """The sorted distinct values of a 1-d array: np.unique without the import of numpy.ma that numpy 2's
    unique makes on its first call, which a one-shot search would wait for."""
    values = np.sort(values)
    return values[np.concatenate(([True], values[1:] != values[:-1]))] if len(values) else values


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
    rows = np.arange(len(database))
    return np.hstack([rows[:, None], nearest_others(database, rows, min(n, len(database) - 1))[0]])


NEIGHBOUR_BLOCK_CELLS = 2**25
"""Scores held at once while finding neighbours exactly (a (rows, N) float32 block: 128 MiB)."""


def nearest_others(database: np.ndarray, rows: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(R, n) nearest other rows of `rows` (ties: lower row) and their similarities, exactly;
    -1 / -inf pad rows of a database with fewer than n others."""
    rows = np.asarray(rows, dtype=np.int64)
    nearest = np.full((len(rows), n), -1, np.int64)
    similarities = np.full((len(rows), n), -np.inf, np.float32)
    block = max(1, NEIGHBOUR_BLOCK_CELLS // max(1, len(database)))
    for start in range(0, len(rows), block):
        part = rows[start : start + block]
        scores = database[part] @ database.T
        scores[np.arange(len(part)), part] = -np.inf
        top = top_rows(scores, min(n, len(database)))
        top_scores = np.take_along_axis(scores, top, axis=1)
        found = np.isfinite(top_scores)
        width = top.shape[1]
        nearest[start : start + len(part), :width] = np.where(found, top, -1)
        similarities[start : start + len(part), :width] = top_scores
    return nearest, similarities


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
    Steps the database is too small for are skipped (`fitted_options`).
    """
    embeddings = np.asarray(embeddings, dtype=np.float32)
    options = fitted_options(len(embeddings), options)[0]
    if not options.pca_dim:
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


# --- the re-ranking state of an index ------------------------------------------------------------

STORED_STEPS = ("pca_dim", "pca_power", "dba_n", "dba_alpha")
"""The options a RerankState is fitted for; the others (QE, k-reciprocal) are chosen per query."""
TARGET_RECALL = 0.99
"""Recall@10 of the graph against exact search that the automatic ef must reach on the items."""
EF_STEPS = (10, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
TUNING_SAMPLE = 500
TUNING_MARGIN = 0.5
"""The held-out queries may miss at most this share of what the target allows (see tune_ef)."""
"""Items held out of the graph as queries while the ef is measured (at most a tenth of them)."""
EXACT_NEIGHBOURS = 50_000
"""Above this many items a fit finds DBA neighbourhoods through a graph over the projected vectors
(approximate; exact below: a (N, N) product)."""
GRAPH_GROWTH = 1.5
"""When the graph must grow, it grows to this many times what it needs."""
REFIT_SHARE = 0.25
"""Items added since the fit above this share of the items fitted on: the next edit refits."""

GraphMaker = Callable[[np.ndarray, np.ndarray], object]
"""(vectors (N, d), ids (N,)) -> an hnswlib cosine graph of them labelled with the ids."""


@dataclass
class RerankState:
    """The re-ranking space of an index version: rows are the live items in id order."""

    options: RerankOptions  # the steps asked for (STORED_STEPS matter)
    ran: RerankOptions  # the steps this many items allowed (fitted_options)
    notes: tuple[str, ...]  # why a step asked for did not run
    whitening: PcaWhitening | None
    ids: np.ndarray  # (N,) int64 item ids, increasing
    base: np.ndarray  # (N, d) projected unit vectors
    vectors: np.ndarray  # (N, d) DBA'd unit vectors: what queries are scored against
    neighbours: np.ndarray  # (N, n+1) ids of each DBA neighbourhood, the item first (-1: none); (N, 0) without DBA
    reach: np.ndarray  # (N,) similarity of each item's n-th neighbour (-inf: fewer than n, or no DBA)
    graph: object  # hnswlib graph over `vectors`, labels = ids (removed items marked deleted)
    ef: int  # the automatic ef at query time
    recall: float  # recall@10 measured at that ef
    fitted: int  # items the PCA was fitted on
    added: int = 0  # items added since
    # rows outside the graph (changed since it was written; their old nodes marked deleted): searched exactly
    pending: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    _prepared: PreparedDatabase | None = field(default=None, repr=False)
    _pending_vectors: np.ndarray | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.ids)

    def holds(self, options: RerankOptions) -> bool:
        """Whether these re-ranking options search this state (same PCA and DBA, no k-reciprocal)."""
        return not options.kreciprocal and all(
            getattr(options, name) == getattr(self.options, name) for name in STORED_STEPS
        )

    def project(self, queries: np.ndarray) -> np.ndarray:
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        return self.whitening.apply(queries) if self.whitening else l2_normalise(queries)

    def prepared(self) -> PreparedDatabase:
        """The state as the exact pipeline takes it (DBA neighbourhoods as rows)."""
        if self._prepared is None:
            neighbours = None
            if self.ran.dba_n:
                neighbours = np.searchsorted(self.ids, self.neighbours)
                neighbours[self.neighbours < 0] = -1
            self._prepared = PreparedDatabase(self.base, self.vectors, self.whitening, neighbours)
        return self._prepared

    def summary(self) -> dict:
        """What ran, for reports: the steps, the projected dimension, the graph's ef and recall."""
        return {
            "pca_dim": self.ran.pca_dim, "pca_power": self.ran.pca_power, "dba_n": self.ran.dba_n,
            "dba_alpha": self.ran.dba_alpha, "dim": int(self.base.shape[1]), "ef": self.ef,
            "recall@10": round(self.recall, 4), "items": len(self), "fitted_on": self.fitted,
            "added_since_fit": self.added, "searched_exactly": len(self.pending), "notes": list(self.notes),
        }

    def pending_vectors(self) -> np.ndarray:
        """The DBA'd vectors of the pending rows, gathered once."""
        if self._pending_vectors is None:
            self._pending_vectors = np.ascontiguousarray(self.vectors[self.pending])
        return self._pending_vectors


def fit_state(
    embeddings: np.ndarray, ids: np.ndarray, options: RerankOptions, make_graph: GraphMaker,
    *, whitening: PcaWhitening | None = None, target: float = TARGET_RECALL,
) -> RerankState:
    """Fit the PCA on the items (or take `whitening`), augment them, graph them, choose the ef."""
    embeddings = np.asarray(embeddings, dtype=np.float32)
    ids = np.asarray(ids, dtype=np.int64)
    ran, notes = fitted_options(len(embeddings), options)
    if not ran.pca_dim:
        whitening = None
    elif whitening is None:
        whitening = fit_pca_whitening(embeddings, ran.pca_dim, ran.pca_power)
    base = whitening.apply(embeddings) if whitening else l2_normalise(embeddings)
    n = ran.dba_n
    if n:
        if len(base) > EXACT_NEIGHBOURS:
            nearest, similarities = _graph_neighbours(base, n, make_graph)
            notes += (f"DBA neighbourhoods found through a graph (more than {EXACT_NEIGHBOURS:,} items)",)
        else:
            nearest, similarities = nearest_others(base, np.arange(len(base)), n)
        vectors = _augment(base, np.arange(len(base)), nearest, similarities, ran.dba_alpha)
        neighbours = np.hstack([ids[:, None], np.where(nearest >= 0, ids[nearest], -1)])
        reach = similarities[:, -1].copy()
    else:
        vectors = base
        neighbours, reach = np.empty((len(base), 0), np.int64), np.full(len(base), -np.inf, np.float32)
    held_out = np.sort(np.random.default_rng(0).choice(len(ids), min(TUNING_SAMPLE, len(ids) // 10), replace=False))
    in_graph = np.setdiff1d(np.arange(len(ids)), held_out)
    state = RerankState(options, ran, notes, whitening, ids, base, vectors, neighbours, reach,
                        make_graph(vectors[in_graph], ids[in_graph]), ef=EF_STEPS[-1], recall=1.0, fitted=len(ids))
    if len(held_out):  # measured with items held out of the graph as queries (as a new photo is), then added
        probe = replace(state, ran=replace(ran, dba_n=0), ids=ids[in_graph], base=base[in_graph],
                        vectors=vectors[in_graph], neighbours=neighbours[in_graph, :0], reach=reach[in_graph])
        state.ef, state.recall = tune_ef(probe, embeddings[held_out], target)
        state.graph.resize_index(len(ids))
        state.graph.add_items(vectors[held_out], ids[held_out])
    else:  # too few items to hold some out: an ef that visits them all
        state.ef = max(EF_STEPS[0], len(ids))
    return state


def _augment(base: np.ndarray, rows: np.ndarray, nearest: np.ndarray, similarities: np.ndarray,
             alpha: float) -> np.ndarray:
    """alpha-DBA of `rows` from their nearest other rows (-1 / -inf: absent, weight 0)."""
    hood = np.hstack([rows[:, None], np.maximum(nearest, 0)])
    weights = np.hstack([np.ones((len(rows), 1), np.float32), similarities])
    return weighted_sum(base[hood], weights, alpha)


def _graph_neighbours(base: np.ndarray, n: int, make_graph: GraphMaker) -> tuple[np.ndarray, np.ndarray]:
    """Approximate nearest others of every row through a graph of the rows (labels = rows)."""
    graph = make_graph(base, np.arange(len(base)))
    graph.set_ef(max(4 * (n + 1), 64))
    labels, distances = graph.knn_query(base, k=n + 1)
    labels = labels.astype(np.int64)
    similarities = (1.0 - distances).astype(np.float32)
    own = labels == np.arange(len(base))[:, None]
    drop = np.where(own.any(axis=1), np.argmax(own, axis=1), n)  # the row itself, else the last
    keep = np.ones(labels.shape, bool)
    keep[np.arange(len(base)), drop] = False
    return labels[keep].reshape(len(base), n), similarities[keep].reshape(len(base), n)


def tune_ef(state: RerankState, queries: np.ndarray, target: float, k: int = 10) -> tuple[int, float]:
    """The ef the graph pipeline searches with: one step of EF_STEPS above the smallest whose recall@k
    against the exact pipeline misses at most TUNING_MARGIN of what `target` allows on `queries`
    (or the largest step), and the recall measured at it.

    The margins: held-out items are easier queries than new photos (their neighbours' DBA'd
    vectors still hold a share of them), and a few hundred queries measure recall coarsely.
    """
    required = 1.0 - (1.0 - target) * TUNING_MARGIN
    truth = rerank_search(state.prepared(), queries, k, state.options)[0]

    def recall_at(ef: int) -> float:
        found = graph_search(state, queries, k, state.options, ef=ef)[0]
        hits = [len(np.intersect1d(row[row >= 0], best[best >= 0])) for row, best in zip(found, truth)]
        return float(np.sum(hits)) / max(1, int((truth >= 0).sum()))

    for step, ef in enumerate(EF_STEPS):
        if recall_at(ef) >= required:
            ef = EF_STEPS[min(step + 1, len(EF_STEPS) - 1)]
            break
    return ef, recall_at(ef)


def update_state(state: RerankState, embeddings: np.ndarray, new_ids: np.ndarray,
                 removed: np.ndarray) -> tuple[RerankState, np.ndarray]:
    """The state after an edit, with the stored PCA, and the ids of the rows the edit changed: the
    new items (projected and augmented) and every item whose DBA neighbourhood the edit changes (a
    neighbour removed, or a new item among its n nearest), augmented again.

    Neighbourhoods are found exactly, so after an exact fit the rows equal `fit_state`'s of the live
    items with the same whitening (to float rounding). A fit through a graph may store an n-th
    neighbour farther than the true one; a new item nearer than that changes the row only when it
    is among the row's n nearest, so an edit changes about as many rows as after an exact fit.
    The graph is not touched: the changed rows join the pending ones (searched exactly), and the
    returned state holds no graph; the writer loads the stored one marked for it, or takes the
    pending rows in (`take_in`).
    """
    new_ids = np.asarray(new_ids, dtype=np.int64)
    removed = np.asarray(removed, dtype=np.int64)
    keep = ~np.isin(state.ids, removed)
    old = int(keep.sum())
    ids = np.concatenate([state.ids[keep], new_ids])
    new_base = state.project(embeddings) if len(new_ids) else np.empty((0, state.base.shape[1]), np.float32)
    base = np.vstack([state.base[keep], new_base])
    vectors = np.vstack([state.vectors[keep], new_base])
    neighbours = np.vstack([state.neighbours[keep], np.full((len(new_ids), state.neighbours.shape[1]), -1, np.int64)])
    reach = np.concatenate([state.reach[keep], np.full(len(new_ids), -np.inf, np.float32)])
    new_rows = np.arange(old, len(ids))
    changed = new_rows
    n = state.ran.dba_n
    if n:
        lost = np.isin(neighbours[:old, 1:], removed).any(axis=1)
        nearer = np.zeros(old, bool)  # a new item nearer than the stored n-th neighbour
        block = max(1, NEIGHBOUR_BLOCK_CELLS // max(1, len(new_ids)))
        for start in range(0, old if len(new_ids) else 0, block):
            stop = min(start + block, old)
            nearer[start:stop] = (base[start:stop] @ new_base.T).max(axis=1) > reach[start:stop]
        candidates = np.concatenate([np.flatnonzero(lost | nearer), new_rows])
        nearest, similarities = nearest_others(base, candidates, n)
        entered = (nearest >= old).any(axis=1)  # a new item among the n nearest
        take = np.concatenate([lost[candidates[candidates < old]], np.ones(len(new_rows), bool)]) | entered
        changed, nearest, similarities = candidates[take], nearest[take], similarities[take]
        vectors[changed] = _augment(base, changed, nearest, similarities, state.ran.dba_alpha)
        neighbours[changed] = np.hstack([ids[changed][:, None], np.where(nearest >= 0, ids[np.maximum(nearest, 0)], -1)])
        reach[changed] = similarities[:, -1]
    still_pending = np.searchsorted(ids, np.intersect1d(state.ids[state.pending], ids[:old]))
    pending = np.union1d(still_pending, changed).astype(np.int64)
    updated = replace(state, ids=ids, base=base, vectors=vectors, neighbours=neighbours, reach=reach, graph=None,
                      added=state.added + len(new_ids), pending=pending, _prepared=None, _pending_vectors=None)
    return updated, ids[changed]


def take_in(state: RerankState, graph, moved: np.ndarray) -> RerankState:
    """The state with its pending rows taken into `graph` and nothing left pending.

    `graph` is the stored graph loaded with allow_replace_deleted, its nodes of removed and pending
    items marked deleted; `moved`: the pending ids it has a node of (their rows changed). Those
    nodes are unmarked and moved to their new vectors (hnswlib updates an existing label in place);
    new items take the slots of removed ones, and the graph grows by GRAPH_GROWTH when they run out.
    """
    rows = state.pending
    ids = state.ids[rows]
    old = np.isin(ids, moved)
    for item_id in ids[old]:
        graph.unmark_deleted(int(item_id))
    if old.any():
        graph.add_items(state.vectors[rows[old]], ids[old])
    new = rows[~old]
    if len(new):
        slots = graph.get_current_count()
        reusable = slots - (len(state) - len(new))  # slots of removed items
        needed = slots + max(0, len(new) - reusable)
        if needed > graph.get_max_elements():
            graph.resize_index(math.ceil(needed * GRAPH_GROWTH))
        graph.add_items(state.vectors[new], state.ids[new], replace_deleted=True)
    return replace(state, graph=graph, pending=np.empty(0, np.int64), _pending_vectors=None)


def graph_search(
    state: RerankState,
    queries: np.ndarray,
    k: int,
    options: RerankOptions,
    excludes: Sequence[frozenset[int]] | None = None,
    ef: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The re-ranked pipeline through the state's graph: (Q, k) rows and scores, -1 / -inf padding.

    Project, search the graph (and the pending rows, exactly), expand the query with its top qe_n
    (alpha-QE), search again. Candidates are re-scored exactly against the (patched) DBA'd
    vectors, so a score is the same cosine the exact pipeline gives; `excludes[q]` (rows) are
    absent as in `rerank_search`: the graph is asked for that many more, and the rows whose DBA
    neighbourhood they were in are re-scored from their patched vectors.
    """
    prepared = state.prepared()
    q = state.project(queries)
    excludes = [frozenset(e) for e in excludes] if excludes is not None else [frozenset()] * len(q)
    if len(excludes) != len(q):
        raise ValueError(f"{len(excludes)} exclusion sets for {len(q)} queries")
    patches = [patch_without(prepared, exclude, state.ran.dba_alpha) for exclude in excludes]
    ef = ef or state.ef
    if options.qe_n:
        top, top_scores = _graph_top(state, prepared, q, options.qe_n, excludes, patches, ef)
        vectors = np.stack([patch.gather(prepared, np.maximum(row, 0)) for patch, row in zip(patches, top)])
        q = alpha_query_expansion(q, vectors, options.qe_alpha, top_scores)
    return _graph_top(state, prepared, q, k, excludes, patches, ef)


def _graph_top(
    state: RerankState, prepared: PreparedDatabase, queries: np.ndarray, depth: int,
    excludes: Sequence[frozenset[int]], patches: Sequence[Patch], ef: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(Q, depth) best rows through the graph and among the pending rows, re-scored exactly, ties
    broken by the lower row."""
    in_graph = len(state) - len(state.pending)  # the graph's unmarked nodes
    extra = max(len(exclude) + len(patch.rows) for exclude, patch in zip(excludes, patches)) if len(queries) else 0
    ask = min(depth + extra, in_graph)
    rows = np.full((len(queries), depth), -1, np.int64)
    scores = np.full((len(queries), depth), -np.inf, np.float32)
    if not len(state):
        return rows, scores
    candidates = np.empty((len(queries), 0), np.int64)
    if ask:
        state.graph.set_ef(max(ef, ask))
        try:
            labels, _ = state.graph.knn_query(queries, k=ask)
            candidates = np.searchsorted(state.ids, labels.astype(np.int64))
        except RuntimeError:  # hnswlib found fewer than `ask` (many slots marked deleted): score them all
            candidates = np.broadcast_to(np.arange(len(state)), (len(queries), len(state)))
    if len(state.pending) and candidates.shape[1] < len(state):
        near = top_rows(queries @ state.pending_vectors().T, depth + extra)
        candidates = np.hstack([candidates, state.pending[near]])
    for row, (query, exclude, patch) in enumerate(zip(queries, excludes, patches)):
        found = distinct(np.concatenate([candidates[row], patch.rows]))
        if exclude:
            found = found[~np.isin(found, list(exclude))]
        found_scores = patch.gather(prepared, found) @ query
        order = np.lexsort((found, -found_scores))[:depth]
        rows[row, : len(order)], scores[row, : len(order)] = found[order], found_scores[order]
    return rows, scores
