"""The on-disk index: segments of embeddings and items plus an HNSW graph, written as versions.

Layout of an index directory::

    INDEX/CURRENT                   name of the live version directory (replaced atomically)
    INDEX/.lock                     flock(2) held by the one writer at a time
    INDEX/v-<stamp>/manifest.json   what the version holds, and every file's size and sha256
    INDEX/v-<stamp>/seg-NNNNNN.npy          a segment's embeddings, one float32 row per stored item
    INDEX/v-<stamp>/seg-NNNNNN.items.json   its items' paths and labels
    INDEX/v-<stamp>/seg-NNNNNN.files.npy    their ids, and their files' sizes, mtimes and sha256
    INDEX/v-<stamp>/seg-NNNNNN.thumbs.npy   (optional) their grey thumbnails for the duplicate finder:
    INDEX/v-<stamp>/seg-NNNNNN.thumbs-data.npy   a table and the bytes (fastret.engine.thumbnails)
    INDEX/v-<stamp>/deleted.npy             ids removed since their segment was written
    INDEX/v-<stamp>/graph-NNNNNN.bin        the HNSW graph; its labels are item ids
    INDEX/v-<stamp>/graph-deleted.npy       ids removed since the graph was written (marked on load)
    INDEX/v-<stamp>/rerank-NNNNNN.*         the re-ranking state (engine/rerank.py) in parts: projected and
                                            DBA'd vectors and neighbourhoods of items; the first part's
                                            files also hold the PCA and the HNSW graph of its vectors (a
                                            graph written by a take-in has its own number and ids file)

Segment and graph files never change once written. A new version hard-links the ones it keeps
(copies them where the file system has no hard links) and writes only what changed: an edit of a
few images costs a few small files however large the index is. Items added since the graph was
written are searched exactly until they pass GRAPH_PENDING_SHARE of the index, when the graph
takes them in (hnswlib `replace_deleted` reuses the slots of removed items); removed items stay
stored, skipped through the deletion lists, until they pass COMPACT_DEAD_SHARE, when the version
is compacted (one segment, a fresh graph). Small trailing segments are merged as they accumulate.

The re-ranking state is derived data, written by writers only: every version's holds its live
items. It follows the same pattern: a full write makes one part and its graph; an edit updates the
state with the stored PCA (`update_state`) and writes only the rows it changed (new items, and old
ones whose DBA neighbourhood changed) as a new part, linking the rest. A reader takes each item's
row from the last part that holds it, marks the graph's nodes of removed and changed items
deleted, and searches the changed rows exactly; when they pass max(GRAPH_PENDING_SHARE of the
items, RERANK_PENDING_FLOOR) the edit takes them into the graph and writes the graph anew (with the
ids it holds), the parts still linked: the graph covers them all. A full
build, a compaction, or an edit that brings the items added since the fit past REFIT_SHARE of those
fitted on fits it anew. Index.load reads it with the rest (`rerank=False`: on first use).

Item ids are stable: an id is never given to another file within the index's life, the rows of
`Index.embeddings` are the live items in id order, and `Index.ids[row]` is a row's id.

A writer takes the lock, writes a new version to a temporary directory, fsyncs it, renames it
into place, and only then points CURRENT at it; a crash at any moment leaves the previous version
loadable, and the kernel drops a dead writer's lock. Removing a superseded version removes only
its names: files it shares with the live version live on through their other links. Loading is
cheap (sizes, shapes, the graph header; a single segment is memory-mapped); `verify_index` also
checks every file's sha256. Format 1 indexes (one embeddings.npy, items.json and hnsw.bin, ids =
rows) are read as they are, and converted by the first incremental write.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import math
import os
import secrets
import shutil
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np

from fastret.engine.encoders import ModelInfo
from fastret.engine.files import fsync_path, sha256_files, write_text_atomic
from fastret.engine.rerank import (
    GRAPH_GROWTH,
    RECOMMENDED_RERANK,
    REFIT_SHARE,
    TARGET_RECALL,
    PcaWhitening,
    RerankOptions,
    RerankState,
    fit_state,
    fitted_options,
    take_in,
    update_state,
)
from fastret.engine.thumbnails import Thumbnails

FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
CURRENT = "CURRENT"
LOCK = ".lock"
MANIFEST = "manifest.json"
DELETED = "deleted.npy"
GRAPH_DELETED = "graph-deleted.npy"
# The files of a format-1 version: one segment and one graph, ids = row numbers.
EMBEDDINGS = "embeddings.npy"
ITEMS = "items.json"
HNSW = "hnsw.bin"
REINDEX = "re-index with `fastret index`"
# What a writer leaves in an index directory besides CURRENT and the lock: versions, a version
# being written, and write_text_atomic's temporary for CURRENT.
WRITER_PREFIXES = ("v-", ".tmp-", f".{CURRENT}.")
LANCE_MANIFEST = "lancedb.json"  # a LanceDB store's pointer (fastret.engine.lance_store)
INDEX_MARKERS = (CURRENT, LANCE_MANIFEST)  # what makes a folder an index folder

COMPACT_DEAD_SHARE = 0.2
"""Removed items still stored (in segments, or marked in the graph) above this share: compact."""
GRAPH_PENDING_SHARE = 0.01
"""Items outside the graph above this share of the index: the graph takes them in."""
SEGMENT_MERGE_RATIO = 2
"""A trailing segment merges into the one before it when that one holds at most this many times
its items: segments stay few (logarithmic in the items added) and each row is rewritten rarely."""

T = TypeVar("T")


class BadIndex(Exception):
    """An index that is missing, damaged, or does not match what the caller expects."""


class IndexLocked(BadIndex):
    """Another writer holds the index directory and the caller chose not to wait."""


class DamagedFiles(BadIndex):
    """Files of a version that disagree with the manifest; `problems` has one line per file."""

    def __init__(self, index_dir: Path, problems: list[str]):
        self.problems = problems
        super().__init__(f"{index_dir}: damaged index, {'; '.join(problems)}; {REINDEX}")


@dataclass(frozen=True)
class HnswParams:
    """HNSW graph parameters: M links per node, ef at build time, default ef at query time."""

    M: int = 16
    ef_construction: int = 200
    ef_search: int = 64


@dataclass(frozen=True)
class Item:
    path: str  # relative to the indexed root, '/'-separated
    label: str  # parent folder name


@dataclass(frozen=True)
class Sources:
    """What each item's file was when it was embedded: size, mtime_ns and sha256 (-1 / zeros: unknown),
    so a later run can tell changed files from unchanged ones without decoding them."""

    sizes: np.ndarray  # (N,) int64
    mtimes_ns: np.ndarray  # (N,) int64
    sha256: np.ndarray  # (N, 32) uint8 digests

    def __post_init__(self) -> None:
        if not len(self.sizes) == len(self.mtimes_ns) == len(self.sha256) or self.sha256.shape[1:] != (32,):
            raise ValueError("sources: sizes, mtimes and sha256 digests differ in length")

    def __len__(self) -> int:
        return len(self.sizes)

    @classmethod
    def unknown(cls, count: int) -> "Sources":
        return cls(np.full(count, -1, np.int64), np.full(count, -1, np.int64), np.zeros((count, 32), np.uint8))

    @classmethod
    def concat(cls, parts: Sequence["Sources"]) -> "Sources":
        if not parts:
            return cls.unknown(0)
        return cls(*(np.concatenate([getattr(part, name) for part in parts]) for name in ("sizes", "mtimes_ns", "sha256")))

    def take(self, rows: np.ndarray) -> "Sources":
        rows = np.asarray(rows, dtype=np.int64)
        return Sources(self.sizes[rows], self.mtimes_ns[rows], self.sha256[rows])

    def digest(self, row: int) -> bytes | None:
        """The sha256 recorded for a row, None when unknown."""
        digest = self.sha256[row].tobytes()
        return None if digest == bytes(32) else digest


@dataclass(frozen=True)
class Additions:
    """New items for an index: their items, embeddings (N, D) and source files, in the same order."""

    items: list[Item]
    embeddings: np.ndarray
    sources: Sources
    thumbnails: Thumbnails | None = None  # None: none made

    def __post_init__(self) -> None:
        if not len(self.items) == len(self.embeddings) == len(self.sources):
            raise ValueError(
                f"additions: {len(self.items)} items, {len(self.embeddings)} embeddings, {len(self.sources)} sources"
            )
        if self.thumbnails is not None and len(self.thumbnails) != len(self.items):
            raise ValueError(f"additions: {len(self.items)} items, {len(self.thumbnails)} thumbnails")

    def __len__(self) -> int:
        return len(self.items)


@dataclass
class Index:
    """Embeddings of a gallery plus what is needed to search and show them.

    Rows are the live items in id order; `ids[row]` is a row's stable item id. `hnsw` holds the
    first `graph_rows` rows (None: all of them); the others are searched exactly.
    """

    model: ModelInfo
    root: str
    items: list[Item]
    embeddings: np.ndarray  # (N, D) float32, unit rows; read-only when loaded
    hnsw_params: HnswParams = field(default_factory=HnswParams)
    _hnsw: object | None = field(default=None, repr=False)  # see the hnsw property
    created: float = field(default_factory=time.time)
    runtime: dict | None = None  # {"backend", "precision"} that embedded the gallery; queries reuse it
    encoder: dict | None = None  # how to rebuild the encoder (defined by the service layer; opaque here)
    version_dir: Path | None = None  # the version directory it was loaded from; None when built in memory
    ids: np.ndarray | None = None  # (N,) int64, strictly increasing; None: 0..N-1
    sources: Sources | None = None  # the files the rows were embedded from; None: not recorded
    next_id: int | None = None  # the id the next added item gets; None: one past the last id
    graph_rows: int | None = None  # rows [0, graph_rows) are in hnsw; None: all rows
    build: dict = field(default_factory=dict)  # how the gallery was read: {"draft", "include_hidden"}
    thumbnails: Thumbnails | None = None  # per row, for the duplicate finder; None: none kept
    rerank_options: RerankOptions | None = RECOMMENDED_RERANK  # the re-ranking state saved with it (None: none)
    reranking: RerankState | None = None  # that state, once fitted or loaded (see rerank_state)
    _rerank_entry: dict | None = field(default=None, repr=False)  # a loaded version's manifest entry
    _rerank_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _load_graph: Callable[[], object] | None = field(default=None, repr=False)  # a graph Index.load left on disk
    _graph_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        if self.embeddings.ndim != 2 or self.embeddings.shape != (len(self.items), self.model.dim):
            raise BadIndex(
                f"embeddings shape {self.embeddings.shape} does not match {len(self.items)} items "
                f"x dim {self.model.dim}"
            )
        self.ids = np.arange(len(self.items), dtype=np.int64) if self.ids is None else np.asarray(self.ids, np.int64)
        if self.ids.shape != (len(self.items),) or (len(self.ids) and (self.ids[0] < 0 or (np.diff(self.ids) <= 0).any())):
            raise BadIndex(f"item ids must be {len(self.items)} increasing non-negative numbers")
        last = int(self.ids[-1]) if len(self.ids) else -1
        self.next_id = last + 1 if self.next_id is None else int(self.next_id)
        if self.next_id <= last:
            raise BadIndex(f"next item id {self.next_id} is not above the last id {last}")
        if self.sources is not None and len(self.sources) != len(self.items):
            raise BadIndex(f"{len(self.sources)} source records for {len(self.items)} items")
        if self.thumbnails is not None and len(self.thumbnails) != len(self.items):
            raise BadIndex(f"{len(self.thumbnails)} thumbnails for {len(self.items)} items")

    def __len__(self) -> int:
        return len(self.items)

    @property
    def labels(self) -> np.ndarray:
        return np.array([item.label for item in self.items])

    # --- ids and rows -------------------------------------------------------------------------

    def find_row(self, item_id: int) -> int | None:
        """The row of a live item id, None when no live item has it."""
        if not 0 <= item_id < 2**63:
            return None
        row = int(np.searchsorted(self.ids, item_id))
        return row if row < len(self.ids) and self.ids[row] == item_id else None

    def rows_of(self, item_ids) -> np.ndarray:
        """Rows of live item ids (any shape); ValueError naming one that is not live."""
        return rows_of(self.ids, item_ids)

    # --- search -----------------------------------------------------------------------------

    @property
    def hnsw(self):
        """The hnswlib.Index over the raw embeddings, labels = ids (None: none, searched exactly); one
        that `Index.load(graph=False)` left on disk is loaded here, on first use."""
        with self._graph_lock:
            if self._load_graph is not None:
                self._hnsw, self._load_graph = self._load_graph(), None
            return self._hnsw

    @hnsw.setter
    def hnsw(self, graph) -> None:
        with self._graph_lock:
            self._hnsw, self._load_graph = graph, None

    def search_kind(self, exact: bool) -> str:
        """What `search(exact=exact)` runs: "hnsw" or "exact" (no graph: a tiny set)."""
        return "exact" if exact or (self._hnsw is None and self._load_graph is None) else "hnsw"

    def search(
        self, queries: np.ndarray, k: int = 10, *, exact: bool = False, ef: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows and cosine similarities for each query row, best first (`ids[rows]`: item ids)."""
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        k = min(k, len(self))
        if k == 0:
            empty = np.empty((len(queries), 0))
            return empty.astype(np.int64), empty.astype(np.float32)
        if exact or self.hnsw is None:
            return exact_search(self.embeddings, queries, k)
        in_graph = len(self) if self.graph_rows is None else self.graph_rows
        parts = []
        if in_graph:
            graph_k = min(k, in_graph)
            self.hnsw.set_ef(max(ef or self.hnsw_params.ef_search, graph_k))
            labels, distances = self.hnsw.knn_query(queries, k=graph_k)
            parts.append((self.rows_of(labels), (1.0 - distances).astype(np.float32)))
        if in_graph < len(self):  # added since the graph was written: searched exactly
            rows, scores = exact_search(self.embeddings[in_graph:], queries, min(k, len(self) - in_graph))
            parts.append((rows + in_graph, scores))
        if len(parts) == 1:
            return parts[0][0].astype(np.int64), parts[0][1]
        rows = np.concatenate([part[0] for part in parts], axis=1)
        scores = np.concatenate([part[1] for part in parts], axis=1)
        order = np.lexsort((rows, -scores), axis=1)[:, :k]
        return np.take_along_axis(rows, order, axis=1).astype(np.int64), np.take_along_axis(scores, order, axis=1)

    def rerank_state(self) -> RerankState | None:
        """The version's re-ranking state, loaded on first use (BadIndex when its files are
        damaged); None for an index that holds none (built in memory, or by an older fastret)."""
        with self._rerank_lock:
            if self.reranking is None and self._rerank_entry is not None and self.version_dir is not None:
                self.reranking = read_rerank(self.version_dir, self._rerank_entry, self.ids)
            return self.reranking

    # --- persistence --------------------------------------------------------------------------

    def save(
        self, index_dir: str | Path, *, wait: bool = True, on_wait: Callable[[str], None] | None = None
    ) -> Path:
        """Write the whole index as a new version (one segment, a graph of every row), make it live,
        and return its directory.

        Takes the directory's writer lock itself (`wait`/`on_wait` as in index_writer_lock; a
        caller already holding it is not blocked). Then it removes what the directory held
        before: older versions and a dead writer's leftovers. That list is taken under the
        lock, so it can never include another writer's new version.
        """
        index_dir = Path(index_dir)
        with index_writer_lock(index_dir, wait=wait, on_wait=on_wait):
            superseded = _writer_entries(index_dir)
            version = _write_version(index_dir, self._write_all)
            for entry in superseded:
                _remove(entry)
        return version

    def _write_all(self, staging: Path) -> tuple[dict, dict[str, dict]]:
        graph = self._complete_graph()
        segment = Segment.named(0, len(self))
        paths, labels = [item.path for item in self.items], [item.label for item in self.items]
        _write_segment(staging, segment, self.ids, paths, labels, self.embeddings, self.sources or Sources.unknown(len(self)),
                       self.thumbnails)
        graph_file = GraphFile(_name("graph", 0) + ".bin", len(self), 0, self.next_id)
        graph.save_index(str(staging / graph_file.file))
        layout = Layout((segment,), _no_ids(), graph_file, _no_ids(), self.next_id, 1)
        _write_deletions(staging, layout)
        state = self.rerank_state() if self.rerank_options is not None else None
        if self.rerank_options is not None and (
            state is None or not np.array_equal(state.ids, self.ids) or len(state.pending)
        ):
            state = self.reranking = fit_rerank(self.embeddings, self.ids, self.rerank_options, self.hnsw_params)
        return self._manifest(layout, write_rerank(staging, state, 0, self.hnsw_params)), {}

    def _complete_graph(self):
        """The graph of every row with no deleted marks: the one held, or a new one."""
        complete = self.hnsw is not None and (self.graph_rows is None or self.graph_rows == len(self))
        if complete and self.graph_rows is not None:  # loaded: it may hold marked-deleted slots
            complete = self.hnsw.get_current_count() == len(self)
        if not complete:
            self.hnsw, self.graph_rows = build_hnsw(self.embeddings, self.hnsw_params, self.ids), None
        return self.hnsw

    def _manifest(self, layout: "Layout", rerank: dict | None) -> dict:
        return manifest_of(
            model=self.model, root=self.root, count=len(self), hnsw_params=self.hnsw_params, created=self.created,
            runtime=self.runtime, encoder=self.encoder, build=self.build, layout=layout, rerank=rerank,
        )

    @classmethod
    def load(cls, index_dir: str | Path, *, verify: bool = False, graph: bool = True, rerank: bool = True) -> "Index":
        """Load the live version, refusing damaged files and unknown formats with a clear message.

        The default checks are cheap: format version, the files listed in the manifest, present
        and of the recorded sizes, item counts and embedding shapes, the HNSW header; a single
        segment's embeddings are memory-mapped read-only, not read (several are gathered into one
        read-only array). A changed byte that keeps a file's size passes them (only a checksum can
        tell): `verify=True` or `verify_index` hashes every file. When a cheap check fails, the
        checksums run too, to name the damaged file.

        `graph` and `rerank`: read the HNSW graph and the re-ranking state now, so that the Index
        keeps answering after a writer removes this version (a server). A reader that will not
        search one of them (a one-shot re-ranked search needs no raw graph) leaves it on disk; it
        is then read on first use, from a version that a writer may have removed by then.
        """
        index_dir = Path(index_dir)

        def read(index_dir: Path, version: Path, manifest: dict) -> Index:
            index = _read_index(index_dir, version, manifest, graph=graph)
            if rerank:
                index.rerank_state()
            return index

        return _at_live_version(index_dir, lambda version: _load_version(index_dir, version, read, checksums=verify))

    def check_model(self, expected: ModelInfo) -> None:
        """Refuse an index made by another model: its vectors live in another space."""
        if (expected.model_id, expected.weights_sha256, expected.dim) != (
            self.model.model_id,
            self.model.weights_sha256,
            self.model.dim,
        ):
            raise BadIndex(
                f"index was built with {self.model.model_id} (dim {self.model.dim}, weights "
                f"{self.model.weights_sha256[:12]}…) but the encoder is {expected.model_id} "
                f"(dim {expected.dim}, weights {expected.weights_sha256[:12]}…); re-index or "
                "use the index's model"
            )


