"""Keeping an index current: find what changed in its folder, embed only that, write a new version.

A file is unchanged when its size and mtime_ns are the ones recorded when it was embedded (with
`rehash`, when its sha256 is); new and changed files are embedded, gone ones removed, every other
item keeps its id and embedding. A changed file gets a new id (ids name what was embedded), so
nothing cached under the old id (a thumbnail) can be served for the new content. The encoder must
embed exactly like the one that made the index (its recorded recipe, the same JPEG draft mode);
anything else is refused with a message naming `--full`.
"""

from __future__ import annotations

import hashlib
import os
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from fastret.engine.decode import IMAGE_SUFFIXES, Skipped, list_images
from fastret.engine.encoders import Encoder, EncoderRecipe
from fastret.engine.index import Additions, BadIndex, IndexState, Item, Sources, Written, index_writer_lock
from fastret.engine.pipeline import DEFAULT_BATCH_SIZE, DEFAULT_WORKERS, EmbedResult, embed_files

HASH_CHUNK = 1 << 20


def file_sha256(path: Path) -> bytes:
    """The sha256 digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.digest()


def read_sources(paths: Sequence[Path], *, workers: int = DEFAULT_WORKERS) -> Sources:
    """Size, mtime_ns and sha256 of each file, read before it is embedded: a file that changes
    while it is embedded looks changed to the next run. Unreadable files get -1 and no digest."""

    def one(path: Path) -> tuple[int, int, bytes]:
        try:
            info = os.stat(path)
            return info.st_size, info.st_mtime_ns, file_sha256(path)
        except OSError:
            return -1, -1, bytes(32)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # hashlib releases the GIL
        records = list(pool.map(one, paths))
    digests = np.frombuffer(b"".join(r[2] for r in records), np.uint8).reshape(len(records), 32)
    return Sources(np.array([r[0] for r in records], np.int64), np.array([r[1] for r in records], np.int64), digests.copy())


def embed_paths(
    root: Path,
    paths: Sequence[Path],
    encoder: Encoder,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    workers: int = DEFAULT_WORKERS,
    draft: bool = True,
    on_skip: Callable[[Skipped], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
    embed: Callable[..., EmbedResult] = embed_files,
    thumbnails: bool = True,
) -> tuple[Additions, EmbedResult]:
    """Embed files under root into new items (path relative to root, label = parent folder), with
    the sources they were read from and (`thumbnails`) their thumbnails for the duplicate finder;
    bad files are skipped, not fatal. `embed` has embed_files' signature (the Ray engine passes its own)."""
    sources = read_sources(paths, workers=workers)
    result = embed(
        paths, encoder, batch_size=batch_size, workers=workers, draft=draft, on_skip=on_skip, on_progress=on_progress,
        thumbnails=thumbnails,
    )
    position = {Path(path): number for number, path in enumerate(paths)}
    rows = np.array([position[path] for path in result.paths], dtype=np.int64)
    items = [Item(path=path.relative_to(root).as_posix(), label=path.parent.name) for path in result.paths]
    return Additions(items, result.embeddings, sources.take(rows), result.thumbnails), result


# --- what changed -----------------------------------------------------------------------------


@dataclass
class Changes:
    """What a refresh will do: embed `new` and `changed` files, drop `gone` items."""

    root: Path
    new: list[Path] = field(default_factory=list)
    changed: dict[Path, int] = field(default_factory=dict)  # file -> the id of its current item
    gone: list[int] = field(default_factory=list)  # ids whose files are no longer there
    unchanged: int = 0
    skipped: list[Skipped] = field(default_factory=list)  # what the listing left out, and why

    @property
    def to_embed(self) -> list[Path]:
        return sorted([*self.new, *self.changed])

    @property
    def empty(self) -> bool:
        return not (self.new or self.changed or self.gone)


def find_changes(
    state: IndexState,
    root: str | Path,
    *,
    scope: Sequence[str] | None = None,
    rehash: bool = False,
    include_hidden: bool = False,
) -> Changes:
    """Compare the folder (or the `scope` inside it: paths relative to root, files or folders) with
    the index's items there: new, changed, gone and unchanged files."""
    root = Path(root).resolve()
    changes = Changes(root)
    listed = _listing(root, scope, include_hidden, changes.skipped)
    in_scope = _rows_in_scope(state, scope)
    known = {state.paths[row]: row for row in in_scope}
    seen: set[int] = set()
    for path in listed:
        row = known.get(path.relative_to(root).as_posix())
        if row is None:
            changes.new.append(path)
            continue
        seen.add(row)
        if _is_unchanged(path, state.sources, row, rehash):
            changes.unchanged += 1
        else:
            changes.changed[path] = int(state.ids[row])
    changes.gone = [int(state.ids[row]) for row in in_scope if row not in seen]
    return changes


