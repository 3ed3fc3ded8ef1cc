"""The search service: one index, its encoder and every search option, for every front end.

`fastret search`, `fastret serve` (all its endpoints) and `fastret eval` go through a Retriever,
so an option (k, exact, ef, score, re-ranking, flip averaging, include-self) means the same
everywhere. It only reads.

Re-ranking (PCA + DBA + alpha-QE, RECOMMENDED_RERANK) is on by default. The index holds its
state (made by `fastret index` and every edit): the query is projected, searched through the
state's HNSW graph, expanded and searched again; `exact` runs the same pipeline by brute force.
Options the index does not hold (another PCA dimension, say, or an index without the state) are
prepared in memory and searched exactly, as before. Scores: plain ranking, the cosine of the
query and the item embeddings (or a softmax over the database); re-ranked, the cosine of the
expanded query and the item's augmented vector in the projected space (comparable within one
query's results, not with plain cosines).

Text queries (CLIP models) embed words with the model's text tower into the images' space; a
query may add an image and subtract a negative text: the unit vectors of the image and the text
are summed, the negative text's subtracted (as rclip does), and the result normalised.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from fastret.engine.decode import ImageError, load_pixels
from fastret.engine.encoders import Encoder, describe_runtime
from fastret.engine.text import TextEncoder, check_query_text, encode_texts
from fastret.engine.index import Index
from fastret.engine.evaluation import index_search
from fastret.engine.rerank import (
    RECOMMENDED_RERANK,
    PreparedDatabase,
    RerankOptions,
    RerankState,
    fitted_options,
    graph_search,
    prepare_database,
    rerank_search,
)
from fastret.engine.retrieval import SCORES, Hit, hits_from, ids_of_file, rank_hits
from fastret.engine.tta import average_views, flip_horizontal
from fastret.service.load import BackendUnavailable, encoder_for_index, text_encoder_for_index
from fastret.service.stores import open_index

MAX_K = 1000
"""Most results one query may ask for: bounds the work (and the response) of a single request."""

PREPARED_DATABASES = 8
"""Re-ranking spaces a Retriever keeps (least recently used dropped): each is a copy of the database,
and `fastret serve` takes the options from its clients."""


@dataclass(frozen=True)
class SearchOptions:
    """What a search asks for; invalid combinations raise ValueError before any work."""

    k: int = 10
    exact: bool = False  # brute force instead of the HNSW graph
    ef: int | None = None  # HNSW ef at query time (None: the index's, or the re-ranking graph's automatic one)
    score: str = "cosine"  # or "softmax" over the database (plain ranking only)
    rerank: RerankOptions = RECOMMENDED_RERANK  # RerankOptions(): the plain ranking
    flip_tta: bool = False  # average the query's embedding with its mirror image's
    include_self: bool = False  # keep the query's own item (a file of the index, or an item query)

    def __post_init__(self) -> None:
        if not 1 <= self.k <= MAX_K:
            raise ValueError(f"k must be between 1 and {MAX_K}, got {self.k}")
        if self.ef is not None and self.ef < 1:
            raise ValueError(f"ef must be a positive number, got {self.ef}")
        if self.score not in SCORES:
            raise ValueError(f"unknown score {self.score!r}: choose one of {', '.join(SCORES)}")
        if self.rerank.active and self.score != "cosine":
            raise ValueError(
                "score softmax does not combine with re-ranking (on by default): its probabilities are over "
                "plain cosines; add --no-rerank (rerank=false)"
            )

    def to_dict(self) -> dict:
        """The options as asked; Retriever.describe adds what ran."""
        return {**asdict(self), "rerank": self.rerank.to_dict() if self.rerank.active else None}


def rerank_request(
    recommended: bool = True,
    *,
    pca_dim: int | None = None,
    pca_power: float | None = None,
    dba_n: int | None = None,
    qe_n: int | None = None,
    alpha: float | None = None,
    kreciprocal: bool | None = None,
) -> RerankOptions:
    """Re-ranking as front ends ask for it: the recommended set (the default), or none when not
    `recommended` (--no-rerank), then each given step overrides (one alpha weights both DBA and QE)."""
    given = {
        "pca_dim": pca_dim,
        "pca_power": pca_power,
        "dba_n": dba_n,
        "qe_n": qe_n,
        "dba_alpha": alpha,
        "qe_alpha": alpha,
        "kreciprocal": kreciprocal,
    }
    base = RECOMMENDED_RERANK if recommended else RerankOptions()
    return replace(base, **{name: value for name, value in given.items() if value is not None})


@dataclass(frozen=True)
class TextQuery:
    """A text query (maybe with an image, maybe minus a negative text) as one unit vector."""

    vector: np.ndarray  # (D,) float32, unit length
    exclude: frozenset[int]  # items treated as absent: the query image's own, unless include_self
    description: str  # e.g. "text:a red bus" or "photo.jpg + text:at night - text:people"
    notes: tuple[str, ...] = ()  # what the user should know, e.g. words past the model's context length


class Retriever:
    """An index plus the encoder it was built with; answers image, vector and item queries, and text
    queries through the model's text tower (opened on first use: `open_text`)."""

    def __init__(
        self,
        index: Index,
        encoder: Encoder | None = None,
        *,
        text_encoder: TextEncoder | None = None,
        open_text: Callable[[Index], TextEncoder] | None = None,
    ) -> None:
        if encoder is not None:
            index.check_model(encoder.info)
        self.index = index
        self.encoder = encoder
        self._prepared: dict[tuple, PreparedDatabase] = {}
        self._prepare_lock = threading.Lock()
        self._text_encoder = text_encoder
        self._text_unavailable: str | None = None
        self._open_text = open_text or text_encoder_for_index
        self._text_lock = threading.Lock()

    @classmethod
    def open(
        cls,
        index_dir: str | Path,
        *,
        backend: str = "auto",
        precision: str = "auto",
        threads: int | None = None,
        workload: str = "latency",
        log: Callable[[str], None] = lambda _: None,
        images: bool = True,
        searches: SearchOptions | None = None,
    ) -> "Retriever":
        """Load the live version of an index and open the encoder that embedded it (`images=False`:
        no image encoder, for text-only queries); the text tower opens on the first text query.

        `searches`: the options of the searches to come, when they are known (one query from the
        shell): only what those read is loaded now. None: everything, as a server needs, since a
        writer may remove the version's files while it serves."""
        reads = {} if searches is None else {"graph": not searches.rerank.active and not searches.exact,
                                              "rerank": searches.rerank.active}
        index = open_index(index_dir, **reads)  # an hnswlib index or a LanceDB store
        encoder = (
            encoder_for_index(index, backend, threads=threads, precision=precision, workload=workload, log=log)
            if images
            else None
        )
        open_text = lambda opened: text_encoder_for_index(opened, backend, precision=precision, threads=threads, log=log)  # noqa: E731
        return cls(index, encoder, open_text=open_text)

    def current(self) -> "Retriever":
        """The search service to answer a request with: this one (a LiveRetriever's changes with the index)."""
        return self

    def with_index(self, index: Index) -> "Retriever":
        """The same encoders over another version of the index (BadIndex if it is another model's);
        its re-ranking state is prepared anew."""
        return Retriever(index, self.encoder, text_encoder=self._text_encoder, open_text=self._open_text)

    @property
    def runtime(self) -> str:
        return describe_runtime(self.encoder) if self.encoder is not None else "none"

    # --- embedding queries ------------------------------------------------------------------

    def decode(self, source, *, max_pixels: int | None = None) -> np.ndarray:
        """One query file (or an in-memory upload) -> its (H, W, 3) uint8 crop; raises ImageError."""
        extra = {"max_pixels": max_pixels} if max_pixels is not None else {}
        return load_pixels(source, self.index.model.preprocessing, **extra)

    def embed(self, crops: np.ndarray, *, flip_tta: bool = False) -> np.ndarray:
        """(N, H, W, 3) crops -> (N, D) query embeddings in the index's space."""
        if self.encoder is None:
            raise ValueError("this search service has no encoder: it answers vector and item queries only")
        return combine_views([self.encoder.encode(view) for view in query_views(crops, flip_tta)])

    def text_encoder(self) -> TextEncoder:
        """The model's text tower, opened once; BackendUnavailable (TextUnavailable) says why there is none."""
        with self._text_lock:
            if self._text_encoder is None:
                if self._text_unavailable is not None:
                    raise BackendUnavailable(self._text_unavailable)
                try:
                    self._text_encoder = self._open_text(self.index)
                except BackendUnavailable as exc:
                    self._text_unavailable = str(exc)
                    raise
            return self._text_encoder

    def text_unavailable(self) -> str | None:
        """Why text queries cannot run on this index (None: they can); opens the text tower if needed."""
        try:
            self.text_encoder()
        except BackendUnavailable as exc:
            return str(exc)
        return None

    def text_query(
        self,
        text: str | None,
        options: SearchOptions,
        *,
        negative: str | None = None,
        image: str | Path | None = None,
    ) -> TextQuery:
        """The unit query vector of a text, an image plus a text, or either minus a negative text.

        ValueError for a missing, empty or too long text, or parts that cancel out; the image is
        decoded (ImageError) and embedded with options.flip_tta, and stays out of its own results
        unless options.include_self.
        """
        if text is None and image is None:
            raise ValueError("a query needs an image, a text, or both")
        if text is None and negative is None:
            raise ValueError("an image query without text: use search_file")
        texts = [check_query_text(t) for t in (text, negative) if t is not None]
        parts: list[np.ndarray] = []
        labels: list[str] = []
        exclude: frozenset[int] = frozenset()
        if image is not None:
            try:
                crop = self.decode(image)
            except ImageError as exc:
                raise ImageError(f"{image}: {exc}") from None
            parts.append(self.embed(crop[None], flip_tta=options.flip_tta)[0])
            labels.append(str(image))
            exclude = frozenset() if options.include_self else ids_of_file(self.index, image)
        encoder = self.text_encoder()
        vectors, tokens = encode_texts(encoder, texts)
        notes = tuple(
            f"the model reads the first {encoder.tokenizer.context_length} tokens of a query; it ignored "
            f"{tail if len(tail) <= 80 else tail[:77] + '...'!r}"
            for tail in tokens.ignored
            if tail
        )
        if text is not None:
            parts.append(vectors[0])
            labels.append(f"text:{text}")
        negatives = [vectors[-1]] if negative is not None else []
        description = " + ".join(labels) + (f" - text:{negative}" if negative is not None else "")
        return TextQuery(combine_query(parts, negatives), exclude, description, notes)

    def search_text(
        self,
        text: str | None,
        options: SearchOptions,
        *,
        negative: str | None = None,
        image: str | Path | None = None,
    ) -> list[Hit]:
        """Hits for a text query (see text_query: an image may be added, a negative text subtracted)."""
        query = self.text_query(text, options, negative=negative, image=image)
        return self.search_vector(query.vector, options, query.exclude)

    # --- searching --------------------------------------------------------------------------

    def search_vectors(
        self, queries: np.ndarray, options: SearchOptions, excludes: Sequence[frozenset[int]] | None = None
    ) -> list[list[Hit]]:
        """Hits for each query row; `excludes[i]` are item ids treated as absent for query i."""
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        excludes = [self._rows(exclude) for exclude in excludes] if excludes is not None else [frozenset()] * len(queries)
        if options.rerank.active and self.can_rerank:
            ids, scores = self._reranked(options)(queries, options.k, excludes)
            return [hits_from(self.index, row_ids, row_scores) for row_ids, row_scores in zip(ids, scores)]
        return [
            rank_hits(self.index, query, options.k, exact=options.exact, ef=options.ef, score=options.score,
                      exclude=exclude)
            for query, exclude in zip(queries, excludes)
        ]

    def search_vector(self, query: np.ndarray, options: SearchOptions, exclude: frozenset[int] = frozenset()) -> list[Hit]:
        return self.search_vectors(query[None, :], options, [exclude])[0]

    def search_file(self, path: str | Path, options: SearchOptions) -> list[Hit]:
        """A query image on disk; a file of the index does not find itself unless include_self."""
        try:
            crop = self.decode(path)
        except ImageError as exc:
            raise ImageError(f"{path}: {exc}") from None
        query = self.embed(crop[None], flip_tta=options.flip_tta)[0]
        exclude = frozenset() if options.include_self else ids_of_file(self.index, path)
        return self.search_vector(query, options, exclude)

    def search_item(self, item_id: int, options: SearchOptions) -> list[Hit]:
        """An indexed item's stored embedding as the query; the item itself left out unless include_self."""
        row = self.index.find_row(item_id)
        if row is None:
            raise ValueError(f"no item {item_id} in the index ({len(self.index)} items)")
        exclude = frozenset() if options.include_self else frozenset({item_id})
        return self.search_vector(np.asarray(self.index.embeddings[row]), options, exclude)

    def _rows(self, item_ids: frozenset[int]) -> frozenset[int]:
        """The rows of live item ids (the engine's searches exclude rows); ids not live are absent anyway."""
        rows = (self.index.find_row(item_id) for item_id in item_ids)
        return frozenset(row for row in rows if row is not None)

    def ranker(self, options: SearchOptions, *, leave_one_out: bool = False) -> Callable[[np.ndarray, int], np.ndarray]:
        """The search of these options as engine.evaluation wants it: (queries, k) -> (Q, k) ids.

        With leave_one_out, query row i is item i: plain search drops it afterwards (evaluation's
        drop_self); re-ranking treats it as absent, so it never helps rank itself.
        """
        if options.rerank.active and self.can_rerank:
            search = self._reranked(options)

            def ranked(queries: np.ndarray, k: int) -> np.ndarray:
                excludes = [frozenset({row}) for row in range(len(queries))] if leave_one_out else None
                return search(queries, k, excludes)[0]

            return ranked
        return index_search(self.index, exact=options.exact, ef=options.ef)

    @property
    def can_rerank(self) -> bool:
        """Whether the index can re-rank: an Index can (its state, or one prepared in memory); a store
        without `rerank_state` (another back end) cannot, and answers with the plain ranking."""
        return hasattr(self.index, "rerank_state")

    def stored_rerank(self, rerank: RerankOptions) -> RerankState | None:
        """The index's re-ranking state when it holds these options' PCA and DBA, else None."""
        state = self.index.rerank_state()
        return state if state is not None and state.holds(rerank) else None

    def _reranked(self, options: SearchOptions) -> Callable[..., tuple[np.ndarray, np.ndarray]]:
        """(queries, k, excludes (rows)) -> (Q, k) rows and scores of the re-ranked pipeline: through the
        index's graph, or exactly (`exact`, k-reciprocal, or options the index does not hold)."""
        rerank, state = options.rerank, self.stored_rerank(options.rerank)
        if state is not None and not options.exact and not rerank.kreciprocal:
            return lambda queries, k, excludes: graph_search(state, queries, k, rerank, excludes, ef=options.ef)
        prepared = state.prepared() if state is not None else self.prepared(rerank)
        return lambda queries, k, excludes: rerank_search(prepared, queries, k, rerank, excludes)

    def describe(self, options: SearchOptions) -> dict:
        """The options plus what ran: "search" ("hnsw", "exact" or a store's ANN index) and "rerank" (None: plain ranking;
        else the steps that ran, where the state came from, the graph's ef and notes)."""
        described = options.to_dict()
        if not options.rerank.active or not self.can_rerank:
            plain = {**described, "search": self.index.search_kind(options.exact), "rerank": None}
            if options.rerank.active:
                plain["rerank_unavailable"] = f"{type(self.index).__name__} holds no re-ranking state: the plain ranking"
            return plain
        rerank = options.rerank
        state = self.stored_rerank(rerank)
        if state is None:
            ran, notes = fitted_options(len(self.index), rerank)
            why = ("the index holds no re-ranking state" if self.index.rerank_state() is None
                   else "the index's re-ranking state has other PCA / DBA options")
            summary = {**ran.to_dict(), "source": "memory", "notes": [f"{why}: prepared in memory, exact search", *notes]}
            return {**described, "search": "exact", "rerank": summary}
        through_graph = not options.exact and not rerank.kreciprocal
        summary = {**state.summary(), "qe_n": rerank.qe_n, "qe_alpha": rerank.qe_alpha, "kreciprocal": rerank.kreciprocal,
                   "source": "index"}
        summary["ef"] = (options.ef or state.ef) if through_graph else None
        return {**described, "search": "hnsw" if through_graph else "exact", "rerank": summary}

    def prepared(self, rerank: RerankOptions) -> PreparedDatabase:
        """The database in the re-ranking space of options the index does not hold, prepared in memory
        and kept for the next query that asks."""
        key = (rerank.pca_dim, rerank.pca_power, rerank.dba_n, rerank.dba_alpha)
        with self._prepare_lock:
            prepared = self._prepared.pop(key, None) or prepare_database(self.index.embeddings, rerank)
            self._prepared[key] = prepared  # the most recently used last
            if len(self._prepared) > PREPARED_DATABASES:
                del self._prepared[next(iter(self._prepared))]
            return prepared


def query_views(crops: np.ndarray, flip_tta: bool) -> list[np.ndarray]:
    """The crops an encoder must see for these queries: the images, and their mirrors with flip_tta."""
    return [crops, flip_horizontal(crops)] if flip_tta else [crops]


def combine_views(embeddings: list[np.ndarray]) -> np.ndarray:
    """(N, D) query embeddings from the embeddings of each view (one view: as it is)."""
    return embeddings[0] if len(embeddings) == 1 else average_views(*embeddings)


def combine_query(positives: list[np.ndarray], negatives: list[np.ndarray]) -> np.ndarray:
    """The unit vector of the sum of `positives` minus the sum of `negatives` (each a unit vector).

    ValueError when they cancel out (a negative text equal to the query's), rather than a search
    with a zero vector whose ranking would mean nothing.
    """
    total = np.sum(positives, axis=0) if positives else 0.0
    total = total - (np.sum(negatives, axis=0) if negatives else 0.0)
    norm = float(np.linalg.norm(total))
    if not np.all(np.isfinite(total)) or norm < 1e-6:
        raise ValueError("the query's parts cancel out (is the negative text the same as the query?)")
    return (np.asarray(total, dtype=np.float64) / norm).astype(np.float32)