def rows_of(ids: np.ndarray, item_ids) -> np.ndarray:
    """Rows of item ids (any shape) among increasing `ids`; ValueError naming one that is not there."""
    item_ids = np.asarray(item_ids, dtype=np.int64)
    if not len(ids):
        if item_ids.size:
            raise ValueError(f"no item {int(item_ids.flat[0])} in the index (0 items)")
        return np.zeros(item_ids.shape, np.int64)
    rows = np.minimum(np.searchsorted(ids, item_ids), len(ids) - 1)
    missing = ids[rows] != item_ids
    if missing.any():
        raise ValueError(f"no item {int(item_ids[missing].flat[0])} in the index ({len(ids)} items)")
    return rows


def verify_index(index_dir: str | Path) -> list[str]:
    """Every problem of the live index, one line each, checksums of all files included; [] = healthy."""
    index_dir = Path(index_dir)
    try:
        _at_live_version(index_dir, lambda version: _load_version(index_dir, version, _read_index, checksums=True))
    except DamagedFiles as exc:
        return [f"{index_dir}: damaged index, {problem}" for problem in exc.problems]
    except BadIndex as exc:
        return [str(exc)]
    return []


# --- the layout of a version ------------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    """Stored items and their embeddings, written once: `rows` includes removed items."""

    embeddings_file: str
    items_file: str  # paths and labels (format 1: a list of {path, label})
    files_file: str | None  # ids and file records (format 1: none, ids are rows)
    rows: int

    @classmethod
    def named(cls, number: int, rows: int) -> "Segment":
        name = _name("seg", number)
        return cls(f"{name}.npy", f"{name}.items.json", f"{name}.files.npy", rows)


