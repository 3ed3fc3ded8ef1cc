"""The on-disk index: manifest, embeddings, item table and an HNSW graph, written atomically.

Layout of an index directory::

    INDEX/CURRENT          name of the live version directory (replaced atomically)
    INDEX/v-<stamp>/       manifest.json, embeddings.npy, items.json, hnsw.bin
    INDEX/.lock            flock(2) held by the one writer at a time

A writer takes the lock, writes a new version to a temporary directory, fsyncs it, renames it
into place, and only then points CURRENT at it; a crash at any moment leaves the previous
version loadable, and the kernel drops a dead writer's lock. Loading is cheap (sizes, shapes,
the graph header; embeddings memory-mapped); `verify_index` also checks every file's sha256.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import secrets
import shutil
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np

from fastret.engine.encoders import ModelInfo
from fastret.engine.files import fsync_path, sha256_files, write_text_atomic

FORMAT_VERSION = 1
CURRENT = "CURRENT"
LOCK = ".lock"
MANIFEST = "manifest.json"
EMBEDDINGS = "embeddings.npy"
ITEMS = "items.json"
HNSW = "hnsw.bin"
REQUIRED_FILES = (EMBEDDINGS, ITEMS, HNSW)
REINDEX = "re-index with `fastret index`"
# What a writer leaves in an index directory besides CURRENT and the lock: versions, a version
# being written, and write_text_atomic's temporary for CURRENT.
WRITER_PREFIXES = ("v-", ".tmp-", f".{CURRENT}.")

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


@dataclass
class Index:
    """Embeddings of a gallery plus what is needed to search and show them."""

    model: ModelInfo
    root: str
    items: list[Item]
    embeddings: np.ndarray  # (N, D) float32, unit rows; read-only and memory-mapped when loaded
    hnsw_params: HnswParams = field(default_factory=HnswParams)
    hnsw: object | None = None  # hnswlib.Index, built lazily for tiny sets
    created: float = field(default_factory=time.time)
    runtime: dict | None = None  # {"backend", "precision"} that embedded the gallery; queries reuse it
    encoder: dict | None = None  # how to rebuild the encoder (defined by the service layer; opaque here)
    version_dir: Path | None = None  # the version directory it was loaded from; None when built in memory

    def __post_init__(self) -> None:
        if self.embeddings.ndim != 2 or self.embeddings.shape != (len(self.items), self.model.dim):
            raise BadIndex(
                f"embeddings shape {self.embeddings.shape} does not match {len(self.items)} items "
                f"x dim {self.model.dim}"
            )

    def __len__(self) -> int:
        return len(self.items)

    @property
    def labels(self) -> np.ndarray:
        return np.array([item.label for item in self.items])

    # --- search -----------------------------------------------------------------------------

    def search(
        self, queries: np.ndarray, k: int = 10, *, exact: bool = False, ef: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k item ids and cosine similarities for each query row, best first."""
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        k = min(k, len(self))
        if k == 0:
            empty = np.empty((len(queries), 0))
            return empty.astype(np.int64), empty.astype(np.float32)
        if exact or self.hnsw is None:
            return exact_search(self.embeddings, queries, k)
        self.hnsw.set_ef(max(ef or self.hnsw_params.ef_search, k))
        ids, distances = self.hnsw.knn_query(queries, k=k)
        return ids.astype(np.int64), (1.0 - distances).astype(np.float32)

    # --- persistence --------------------------------------------------------------------------

    def manifest(self, files: dict[str, dict]) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "model": self.model.to_dict(),
            "dim": self.model.dim,
            "metric": "cosine",
            "count": len(self),
            "root": self.root,
            "hnsw": asdict(self.hnsw_params),
            "created": self.created,
            "runtime": self.runtime,
            "encoder": self.encoder,
            "files": files,
        }

    def save(
        self, index_dir: str | Path, *, wait: bool = True, on_wait: Callable[[str], None] | None = None
    ) -> Path:
        """Write a new version atomically, make it live, and return its directory.

        Takes the directory's writer lock itself (`wait`/`on_wait` as in index_writer_lock; a
        caller already holding it is not blocked). Then it removes what the directory held
        before: older versions and a dead writer's leftovers. That list is taken under the
        lock, so it can never include another writer's new version.
        """
        index_dir = Path(index_dir)
        with index_writer_lock(index_dir, wait=wait, on_wait=on_wait):
            superseded = [entry for entry in index_dir.iterdir() if entry.name.startswith(WRITER_PREFIXES)]
            version = self._write_version(index_dir)
            for entry in superseded:
                _remove(entry)
        return version

    def _write_version(self, index_dir: Path) -> Path:
        staging = _new_staging_dir(index_dir)
        version = index_dir / f"v-{time.strftime('%Y%m%d-%H%M%S')}-{staging.name[-8:]}"
        try:
            np.save(staging / EMBEDDINGS, self.embeddings.astype(np.float32))
            (staging / ITEMS).write_text(json.dumps([asdict(item) for item in self.items]))
            if self.hnsw is None:
                self.hnsw = build_hnsw(self.embeddings, self.hnsw_params)
            self.hnsw.save_index(str(staging / HNSW))
            files = {name: _file_fingerprint(staging / name) for name in REQUIRED_FILES}
            (staging / MANIFEST).write_text(json.dumps(self.manifest(files), indent=2))
            for name in (*REQUIRED_FILES, MANIFEST):
                fsync_path(staging / name)
            os.rename(staging, version)
            fsync_path(index_dir)
            write_text_atomic(index_dir / CURRENT, version.name + "\n")
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            if _current_name(index_dir) != version.name:  # renamed into place but never made live
                shutil.rmtree(version, ignore_errors=True)
            raise
        return version

    @classmethod
    def load(cls, index_dir: str | Path, *, verify: bool = False) -> "Index":
        """Load the live version, refusing damaged files and unknown formats with a clear message.

        The default checks are cheap: format version, the required files listed in the manifest,
        present and of the recorded sizes, item count and embedding shape, the HNSW header; the
        embeddings are memory-mapped read-only, not read. A changed byte that keeps a file's size
        passes them (only a checksum can tell): `verify=True` or `verify_index` hashes every file.
        When a cheap check fails, the checksums run too, to name the damaged file.
        """
        index_dir = Path(index_dir)
        return _at_live_version(index_dir, lambda version: _load_version(index_dir, version, checksums=verify))

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


