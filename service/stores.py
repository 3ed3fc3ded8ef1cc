"""Which store an index directory holds, for readers and writers, and writing a LanceDB store.

An index directory holds an hnswlib index (CURRENT and its versions; the default) or a pointer to
a LanceDB table (lancedb.json, see fastret.engine.lance_store). `open_index` opens either for the
search service (`fastret search/serve/eval --index INDEX`); `read_state` either for incremental
writers (`fastret index` again, `fastret add/remove/compact`). lancedb itself is imported only
when a LanceDB store is opened or written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Callable

from fastret.engine import index as hnswlib_store
from fastret.engine import lance_store
from fastret.engine.index import CURRENT, LANCE_MANIFEST, BadIndex, Index, IndexState, index_writer_lock, verify_index
from fastret.engine.lance_store import (
    AnnParams,
    LanceIndex,
    LanceState,
    default_uri,
    is_lance_index,
    lancedb_missing,
    new_manifest,
    verify_store,
    write_manifest,
    write_table,
)
from fastret.engine.lance_store import next_free_id as lance_next_free_id
from fastret.engine.lance_store import read_manifest as read_lance_manifest


def holds_lance_store(index_dir: str | Path) -> bool:
    """Whether INDEX points at a LanceDB table (refusing a folder that holds both stores)."""
    index_dir = Path(index_dir)
    if not is_lance_index(index_dir):
        return False
    if (index_dir / CURRENT).exists():
        raise BadIndex(f"{index_dir} holds both an hnswlib index ({CURRENT}) and a LanceDB store ({LANCE_MANIFEST}); "
                       "delete the one you do not want")
    missing = lancedb_missing()
    if missing:
        raise BadIndex(f"{index_dir} is a LanceDB store: {missing}")
    return True


def holds_index(index_dir: str | Path) -> bool:
    """Whether INDEX holds an index of either store (maybe damaged)."""
    return (Path(index_dir) / CURRENT).exists() or is_lance_index(index_dir)


def open_index(index_dir: str | Path, *, graph: bool = True, rerank: bool = True) -> Index | LanceIndex:
    """The live index in this directory, whichever store holds it (`graph`, `rerank`: as in Index.load;
    a LanceDB store reads its table when searched)."""
    if holds_lance_store(index_dir):
        return LanceIndex.load(index_dir)
    return Index.load(index_dir, graph=graph, rerank=rerank)


def read_state(index_dir: str | Path) -> IndexState | LanceState:
    """The index in this directory as an incremental writer sees it, whichever store holds it."""
    return LanceState.read(index_dir) if holds_lance_store(index_dir) else IndexState.read(index_dir)


def store_name(index: Index | LanceIndex) -> str:
    """The store an opened index reads: "hnswlib" or "lancedb"."""
    return "lancedb" if isinstance(index, LanceIndex) else "hnswlib"


def version_name(index: Index | LanceIndex) -> str | None:
    """The version an opened index holds: its version folder's name, or the LanceDB table version."""
    if isinstance(index, LanceIndex):
        return index.version_name
    return index.version_dir.name if index.version_dir is not None else None


def live_version_name(index_dir: str | Path) -> str | None:
    """The version a reader opening INDEX now gets, named as `version_name` names it; None when there
    is none or it cannot be read now (a cheap poll for a server that follows the index)."""
    try:
        lance = holds_lance_store(index_dir)
    except BadIndex:
        return None
    return lance_store.live_version_name(index_dir) if lance else hnswlib_store.live_version_name(index_dir)


@dataclass(frozen=True)
class Verification:
    """What `fastret verify` found in INDEX: problems (one line each) and, when there are none, what
    was checked; `advice` says what to do about the problems."""

    problems: list[str]
    checked: list[str]
    advice: str


def verify(index_dir: str | Path) -> Verification:
    """Check the index in INDEX, whichever store holds it: an hnswlib index's files against their
    checksums, a LanceDB store's manifest, table, rows and ANN index (lance_store.verify_store)."""
    if holds_lance_store(index_dir):
        found = verify_store(index_dir)
        return Verification(found.problems, found.checked, "each line says what to do")
    rebuild = f"rebuild it with `fastret index DIR --out {index_dir}`"
    problems = verify_index(index_dir)
    if problems:
        return Verification(problems, [], rebuild)
    index = Index.load(index_dir)
    return Verification([], [f"{len(index)} items, every checksum matches ({index.version_dir.name})"], rebuild)


def next_free_id(index_dir: str | Path) -> int:
    """The first id a full rebuild into this directory gives (ids stay unique across rebuilds)."""
    return lance_next_free_id(index_dir) if is_lance_index(index_dir) else hnswlib_store.next_free_id(index_dir)


def save_lance(
    index: Index,
    index_dir: str | Path,
    *,
    uri: str | None = None,
    ann: AnnParams = AnnParams(),
    wait: bool = True,
    on_wait: Callable[[str], None] | None = None,
) -> PurePath:
    """Write an index's items, source records and embeddings (with its stable ids) to a LanceDB table,
    replacing it, build its ANN index, then point INDEX at it; returns the table version written
    (lancedb-vN). `uri`: a folder or an object-storage URI (default: the one INDEX already names,
    else INDEX/lance)."""
    index_dir = Path(index_dir)
    with index_writer_lock(index_dir, wait=wait, on_wait=on_wait):
        if (index_dir / CURRENT).exists():
            raise BadIndex(f"{index_dir} holds an hnswlib index; choose another --out for the LanceDB store")
        if uri is None:
            uri = _recorded_uri(index_dir) or default_uri(index_dir)
        ann_record, version = write_table(uri, index.ids, index.items, index.embeddings, index.sources, ann)
        manifest = new_manifest(uri, model=index.model, root=index.root, encoder=index.encoder, build=index.build,
                                next_id=index.next_id, ann=ann_record, created=index.created)
        write_manifest(index_dir, manifest)
        return version


def _recorded_uri(index_dir: Path) -> str | None:
    """The table URI an existing (maybe damaged) store in INDEX names."""
    try:
        return read_lance_manifest(index_dir)["uri"] if is_lance_index(index_dir) else None
    except BadIndex:
        return None
