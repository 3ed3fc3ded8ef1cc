"""A LanceDB table as an index's store (`fastret index --store lancedb`; extra `fastret[lancedb]`).

For galleries larger than RAM: the items, their source records and embeddings live in a Lance
table (a local folder or an object-storage URI such as s3://bucket/gallery) with an IVF-PQ ANN
index searched from disk; only the items' ids, paths and labels are held in memory. The index
directory keeps one file::

    INDEX/lancedb.json   the table's URI, what an index manifest records (model, root, encoder
                         recipe, build options) and the next free item id

written atomically under the index's writer lock, so `fastret search/serve/eval --index INDEX`
open the table through it.

Item ids are the stable ids of index format 2: the table's `id` column. `LanceIndex` answers the
calls the search service makes of an `Index` (rows are positions in id order; `ids[row]` is the
item id), `LanceState` those an incremental writer makes of an `IndexState` (`fastret index` again,
`fastret add/remove/compact`): its `write` maps removed ids to LanceDB's delete and additions to
its add, with ids from `next_id`. A LanceIndex reads one table version (`version_name`); a server
follows the store by polling `live_version_name`. `verify_store` is `fastret verify` for a store.
lancedb is imported only when a LanceDB store is written or opened.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path, PurePath
from typing import Sequence

import numpy as np

from fastret.engine.encoders import ModelInfo
from fastret.engine.files import write_text_atomic
from fastret.engine.index import (
    GRAPH_PENDING_SHARE,
    LANCE_MANIFEST,
    Additions,
    BadIndex,
    HnswParams,
    Item,
    ManifestFields,
    Sources,
    Written,
    index_writer_lock,
    rows_of,
)

FORMAT = "fastret-lancedb"
FORMAT_VERSION = 1
TABLE = "items"
VECTOR_INDEX = "vector_idx"  # LanceDB's name for the index of the `vector` column
DEFAULT_LANCE_DIR = "lance"  # the table's folder inside INDEX when no --lance-uri is given
MIN_ANN_ROWS = 4096
"""Below this many rows the table gets no ANN index: a scan is exact and fast, and IVF-PQ needs
enough rows to train its 256 codes per sub-vector."""
DELETE_CHUNK = 1000  # ids per LanceDB delete predicate
REBUILD = "re-index with `fastret index DIR --out INDEX --store lancedb --full`"


def lancedb_missing() -> str | None:
    """Why a LanceDB store cannot be used here (None: it can)."""
    if importlib.util.find_spec("lancedb") is None:  # not imported here: a job may fork (Ray) after this check
        return "a LanceDB store needs the extra: pip install 'fastret[lancedb]'"
    return None


@dataclass(frozen=True)
class AnnParams:
    """The table's ANN index and its query-time defaults, chosen by measurement (BENCHMARKS.md,
    "LanceDB store"): IVF-PQ (64 bytes a 512-d vector in memory, where IVF_HNSW_SQ keeps 512 and
    a graph) with dim/8 sub-vectors and `partitions` lists (None: LanceDB's choice, rows over its
    target partition size; 0: sqrt(rows)), trained on
    `sample_rate` rows a partition; at query time `nprobes` partitions, the top k x
    `refine_factor` re-scored on the full vectors read from the table."""

    kind: str = "IVF_PQ"  # or IVF_HNSW_SQ
    partitions: int | None = None  # None: LanceDB's choice; 0: sqrt(rows)
    sub_vectors: int | None = None  # IVF_PQ; None: dim / 8
    sample_rate: int = 256  # LanceDB's default
    nprobes: int = 20
    refine_factor: int | None = 10
    ef: int = 64  # IVF_HNSW_SQ's search breadth

    def __post_init__(self) -> None:
        if self.kind not in ("IVF_PQ", "IVF_HNSW_SQ"):
            raise ValueError(f"unknown LanceDB index {self.kind!r}: choose IVF_PQ or IVF_HNSW_SQ")

    def config(self, rows: int, dim: int):
        """lancedb's index configuration for a table of this size."""
        from lancedb.index import HnswSq, IvfPq

        partitions = self.partitions if self.partitions != 0 else max(1, round(math.sqrt(rows)))
        if self.kind == "IVF_HNSW_SQ":
            return HnswSq(distance_type="cosine", num_partitions=partitions, sample_rate=self.sample_rate)
        return IvfPq(distance_type="cosine", num_partitions=partitions, num_sub_vectors=self.sub_vectors or _sub_vectors(dim),
                     sample_rate=self.sample_rate)


