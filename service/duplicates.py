"""Duplicate groups of an index, and the safe actions on them (`fastret duplicates`, GET /duplicates).

The job reads the index's stored embeddings and asks the search service for each item's
neighbours (never re-embedding); the candidates it proposes are verified in pixels
(fastret.engine.duplicates) on the thumbnails the index kept of them, or, for files changed since
(and indexes made before thumbnails were kept, and LanceDB stores, which keep none), on thumbnails
decoded now. A folder is indexed in memory first.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from fastret.engine.decode import ImageError, Skipped, decode_rgb
from fastret.engine.duplicates import (
    AUTO_THRESHOLD,
    NEIGHBOURS,
    REASON_BYTES,
    REASON_NEAR,
    REASON_PIXELS,
    FileFacts,
    PixelFeatures,
    candidate_pairs,
    facts_and_features,
    file_facts,
    identical_files,
    is_duplicate,
    keep_priority,
    star_groups,
    stored_features,
)
from fastret.engine.encoders import default_threads
from fastret.engine.index import Index
from fastret.engine.rerank import RerankOptions
from fastret.engine.retrieval import build_index, display_path
from fastret.engine.thumbnails import Thumbnail
from fastret.service.load import open_encoder
from fastret.service.search import Retriever, SearchOptions
from fastret.service.stores import holds_index, open_index

KEEP_RULE = "largest resolution, then largest file, then oldest"
Log = Callable[[str], None]


def item_id_of(index: Index, row: int) -> int:
    """The stable item id of a row of index.items."""
    return int(index.ids[row])


@dataclass(frozen=True)
class Copy:
    """One file of a group: the kept one (reason "kept") or a duplicate of it."""

    item_id: int
    path: str  # as stored in the index, relative to its root
    width: int
    height: int
    bytes: int
    mtime: float
    reason: str
    cosine: float | None = None  # embeddings' cosine to the kept file
    agreement: float | None = None  # pixel agreement with the kept file once aligned (1 = same pixels)
    mirrored: bool = False  # a mirror image of the kept file

    def to_dict(self) -> dict:
        return {
            "id": self.item_id,
            "path": display_path(self.path),
            "width": self.width,
            "height": self.height,
            "bytes": self.bytes,
            "mtime": self.mtime,
            "reason": self.reason,
            "cosine": None if self.cosine is None else round(self.cosine, 4),
            "agreement": None if self.agreement is None else round(self.agreement, 4),
            "mirrored": self.mirrored,
        }


@dataclass(frozen=True)
class DuplicateGroup:
    kept: Copy
    duplicates: list[Copy]

    def to_dict(self) -> dict:
        return {"kept": self.kept.to_dict(), "duplicates": [copy.to_dict() for copy in self.duplicates]}


@dataclass
class DuplicateReport:
    root: str
    items: int
    threshold: float
    mirrored: bool
    groups: list[DuplicateGroup]
    skipped: list[Skipped] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "root": display_path(self.root),
            "items": self.items,
            "threshold": self.threshold,
            "mirrored": self.mirrored,
            "keep_rule": KEEP_RULE,
            "groups": [group.to_dict() for group in self.groups],
            "duplicates": sum(len(group.duplicates) for group in self.groups),
            "skipped": [{"path": display_path(str(skip.path)), "reason": skip.reason} for skip in self.skipped],
            "seconds": self.seconds,
        }


def parse_threshold(text: str) -> float:
    """'auto' (the measured default) or an agreement in (0, 1]; ValueError otherwise."""
    if text == "auto":
        return AUTO_THRESHOLD
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"threshold must be 'auto' or a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise ValueError(f"threshold must be 'auto' or a number in (0, 1], got {text!r}")
    return value


def open_for_duplicates(
    path: Path,
    *,
    model: str = "auto",
    backend: str = "auto",
    precision: str = "auto",
    threads: int | None = None,
    on_skip: Callable[[Skipped], None] | None = None,
    log: Log = lambda _: None,
) -> Retriever:
    """An index directory as it is (no encoder: nothing is embedded; an hnswlib index or a LanceDB
    store, which keeps no thumbnails: the images it proposes are decoded), or a folder indexed in memory."""
    path = Path(path).expanduser()
    if holds_index(path):
        return Retriever(open_index(path, rerank=False))  # the finder ranks by plain cosines
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: neither a fastret index nor a folder")
    encoder = open_encoder(model, backend, threads=threads, image_dir=path, precision=precision,
                           workload="throughput", log=log)
    log(f"indexing {path} in memory (index it with `fastret index` once to make later runs fast)")
    index, _ = build_index(path, encoder, on_skip=on_skip)
    return Retriever(index, encoder)


def find_duplicates(
    retriever: Retriever,
    *,
    threshold: float = AUTO_THRESHOLD,
    mirrored: bool = True,
    neighbours: int = NEIGHBOURS,
    workers: int | None = None,
    processes: int = 1,
) -> DuplicateReport:
    """Groups of identical and near-duplicate files of the retriever's index, kept file first.

    `workers` threads decode what the index kept no thumbnail of; `processes` > 1 verifies in that
    many forked processes (for a command-line job; a server keeps to 1). Files missing or
    unreadable now are skipped with a reason, never fatal.
    """
    started = time.perf_counter()
    index = retriever.index
    workers = workers or default_threads()
    root = Path(index.root)
    paths = [root / item.path for item in index.items]
    skipped: list[Skipped] = []
    stats: dict[int, os.stat_result] = {}
    for row, path in enumerate(paths):
        try:
            stats[row] = os.stat(path)
        except OSError as exc:
            skipped.append(Skipped(path, f"cannot read: {exc.strerror or exc}"))
    rows = sorted(stats)
    same_bytes = identical_files([paths[row] for row in rows], [stats[row].st_size for row in rows])
    copies_of: dict[int, list[int]] = {}  # a byte group's oldest file -> the others
    for positions in same_bytes:
        members = sorted((rows[p] for p in positions), key=lambda row: (stats[row].st_mtime, index.items[row].path))
        copies_of[members[0]] = members[1:]
    hidden = {row for others in copies_of.values() for row in others}
    nodes = [row for row in rows if row not in hidden]
    hashed = time.perf_counter()

    search = retriever.ranker(SearchOptions(k=neighbours + 1, rerank=RerankOptions()))  # raw cosine neighbours
    candidates = candidate_pairs(index.embeddings, search, nodes, neighbours=neighbours)
    searched = time.perf_counter()

    proposed = sorted(candidates)
    features: dict[int, PixelFeatures] = {}
    facts: dict[int, FileFacts] = {}
    for row in proposed:
        kept = kept_thumbnail(index, row, stats.get(row))
        if kept is not None:
            facts[row] = FileFacts(kept.width, kept.height, stats[row].st_size, stats[row].st_mtime)
            features[row] = stored_features(kept)
    to_decode = [row for row in proposed if row not in features]
    decoded = facts_and_features([paths[row] for row in to_decode], workers=workers)
    for row, found in zip(to_decode, decoded):
        if isinstance(found, ImageError):
            skipped.append(Skipped(paths[row], str(found)))
        else:
            facts[row], features[row] = found
    candidates = {
        row: [(other, cosine) for other, cosine in listed if other in features]
        for row, listed in candidates.items()
        if row in features
    }
    priority = sorted(features, key=lambda row: keep_priority(facts[row], index.items[row].path))

    def verify(a: int, b: int):
        return is_duplicate(features[a], features[b], threshold, mirrored=mirrored)

    near = star_groups(priority, candidates, verify, processes=processes)
    verified = time.perf_counter()

    def copy(row: int, reason: str, fact: FileFacts, **scores) -> Copy:
        return Copy(item_id_of(index, row), index.items[row].path, fact.width, fact.height, fact.bytes, fact.mtime,
                    reason, **scores)

    def byte_copies(row: int) -> list[Copy]:
        """The files with row's bytes: its size in pixels, their own dates."""
        return [
            copy(other, REASON_BYTES, replace(facts[row], mtime=stats[other].st_mtime), cosine=1.0, agreement=1.0)
            for other in copies_of.get(row, [])
        ]

    groups: list[DuplicateGroup] = []
    for group in near:
        rep = group.representative
        duplicates = byte_copies(rep)
        for member in group.members:
            same = identical_pixels(features[rep], features[member.row], paths[rep], paths[member.row])
            duplicates.append(copy(member.row, REASON_PIXELS if same else REASON_NEAR, facts[member.row],
                                   cosine=member.cosine, agreement=member.match.agreement,
                                   mirrored=member.match.mirrored))
            duplicates.extend(byte_copies(member.row))
        groups.append(DuplicateGroup(copy(rep, "kept", facts[rep]), duplicates))
    grouped = {row for group in near for row in (group.representative, *(m.row for m in group.members))}
    for row in copies_of:
        if row in grouped:
            continue
        if row not in facts:
            try:
                facts[row] = file_facts(paths[row])
            except (ImageError, OSError) as exc:
                skipped.append(Skipped(paths[row], str(exc)))
                continue
        groups.append(DuplicateGroup(copy(row, "kept", facts[row]), byte_copies(row)))
    groups.sort(key=lambda group: group.kept.path)
    finished = time.perf_counter()
    seconds = {
        "hash": hashed - started,
        "search": searched - hashed,
        "verify": verified - searched,
        "report": finished - verified,
        "total": finished - started,
    }
    return DuplicateReport(index.root, len(index), threshold, mirrored, groups, sorted(skipped, key=lambda s: s.path),
                           {name: round(value, 3) for name, value in seconds.items()})


