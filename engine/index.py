"""The on-disk index: manifest, embeddings, item table and an HNSW graph, written atomically.

Layout of an index directory::

    INDEX/CURRENT          name of the live version directory (replaced atomically)
    INDEX/v-<stamp>/       manifest.json, embeddings.npy, items.json, hnsw.bin

A new version is written to a temporary directory, fsynced, renamed into place, and only then
does CURRENT point at it; a crash at any moment leaves the previous version loadable.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from fastret.engine.encoders import ModelInfo
from fastret.engine.files import fsync_path, sha256_files, write_text_atomic

FORMAT_VERSION = 1
CURRENT = "CURRENT"
MANIFEST = "manifest.json"
EMBEDDINGS = "embeddings.npy"
ITEMS = "items.json"
HNSW = "hnsw.bin"


class BadIndex(Exception):
    """An index that is missing, damaged, or does not match what the caller expects."""


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
    embeddings: np.ndarray  # (N, D) float32, unit rows
    hnsw_params: HnswParams = field(default_factory=HnswParams)
    hnsw: object | None = None  # hnswlib.Index, built lazily for tiny sets
    created: float = field(default_factory=time.time)
    runtime: dict | None = None  # {"backend", "precision"} that embedded the gallery; queries reuse it

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
            "files": files,
        }

    def save(self, index_dir: str | Path) -> Path:
        """Write a new version atomically; return the version directory."""
        index_dir = Path(index_dir)
        _check_writable_target(index_dir)
        index_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=index_dir, prefix=".tmp-"))
        try:
            np.save(staging / EMBEDDINGS, self.embeddings.astype(np.float32))
            (staging / ITEMS).write_text(json.dumps([asdict(item) for item in self.items]))
            if self.hnsw is None:
                self.hnsw = build_hnsw(self.embeddings, self.hnsw_params)
            self.hnsw.save_index(str(staging / HNSW))
            files = {name: _file_fingerprint(staging / name) for name in (EMBEDDINGS, ITEMS, HNSW)}
            (staging / MANIFEST).write_text(json.dumps(self.manifest(files), indent=2))
            for name in (EMBEDDINGS, ITEMS, HNSW, MANIFEST):
                fsync_path(staging / name)
            version = index_dir / f"v-{time.strftime('%Y%m%d-%H%M%S')}-{staging.name[-8:]}"
            os.rename(staging, version)
            fsync_path(index_dir)
            write_text_atomic(index_dir / CURRENT, version.name + "\n")
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        _remove_old_versions(index_dir, keep=version.name)
        return version

    @classmethod
    def load(cls, index_dir: str | Path, *, verify: bool = True) -> "Index":
        """Load the live version, refusing damaged files and unknown formats with a clear message."""
        version = live_version(index_dir)
        manifest = read_manifest(version)
        for name, fingerprint in manifest["files"].items():
            path = version / name
            if not path.is_file():
                raise BadIndex(f"{index_dir}: damaged index, {name} is missing")
            if path.stat().st_size != fingerprint["bytes"]:
                raise BadIndex(
                    f"{index_dir}: damaged index, {name} has {path.stat().st_size} bytes, "
                    f"the manifest says {fingerprint['bytes']}"
                )
            if verify and _file_fingerprint(path)["sha256"] != fingerprint["sha256"]:
                raise BadIndex(f"{index_dir}: damaged index, {name} checksum mismatch")
        try:
            model = ModelInfo.from_dict(manifest["model"])
            embeddings = np.load(version / EMBEDDINGS, allow_pickle=False)
            items = [Item(**entry) for entry in json.loads((version / ITEMS).read_text())]
            params = HnswParams(**manifest["hnsw"])
        except (KeyError, TypeError, ValueError) as exc:
            raise BadIndex(f"{index_dir}: damaged index ({type(exc).__name__}: {exc})") from None
        if len(items) != manifest["count"] or embeddings.shape != (manifest["count"], manifest["dim"]):
            raise BadIndex(
                f"{index_dir}: damaged index, {len(items)} items and embeddings {embeddings.shape} "
                f"but the manifest says {manifest['count']} x {manifest['dim']}"
            )
        runtime = manifest.get("runtime")  # absent in indexes written before it was recorded
        index = cls(model, manifest["root"], items, embeddings, params, created=manifest["created"], runtime=runtime)
        index.hnsw = load_hnsw(version / HNSW, model.dim, len(items))
        return index

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


def build_hnsw(embeddings: np.ndarray, params: HnswParams):
    """An hnswlib cosine index over the rows, item ids = row numbers."""
    import hnswlib

    graph = hnswlib.Index(space="cosine", dim=embeddings.shape[1])
    graph.init_index(max_elements=max(1, len(embeddings)), ef_construction=params.ef_construction, M=params.M)
    if len(embeddings):
        graph.add_items(embeddings, np.arange(len(embeddings)))
    graph.set_ef(params.ef_search)
    return graph


def load_hnsw(path: Path, dim: int, count: int):
    import hnswlib

    graph = hnswlib.Index(space="cosine", dim=dim)
    try:
        graph.load_index(str(path), max_elements=max(1, count))
    except (RuntimeError, ValueError) as exc:
        raise BadIndex(f"{path}: damaged HNSW graph ({exc})") from None
    if graph.get_current_count() != count:
        raise BadIndex(f"{path}: HNSW graph holds {graph.get_current_count()} items, expected {count}")
    return graph


def live_version(index_dir: str | Path) -> Path:
    index_dir = Path(index_dir)
    pointer = index_dir / CURRENT
    if not pointer.is_file():
        if not index_dir.exists():
            raise BadIndex(f"{index_dir}: no index here; build one with `fastret index DIR`")
        raise BadIndex(f"{index_dir}: not a fastret index (no {CURRENT} file)")
    version = index_dir / pointer.read_text().strip()
    if not version.is_dir() or version.parent != index_dir:
        raise BadIndex(f"{index_dir}: damaged index, {CURRENT} names a missing version")
    return version


def read_manifest(version: Path) -> dict:
    try:
        manifest = json.loads((version / MANIFEST).read_text())
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
    return manifest


def _check_writable_target(index_dir: Path) -> None:
    """Never write into a folder that holds something other than a fastret index."""
    if index_dir.exists() and not index_dir.is_dir():
        raise BadIndex(f"{index_dir}: exists and is not a directory")
    if index_dir.is_dir() and not (index_dir / CURRENT).exists():
        foreign = [p.name for p in index_dir.iterdir() if not p.name.startswith((".tmp-", "v-"))]
        if foreign:
            raise BadIndex(
                f"{index_dir}: folder is not empty and is not a fastret index; choose another --out"
            )


def _file_fingerprint(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": sha256_files([path])}


def _remove_old_versions(index_dir: Path, keep: str) -> None:
    for entry in index_dir.iterdir():
        if entry.is_dir() and entry.name != keep and entry.name.startswith(("v-", ".tmp-")):
            shutil.rmtree(entry, ignore_errors=True)


def default_index_dir() -> Path:
    """Where `fastret index` writes and `fastret search` reads when --index is not given."""
    return Path(os.environ.get("FASTRET_INDEX", Path.home() / ".fastret" / "index")).expanduser()