def _sub_vectors(dim: int) -> int:
    """dim / 8 rounded down to a divisor of dim (PQ splits a vector into equal sub-vectors)."""
    target = max(1, dim // 8)
    return max(d for d in range(1, target + 1) if dim % d == 0)


def connect(uri: str):
    os.environ.setdefault("LANCEDB_LOG", "error")  # lance's Rust warnings are not the user's (read on import)
    import lancedb

    return lancedb.connect(uri)


def _columns(table, names: list[str]):
    """These columns of every row, as a pyarrow table (the vectors only when asked for)."""
    rows = table.count_rows()
    return table.search().select(names).limit(max(rows, 1)).to_arrow()


def _arrow_rows(ids: np.ndarray, items: Sequence[Item], embeddings: np.ndarray, sources: Sources):
    import pyarrow as pa

    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    digests = np.ascontiguousarray(sources.sha256, dtype=np.uint8)
    return pa.table({
        "id": pa.array(np.asarray(ids, np.int64), pa.int64()),
        "path": pa.array([item.path for item in items], pa.string()),
        "label": pa.array([item.label for item in items], pa.string()),
        "size": pa.array(sources.sizes, pa.int64()),
        "mtime_ns": pa.array(sources.mtimes_ns, pa.int64()),
        "sha256": pa.FixedSizeBinaryArray.from_buffers(pa.binary(32), len(ids), [None, pa.py_buffer(digests.tobytes())]),
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(embeddings.ravel()), embeddings.shape[1]),
    })


def write_table(
    uri: str,
    ids: np.ndarray,
    items: Sequence[Item],
    embeddings: np.ndarray,
    sources: Sources | None = None,
    ann: AnnParams = AnnParams(),
) -> tuple[dict | None, PurePath]:
    """(Over)write the table at `uri` with these rows and build its ANN index; returns what the
    manifest records of the index (None below MIN_ANN_ROWS) and the table version written."""
    sources = sources if sources is not None else Sources.unknown(len(items))
    table = connect(uri).create_table(TABLE, _arrow_rows(ids, items, embeddings, sources), mode="overwrite")
    built = build_ann(table, ann)
    return built, written_version(table.version)


def written_version(table_version: int) -> PurePath:
    """A write's table version, named as a write to an hnswlib index names its version folder."""
    return PurePath(f"lancedb-v{table_version}")


def build_ann(table, ann: AnnParams) -> dict | None:
    """(Re)build the table's ANN index; None (scans only) for a small table."""
    rows = table.count_rows()
    if rows < MIN_ANN_ROWS:
        return None
    dim = table.schema.field("vector").type.list_size
    table.create_index("vector", config=ann.config(rows, dim), replace=True)
    return asdict(ann)


def _unindexed_rows(table) -> int:
    stats = table.index_stats(VECTOR_INDEX)
    return table.count_rows() if stats is None else stats.num_unindexed_rows


def _sql_ids(ids: Sequence[int]) -> str:
    return "id IN (" + ", ".join(str(int(i)) for i in ids) + ")"


# --- the manifest -----------------------------------------------------------------------------


def is_lance_index(index_dir: str | Path) -> bool:
    return (Path(index_dir) / LANCE_MANIFEST).is_file()


def default_uri(index_dir: str | Path) -> str:
    return str((Path(index_dir) / DEFAULT_LANCE_DIR).resolve())


def new_manifest(
    uri: str, *, model: ModelInfo, root: str, encoder: dict | None, build: dict, next_id: int, ann: dict | None,
    created: float | None = None,
) -> dict:
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "uri": uri, "table": TABLE, "model": model.to_dict(),
        "root": root, "encoder": encoder, "build": build, "next_id": int(next_id), "ann": ann,
        "created": created if created is not None else time.time(),
    }