def verify_index(index_dir: str | Path) -> list[str]:
    """Every problem of the live index, one line each, checksums of all files included; [] = healthy."""
    index_dir = Path(index_dir)
    try:
        _at_live_version(index_dir, lambda version: _load_version(index_dir, version, checksums=True))
    except DamagedFiles as exc:
        return [f"{index_dir}: damaged index, {problem}" for problem in exc.problems]
    except BadIndex as exc:
        return [str(exc)]
    return []


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
    if index_dir.is_dir() and not (index_dir / CURRENT).exists():
        foreign = [p.name for p in index_dir.iterdir() if p.name != LOCK and not p.name.startswith(WRITER_PREFIXES)]
        if foreign:
            raise BadIndex(
                f"{index_dir}: folder is not empty and is not a fastret index; choose another --out"
            )


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
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        entry.unlink(missing_ok=True)


def _file_fingerprint(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": sha256_files([path])}


# --- loading ----------------------------------------------------------------------------------


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


def _load_version(index_dir: Path, version: Path, *, checksums: bool) -> Index:
    try:
        manifest = read_manifest(version)
        files = manifest["files"]
        problems = _file_problems(version, files, checksums=checksums)
        if problems:
            raise DamagedFiles(index_dir, problems)
        try:
            return _read_version(index_dir, version, manifest)
        except BadIndex:
            problems = [] if checksums else _file_problems(version, files, checksums=True)
            if problems:  # the precise reason: a file changed after it was written
                raise DamagedFiles(index_dir, problems) from None
            raise
    except PermissionError as exc:
        raise BadIndex(
            f"{exc.filename or version}: permission denied reading the index; ask its owner to make "
            f"it readable (chmod -R a+rX {index_dir}) or run as a user who can read it"
        ) from None
    except OSError as exc:  # a file vanished mid-read, or the disk failed
        raise BadIndex(f"{index_dir}: cannot read the index ({exc.filename}: {exc.strerror})") from None


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


def _read_version(index_dir: Path, version: Path, manifest: dict) -> Index:
    """Build the Index from files whose presence and sizes are checked; refuse what does not fit."""
    count, dim = manifest["count"], manifest["dim"]
    try:
        model = ModelInfo.from_dict(manifest["model"])
        params = HnswParams(**manifest["hnsw"])
        items = [Item(**entry) for entry in json.loads((version / ITEMS).read_text())]
        embeddings = np.load(version / EMBEDDINGS, mmap_mode="r", allow_pickle=False)
    except (KeyError, TypeError, ValueError) as exc:  # JSON and UTF-8 errors are ValueErrors
        raise BadIndex(f"{index_dir}: damaged index ({type(exc).__name__}: {exc})") from None
    if not all(_is_count(value) and value > 0 for value in asdict(params).values()):
        raise BadIndex(
            f"{version / MANIFEST}: damaged index, hnsw parameters {asdict(params)} are not positive integers"
        )
    if not all(isinstance(item.path, str) and isinstance(item.label, str) for item in items):
        raise BadIndex(f"{index_dir}: damaged index, {ITEMS} has an item whose path or label is not text")
    if len(items) != count or embeddings.shape != (count, dim):
        raise BadIndex(
            f"{index_dir}: damaged index, {len(items)} items and embeddings {embeddings.shape} "
            f"but the manifest says {count} x {dim}"
        )
    if embeddings.dtype != np.float32:
        raise BadIndex(f"{index_dir}: damaged index, {EMBEDDINGS} holds {embeddings.dtype}, not float32")
    encoder = manifest.get("encoder")  # absent in indexes written before it was recorded
    if encoder is not None and not isinstance(encoder, dict):
        raise BadIndex(f"{version / MANIFEST}: damaged index, encoder is not a table")
    index = Index(
        model,
        manifest["root"],
        items,
        np.asarray(embeddings),  # a plain read-only view of the mapping
        params,
        created=manifest["created"],
        runtime=manifest.get("runtime"),  # absent in indexes written before it was recorded
        encoder=encoder,
        version_dir=version,
    )
    index.hnsw = load_hnsw(version / HNSW, dim, count, params)
    return index


def exact_search(embeddings: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force cosine top-k; ties broken by lower item id so results are deterministic."""
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


def build_hnsw(embeddings: np.ndarray, params: HnswParams):
    """An hnswlib cosine index over the rows, item ids = row numbers."""
    import hnswlib

    graph = hnswlib.Index(space="cosine", dim=embeddings.shape[1])
    graph.init_index(max_elements=max(1, len(embeddings)), ef_construction=params.ef_construction, M=params.M)
    if len(embeddings):
        graph.add_items(embeddings, np.arange(len(embeddings)))
    graph.set_ef(params.ef_search)
    return graph


def load_hnsw(path: Path, dim: int, count: int, params: HnswParams):
    """Load a graph saved by build_hnsw's index, after checking its header (check_hnsw_header)."""
    import hnswlib

    check_hnsw_header(path, dim, count, params)
    graph = hnswlib.Index(space="cosine", dim=dim)
    try:
        graph.load_index(str(path), max_elements=max(1, count))
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
    if found != FORMAT_VERSION:
        raise BadIndex(
            f"{version}: index format version {found!r} is not supported (this fastret reads "
            f"version {FORMAT_VERSION}); re-index with `fastret index`"
        )
    missing = [key for key in ("files", "model", "dim", "count", "root", "hnsw", "created") if key not in manifest]
    if missing:
        raise BadIndex(f"{version}: damaged index, {MANIFEST} lacks {', '.join(missing)}")
    for key in ("count", "dim"):
        if not _is_count(manifest[key]):
            raise BadIndex(f"{path}: damaged index, {key} is {manifest[key]!r}, not a non-negative integer; {REINDEX}")
    _check_file_table(path, manifest["files"])
    return manifest


def _check_file_table(path: Path, files: object) -> None:
    """The manifest's files: a table listing at least the required files, each with size and sha256."""
    if not isinstance(files, dict):
        raise BadIndex(f"{path}: damaged index, files is {type(files).__name__}, not a table of files; {REINDEX}")
    unlisted = [name for name in REQUIRED_FILES if name not in files]
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