def _listing(root: Path, scope: Sequence[str] | None, include_hidden: bool, skipped: list[Skipped]) -> list[Path]:
    """The image files of the folder, or of each scope entry (a folder: its images; a file: itself
    when list_images would list it)."""
    if scope is None:
        return list_images(root, include_hidden=include_hidden, on_skip=skipped.append)
    found: set[Path] = set()
    for relative in scope:
        if not include_hidden and any(part.startswith(".") for part in Path(relative).parts):
            continue
        path = root / relative
        if path.is_dir() and not path.is_symlink():
            found.update(list_images(path, include_hidden=include_hidden, on_skip=skipped.append))
        elif _is_image_file(path):
            found.add(path)
    return sorted(found)


def _is_image_file(path: Path) -> bool:
    """A regular file (symlinks followed) with an image suffix: what list_images lists."""
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        return False
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def _rows_in_scope(state: IndexState, scope: Sequence[str] | None) -> list[int]:
    """Rows of the items at the scope's paths, or under its folders (one pass over the items)."""
    targets = {_posix(relative) for relative in scope} if scope is not None else {""}
    if "" in targets:
        return list(range(len(state)))
    prefixes = tuple(target + "/" for target in targets)
    return [row for row, path in enumerate(state.paths) if path in targets or path.startswith(prefixes)]


def _under(path: str, target: str) -> bool:
    return target == "" or path == target or path.startswith(target + "/")


def _posix(relative: str) -> str:
    """'a/b' for 'a/b/', './a//b' and the like; '' for the root itself."""
    return "/".join(part for part in Path(relative).parts if part != ".")


def _is_unchanged(path: Path, sources: Sources, row: int, rehash: bool) -> bool:
    try:
        info = os.stat(path)
    except OSError:
        return False
    if rehash:
        recorded = sources.digest(row)
        try:
            return recorded is not None and file_sha256(path) == recorded
        except OSError:
            return False
    return (info.st_size, info.st_mtime_ns) == (int(sources.sizes[row]), int(sources.mtimes_ns[row]))


# --- the encoder must embed like the index's --------------------------------------------------

FULL = "`fastret index DIR --out INDEX --full` rebuilds it"


def check_updatable(state: IndexState, root: str | Path, *, draft: bool | None = None) -> None:
    """Refuse to update an index of another folder, with another JPEG draft mode, or without an
    encoder recipe (made before recipes were recorded): its items would not fit together."""
    root = Path(root).resolve()
    if str(root) != state.root:
        raise BadIndex(f"{state.index_dir} holds an index of {state.root}, not of {root}; {FULL}, or choose another --out")
    if state.encoder is None:
        raise BadIndex(f"{state.index_dir}: the index records no encoder recipe (made by an older fastret); {FULL}")
    recorded = state.build.get("draft", True)
    if draft is not None and draft != recorded:
        asked, made = ("with", "without") if draft else ("without", "with")
        raise BadIndex(
            f"{state.index_dir}: the index was built {made} JPEG draft decoding, this run asks {asked} it; {FULL}"
        )


def check_same_encoder(state: IndexState, encoder: Encoder) -> None:
    """Refuse an encoder that would embed new items differently from the index's recorded recipe."""
    recorded = EncoderRecipe.from_dict(state.encoder) if state.encoder is not None else None
    if recorded is None or not same_embedding(recorded, encoder.recipe):
        what = recorded.line() if recorded is not None else "an unrecorded encoder"
        raise BadIndex(
            f"{state.index_dir}: the index was embedded by {recorded.model.model_id if recorded else '?'} on {what}, "
            f"this run would embed with {encoder.recipe.model.model_id} on {encoder.recipe.line()}; {FULL}"
        )