FILE_TABLE = np.dtype([("id", "<i8"), ("size", "<i8"), ("mtime_ns", "<i8"), ("sha256", "u1", (32,))])
"""A segment's .files.npy: each stored item's id and its file's size, mtime_ns and sha256."""


def thumbnail_files(segment: Segment) -> tuple[str, str]:
    """The names of a segment's thumbnail table and bytes. They are optional (older indexes have
    none): a segment has them when the manifest's file table lists them."""
    stem = segment.embeddings_file.removesuffix(".npy")
    return f"{stem}.thumbs.npy", f"{stem}.thumbs-data.npy"


def _segment_thumbnails(version: Path, manifest: dict, segment: Segment, ids: np.ndarray) -> Thumbnails:
    """A stored segment's thumbnails (rows without: none), BadIndex when its files do not fit it."""
    table, data = thumbnail_files(segment)
    if table not in manifest["files"] or data not in manifest["files"]:
        return Thumbnails.absent(len(ids))
    try:
        return Thumbnails.load(version / table, version / data, ids)
    except ValueError as exc:
        raise BadIndex(f"{version}: damaged index, {exc}; {REINDEX}") from None


@dataclass(frozen=True)
class GraphFile:
    """An HNSW graph file: `slots` elements, `marked` of them marked deleted; it held every item
    with an id below `id_bound` that was live when it was written."""

    file: str
    slots: int
    marked: int
    id_bound: int


@dataclass(frozen=True)
class Layout:
    """The files of a version and how they combine into the live items."""

    segments: tuple[Segment, ...]
    deleted: np.ndarray  # ids stored in the segments but removed (sorted)
    graph: GraphFile
    graph_deleted: np.ndarray  # ids in the graph file, unmarked there, but removed (sorted)
    next_id: int
    next_name: int  # number of the next segment or graph file written


def _name(kind: str, number: int) -> str:
    return f"{kind}-{number:06d}"


def _no_ids() -> np.ndarray:
    return np.empty(0, np.int64)


def manifest_of(
    *, model: ModelInfo, root: str, count: int, hnsw_params: HnswParams, created: float, runtime: dict | None,
    encoder: dict | None, build: dict, layout: Layout, rerank: dict | None = None,
) -> dict:
    """A format-2 manifest without its file table (the writer adds it); `rerank`: write_rerank's entry."""
    return {
        "format_version": FORMAT_VERSION,
        "model": model.to_dict(),
        "dim": model.dim,
        "metric": "cosine",
        "count": count,
        "root": root,
        "hnsw": asdict(hnsw_params),
        "created": created,
        "written": time.time(),
        "runtime": runtime,
        "encoder": encoder,
        "build": build,
        "segments": [asdict(segment) for segment in layout.segments],
        "graph": asdict(layout.graph),
        "deleted": len(layout.deleted),
        "graph_deleted": len(layout.graph_deleted),
        "next_id": layout.next_id,
        "next_name": layout.next_name,
        "rerank": rerank,
    }


def _layout(version: Path, manifest: dict) -> Layout:
    """The layout a manifest describes; a format-1 version reads as one segment and one graph."""
    path = version / MANIFEST
    count = manifest["count"]
    if manifest["format_version"] == 1:
        segment = Segment(EMBEDDINGS, ITEMS, None, count)
        return Layout((segment,), _no_ids(), GraphFile(HNSW, count, 0, count), _no_ids(), count, 0)
    try:
        segments = tuple(Segment(**entry) for entry in manifest["segments"])
        graph = GraphFile(**manifest["graph"])
        numbers = [manifest[key] for key in ("deleted", "graph_deleted", "next_id", "next_name")]
    except (KeyError, TypeError) as exc:
        raise BadIndex(f"{path}: damaged index, bad layout ({type(exc).__name__}: {exc}); {REINDEX}") from None
    counts = [segment.rows for segment in segments] + [graph.slots, graph.marked, graph.id_bound, *numbers]
    if not segments or not all(_is_count(value) for value in counts):
        raise BadIndex(f"{path}: damaged index, its segments or graph are not described by counts; {REINDEX}")
    deleted = _read_ids(version / DELETED, manifest["deleted"])
    graph_deleted = _read_ids(version / GRAPH_DELETED, manifest["graph_deleted"])
    return Layout(segments, deleted, graph, graph_deleted, manifest["next_id"], manifest["next_name"])


def _layout_files(path: Path, manifest: dict) -> list[str]:
    """The files a manifest's layout needs (BadIndex when the layout is not described)."""
    if manifest["format_version"] == 1:
        return [EMBEDDINGS, ITEMS, HNSW]
    try:
        names = [
            name for entry in manifest["segments"] for name in (entry["embeddings_file"], entry["items_file"], entry["files_file"])
        ]
        rerank = _stored_rerank(manifest)
        return [*names, manifest["graph"]["file"], DELETED, GRAPH_DELETED, *(_rerank_files(rerank) if rerank else ())]
    except (KeyError, TypeError, AttributeError) as exc:
        raise BadIndex(f"{path}: damaged index, bad layout ({type(exc).__name__}: {exc}); {REINDEX}") from None


def _read_ids(path: Path, count: int) -> np.ndarray:
    ids = np.load(path, allow_pickle=False)
    if ids.dtype != np.int64 or ids.shape != (count,) or (len(ids) and (np.diff(ids) <= 0).any()):
        raise BadIndex(f"{path}: damaged index, not {count} increasing int64 ids; {REINDEX}")
    return ids


def _write_deletions(staging: Path, layout: Layout) -> None:
    np.save(staging / DELETED, layout.deleted.astype(np.int64))
    np.save(staging / GRAPH_DELETED, layout.graph_deleted.astype(np.int64))


def _write_segment(
    staging: Path, segment: Segment, ids: np.ndarray, paths: list[str], labels: list[str], embeddings: np.ndarray,
    sources: Sources, thumbnails: Thumbnails | None,
) -> None:
    np.save(staging / segment.embeddings_file, np.asarray(embeddings, dtype=np.float32))
    _write_items(staging, segment, ids, paths, labels, sources)
    if thumbnails is not None and thumbnails.stored():
        table, data = thumbnail_files(segment)
        thumbnails.save(staging / table, staging / data, ids)


def _write_items(
    staging: Path, segment: Segment, ids: np.ndarray, paths: list[str], labels: list[str], sources: Sources
) -> None:
    (staging / segment.items_file).write_text(json.dumps({"paths": paths, "labels": labels}))
    table = np.empty(len(ids), FILE_TABLE)
    table["id"], table["size"], table["mtime_ns"], table["sha256"] = ids, sources.sizes, sources.mtimes_ns, sources.sha256
    np.save(staging / segment.files_file, table)


@dataclass(frozen=True)
class SegmentItems:
    """A segment's stored items (removed ones included), in row order."""

    ids: np.ndarray
    paths: list[str]
    labels: list[str]
    sources: Sources


def _read_segment_items(version: Path, segment: Segment) -> SegmentItems:
    """A segment's items: format 2's paths and labels plus its file table, or format 1's list of
    {path, label} (ids = rows, files unknown)."""
    path = version / segment.items_file
    data = json.loads(path.read_text())
    if segment.files_file is None:  # format 1
        if not isinstance(data, list) or not all(isinstance(entry, dict) for entry in data):
            raise BadIndex(f"{path}: damaged index, not a list of items; {REINDEX}")
        paths, labels = [entry.get("path") for entry in data], [entry.get("label") for entry in data]
        ids, sources = np.arange(len(data), dtype=np.int64), Sources.unknown(len(data))
    else:
        if not isinstance(data, dict) or not all(isinstance(data.get(key), list) for key in ("paths", "labels")):
            raise BadIndex(f"{path}: damaged index, not a table of paths and labels; {REINDEX}")
        paths, labels = data["paths"], data["labels"]
        table = np.load(version / segment.files_file, allow_pickle=False)
        if table.dtype != FILE_TABLE or table.shape != (len(paths),):
            raise BadIndex(f"{version / segment.files_file}: damaged index, not a table of {len(paths)} file records; "
                           f"{REINDEX}")
        ids, sources = table["id"].copy(), Sources(table["size"].copy(), table["mtime_ns"].copy(), table["sha256"].copy())
    if len(labels) != len(paths) or not set(map(type, paths)) | set(map(type, labels)) <= {str}:
        raise BadIndex(f"{path}: damaged index, an item whose path or label is not text; {REINDEX}")
    return SegmentItems(ids, paths, labels, sources)


# --- reading a version ------------------------------------------------------------------------


class ManifestFields:
    """What an index's manifest says of it, read one way by every store's views (IndexState, LanceDB's)."""

    manifest: dict

    @property
    def model(self) -> ModelInfo:
        return ModelInfo.from_dict(self.manifest["model"])

    @property
    def root(self) -> str:
        return self.manifest["root"]

    @property
    def encoder(self) -> dict | None:
        return self.manifest.get("encoder")

    @property
    def build(self) -> dict:
        return self.manifest.get("build") or {}


@dataclass
class IndexState(ManifestFields):
    """A version as a writer sees it: its manifest, layout and live items, without vectors or graph.

    Reading it is what an incremental writer needs to decide what changed (paths, sources, ids);
    `write` then makes the next version from it, under the writer lock.
    """

    index_dir: Path
    version: Path
    manifest: dict
    layout: Layout
    segment_items: list[SegmentItems]
    kept: list[np.ndarray]  # per segment: which stored rows are live
    ids: np.ndarray  # the live items, in id order: their ids,
    paths: list[str]  # paths,
    labels: list[str]  # labels
    sources: Sources  # and files

    @classmethod
    def read(cls, index_dir: str | Path) -> "IndexState":
        """The live version's state (the cheap checks of Index.load; no vectors, no graph)."""
        index_dir = Path(index_dir)
        return _at_live_version(
            index_dir, lambda version: _load_version(index_dir, version, _read_state, checksums=False)
        )

    @property
    def hnsw_params(self) -> HnswParams:
        return HnswParams(**self.manifest["hnsw"])

    @property
    def runtime(self) -> dict | None:
        return self.manifest.get("runtime")

    @property
    def version_dir(self) -> Path:
        """As Index.version_dir: what the service layer's encoder_for_index reads of either."""
        return self.version

    def __len__(self) -> int:
        return len(self.ids)

    def write(
        self,
        added: Additions | None = None,
        removed: Sequence[int] = (),
        *,
        compact: bool = False,
        build: dict | None = None,
    ) -> "Written":
        """Make the version that adds `added` (new ids) and drops the live ids `removed`, and make it live.

        Shared files are hard-linked; only new segments, the deletion lists and the manifest are
        written, plus the graph when it takes in pending items and everything when the version is
        compacted (`compact`, or too many removed items stored). `build` updates the recorded build
        options. Holds the writer lock (a caller holding it since `read` is not blocked); refuses a
        state that is no longer the live one.
        """
        added = added if added is not None else Additions([], np.empty((0, self.model.dim), np.float32), Sources.unknown(0))
        removed_ids = np.unique(np.asarray(list(removed), dtype=np.int64))
        rows_of(self.ids, removed_ids)  # every removed id is live
        if added.embeddings.shape[1:] != (self.model.dim,):
            raise ValueError(f"added embeddings have shape {added.embeddings.shape}, the index holds dim {self.model.dim}")
        with index_writer_lock(self.index_dir):
            if _current_name(self.index_dir) != self.version.name:
                raise BadIndex(f"{self.index_dir}: another writer changed the index since it was read; read it again")
            superseded = _writer_entries(self.index_dir)
            plan = _UpdatePlan(self, added, removed_ids, compact, {**self.build, **(build or {})})
            version = _write_version(self.index_dir, plan.write)
            for entry in superseded:
                _remove(entry)
        return Written(version, plan.added_ids, removed_ids, len(self) - len(removed_ids) + len(added),
                       plan.compacted, plan.graph_action, plan.bytes_written)


