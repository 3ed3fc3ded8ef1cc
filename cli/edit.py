"""Keeping an index current: `fastret index` again (only what changed), add, remove, compact, watch."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from fastret.cli.options import add_runtime_options, int_in, positive_float
from fastret.engine.decode import IMAGE_SUFFIXES, Skipped, list_images
from fastret.engine.encoders import Encoder, describe_runtime
from fastret.engine.index import BadIndex, HnswParams, IndexState, Written, default_index_dir, index_writer_lock
from fastret.engine.pipeline import DEFAULT_BATCH_SIZE, DEFAULT_WORKERS, EmbedResult, embed_files
from fastret.engine.retrieval import display_path
from fastret.engine.update import (
    FULL,
    Refreshed,
    apply_changes,
    check_updatable,
    file_sha256,
    find_changes,
    ids_under,
)
from fastret.service.load import BackendUnavailable, encoder_for_index
from fastret.service.stores import holds_index, read_state
from fastret.service.watch import DEFAULT_DEBOUNCE_S, Batch, FolderWatch, follow


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def hnsw_params(args: argparse.Namespace, base: HnswParams) -> HnswParams:
    """The graph parameters the flags ask for, the others as in `base`."""
    return HnswParams(
        M=base.M if args.hnsw_m is None else args.hnsw_m,
        ef_construction=base.ef_construction if args.ef_construction is None else args.ef_construction,
        ef_search=base.ef_search if args.ef_search is None else args.ef_search,
    )


def existing_index(index_dir: Path, log=log) -> IndexState | None:
    """The index already in --out, to update; None when there is none, or it cannot be read (then it
    is rebuilt, as `fastret index` always did)."""
    if not holds_index(index_dir):
        return None
    try:
        return read_state(index_dir)  # an hnswlib index or a LanceDB store
    except BadIndex as exc:
        log(f"cannot update the index in {index_dir} ({exc}): embedding everything again")
        return None


def index_encoder(state: IndexState, args: argparse.Namespace) -> Encoder:
    """The encoder that embeds new items like the index's: its recorded recipe (or the runtime asked
    for, refused unless it is the same recipe)."""
    try:
        return encoder_for_index(
            state, args.backend, threads=args.threads, precision=args.precision, workload="throughput", log=log
        )
    except BackendUnavailable as exc:
        raise BackendUnavailable(f"{exc}; or rebuild the index here: {FULL}") from None


def check_same_model(state: IndexState, model: str) -> None:
    """--model other than auto must be the index's model (auto: the index's)."""
    if model == "auto":
        return
    from fastret.export.models import resolve_model

    source, _ = resolve_model(model)
    recorded = state.model
    if (source.model_id, source.weights_sha256, source.dim) != (recorded.model_id, recorded.weights_sha256, recorded.dim):
        raise BadIndex(
            f"{state.index_dir} holds an index made with {recorded.model_id}, not {source.model_id}; {FULL}"
        )


def index_incrementally(
    args: argparse.Namespace, state: IndexState, *, embed: Callable[..., EmbedResult] = embed_files
) -> int:
    """`fastret index DIR --out INDEX` where INDEX holds an index of DIR: embed only what changed
    (`embed`: embed_files' signature; the Ray engine passes its own)."""
    from tqdm import tqdm

    started = time.perf_counter()
    root = Path(args.dir)
    check_updatable(state, root, draft=not args.no_draft)
    check_same_model(state, args.model)
    if hnsw_params(args, state.hnsw_params) != state.hnsw_params:
        raise BadIndex(f"{args.out}: the index's graph has {state.hnsw_params}; other HNSW parameters need a rebuild: {FULL}")
    recorded_hidden = state.build.get("include_hidden", False)
    hidden = args.include_hidden or recorded_hidden
    changes = find_changes(state, root, rehash=args.rehash, include_hidden=hidden)
    encoder = index_encoder(state, args) if changes.to_embed else None
    if encoder is not None:
        log(f"updating {root}: embedding {len(changes.to_embed)} new or changed images on {describe_runtime(encoder)}")
    with tqdm(total=len(changes.to_embed), unit="img", disable=args.quiet or not changes.to_embed, file=sys.stderr,
              dynamic_ncols=True) as bar:
        done = apply_changes(
            state, changes, encoder, batch_size=args.batch_size, workers=args.workers,
            on_skip=lambda skip: bar.write(skip.line(), file=sys.stderr), on_progress=bar.update,
            build={"include_hidden": True} if hidden != recorded_hidden else None, embed=embed,
        )
    log(f"{done.summary()}, skipped {len(done.skipped)}, in {time.perf_counter() - started:.1f} s "
        f"{outcome(args.out, done.written, state)}")
    return 0


def outcome(index_dir: Path, written: Written | None, state: IndexState) -> str:
    if written is None:
        return f"({index_dir} unchanged, {state.version.name})"
    return f"-> {index_dir} ({written.version.name}, {written.count} items)"


# --- fastret add ------------------------------------------------------------------------------


def cmd_add(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    started = time.perf_counter()
    with index_writer_lock(args.index, wait=not args.no_wait, on_wait=log):
        state = read_state(args.index)
        root = Path(state.root)
        check_updatable(state, root)
        scope = [under_root(path, root, args.copy_into) for path in args.paths]
        for path in args.paths:
            if path.is_file() and path.suffix.lower() not in IMAGE_SUFFIXES:
                log(Skipped(path, "not an image file name (see `fastret index --help` for the formats)").line())
        hidden = state.build.get("include_hidden", False)
        changes = find_changes(state, root, scope=scope, include_hidden=hidden)
        encoder = index_encoder(state, args) if changes.to_embed else None
        with tqdm(total=len(changes.to_embed), unit="img", disable=args.quiet or not changes.to_embed,
                  file=sys.stderr, dynamic_ncols=True) as bar:
            done = apply_changes(
                state, changes, encoder, remove_gone=False, batch_size=args.batch_size, workers=args.workers,
                on_skip=lambda skip: bar.write(skip.line(), file=sys.stderr), on_progress=bar.update,
            )
    log(f"{done.summary()}, skipped {len(done.skipped)}, in {time.perf_counter() - started:.1f} s "
        f"{outcome(args.index, done.written, state)}")
    return 0


def under_root(path: Path, root: Path, copy_into: str | None) -> str:
    """A file or folder to add, as a path relative to the index root; one from elsewhere is copied
    into ROOT/copy_into first (refused without it)."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    for candidate in (Path(os.path.abspath(path)), path.resolve()):
        try:
            return candidate.relative_to(root).as_posix()
        except ValueError:
            continue
    if copy_into is None:
        raise ValueError(
            f"{display_path(str(path))} is not under the index root {display_path(str(root))}; pass --copy-into "
            "FOLDER to copy it into ROOT/FOLDER (FOLDER's name becomes its label)"
        )
    return copy_under_root(path, root, copy_into)


def copy_under_root(path: Path, root: Path, folder: str) -> str:
    """Copy a file (or a folder's images, keeping their sub-folders) into ROOT/folder; an existing
    different file of the same name is never overwritten. Returns the copy's path relative to root."""
    target_dir = (root / folder).resolve()
    if target_dir != root and root not in target_dir.parents:
        raise ValueError(f"--copy-into {folder}: not a folder inside the index root {root}")
    if path.is_dir():
        files = [(source, target_dir / path.name / source.relative_to(path)) for source in list_images(path)]
    else:
        files = [(path, target_dir / path.name)]
    for source, target in files:
        if target.exists():
            if file_sha256(target) != file_sha256(source):
                raise ValueError(f"{target} exists and differs from {source}; not overwritten (rename one)")
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.fastret-copy")  # hidden: never listed half-copied
        shutil.copy2(source, partial)
        os.replace(partial, target)
    return (files[0][1] if not path.is_dir() else target_dir / path.name).relative_to(root).as_posix()


# --- fastret remove, compact ------------------------------------------------------------------


def cmd_remove(args: argparse.Namespace) -> int:
    if not args.targets and not args.ids:
        raise ValueError("name what to remove: paths relative to the index root, or --id N")
    with index_writer_lock(args.index, wait=not args.no_wait, on_wait=log):
        state = read_state(args.index)
        relatives = [relative_to_root(target, Path(state.root)) for target in args.targets]
        ids, unmatched = ids_under(state, relatives)
        unmatched = [target for target, relative in zip(args.targets, relatives) if relative in unmatched]
        live = set(state.ids.tolist())
        unmatched += [f"id {item_id}" for item_id in args.ids if item_id not in live]
        removed = sorted(set(ids) | {item_id for item_id in args.ids if item_id in live})
        for target in unmatched:
            log(f"not in the index: {display_path(str(target))}")
        written = state.write(removed=removed) if removed else None
    log(f"removed {len(removed)} {outcome(args.index, written, state)}")
    if removed:
        log("files still in the folder come back at the next `fastret index`: move or delete them to keep them out")
    return 1 if unmatched else 0


def relative_to_root(target: str, root: Path) -> str:
    """A path to remove as the index names it: relative to the root (an absolute one under the root is converted)."""
    path = Path(target)
    if not path.is_absolute():
        return path.as_posix()
    for candidate in (Path(os.path.abspath(path)), path.resolve()):
        try:
            return candidate.relative_to(root).as_posix()
        except ValueError:
            continue
    return path.as_posix()  # matches nothing, reported


def cmd_compact(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    with index_writer_lock(args.index, wait=not args.no_wait, on_wait=log):
        state = read_state(args.index)
        if not isinstance(state, IndexState):  # a LanceDB store: its own compaction and index upkeep
            written = state.write(compact=True)
            ann = ("every row taken into the ANN index" if written.graph != "kept"
                   else "no ANN index (a table this small is scanned)")
            log(f"compacted {args.index}: LanceDB files compacted, {ann}; "
                f"{written.count} items in {time.perf_counter() - started:.1f} s ({written.version.name})")
            return 0
        stored = sum(segment.rows for segment in state.layout.segments)
        written = state.write(compact=True)
    log(f"compacted {args.index}: {len(state.layout.segments)} segments of {stored} stored rows -> one segment of "
        f"{written.count} items and a fresh graph, in {time.perf_counter() - started:.1f} s "
        f"({written.version.name})")
    return 0


# --- fastret watch ----------------------------------------------------------------------------


def cmd_watch(args: argparse.Namespace) -> int:
    code = args.index_job(args)  # the first pass is `fastret index DIR --out INDEX` itself
    if code:
        return code
    state = IndexState.read(args.out)
    encoder = index_encoder(state, args)
    watch = FolderWatch(args.dir, debounce_s=args.debounce, ignore=[args.out]).start()
    stop = threading.Event()
    log(f"watching {watch.root} (batches after {args.debounce:g} s of quiet); Ctrl+C stops")
    try:
        follow(
            args.out, watch, encoder, stop=stop, on_batch=lambda batch: log(batch_line(args.out, batch)),
            on_skip=lambda skip: log(skip.line()), include_hidden=args.include_hidden, batch_size=args.batch_size,
            workers=args.workers,
        )
    except KeyboardInterrupt:
        stop.set()
        log(f"stopped watching {watch.root}; {args.out} holds every batch applied")
    finally:
        watch.stop()
    return 0


def batch_line(index_dir: Path, batch: Batch) -> str:
    done: Refreshed = batch.refreshed
    where = f"-> {index_dir} ({done.written.version.name}, {done.written.count} items)" if done.written else "(no change)"
    waiting = f", {batch.waiting} waiting" if batch.waiting else ""
    return f"{time.strftime('%H:%M:%S')} {done.summary()}{waiting} {where}"


def register(
    commands: argparse._SubParsersAction,
    *,
    add_index_options: Callable[[argparse.ArgumentParser], None],
    index_job: Callable[[argparse.Namespace], int],
) -> None:
    """Add add / remove / compact / watch; `fastret watch` takes `fastret index`'s options and runs
    its job first (both passed in by cli/main.py, which defines them, so neither module imports the other)."""
    add = commands.add_parser("add", help="embed images into an index: files under its root, or copies (--copy-into)")
    add.add_argument("index", type=Path, help="index directory")
    add.add_argument("paths", nargs="+", type=Path, help="image files or folders under the index root")
    add.add_argument("--copy-into", metavar="FOLDER",
                     help="copy files from outside the root into ROOT/FOLDER first (FOLDER's name is their label)")
    add_runtime_options(add)
    add.add_argument("--batch-size", type=int_in(1, 4096), default=DEFAULT_BATCH_SIZE)
    add.add_argument("--workers", type=int_in(0, 256), default=DEFAULT_WORKERS, help="decoder threads (0: decode inline)")
    add.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add.add_argument("--no-wait", action="store_true", help="fail at once when another fastret writer is writing INDEX")
    add.set_defaults(run=cmd_add)

    remove = commands.add_parser("remove", help="drop items from an index, by path (a folder: all under it) or id")
    remove.add_argument("index", type=Path, help="index directory")
    remove.add_argument("targets", nargs="*", help="paths relative to the index root (or absolute paths under it)")
    remove.add_argument("--id", dest="ids", type=int_in(0), action="append", default=[], help="an item id (repeatable)")
    remove.add_argument("--no-wait", action="store_true", help="fail at once when another fastret writer is writing INDEX")
    remove.set_defaults(run=cmd_remove)

    compact = commands.add_parser("compact", help="rewrite an index as one segment with a fresh graph")
    compact.add_argument("index", type=Path, nargs="?", default=default_index_dir(),
                         help="index directory (default: %(default)s)")
    compact.add_argument("--no-wait", action="store_true", help="fail at once when another fastret writer is writing INDEX")
    compact.set_defaults(run=cmd_compact)

    watch = commands.add_parser("watch", help="index DIR, then follow it: changes are applied in batches until Ctrl+C")
    watch.add_argument("dir", help="folder of images (sub-folder names become labels)")
    watch.add_argument("--out", type=Path, default=default_index_dir(), help="index directory (default: %(default)s)")
    add_index_options(watch)
    watch.add_argument("--debounce", type=positive_float, default=DEFAULT_DEBOUNCE_S,
                       help="seconds of quiet before a batch of changes is applied (default: %(default)s)")
    watch.set_defaults(run=cmd_watch, index_job=index_job)