def same_embedding(a: EncoderRecipe, b: EncoderRecipe) -> bool:
    """Whether two recipes embed alike: the same model and preprocessing, runtime, precision and
    artefact (by sha256 where both recorded one, else by file name and size)."""
    if (a.model, a.backend, a.precision) != (b.model, b.backend, b.precision):
        return False
    if a.artefact_sha256 and b.artefact_sha256:
        return a.artefact_sha256 == b.artefact_sha256
    name = lambda recipe: None if recipe.artefact is None else Path(recipe.artefact).name  # noqa: E731
    return (name(a), a.artefact_bytes) == (name(b), b.artefact_bytes)


# --- applying changes -------------------------------------------------------------------------


@dataclass
class Refreshed:
    """What a refresh did; `written` is None when nothing changed (no version was written)."""

    added: int = 0
    updated: int = 0
    removed: int = 0
    unchanged: int = 0
    skipped: list[Skipped] = field(default_factory=list)
    written: Written | None = None
    seconds: float = 0.0

    def summary(self) -> str:
        return f"added {self.added}, updated {self.updated}, removed {self.removed}, unchanged {self.unchanged}"


def apply_changes(
    state: IndexState,
    changes: Changes,
    encoder: Encoder | None,
    *,
    remove_gone: bool = True,
    batch_size: int = DEFAULT_BATCH_SIZE,
    workers: int = DEFAULT_WORKERS,
    on_skip: Callable[[Skipped], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
    build: dict | None = None,
    embed: Callable[..., EmbedResult] = embed_files,
) -> Refreshed:
    """Embed the new and changed files, drop the gone ones (`remove_gone`), write the next version.

    A changed file that no longer decodes loses its item (it no longer shows what the file holds)
    and counts as removed; a new one that does not decode is skipped and tried again next time.
    """
    started = time.perf_counter()
    done = Refreshed(unchanged=changes.unchanged, skipped=list(changes.skipped))
    if on_skip is not None:
        for skip in changes.skipped:
            on_skip(skip)
    to_embed = changes.to_embed
    if to_embed and encoder is None:
        raise ValueError("files to embed but no encoder")
    if to_embed:
        check_same_encoder(state, encoder)
        additions, result = embed_paths(
            changes.root, to_embed, encoder, batch_size=batch_size, workers=workers,
            draft=state.build.get("draft", True), on_skip=on_skip, on_progress=on_progress,
            embed=embed,
        )
        done.skipped.extend(result.skipped)
    else:
        additions = None
    embedded = {item.path for item in additions.items} if additions is not None else set()
    updated = {path for path in changes.changed if path.relative_to(changes.root).as_posix() in embedded}
    done.updated = len(updated)
    done.added = (len(additions) if additions is not None else 0) - done.updated
    removed = list(changes.changed.values()) + (changes.gone if remove_gone else [])
    done.removed = len(removed) - done.updated
    if done.added or removed or build:
        done.written = state.write(additions, removed, build=build)
    done.seconds = time.perf_counter() - started
    return done


def refresh_index(
    index_dir: str | Path,
    root: str | Path,
    encoder: Encoder,
    *,
    scope: Sequence[str] | None = None,
    remove_gone: bool = True,
    rehash: bool = False,
    include_hidden: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
    workers: int = DEFAULT_WORKERS,
    on_skip: Callable[[Skipped], None] | None = None,
    wait: bool = True,
    on_wait: Callable[[str], None] | None = None,
) -> Refreshed:
    """find_changes + apply_changes under the index's writer lock (one job: `fastret watch` batches)."""
    with index_writer_lock(index_dir, wait=wait, on_wait=on_wait):
        state = IndexState.read(index_dir)
        check_updatable(state, root)
        hidden = include_hidden or state.build.get("include_hidden", False)
        changes = find_changes(state, root, scope=scope, rehash=rehash, include_hidden=hidden)
        return apply_changes(
            state, changes, encoder, remove_gone=remove_gone, batch_size=batch_size, workers=workers, on_skip=on_skip
        )


def ids_under(state: IndexState, targets: Sequence[str]) -> tuple[list[int], list[str]]:
    """Ids of the items at these paths relative to root (a folder: every item under it), and the
    targets that matched none."""
    rows = _rows_in_scope(state, targets)
    paths = [state.paths[row] for row in rows]
    unmatched = [target for target in targets if not any(_under(path, _posix(target)) for path in paths)]
    return [int(state.ids[row]) for row in rows], unmatched