@dataclass(frozen=True)
class Written:
    """What a write made: the version, the ids given to the added items, what happened to the files."""

    version: Path
    added_ids: np.ndarray
    removed_ids: np.ndarray
    count: int
    compacted: bool
    graph: str  # "kept" (linked), "extended" (took in pending items) or "rebuilt"
    bytes_written: int  # bytes of the files written (not linked) into the version


def _read_state(index_dir: Path, version: Path, manifest: dict) -> IndexState:
    """The live items of a version whose files are present and of the recorded sizes."""
    layout = _layout(version, manifest)
    parts = [_read_segment_items(version, segment) for segment in layout.segments]
    stored = np.concatenate([part.ids for part in parts])
    problems = []
    for segment, part in zip(layout.segments, parts):
        if len(part.ids) != segment.rows:
            problems.append(f"{segment.items_file} holds {len(part.ids)} items, the manifest says {segment.rows}")
    if len(stored) and (stored[0] < 0 or (np.diff(stored) <= 0).any() or stored[-1] >= layout.next_id):
        problems.append(f"item ids are not increasing and below next_id {layout.next_id}")
    if not np.isin(layout.deleted, stored).all():
        problems.append(f"{DELETED} names items no segment stores")
    kept = [~np.isin(part.ids, layout.deleted) for part in parts]
    live = sum(int(mask.sum()) for mask in kept)
    if live != manifest["count"]:
        problems.append(f"{live} live items but the manifest says {manifest['count']}")
    if problems:
        raise BadIndex(f"{index_dir}: damaged index, {'; '.join(problems)}; {REINDEX}")
    paths = [path for part, mask in zip(parts, kept) for path in itertools.compress(part.paths, mask.tolist())]
    labels = [label for part, mask in zip(parts, kept) for label in itertools.compress(part.labels, mask.tolist())]
    ids = np.concatenate([part.ids[mask] for part, mask in zip(parts, kept)])
    sources = Sources.concat([part.sources.take(np.flatnonzero(mask)) for part, mask in zip(parts, kept)])
    return IndexState(index_dir, version, manifest, layout, parts, kept, ids, paths, labels, sources)


def _read_index(index_dir: Path, version: Path, manifest: dict, *, graph: bool = True) -> Index:
    """The Index of a version: its state, then the embeddings and the graph (`graph=False`: checked
    against the manifest, read on first use)."""
    state = _read_state(index_dir, version, manifest)
    dim, layout = manifest["dim"], state.layout
    try:
        model = ModelInfo.from_dict(manifest["model"])
        params = HnswParams(**manifest["hnsw"])
        arrays = [np.load(version / segment.embeddings_file, mmap_mode="r", allow_pickle=False) for segment in layout.segments]
    except (KeyError, TypeError, ValueError) as exc:  # JSON and UTF-8 errors are ValueErrors
        raise BadIndex(f"{index_dir}: damaged index ({type(exc).__name__}: {exc})") from None
    if not all(_is_count(value) and value > 0 for value in asdict(params).values()):
        raise BadIndex(
            f"{version / MANIFEST}: damaged index, hnsw parameters {asdict(params)} are not positive integers"
        )
    for segment, array in zip(layout.segments, arrays):
        if array.shape != (segment.rows, dim):
            raise BadIndex(
                f"{index_dir}: damaged index, {segment.items_file} has {segment.rows} items and embeddings "
                f"{array.shape} but the manifest says {segment.rows} x {dim}"
            )
        if array.dtype != np.float32:
            raise BadIndex(f"{index_dir}: damaged index, {segment.embeddings_file} holds {array.dtype}, not float32")
    encoder = manifest.get("encoder")  # absent in indexes written before it was recorded
    if encoder is not None and not isinstance(encoder, dict):
        raise BadIndex(f"{version / MANIFEST}: damaged index, encoder is not a table")
    index = Index(
        model,
        manifest["root"],
        list(map(Item, state.paths, state.labels)),
        _live_rows(arrays, state.kept),
        params,
        created=manifest["created"],
        runtime=manifest.get("runtime"),  # absent in indexes written before it was recorded
        encoder=encoder,
        version_dir=version,
        ids=state.ids,
        sources=state.sources,
        next_id=layout.next_id,
        graph_rows=int(np.searchsorted(state.ids, layout.graph.id_bound)),
        build=manifest.get("build") or {},
        thumbnails=_live_thumbnails(version, manifest, state),
        rerank_options=_rerank_options(version, manifest.get("rerank")),
        _rerank_entry=_stored_rerank(manifest),
    )
    load_graph = _graph_of(version, layout, index)
    if graph:
        index.hnsw = load_graph()
    else:
        index._load_graph = load_graph
    return index


def _live_thumbnails(version: Path, manifest: dict, state: IndexState) -> Thumbnails | None:
    """The live rows' thumbnails (their bytes memory-mapped); None when no segment has any."""
    segments = state.layout.segments
    if not any(thumbnail_files(segment)[0] in manifest["files"] for segment in segments):
        return None
    return Thumbnails.concat([
        _segment_thumbnails(version, manifest, segment, part.ids).take(np.flatnonzero(mask))
        for segment, part, mask in zip(segments, state.segment_items, state.kept)
    ])


def _live_rows(arrays: list[np.ndarray], kept: list[np.ndarray]) -> np.ndarray:
    """The live rows of the segments as one read-only array: the mapping itself when it is one
    segment with nothing removed, else a copy."""
    if len(arrays) == 1 and kept[0].all():
        return np.asarray(arrays[0])  # a plain read-only view of the mapping
    live = np.empty((sum(int(mask.sum()) for mask in kept), arrays[0].shape[1]), np.float32)
    start = 0
    for array, mask in zip(arrays, kept):  # one pass over each mapping, straight into place
        count = int(mask.sum())
        np.compress(mask, array, axis=0, out=live[start : start + count])
        start += count
    live.flags.writeable = False
    return live


def _graph_of(version: Path, layout: Layout, index: Index) -> Callable[[], object]:
    """What reads the version's graph file with the items removed since it was written marked
    deleted, once its counts and header have been checked against the manifest."""
    graph = layout.graph
    path = version / graph.file
    in_graph = index.graph_rows
    if graph.slots - graph.marked - len(layout.graph_deleted) != in_graph:
        raise BadIndex(
            f"{path}: damaged index, the graph holds {graph.slots} items ({graph.marked} marked deleted, "
            f"{len(layout.graph_deleted)} removed since) but {in_graph} live items have ids below {graph.id_bound}; "
            f"{REINDEX}"
        )
    check_hnsw_header(path, index.model.dim, graph.slots, index.hnsw_params)

    def load():
        loaded = load_hnsw(path, index.model.dim, graph.slots, index.hnsw_params)
        try:
            for item_id in layout.graph_deleted:
                loaded.mark_deleted(int(item_id))
        except RuntimeError as exc:
            raise BadIndex(f"{path}: damaged index, cannot mark a removed item ({exc}); {REINDEX}") from None
        return loaded

    return load


def _load_version(index_dir: Path, version: Path, read: Callable[[Path, Path, dict], T], *, checksums: bool) -> T:
    """read(index_dir, version, manifest) after the file checks, naming a damaged file when it fails."""
    try:
        manifest = read_manifest(version)
        files = manifest["files"]
        problems = _file_problems(version, files, checksums=checksums)
        if problems:
            raise DamagedFiles(index_dir, problems)
        try:
            return read(index_dir, version, manifest)
        except (BadIndex, KeyError, TypeError, ValueError) as exc:
            problems = [] if checksums else _file_problems(version, files, checksums=True)
            if problems:  # the precise reason: a file changed after it was written
                raise DamagedFiles(index_dir, problems) from None
            if isinstance(exc, BadIndex):
                raise
            raise BadIndex(f"{index_dir}: damaged index ({type(exc).__name__}: {exc})") from None
    except PermissionError as exc:
        raise BadIndex(
            f"{exc.filename or version}: permission denied reading the index; ask its owner to make "
            f"it readable (chmod -R a+rX {index_dir}) or run as a user who can read it"
        ) from None
    except OSError as exc:  # a file vanished mid-read, or the disk failed
        raise BadIndex(f"{index_dir}: cannot read the index ({exc.filename}: {exc.strerror})") from None


def _at_live_version(index_dir: Path, read: Callable[[Path], T]) -> T:
    """read(live version), once more with the new one if a writer switched CURRENT meanwhile.

    CURRENT is read once per attempt and everything comes from that version; a version that
    vanished under the reader was an old one, deleted after a writer made a newer one live.
    """
    version = live_version(index_dir)
    try:
        return read(version)
    except BadIndex:
        if _current_name(index_dir) in (None, version.name):
            raise
    return read(live_version(index_dir))


def _file_problems(version: Path, files: dict[str, dict], *, checksums: bool) -> list[str]:
    """What is wrong with each file the manifest lists: missing, resized, or (checksums) changed."""
    problems = []
    for name, recorded in files.items():
        try:
            size = (version / name).stat().st_size
        except FileNotFoundError:
            problems.append(f"{name} is missing")
            continue
        if size != recorded["bytes"]:
            problems.append(f"{name} has {size} bytes, the manifest says {recorded['bytes']}")
        elif checksums and sha256_files([version / name]) != recorded["sha256"]:
            problems.append(f"{name} checksum mismatch (changed after it was written)")
    return problems