def write_manifest(index_dir: str | Path, manifest: dict) -> Path:
    """Point INDEX at the table (atomically)."""
    index_dir = Path(index_dir)
    index_dir.mkdir(parents=True, exist_ok=True)
    path = index_dir / LANCE_MANIFEST
    write_text_atomic(path, json.dumps(manifest, indent=2))
    return path


def read_manifest(index_dir: str | Path) -> dict:
    """INDEX/lancedb.json, checked; BadIndex says what is wrong and what to do."""
    path = Path(index_dir) / LANCE_MANIFEST
    try:
        manifest = json.loads(path.read_text())
        if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"format {manifest.get('format')} {manifest.get('format_version')}")
        ModelInfo.from_dict(manifest["model"])
        str(manifest["uri"]), str(manifest["root"]), int(manifest["next_id"])
        if manifest.get("ann") is not None:
            AnnParams(**manifest["ann"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BadIndex(f"{path}: unreadable LanceDB manifest ({exc}); {REBUILD}") from None
    return manifest


def _connect_table(index_dir: Path, manifest: dict):
    """The table the manifest names, at its latest version (unchecked)."""
    try:
        return connect(manifest["uri"]).open_table(manifest.get("table", TABLE))
    except Exception as exc:  # lancedb raises its own kinds for a missing or unreachable table
        raise BadIndex(f"{index_dir}: cannot open the LanceDB table at {manifest['uri']} ({type(exc).__name__}: {exc}); "
                       f"check the URI and its credentials, or {REBUILD}") from None


def _vector_dim(table) -> int | None:
    """The table's vector length (None: no fixed-size `vector` column)."""
    try:
        return table.schema.field("vector").type.list_size
    except (KeyError, AttributeError):
        return None


def _open_table(index_dir: Path, manifest: dict):
    table = _connect_table(index_dir, manifest)
    dim = _vector_dim(table)
    if dim != manifest["model"]["dim"]:
        raise BadIndex(f"{manifest['uri']}: vectors of {dim} dimensions, the manifest says {manifest['model']['dim']}; {REBUILD}")
    return table


def table_version_name(index_dir: str | Path, uri: str, table_version: int) -> str:
    """A name for one version of a store, as a version folder names an hnswlib index's: the table's
    version, and its URI when that is not INDEX/lance (a rebuild into another table starts again
    at version 1)."""
    name = f"lancedb-v{table_version}"
    return name if uri == default_uri(index_dir) else f"{name} ({uri})"


def live_version_name(index_dir: str | Path) -> str | None:
    """The name of the version a reader opening INDEX now gets, or None when the store cannot be
    read now: a cheap poll for readers that follow a store (the manifest and the table's latest
    version, no rows)."""
    try:
        manifest = read_manifest(index_dir)
        return table_version_name(index_dir, manifest["uri"], _connect_table(Path(index_dir), manifest).version)
    except BadIndex:
        return None


def next_free_id(index_dir: str | Path) -> int:
    """The first id a store written into this directory may use (0 when there is none)."""
    try:
        return int(read_manifest(index_dir)["next_id"])
    except BadIndex:
        return 0


class _Manifested(ManifestFields):
    """What both views read from the manifest: the fields of every store, and the table's URI."""

    @property
    def uri(self) -> str:
        return self.manifest["uri"]

    @property
    def ann(self) -> AnnParams | None:
        return None if self.manifest.get("ann") is None else AnnParams(**self.manifest["ann"])

    @property
    def next_id(self) -> int:
        return int(self.manifest["next_id"])

    # What the service layer reads of an index: no runtime record (the recipe says it), no version
    # folder, hnswlib's parameters only as a placeholder (the table's ANN index answers), no
    # thumbnails (the duplicate finder decodes the images it verifies).
    runtime = None
    version_dir = None
    hnsw = None
    hnsw_params = HnswParams()
    thumbnails = None


# --- reading: the search surface ---------------------------------------------------------------


@dataclass
class LanceIndex(_Manifested):
    """A LanceDB table at one table version, with the surface of `Index` the search service uses."""

    index_dir: Path
    manifest: dict
    table: object = field(repr=False)  # lancedb Table, checked out at the version read

    @classmethod
    def load(cls, index_dir: str | Path) -> "LanceIndex":
        """Open the table INDEX/lancedb.json names, pinned at its current version (so the items read
        once and the rows searched stay the same while a writer adds or deletes)."""
        index_dir = Path(index_dir)
        manifest = read_manifest(index_dir)
        table = _open_table(index_dir, manifest)
        table.checkout(table.version)
        return cls(index_dir, manifest, table)

    @property
    def created(self) -> float:
        return float(self.manifest.get("created", 0.0))

    @property
    def version_name(self) -> str:
        """The version read (see `table_version_name`): a follower compares it with `live_version_name`."""
        return table_version_name(self.index_dir, self.uri, self.table.version)

    @cached_property
    def _rows(self) -> tuple[np.ndarray, list[Item]]:
        """The table's ids (sorted) and items, read once (paths and labels only, not vectors)."""
        columns = _columns(self.table, ["id", "path", "label"])
        ids = columns.column("id").to_numpy()
        order = np.argsort(ids, kind="stable")
        paths, labels = columns.column("path").to_pylist(), columns.column("label").to_pylist()
        return ids[order], [Item(path=paths[i], label=labels[i]) for i in order]

    @property
    def ids(self) -> np.ndarray:
        return self._rows[0]

    @property
    def items(self) -> list[Item]:
        return self._rows[1]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def labels(self) -> np.ndarray:
        return np.array([item.label for item in self.items])

    def find_row(self, item_id: int) -> int | None:
        row = int(np.searchsorted(self.ids, item_id))
        return row if row < len(self.ids) and self.ids[row] == item_id else None

    def rows_of(self, item_ids) -> np.ndarray:
        return rows_of(self.ids, item_ids)

    @cached_property
    def embeddings(self) -> np.ndarray:
        """Every vector in row order, read on first use (softmax scores, item queries and evaluation
        need them; plain searches do not)."""
        columns = _columns(self.table, ["id", "vector"])
        rows = np.searchsorted(self.ids, columns.column("id").to_numpy())
        vectors = np.empty((len(self), self.model.dim), np.float32)
        flat = columns.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        vectors[rows] = flat.reshape(-1, self.model.dim)
        vectors.flags.writeable = False
        return vectors

    def check_model(self, expected: ModelInfo) -> None:
        model = self.model
        if (expected.model_id, expected.weights_sha256, expected.dim) != (model.model_id, model.weights_sha256, model.dim):
            raise BadIndex(f"the LanceDB store was built with {model.model_id} (dim {model.dim}) but the encoder is "
                           f"{expected.model_id} (dim {expected.dim}); re-index or use the index's model")

    def search_kind(self, exact: bool) -> str:
        """What `search(exact=exact)` runs: "exact" (a scan) or the table's ANN index ("ivf_pq", "ivf_hnsw_sq")."""
        return "exact" if exact or self.ann is None else self.ann.kind.lower()

    def describe_search(self, mode: str, ef: int | None) -> str:
        """How a search of this mode runs here, for reports."""
        ann = self.ann
        if mode != "hnsw" or ann is None:
            return "exact (LanceDB scan)" if mode == "hnsw" else f"{mode} (LanceDB scan)"
        if ann.kind == "IVF_HNSW_SQ":
            return f"LanceDB IVF_HNSW_SQ (nprobes={ann.nprobes}, ef={ef or ann.ef})"
        return f"LanceDB IVF_PQ (nprobes={ef or ann.nprobes}, refine_factor={ann.refine_factor})"

    def search(
        self, queries: np.ndarray, k: int = 10, *, exact: bool = False, ef: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows and cosines per query row, best first, as Index.search (rows of -1 pad short
        ones). `ef` sets the partitions probed (IVF-PQ) or HNSW's ef (IVF_HNSW_SQ); exact=True
        scans every vector. Rows added since the ANN index was built are scanned by LanceDB itself."""
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        k = min(k, len(self))
        rows = np.full((len(queries), k), -1, np.int64)
        scores = np.full((len(queries), k), -np.inf, np.float32)
        if k == 0:
            return rows, scores
        ann = self.ann
        query = self.table.search(queries if len(queries) > 1 else queries[0]).distance_type("cosine").limit(k)
        if exact or ann is None:
            query = query.bypass_vector_index()
        elif ann.kind == "IVF_HNSW_SQ":
            query = query.nprobes(ann.nprobes).ef(max(ef or ann.ef, k))
        else:
            query = query.nprobes(ef or ann.nprobes)
            query = query.refine_factor(ann.refine_factor) if ann.refine_factor else query
        found = query.select(["id"]).to_arrow()
        query_rows = (found.column("query_index").to_numpy() if "query_index" in found.column_names
                      else np.zeros(found.num_rows, np.int64))
        found_rows = self.rows_of(found.column("id").to_numpy())
        cosines = 1.0 - found.column("_distance").to_numpy().astype(np.float32)
        for q in range(len(queries)):
            mine = np.flatnonzero(query_rows == q)
            best = mine[np.lexsort((found_rows[mine], -cosines[mine]))][:k]  # ties: the lower row first, as exact_search
            rows[q, : len(best)] = found_rows[best]
            scores[q, : len(best)] = cosines[best]
        return rows, scores


# --- writing: the writer surface ---------------------------------------------------------------


@dataclass
class LanceState(_Manifested):
    """A LanceDB store as an incremental writer sees it (the surface of `IndexState` that
    engine.update and `fastret add/remove/compact` use): the live items with their source records."""

    index_dir: Path
    manifest: dict
    table_version: int
    ids: np.ndarray
    paths: list[str]
    labels: list[str]
    sources: Sources

    @classmethod
    def read(cls, index_dir: str | Path) -> "LanceState":
        index_dir = Path(index_dir)
        manifest = read_manifest(index_dir)
        table = _open_table(index_dir, manifest)
        columns = _columns(table, ["id", "path", "label", "size", "mtime_ns", "sha256"])
        ids = columns.column("id").to_numpy()
        order = np.argsort(ids, kind="stable")
        digests = np.frombuffer(b"".join(columns.column("sha256").to_pylist()), np.uint8).reshape(-1, 32)
        sources = Sources(columns.column("size").to_numpy()[order], columns.column("mtime_ns").to_numpy()[order],
                          digests[order].copy())
        paths, labels = columns.column("path").to_pylist(), columns.column("label").to_pylist()
        manifest["next_id"] = max(int(manifest["next_id"]), int(ids.max()) + 1 if len(ids) else 0)  # a write cut short
        return cls(index_dir, manifest, table.version, ids[order], [paths[i] for i in order],
                   [labels[i] for i in order], sources)

    @property
    def version(self) -> PurePath:
        """A name for the table version read, as IndexState.version names its version folder."""
        return written_version(self.table_version)

    def __len__(self) -> int:
        return len(self.ids)

    def write(
        self,
        added: Additions | None = None,
        removed: Sequence[int] = (),
        *,
        compact: bool = False,
        build: dict | None = None,
    ) -> Written:
        """LanceDB's own delete (removed ids) and add (new ids from next_id), then its ANN upkeep:
        the index built once the table is large enough, new rows folded into it (`optimize`) when
        they pass GRAPH_PENDING_SHARE of the table or on `compact`. Old table versions are LanceDB's
        to drop (after a week): a server pinned to one keeps reading it. The manifest (next id,
        build options) is written last; holds the writer lock and refuses a state another writer
        changed since it was read."""
        removed_ids = np.unique(np.asarray(list(removed), dtype=np.int64))
        rows_of(self.ids, removed_ids)  # every removed id is live
        if added is not None and added.embeddings.shape[1:] != (self.model.dim,):
            raise ValueError(f"added embeddings have shape {added.embeddings.shape}, the store holds dim {self.model.dim}")
        with index_writer_lock(self.index_dir):
            table = _open_table(self.index_dir, read_manifest(self.index_dir))
            if table.version != self.table_version:
                raise BadIndex(f"{self.index_dir}: another writer changed the store since it was read; read it again")
            for start in range(0, len(removed_ids), DELETE_CHUNK):
                table.delete(_sql_ids(removed_ids[start : start + DELETE_CHUNK]))
            added_ids = np.arange(self.next_id, self.next_id + (len(added) if added is not None else 0), dtype=np.int64)
            if len(added_ids):
                table.add(_arrow_rows(added_ids, added.items, added.embeddings, added.sources))
            ann, action = self._ann_upkeep(table, compact)
            count = table.count_rows()
            manifest = {**self.manifest, "next_id": int(self.next_id + len(added_ids)), "ann": ann,
                        "build": {**self.build, **(build or {})}}
            write_manifest(self.index_dir, manifest)
            version = written_version(table.version)
        return Written(version, added_ids, removed_ids, count, compact, action, 0)

    def _ann_upkeep(self, table, compact: bool) -> tuple[dict | None, str]:
        """The ANN record after a write and what happened to the index: kept, extended or rebuilt."""
        ann = self.ann or AnnParams()
        indexed = self.ann is not None and table.index_stats(VECTOR_INDEX) is not None
        if compact or (indexed and _unindexed_rows(table) > GRAPH_PENDING_SHARE * table.count_rows()):
            table.optimize()  # compacts the table's files and folds new rows into its ANN index
            if indexed:
                return asdict(ann), "extended"
        if not indexed:
            built = build_ann(table, ann)
            return built, "rebuilt" if built is not None else "kept"
        return asdict(ann), "kept"


# --- checking: fastret verify ------------------------------------------------------------------

VERIFY_BATCH = 65536  # rows read at a time: a store may not fit in memory
UNIT_TOLERANCE = 1e-3  # |norm - 1| a stored vector may have


@dataclass
class StoreCheck:
    """What `verify_store` found: problems (one line each, with what to do) and what it checked."""

    problems: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)


def verify_store(index_dir: str | Path) -> StoreCheck:
    """Check a LanceDB store as far as it can be checked: the manifest, the table's schema and every
    row (ids unique and below the next id, paths unique, vectors of the model's dim, finite and of
    unit length; reading them all makes Lance read every data file), and the ANN index the
    manifest records (or a table that has outgrown MIN_ANN_ROWS without one)."""
    index_dir = Path(index_dir)
    check = StoreCheck()
    try:
        manifest = read_manifest(index_dir)
        table = _connect_table(index_dir, manifest)
    except BadIndex as exc:
        check.problems.append(str(exc))
        return check
    uri, dim, next_id = manifest["uri"], int(manifest["model"]["dim"]), int(manifest["next_id"])
    check.checked.append(f"manifest {LANCE_MANIFEST} ({manifest['model']['model_id']}, dim {dim}, next id {next_id})")
    check.checked.append(f"table {uri} opens ({table_version_name(index_dir, uri, table.version)})")
    wrong = _schema_problems(table.schema, dim)
    if wrong:
        check.problems.extend(f"{uri}: {problem}; {REBUILD}" for problem in wrong)
        return check
    check.checked.append("schema")
    try:
        rows = _check_rows(table, dim, next_id, uri, check.problems)
        check.checked.append(f"{rows} rows: unique ids below the next id, unique paths, finite unit vectors of dim {dim}")
        _check_ann(index_dir, manifest, table, rows, check)
    except Exception as exc:  # Lance raises its own kinds for an unreadable data or index file
        check.problems.append(f"{uri}: cannot read the table ({type(exc).__name__}: {exc}); {REBUILD}")
    return check


def _schema_problems(schema, dim: int) -> list[str]:
    import pyarrow as pa

    wanted = {"id": pa.int64(), "path": pa.string(), "label": pa.string(), "size": pa.int64(),
              "mtime_ns": pa.int64(), "sha256": pa.binary(32)}
    problems = [f"no `{name}` column" for name in [*wanted, "vector"] if name not in schema.names]
    problems += [f"column `{name}` is {schema.field(name).type}, not {kind}"
                 for name, kind in wanted.items() if name in schema.names and schema.field(name).type != kind]
    vector = schema.field("vector").type if "vector" in schema.names else None
    if vector is not None and not (pa.types.is_fixed_size_list(vector) and vector.value_type == pa.float32()
                                   and vector.list_size == dim):
        problems.append(f"column `vector` is {vector}, not {dim} float32 values a row (the manifest's model)")
    return problems


def _check_rows(table, dim: int, next_id: int, uri: str, problems: list[str]) -> int:
    """Read every row's id, path and vector a batch at a time; appends what is wrong; returns the rows read."""
    ids, paths, bad_vectors, first_bad = [], set(), 0, None
    repeated_paths: list[str] = []
    reader = table.search().select(["id", "path", "vector"]).limit(None).to_batches(VERIFY_BATCH)
    for batch in reader:
        batch_ids = batch.column("id").to_numpy()
        ids.append(batch_ids)
        for path in batch.column("path").to_pylist():
            if path in paths:
                repeated_paths.append(path)
            paths.add(path)
        vectors = batch.column("vector").flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
        norms = np.linalg.norm(vectors, axis=1)
        bad = ~np.isfinite(vectors).all(axis=1) | (np.abs(norms - 1) > UNIT_TOLERANCE)
        if bad.any():
            bad_vectors += int(bad.sum())
            first_bad = first_bad if first_bad is not None else int(batch_ids[np.argmax(bad)])
    ids = np.concatenate(ids) if ids else np.empty(0, np.int64)
    counted = table.count_rows()
    if counted != len(ids):
        problems.append(f"{uri}: {len(ids)} rows read, the table counts {counted}; {REBUILD}")
    if len(np.unique(ids)) != len(ids):
        problems.append(f"{uri}: {len(ids) - len(np.unique(ids))} repeated ids; {REBUILD}")
    if len(ids) and (ids.min() < 0 or ids.max() >= next_id):
        problems.append(f"{uri}: ids from {ids.min()} to {ids.max()}, the manifest's next id is {next_id} "
                        f"(new items would reuse ids); {REBUILD}")
    if repeated_paths:
        problems.append(f"{uri}: {len(repeated_paths)} paths held twice (first {repeated_paths[0]!r}); {REBUILD}")
    if bad_vectors:
        problems.append(f"{uri}: {bad_vectors} vectors not finite or not of unit length (first: id {first_bad}); {REBUILD}")
    return len(ids)


def _check_ann(index_dir: Path, manifest: dict, table, rows: int, check: StoreCheck) -> None:
    """The ANN index the manifest records is the table's (kind, cosine); a table large enough has one."""
    uri, recorded = manifest["uri"], manifest.get("ann")
    compact = f"`fastret compact {index_dir}` sets it right"
    stats = table.index_stats(VECTOR_INDEX)
    if recorded is None:
        if rows >= MIN_ANN_ROWS:
            check.problems.append(f"{uri}: no ANN index over {rows} rows (searches scan every vector); {compact}")
        else:
            check.checked.append(f"no ANN index (under {MIN_ANN_ROWS} rows: searches scan)")
        return
    kind = recorded["kind"]
    if stats is None:
        check.problems.append(f"{uri}: the manifest records an {kind} index, the table has none; {compact}")
    elif stats.index_type != kind or (stats.distance_type or "cosine").lower() != "cosine":
        check.problems.append(f"{uri}: the table's ANN index is {stats.index_type} ({stats.distance_type}), "
                              f"the manifest records {kind} (cosine); {REBUILD}")
    else:
        pending = f", {stats.num_unindexed_rows} newer rows scanned until it takes them in" if stats.num_unindexed_rows else ""
        check.checked.append(f"{kind} index (cosine) over {stats.num_indexed_rows} rows{pending}")