def kept_thumbnail(index: Index, row: int, stat: os.stat_result | None) -> Thumbnail | None:
    """The thumbnail the index kept of a row, if its file is still the one it was made from."""
    if index.thumbnails is None or index.sources is None or stat is None:
        return None
    if (stat.st_size, stat.st_mtime_ns) != (int(index.sources.sizes[row]), int(index.sources.mtimes_ns[row])):
        return None
    return index.thumbnails[row]


def identical_pixels(a: PixelFeatures, b: PixelFeatures, path_a: Path, path_b: Path) -> bool:
    """Whether two files decode to the same pixels (checked in full only when their thumbnails are equal)."""
    if a.thumb.shape != b.thumb.shape or (a.thumb != b.thumb).any():
        return False
    try:
        first, _ = decode_rgb(path_a)
        second, _ = decode_rgb(path_b)
    except ImageError:
        return False
    return first.size == second.size and first.tobytes() == second.tobytes()


# --- actions ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Action:
    """Move (or link) one duplicate into the review folder."""

    source: Path
    target: Path
    link: bool

    def line(self) -> str:
        verb = "link" if self.link else "move"
        return f"{verb} {display_path(str(self.source))} -> {display_path(str(self.target))}"


def plan_actions(report: DuplicateReport, destination: Path, *, link: bool) -> list[Action]:
    """Each duplicate (never a kept file) to destination/<its path in the index>; refuses a
    destination inside the indexed folder (a later index would find the copies again)."""
    root = Path(report.root).resolve()
    destination = Path(destination).resolve()
    if destination == root or root in destination.parents:
        raise ValueError(f"{destination}: inside the indexed folder {root}; choose a folder outside it")
    return [
        Action(root / copy.path, destination / copy.path, link)
        for group in report.groups
        for copy in group.duplicates
    ]


def apply_actions(actions: Sequence[Action], on_skip: Callable[[Skipped], None]) -> int:
    """Carry out the actions; one that would overwrite a file or whose source is gone is skipped
    with a reason. Returns how many were done. Nothing is ever deleted."""
    done = 0
    for action in actions:
        if action.target.exists() or action.target.is_symlink():
            on_skip(Skipped(action.source, f"{action.target} exists already; left as it is"))
            continue
        if not action.source.exists():
            on_skip(Skipped(action.source, "no longer exists"))
            continue
        try:
            action.target.parent.mkdir(parents=True, exist_ok=True)
            if action.link:
                action.target.symlink_to(action.source)
            else:
                shutil.move(action.source, action.target)
        except OSError as exc:
            on_skip(Skipped(action.source, f"cannot {'link' if action.link else 'move'}: {exc.strerror or exc}"))
            continue
        done += 1
    return done