# --- writing a version ------------------------------------------------------------------------


def _write_version(index_dir: Path, fill: Callable[[Path], tuple[dict, dict[str, dict]]]) -> Path:
    """Stage a version, make it durable, rename it into place, point CURRENT at it.

    `fill(staging)` writes or links the version's files and returns its manifest (without the
    file table) and the fingerprints it already knows (of linked files); the others are hashed.
    """
    staging = _new_staging_dir(index_dir)
    version = index_dir / f"v-{time.strftime('%Y%m%d-%H%M%S')}-{staging.name[-8:]}"
    try:
        manifest, known = fill(staging)
        names = sorted(entry.name for entry in staging.iterdir())
        written = [name for name in names if name not in known]
        manifest["files"] = {name: known.get(name) or _file_fingerprint(staging / name) for name in names}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        for name in (*written, MANIFEST):
            fsync_path(staging / name)
        fsync_path(staging)
        os.rename(staging, version)
        fsync_path(index_dir)
        write_text_atomic(index_dir / CURRENT, version.name + "\n")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if _current_name(index_dir) != version.name:  # renamed into place but never made live
            shutil.rmtree(version, ignore_errors=True)
        raise
    return version


def _link(source: Path, target: Path) -> None:
    """Share an immutable file with the new version: a hard link, or a copy where links fail."""
    try:
        os.link(source, target)
    except OSError:  # no hard links here (some network and FAT file systems), or across devices
        shutil.copyfile(source, target)


@dataclass
class _Planned:
    """A segment (or re-ranking part) of the next version: a base one kept (linked), or rows gathered
    and written."""

    origins: list[int]  # base segment (part) numbers the rows come from; -1: the additions (the edit's rows)
    ids: np.ndarray  # stored ids, in row order
    live: np.ndarray  # which stored rows are live
    keep: bool


def _merge_trailing(planned: list[_Planned]) -> list[_Planned]:
    """Merge the last part into the one before it while that one holds at most SEGMENT_MERGE_RATIO
    times its live rows (the merged part holds the live ids of both, and is written)."""
    planned = list(planned)
    while len(planned) >= 2 and planned[-2].live.sum() <= SEGMENT_MERGE_RATIO * planned[-1].live.sum():
        first, second = planned[-2], planned[-1]
        ids = np.union1d(first.ids[first.live], second.ids[second.live])
        planned[-2:] = [_Planned(first.origins + second.origins, ids, np.ones(len(ids), bool), False)]
    return planned


class _UpdatePlan:
    """How one incremental write turns the base version's layout into the next one."""

    def __init__(self, base: IndexState, added: Additions, removed: np.ndarray, compact: bool, build: dict) -> None:
        self.base, self.added, self.removed, self.build = base, added, removed, build
        layout = base.layout
        self.added_ids = np.arange(layout.next_id, layout.next_id + len(added), dtype=np.int64)
        self.next_id = layout.next_id + len(added)
        self.live_ids = np.concatenate([np.setdiff1d(base.ids, removed, assume_unique=True), self.added_ids])
        self.deleted = np.union1d(layout.deleted, removed)
        self.graph_deleted = np.union1d(layout.graph_deleted, removed[removed < layout.graph.id_bound])
        stored = sum(segment.rows for segment in layout.segments) + len(added)
        marks = layout.graph.marked + len(self.graph_deleted)
        self.compacted = compact or len(self.deleted) > COMPACT_DEAD_SHARE * stored or (
            marks > COMPACT_DEAD_SHARE * max(layout.graph.slots, 1)
        )
        self.graph_action = "rebuilt"
        self.bytes_written = 0
        self.next_name = layout.next_name

    def write(self, staging: Path) -> tuple[dict, dict[str, dict]]:
        base = self.base
        known: dict[str, dict] = {}
        if self.compacted:
            layout = self._compact(staging)
        else:
            segments, stored = self._segments(staging, known)
            graph_file, graph_deleted = self._graph(staging, known)
            deleted = self.deleted[np.isin(self.deleted, stored)]
            layout = Layout(segments, deleted, graph_file, graph_deleted, self.next_id, self.next_name)
        _write_deletions(staging, layout)
        rerank = self._rerank(staging, known)
        manifest = manifest_of(
            model=base.model, root=base.root, count=len(self.live_ids), hnsw_params=base.hnsw_params,
            created=base.manifest["created"], runtime=base.manifest.get("runtime"), encoder=base.encoder,
            build=self.build, layout=Layout(layout.segments, layout.deleted, layout.graph, layout.graph_deleted,
                                            layout.next_id, self.next_name), rerank=rerank,
        )
        written = [name for name in os.listdir(staging) if name not in known]
        self.bytes_written = sum((staging / name).stat().st_size for name in written)
        self.bytes_written += len(json.dumps(manifest, indent=2))  # about the manifest's size, table aside
        return manifest, known

    def _rerank(self, staging: Path, known: dict[str, dict]) -> dict | None:
        """Write the base's re-ranking state after this edit; its manifest entry.

        Fitted anew and written whole on a compaction, with no state yet, when the items added
        since the fit pass REFIT_SHARE of those fitted on, or when the new count allows or forbids
        a step. Else updated with its PCA: the changed rows become a new part and the rest is
        linked; when the rows outside the graph pass max(GRAPH_PENDING_SHARE of the items,
        RERANK_PENDING_FLOOR) the graph takes them in and is written anew, the parts still linked.
        """
        base, entry = self.base, _stored_rerank(self.base.manifest)
        options = _rerank_options(base.version, entry) or RECOMMENDED_RERANK
        if not len(self.live_ids):
            return None
        refit = self.compacted or entry is None or (
            entry["added"] + len(self.added) > REFIT_SHARE * entry["fitted"]
        ) or RerankOptions(**entry["ran"]) != fitted_options(len(self.live_ids), options)[0]
        if refit:
            everything = list(range(len(base.layout.segments))) + [-1]
            state = fit_rerank(self._rows(everything, self.live_ids)[2], self.live_ids, options, base.hnsw_params)
            return write_rerank(staging, state, self._number(), base.hnsw_params)
        state = read_rerank(base.version, entry, base.ids, with_graph=False)
        state, changed = update_state(state, self.added.embeddings, self.added_ids, self.removed)
        if len(state.pending) > max(GRAPH_PENDING_SHARE * len(state), RERANK_PENDING_FLOOR):
            graph, moved = _rerank_graph(base.version, entry, state, allow_replace_deleted=True)
            state = take_in(state, graph, moved)
        return self._rerank_delta(staging, known, entry, state, changed)

    def _rerank_delta(self, staging: Path, known: dict[str, dict], entry: dict, state: RerankState,
                      changed: np.ndarray) -> dict:
        """Link the base state's PCA and parts, add a part of the `changed` ids' rows, merge small
        trailing parts as segments merge, and drop parts whose rows all went stale. The graph is
        linked, or written anew when it has taken the pending rows in (`state.graph`): then every
        part is one it covers. Parts the graph covers merge only with each other, pending ones too."""
        base, first = self.base, entry["parts"][0]
        covered = _graph_parts(entry)
        groups: tuple[list[_Planned], list[_Planned]] = ([], [])  # covered by the graph, pending
        later = np.asarray(changed, np.int64)
        for number in reversed(range(1, len(entry["parts"]))):  # a row is stale once a later part holds its id
            name = entry["parts"][number]["name"]
            stored = np.load(base.version / _rerank_part_files(name)["ids"], allow_pickle=False)
            current = np.isin(stored, state.ids) & ~np.isin(stored, later)
            if current.any():
                groups[number >= covered].insert(0, _Planned([number], stored, current, True))
            later = np.union1d(later, stored)
        if len(changed):
            groups[1].append(_Planned([-1], np.asarray(changed, np.int64), np.ones(len(changed), bool), False))
        taken_in = state.graph is not None
        if taken_in:
            groups = (groups[0] + groups[1], [])
        parts = [first]
        for group in groups:
            for plan in _merge_trailing(group):
                if plan.keep:
                    part = entry["parts"][plan.origins[0]]
                    self._link_rerank(staging, known, _rerank_part_files(part["name"]).values())
                    parts.append(part)
                    continue
                name = _name("rerank", self._number())
                _write_rerank_part(staging, name, state, np.searchsorted(state.ids, plan.ids), entry["bound"])
                parts.append({"name": name, "rows": len(plan.ids)})
            if group is groups[0]:
                covered = len(parts)
        pca = entry["pca"]
        self._link_rerank(staging, known, [*_rerank_part_files(first["name"]).values(), *(pca.values() if pca else ())])
        if taken_in:
            graph = _write_rerank_graph(staging, _name("rerank", self._number()), state, covered)
        else:
            graph = {**entry["graph"], "parts": covered}
            self._link_rerank(staging, known, _rerank_graph_files(graph))
        return _rerank_entry(state, base.hnsw_params, parts, entry["bound"], graph, pca)

    def _link_rerank(self, staging: Path, known: dict[str, dict], names) -> None:
        for name in names:
            _link(self.base.version / name, staging / name)
            known[name] = self.base.manifest["files"][name]

    def _number(self) -> int:
        """The number of the next segment or graph file this version writes."""
        self.next_name += 1
        return self.next_name - 1

    def _compact(self, staging: Path) -> Layout:
        """One segment of the live rows and a fresh graph: nothing removed stays stored."""
        everything = list(range(len(self.base.layout.segments))) + [-1]
        paths, labels, embeddings, sources, thumbnails = self._rows(everything, self.live_ids)
        segment = Segment.named(self._number(), len(self.live_ids))
        _write_segment(staging, segment, self.live_ids, paths, labels, embeddings, sources, thumbnails)
        graph = GraphFile(_name("graph", self._number()) + ".bin", len(self.live_ids), 0, self.next_id)
        build_hnsw(embeddings, self.base.hnsw_params, self.live_ids).save_index(str(staging / graph.file))
        return Layout((segment,), _no_ids(), graph, _no_ids(), self.next_id, self.next_name)

    def _segments(self, staging: Path, known: dict[str, dict]) -> tuple[tuple[Segment, ...], np.ndarray]:
        """Keep the base's segments, add one for the additions, merge small trailing ones.

        Returns the segments and every id they store (removed ones included)."""
        base = self.base
        planned = [
            _Planned([number], part.ids, ~np.isin(part.ids, self.deleted), True)
            for number, part in enumerate(base.segment_items)
        ]
        if len(self.added):
            planned.append(_Planned([-1], self.added_ids, np.ones(len(self.added), bool), False))
        planned = _merge_trailing(planned)
        segments = []
        for plan in planned:
            if plan.keep:
                segments.append(self._keep(staging, known, plan.origins[0]))
                continue
            paths, labels, embeddings, sources, thumbnails = self._rows(plan.origins, plan.ids)
            segment = Segment.named(self._number(), len(plan.ids))
            _write_segment(staging, segment, plan.ids, paths, labels, embeddings, sources, thumbnails)
            segments.append(segment)
        return tuple(segments), np.concatenate([plan.ids for plan in planned]) if planned else _no_ids()

    def _keep(self, staging: Path, known: dict[str, dict], number: int) -> Segment:
        """Link a base segment into the new version; a format-1 one gets a named copy of its items with ids."""
        base = self.base
        segment = base.layout.segments[number]
        if base.manifest["format_version"] != 1:
            thumbnails = [name for name in thumbnail_files(segment) if name in base.manifest["files"]]
            for name in (segment.embeddings_file, segment.items_file, segment.files_file, *thumbnails):
                _link(base.version / name, staging / name)
                known[name] = base.manifest["files"][name]
            return segment
        converted = Segment.named(self._number(), segment.rows)
        _link(base.version / segment.embeddings_file, staging / converted.embeddings_file)
        known[converted.embeddings_file] = base.manifest["files"][segment.embeddings_file]
        part = base.segment_items[number]
        _write_items(staging, converted, part.ids, part.paths, part.labels, part.sources)
        return converted

    def _graph(self, staging: Path, known: dict[str, dict]) -> tuple[GraphFile, np.ndarray]:
        """Link the base's graph, or, when too many live items are outside it, take them in."""
        base, graph = self.base, self.base.layout.graph
        pending = self.live_ids[self.live_ids >= graph.id_bound]
        if len(pending) <= GRAPH_PENDING_SHARE * len(self.live_ids):
            self.graph_action = "kept"
            name = graph.file if base.manifest["format_version"] != 1 else _name("graph", self._number()) + ".bin"
            _link(base.version / graph.file, staging / name)
            known[name] = base.manifest["files"][graph.file]
            return GraphFile(name, graph.slots, graph.marked, graph.id_bound), self.graph_deleted
        self.graph_action = "extended"
        everything = list(range(len(base.layout.segments))) + [-1]
        _, _, vectors, _, _ = self._rows(everything, pending)
        loaded = load_hnsw(base.version / graph.file, base.model.dim, graph.slots, base.hnsw_params,
                           allow_replace_deleted=True)
        for item_id in self.graph_deleted:
            loaded.mark_deleted(int(item_id))
        reusable = graph.marked + len(self.graph_deleted)
        needed = graph.slots + max(0, len(pending) - reusable)
        if needed > loaded.get_max_elements():
            loaded.resize_index(math.ceil(needed * GRAPH_GROWTH))
        loaded.add_items(vectors, pending, replace_deleted=True)
        slots = loaded.get_current_count()
        extended = GraphFile(_name("graph", self._number()) + ".bin", slots, slots - len(self.live_ids), self.next_id)
        loaded.save_index(str(staging / extended.file))
        return extended, _no_ids()

    def _rows(
        self, origins: list[int], ids: np.ndarray
    ) -> tuple[list[str], list[str], np.ndarray, Sources, Thumbnails]:
        """Paths, labels, embeddings, sources and thumbnails of `ids` (in id order), from base
        segments and the additions (-1)."""
        paths: list[str] = []
        labels: list[str] = []
        vectors, sources, thumbnails = [], [], []
        for origin in origins:
            if origin < 0:
                stored, part_vectors, part_sources = self.added_ids, self.added.embeddings, self.added.sources
                part_paths = [item.path for item in self.added.items]
                part_labels = [item.label for item in self.added.items]
                part_thumbnails = self.added.thumbnails or Thumbnails.absent(len(stored))
            else:
                part = self.base.segment_items[origin]
                segment = self.base.layout.segments[origin]
                stored, part_paths, part_labels, part_sources = part.ids, part.paths, part.labels, part.sources
                part_vectors = np.load(self.base.version / segment.embeddings_file, mmap_mode="r", allow_pickle=False)
                part_thumbnails = _segment_thumbnails(self.base.version, self.base.manifest, segment, part.ids)
            rows = np.flatnonzero(np.isin(stored, ids))
            paths.extend(part_paths[row] for row in rows)
            labels.extend(part_labels[row] for row in rows)
            vectors.append(np.asarray(part_vectors[rows], dtype=np.float32))
            sources.append(part_sources.take(rows))
            thumbnails.append(part_thumbnails.take(rows))
        vectors = np.concatenate(vectors) if vectors else np.empty((0, self.base.model.dim), np.float32)
        return paths, labels, vectors, Sources.concat(sources), Thumbnails.concat(thumbnails)


# --- the writer lock --------------------------------------------------------------------------

_held_locks = threading.local()  # .dirs: the index directories this thread holds the lock of


@contextmanager
def index_writer_lock(
    index_dir: str | Path, *, wait: bool = True, on_wait: Callable[[str], None] | None = None
) -> Iterator[None]:
    """Be the only writer of an index directory while the block runs.

    An flock(2) on INDEX/.lock: the kernel releases it when its holder exits or is killed, so
    a crash never leaves the index locked. If another process holds it, wait (calling
    `on_wait(message)` once first) or, with wait=False, raise IndexLocked. Re-entrant within a
    thread. Refuses a folder that is not a fastret index (BadIndex) before creating anything.
    """
    index_dir = Path(index_dir)
    _check_writable_target(index_dir)
    held: set[str] = _held_locks.__dict__.setdefault("dirs", set())
    try:
        index_dir.mkdir(parents=True, exist_ok=True)
        key = str(index_dir.resolve())
        fd = None if key in held else os.open(index_dir / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except PermissionError as exc:
        raise BadIndex(f"{index_dir}: cannot write the index here ({exc.strerror}); choose another folder") from None
    if fd is None:  # this thread holds it already
        yield
        return
    try:
        _acquire(fd, index_dir, wait=wait, on_wait=on_wait)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)  # for the message of a writer that has to wait
        held.add(key)
        try:
            yield
        finally:
            held.discard(key)
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the lock


def _acquire(fd: int, index_dir: Path, *, wait: bool, on_wait: Callable[[str], None] | None) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        pass
    holder = _lock_holder(fd)
    if not wait:
        raise IndexLocked(
            f"{index_dir}: another fastret writer{holder} is writing this index; wait until it "
            "finishes or stop it"
        )
    if on_wait is not None:
        on_wait(f"waiting for another fastret writer on {index_dir}{holder}…")
    fcntl.flock(fd, fcntl.LOCK_EX)


def _lock_holder(fd: int) -> str:
    """' (pid N)' as the holder wrote it into the lock file, '' if it has not yet."""
    text = os.pread(fd, 32, 0).decode("ascii", errors="replace").strip()
    return f" (pid {text})" if text.isdigit() else ""


def _check_writable_target(index_dir: Path) -> None:
    """Never write into a folder that holds something other than a fastret index (even a half-made one)."""
    if index_dir.exists() and not index_dir.is_dir():
        raise BadIndex(f"{index_dir}: exists and is not a directory")
    if index_dir.is_dir() and not any((index_dir / marker).exists() for marker in INDEX_MARKERS):
        foreign = [p.name for p in index_dir.iterdir() if p.name != LOCK and not p.name.startswith(WRITER_PREFIXES)]
        if foreign:
            raise BadIndex(
                f"{index_dir}: folder is not empty and is not a fastret index; choose another --out"
            )


def _writer_entries(index_dir: Path) -> list[Path]:
    """What writers left in the directory: versions (the live one too) and dead writers' debris."""
    return [entry for entry in index_dir.iterdir() if entry.name.startswith(WRITER_PREFIXES)]


def _new_staging_dir(index_dir: Path) -> Path:
    """A fresh .tmp-* directory made like `mkdir` makes one (umask applies; mkdtemp's 0700 would
    keep other users out of a shared index)."""
    while True:
        staging = index_dir / f".tmp-{secrets.token_hex(4)}"
        try:
            staging.mkdir()
            return staging
        except FileExistsError:
            continue


def _remove(entry: Path) -> None:
    """Remove a superseded entry; removing a version's names leaves files another version links."""
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        entry.unlink(missing_ok=True)


def _file_fingerprint(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": sha256_files([path])}


def exact_search(embeddings: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force cosine top-k rows; ties broken by the lower row so results are deterministic."""
    scores = queries @ embeddings.T
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < scores.shape[1] else np.tile(
        np.arange(scores.shape[1]), (len(scores), 1)
    )
    part_scores = np.take_along_axis(scores, part, axis=1)
    # argpartition keeps arbitrary members of a tie at the k-th place: redo those rows stably.
    straddle = (scores >= part_scores.min(axis=1, keepdims=True)).sum(axis=1) > k
    if straddle.any():
        part[straddle] = np.argsort(-scores[straddle], axis=1, kind="stable")[:, :k]
        part_scores = np.take_along_axis(scores, part, axis=1)
    order = np.lexsort((part, -part_scores), axis=1)
    ids = np.take_along_axis(part, order, axis=1)
    return ids.astype(np.int64), np.take_along_axis(scores, ids, axis=1).astype(np.float32)


# --- the HNSW graph ---------------------------------------------------------------------------

# hnswlib's saveIndex header (hnswalg.h), native little-endian: six size_t, an int, an unsigned
# int, three size_t, a double, a size_t.
HNSW_HEADER = struct.Struct("<6QiI3QdQ")
HNSW_FIELDS = (
    "offsetLevel0",
    "max_elements",
    "cur_element_count",
    "size_data_per_element",
    "label_offset",
    "offsetData",
    "maxlevel",
    "enterpoint_node",
    "maxM",
    "maxM0",
    "M",
    "mult",
    "ef_construction",
)
NO_NODE = 2**32 - 1  # enterpoint_node of an empty graph (tableint -1)
# hnswlib draws a node's level as int(-ln(u) * mult) for a positive double u, so never above
# this factor times mult.
LEVEL_FACTOR = -math.log(sys.float_info.min * sys.float_info.epsilon)


def build_hnsw(embeddings: np.ndarray, params: HnswParams, ids: np.ndarray | None = None):
    """An hnswlib cosine index over the rows, labelled with their item ids (default: row numbers)."""
    import hnswlib

    graph = hnswlib.Index(space="cosine", dim=embeddings.shape[1])
    graph.init_index(max_elements=max(1, len(embeddings)), ef_construction=params.ef_construction, M=params.M)
    if len(embeddings):
        graph.add_items(embeddings, np.arange(len(embeddings)) if ids is None else ids)
    graph.set_ef(params.ef_search)
    return graph


def load_hnsw(path: Path, dim: int, count: int, params: HnswParams, *, allow_replace_deleted: bool = False):
    """Load a graph of `count` elements (marked-deleted ones included) after checking its header."""
    import hnswlib

    check_hnsw_header(path, dim, count, params)
    graph = hnswlib.Index(space="cosine", dim=dim)
    try:
        graph.load_index(str(path), max_elements=max(1, count), allow_replace_deleted=allow_replace_deleted)
    except (RuntimeError, ValueError) as exc:
        raise BadIndex(f"{path}: damaged HNSW graph ({exc}); {REINDEX}") from None
    if graph.get_current_count() != count:
        raise BadIndex(f"{path}: HNSW graph holds {graph.get_current_count()} items, expected {count}")
    return graph


def check_hnsw_header(path: Path, dim: int, count: int, params: HnswParams) -> None:
    """Refuse a graph file whose header disagrees with the manifest, before hnswlib reads it.

    hnswlib trusts these offsets and sizes: a wrong one makes it read out of bounds and crash
    the process instead of raising. The links inside the graph are covered by the checksum only.
    """
    with open(path, "rb") as handle:
        header = handle.read(HNSW_HEADER.size)
        size = os.fstat(handle.fileno()).st_size
    if len(header) < HNSW_HEADER.size:
        raise BadIndex(f"{path}: damaged HNSW graph, {size} bytes is shorter than its header; {REINDEX}")
    found = dict(zip(HNSW_FIELDS, HNSW_HEADER.unpack(header)))
    M = params.M
    links0 = 2 * M * 4 + 4  # level-0 neighbour count and ids
    per_element = links0 + dim * 4 + 8  # links, the vector, the label
    mult = 1 / math.log(M) if M > 1 else math.inf
    expected = {
        "offsetLevel0": 0,
        "cur_element_count": count,
        "size_data_per_element": per_element,
        "label_offset": links0 + dim * 4,
        "offsetData": links0,
        "maxM": M,
        "maxM0": 2 * M,
        "M": M,
        "ef_construction": max(params.ef_construction, M),
    }
    if count == 0:
        expected.update(maxlevel=-1, enterpoint_node=NO_NODE)
    wrong = [f"{name} is {found[name]}, expected {value}" for name, value in expected.items() if found[name] != value]
    if not math.isclose(found["mult"], mult):
        wrong.append(f"mult is {found['mult']}, expected {mult}")
    if found["max_elements"] < count:
        wrong.append(f"max_elements is {found['max_elements']}, fewer than the {count} items")
    if count and not 0 <= found["maxlevel"] <= LEVEL_FACTOR * mult:
        wrong.append(f"maxlevel is {found['maxlevel']}, impossible for M={M}")
    if count and found["enterpoint_node"] >= count:
        wrong.append(f"enterpoint_node is {found['enterpoint_node']}, not one of the {count} items")
    if size < HNSW_HEADER.size + count * (per_element + 4):
        wrong.append(f"{size} bytes is too short for {count} items")
    if wrong:
        raise BadIndex(
            f"{path}: damaged HNSW graph, its header disagrees with the manifest "
            f"({count} items, dim {dim}, M={M}): {'; '.join(wrong)}; {REINDEX}"
        )


# --- the re-ranking state ----------------------------------------------------------------------

RERANK_ARRAYS = ("ids", "base", "vectors", "neighbours", "reach")
RERANK_PENDING_FLOOR = 1024
"""Rows of the re-ranking state outside its graph that an edit may always leave there (searched
exactly): the share alone would take them in at nearly every edit of a small index, since one
image added or removed changes about 2 * dba_n + 1 rows, and scoring this many is one small product."""


def fit_rerank(embeddings: np.ndarray, ids: np.ndarray, options: RerankOptions, params: HnswParams,
               *, whitening: PcaWhitening | None = None, target: float = TARGET_RECALL) -> RerankState:
    """The re-ranking state of these items (rerank.fit_state), its graphs built with the index's HNSW parameters."""
    return fit_state(embeddings, ids, options, lambda vectors, labels: build_hnsw(vectors, params, labels),
                     whitening=whitening, target=target)


def _rerank_part_files(name: str) -> dict[str, str]:
    return {array: f"{name}.{array}.npy" for array in RERANK_ARRAYS}


def _stored_rerank(manifest: dict) -> dict | None:
    """A manifest's re-ranking entry; one written before states had parts (one table of files, its
    graph holding every live item unmarked) reads as a state of one part."""
    entry = manifest.get("rerank")
    if not isinstance(entry, dict) or "parts" in entry or not isinstance(entry.get("files"), dict):
        return entry
    files = entry["files"]
    try:
        return {**entry, "parts": [{"name": files["ids"].removesuffix(".ids.npy"), "rows": entry["count"]}],
                "bound": manifest["next_id"],
                "graph": {"file": files["graph"], "slots": entry["slots"], "marked": entry["slots"] - entry["count"]},
                "pca": {"mean": files["mean"], "projection": files["projection"]} if "mean" in files else None}
    except (KeyError, TypeError, AttributeError):
        return entry


def _rerank_files(entry: dict) -> list[str]:
    """Every file of a re-ranking state's manifest entry (KeyError / TypeError when it is not one)."""
    pca = entry["pca"]
    parts = [file for part in entry["parts"] for file in _rerank_part_files(part["name"]).values()]
    return [*parts, *_rerank_graph_files(entry["graph"]), *(pca.values() if pca else ())]


def _rerank_graph_files(graph: dict) -> list[str]:
    """The files of a re-ranking graph's manifest entry: the graph, and the ids it holds when recorded."""
    return [graph["file"], *([graph["ids"]] if "ids" in graph else [])]


def _graph_parts(entry: dict) -> int:
    """How many of a state's parts (from the first) its graph covers: it holds each of their ids'
    newest row among them; the ids of later parts are pending. One when the entry does not say."""
    return entry["graph"].get("parts", 1)


def _write_rerank_graph(staging: Path, name: str, state: RerankState, parts: int | None = None) -> dict:
    """Save a state's graph (no row pending) as `name`.graph.bin; its manifest entry. A graph that
    covers more `parts` than the first one records the ids it holds unmarked (the live ones)."""
    graph = {"file": f"{name}.graph.bin"}
    state.graph.save_index(str(staging / graph["file"]))
    slots = int(state.graph.get_current_count())
    graph.update(slots=slots, marked=slots - len(state))
    if parts is not None:
        graph.update(ids=f"{name}.graph-ids.npy", parts=parts)
        np.save(staging / graph["ids"], state.ids)
    return graph


def _write_rerank_part(staging: Path, name: str, state: RerankState, rows: np.ndarray | None = None,
                       bound: int = 0) -> None:
    """A part of a state: its `rows` (None: all) of each array, the projected rows only of the ids
    from `bound` on (an edit changes the DBA'd rows of older items, never their projection: the
    first part, which holds every id below `bound`, keeps it)."""
    for array, file in _rerank_part_files(name).items():
        values = getattr(state, array)
        if rows is not None:
            values = values[rows[state.ids[rows] >= bound]] if array == "base" else values[rows]
        np.save(staging / file, np.asarray(values))


def _rerank_entry(state: RerankState, params: HnswParams, parts: list[dict], bound: int, graph: dict,
                  pca: dict | None) -> dict:
    return {
        "options": state.options.to_dict(), "ran": state.ran.to_dict(), "notes": list(state.notes),
        "dim": int(state.base.shape[1]), "count": len(state), "ef": state.ef, "recall": state.recall,
        "fitted": state.fitted, "added": state.added, "hnsw": asdict(params), "parts": parts, "bound": bound,
        "graph": graph, "pca": pca,
    }


def write_rerank(staging: Path, state: RerankState | None, number: int, params: HnswParams) -> dict | None:
    """Write a re-ranking state whole into a version (one part, its graph and PCA); its manifest entry
    (None: no state). A state with pending rows is written whole only after `take_in`."""
    if state is None:
        return None
    if len(state.pending):
        raise ValueError("the state has rows outside its graph: take them in before writing it whole")
    name = _name("rerank", number)
    _write_rerank_part(staging, name, state)
    pca = None
    if state.whitening is not None:
        pca = {"mean": f"{name}.mean.npy", "projection": f"{name}.projection.npy"}
        np.save(staging / pca["mean"], state.whitening.mean)
        np.save(staging / pca["projection"], state.whitening.projection)
    parts, bound = [{"name": name, "rows": len(state)}], int(state.ids[-1]) + 1 if len(state) else 0
    return _rerank_entry(state, params, parts, bound, _write_rerank_graph(staging, name, state), pca)


def _rerank_options(version: Path, entry: dict | None) -> RerankOptions | None:
    if entry is None:
        return None
    try:
        return RerankOptions(**entry["options"])
    except (KeyError, TypeError, ValueError) as exc:
        raise BadIndex(f"{version / MANIFEST}: damaged index, bad re-ranking options ({exc}); {REINDEX}") from None


def read_rerank(version: Path, entry: dict, ids: np.ndarray, *, with_graph: bool = True) -> RerankState:
    """A version's re-ranking state for its live `ids`, refusing files that disagree with its entry.

    One part that holds exactly the live items is memory-mapped; else each item's row comes from
    the last part holding it (gathered into memory) and the rows of parts the graph does not cover
    are pending. The graph (`with_graph`) comes with the nodes of removed and pending items marked
    deleted.
    """
    where = version / MANIFEST
    try:
        dim, count, parts, bound, graph = entry["dim"], entry["count"], entry["parts"], entry["bound"], entry["graph"]
        options, ran = RerankOptions(**entry["options"]), RerankOptions(**entry["ran"])
        numbers = (entry["ef"], entry["fitted"], entry["added"])
        recall, notes = float(entry["recall"]), tuple(map(str, entry["notes"]))
        HnswParams(**entry["hnsw"])  # the graph's, read by _rerank_graph
        sizes = [part["rows"] for part in parts] + [graph["slots"], graph["marked"], _graph_parts(entry)]
        held = _graph_held(version, entry)
        arrays = [{array: np.load(version / file, mmap_mode="r", allow_pickle=False)
                   for array, file in _rerank_part_files(part["name"]).items()} for part in parts]
        whitening = None
        if entry["pca"] is not None:
            whitening = PcaWhitening(np.load(version / entry["pca"]["mean"], allow_pickle=False),
                                     np.load(version / entry["pca"]["projection"], allow_pickle=False))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise BadIndex(f"{where}: damaged index, bad re-ranking state ({type(exc).__name__}: {exc}); {REINDEX}") from None
    wrong = []
    if not parts or not all(_is_count(number) for number in (*numbers, *sizes, dim, count, bound)):
        wrong.append("its counts are not counts")
    else:
        wrong += _rerank_part_problems(parts, arrays, dim, ran.dba_n + 1 if ran.dba_n else 0, bound)
        if graph["slots"] - graph["marked"] != len(held) or held.dtype != np.int64 or held.ndim != 1:
            wrong.append(f"its graph holds {graph['slots'] - graph['marked']} items, its ids {held.dtype} {held.shape}")
        if not 1 <= _graph_parts(entry) <= len(parts):
            wrong.append(f"its graph covers {_graph_parts(entry)} of its {len(parts)} parts")
    if whitening is not None and (whitening.mean.shape != (len(whitening.projection),) or whitening.projection.shape[1] != dim):
        wrong.append(f"the PCA's shapes {whitening.mean.shape} {whitening.projection.shape} do not project to {dim}")
    if not wrong:
        merged, pending = _merge_rerank_parts(arrays, ids, bound, _graph_parts(entry))
        if count != len(ids) or merged is None:
            wrong.append("its items are not the version's live items")
    if wrong:
        raise BadIndex(f"{where}: damaged index, re-ranking state: {'; '.join(wrong)}; {REINDEX}")
    state = RerankState(options, ran, notes, whitening, merged["ids"], merged["base"], merged["vectors"],
                        merged["neighbours"], merged["reach"], None, numbers[0], recall, numbers[1], numbers[2], pending)
    if with_graph:
        state.graph = _rerank_graph(version, entry, state)[0]
    return state


def _rerank_part_problems(parts: list[dict], arrays: list[dict[str, np.ndarray]], dim: int, width: int,
                          bound: int) -> list[str]:
    """One line per array of a part that has not the shape and type its entry says (the first part
    holds every projected row, later ones those of their ids from `bound` on)."""
    wrong = []
    for number, (part, found) in enumerate(zip(parts, arrays)):
        rows, files = part["rows"], _rerank_part_files(part["name"])
        projected = rows if number == 0 or found["ids"].shape != (rows,) else int((found["ids"] >= bound).sum())
        expected = {"ids": ((rows,), np.int64), "base": ((projected, dim), np.float32), "vectors": ((rows, dim), np.float32),
                    "neighbours": ((rows, width), np.int64), "reach": ((rows,), np.float32)}
        wrong += [f"{files[name]} holds {found[name].dtype} {found[name].shape}, expected {kind.__name__} {shape}"
                  for name, (shape, kind) in expected.items() if found[name].shape != shape or found[name].dtype != kind]
        if found["ids"].shape == (rows,) and (np.diff(found["ids"]) <= 0).any():
            wrong.append(f"{files['ids']} holds ids that are not increasing")
    return wrong


def _merge_rerank_parts(
    parts: list[dict[str, np.ndarray]], ids: np.ndarray, bound: int, covered: int = 1
) -> tuple[dict[str, np.ndarray] | None, np.ndarray]:
    """The rows of the live `ids` (in id order), each from the last part that holds it (a projected
    row of an id below `bound` from the first), and the rows that came from parts after the first
    `covered` (pending: outside the graph); None when a live id has no row."""
    first = parts[0]
    if len(parts) == 1 and np.array_equal(first["ids"], ids):
        return {array: np.asarray(first[array]) for array in RERANK_ARRAYS}, np.empty(0, np.int64)
    kept = np.isin(first["ids"], ids)
    head = int(kept.sum())  # ids added since the first part are higher: its live ids come first
    merged = {array: np.empty((len(ids), *first[array].shape[1:]), first[array].dtype) for array in RERANK_ARRAYS}
    for array in RERANK_ARRAYS:
        np.compress(kept, first[array], axis=0, out=merged[array][:head])
    pending, filled, projected = np.zeros(len(ids), bool), np.zeros(len(ids), bool), np.zeros(len(ids), bool)
    filled[:head] = projected[:head] = True
    for number, part in enumerate(parts[1:], start=1):
        live = np.isin(part["ids"], ids)
        rows = np.searchsorted(ids, part["ids"][live])
        for array in RERANK_ARRAYS:
            if array != "base":
                merged[array][rows] = part[array][live]
        added = part["ids"] >= bound  # the ids the part has projected rows of
        merged["base"][rows[added[live]]] = part["base"][live[added]]
        pending[rows] = number >= covered
        filled[rows] = True
        projected[rows[added[live]]] = True
    if not (filled & projected).all() or not np.array_equal(merged["ids"], ids):
        return None, np.empty(0, np.int64)
    for values in merged.values():
        values.flags.writeable = False
    return merged, np.flatnonzero(pending)


def _rerank_graph(version: Path, entry: dict, state: RerankState, *, allow_replace_deleted: bool = False):
    """The stored graph of a re-ranking state with the nodes of items removed or pending in `state`
    marked deleted; and the pending ids it has nodes of."""
    graph = entry["graph"]
    path = version / graph["file"]
    held = _graph_held(version, entry)
    pending = state.ids[state.pending]
    moved = np.isin(held, pending)
    loaded = load_hnsw(path, state.base.shape[1], graph["slots"], HnswParams(**entry["hnsw"]),
                       allow_replace_deleted=allow_replace_deleted)
    try:
        for item_id in held[moved | ~np.isin(held, state.ids)]:
            loaded.mark_deleted(int(item_id))
    except RuntimeError as exc:
        raise BadIndex(f"{path}: damaged index, cannot mark a removed item ({exc}); {REINDEX}") from None
    return loaded, held[moved]


def _graph_held(version: Path, entry: dict) -> np.ndarray:
    """The ids a state's graph holds unmarked as written: those it records, else the first part's."""
    name = entry["graph"].get("ids") or _rerank_part_files(entry["parts"][0]["name"])["ids"]
    return np.load(version / name, mmap_mode="r", allow_pickle=False)


# --- the directory ----------------------------------------------------------------------------


def live_version(index_dir: str | Path) -> Path:
    """The version directory CURRENT names, refusing a missing or damaged pointer."""
    index_dir = Path(index_dir)
    pointer = index_dir / CURRENT
    if not pointer.is_file():
        if not index_dir.exists():
            raise BadIndex(f"{index_dir}: no index here; build one with `fastret index DIR`")
        raise BadIndex(f"{index_dir}: not a fastret index (no {CURRENT} file)")
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError:
        raise BadIndex(f"{pointer}: damaged index, {CURRENT} is not text; {REINDEX}") from None
    except PermissionError:
        raise BadIndex(f"{pointer}: permission denied reading the index; ask its owner to make it readable") from None
    version = index_dir / name
    if not name.startswith("v-") or version.parent != index_dir:
        raise BadIndex(f"{pointer}: damaged index, {CURRENT} names {name!r}, not a version; {REINDEX}")
    if not version.is_dir():
        raise BadIndex(f"{index_dir}: damaged index, {CURRENT} names a missing version ({name}); {REINDEX}")
    return version


def live_version_name(index_dir: str | Path) -> str | None:
    """The version name CURRENT holds now, or None when it cannot be read: a cheap poll for readers
    that follow an index."""
    return _current_name(Path(index_dir))


def next_free_id(index_dir: str | Path) -> int:
    """The first id an index written into this directory may use without reusing one its live
    version gave out (0 when there is no readable index): ids stay unique across rebuilds."""
    try:
        manifest = read_manifest(live_version(index_dir))
    except BadIndex:
        return 0
    found = manifest.get("next_id", manifest["count"])  # format 1: ids are the rows
    return found if _is_count(found) else 0


def _current_name(index_dir: Path) -> str | None:
    """The version name in CURRENT, or None when it cannot be read."""
    try:
        return (index_dir / CURRENT).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None


def read_manifest(version: Path) -> dict:
    """The version's manifest, refusing an unknown format and missing or mistyped fields."""
    path = version / MANIFEST
    try:
        manifest = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise BadIndex(f"{version}: damaged index, {MANIFEST} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadIndex(f"{version}: damaged index, {MANIFEST} is not valid JSON ({exc})") from None
    found = manifest.get("format_version") if isinstance(manifest, dict) else None
    if found not in READABLE_FORMATS:
        raise BadIndex(
            f"{version}: index format version {found!r} is not supported (this fastret reads "
            f"versions {', '.join(map(str, READABLE_FORMATS))}); re-index with `fastret index`"
        )
    missing = [key for key in ("files", "model", "dim", "count", "root", "hnsw", "created") if key not in manifest]
    if missing:
        raise BadIndex(f"{version}: damaged index, {MANIFEST} lacks {', '.join(missing)}")
    for key in ("count", "dim"):
        if not _is_count(manifest[key]):
            raise BadIndex(f"{path}: damaged index, {key} is {manifest[key]!r}, not a non-negative integer; {REINDEX}")
    _check_file_table(path, manifest["files"], _layout_files(path, manifest))
    return manifest


def _check_file_table(path: Path, files: object, required: list[str]) -> None:
    """The manifest's files: a table listing at least the required files, each with size and sha256."""
    if not isinstance(files, dict):
        raise BadIndex(f"{path}: damaged index, files is {type(files).__name__}, not a table of files; {REINDEX}")
    unlisted = [name for name in required if name not in files]
    if unlisted:
        raise BadIndex(f"{path}: damaged index, files does not list {', '.join(unlisted)}; {REINDEX}")
    for name, recorded in files.items():
        if (
            Path(name).name != name
            or name.startswith(".")
            or not isinstance(recorded, dict)
            or not _is_count(recorded.get("bytes"))
            or not isinstance(recorded.get("sha256"), str)
        ):
            raise BadIndex(f"{path}: damaged index, files has a bad entry for {name!r}; {REINDEX}")


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def default_index_dir() -> Path:
    """Where `fastret index` writes and `fastret search` reads when --index is not given."""
    return Path(os.environ.get("FASTRET_INDEX", Path.home() / ".fastret" / "index")).expanduser()
