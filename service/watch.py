"""Following a folder: file-system events -> debounced batches of changed paths -> index updates.

watchdog delivers events (inotify on Linux, FSEvents on macOS, ReadDirectoryChangesW on Windows)
on its own thread; FolderWatch keeps the paths they name and hands them out as one batch once the
folder has been quiet for `debounce_s` (or the oldest waiting path has waited `max_wait_s`), so a
burst of copied files becomes a few updates, not one version per file. `follow` applies each batch
with engine.update.refresh_index, limited to the batch's paths. A file still being written (changed
less than `settle_s` ago, or failing to decode while it changed recently) is tried again later,
never given up on while it keeps changing.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from fastret.engine.decode import Skipped
from fastret.engine.encoders import Encoder
from fastret.engine.pipeline import DEFAULT_BATCH_SIZE, DEFAULT_WORKERS
from fastret.engine.update import Refreshed, refresh_index

DEFAULT_DEBOUNCE_S = 2.0
MAX_WAIT_FACTOR = 10
"""A batch goes out at the latest this many debounce periods after its oldest path was seen."""
RETRY_WINDOW_S = 60.0
"""A file that fails to decode is tried again while it changed less than this long ago."""
IGNORED_EVENTS = ("opened", "closed_no_write", "attrib")  # reading files (ours too) is no change


class FolderWatch:
    """Changed paths under a folder, collected from watchdog events and handed out in batches."""

    def __init__(self, root: str | Path, *, debounce_s: float = DEFAULT_DEBOUNCE_S, max_wait_s: float | None = None,
                 ignore: Sequence[str | Path] = ()) -> None:
        self.root = Path(root).resolve()
        self.debounce_s = debounce_s
        self.max_wait_s = max_wait_s if max_wait_s is not None else MAX_WAIT_FACTOR * debounce_s
        self._ignore = tuple(os.path.abspath(path) for path in ignore)
        self._pending: dict[str, tuple[float, float]] = {}  # relative path -> (first seen, not before)
        self._last_event = 0.0
        self._changed = threading.Condition()
        self._observer = None

    def start(self) -> "FolderWatch":
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer

        watch = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event) -> None:
                if event.event_type in IGNORED_EVENTS or (event.is_directory and event.event_type == "modified"):
                    return
                for path in (event.src_path, getattr(event, "dest_path", "")):
                    if path:
                        watch.note(os.fsdecode(path))

        self._observer = Observer()
        self._observer.schedule(Handler(), str(self.root), recursive=True)
        self._observer.start()
        return self

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=30)
            self._observer = None

    def note(self, path: str) -> None:
        """A path (absolute, or relative to the root) changed: it waits for the next batch."""
        absolute = os.path.abspath(os.path.join(self.root, path))
        if any(absolute == ignored or absolute.startswith(ignored + os.sep) for ignored in self._ignore):
            return
        relative = os.path.relpath(absolute, self.root)
        if relative == os.curdir or relative.startswith(os.pardir):
            return
        with self._changed:
            now = time.monotonic()
            first, _ = self._pending.get(relative, (now, now))
            self._pending[relative] = (first, now)
            self._last_event = now
            self._changed.notify_all()

    def retry(self, relatives: Sequence[str], after_s: float) -> None:
        """Hand these paths out again in a batch at least `after_s` seconds from now."""
        with self._changed:
            now = time.monotonic()
            for relative in relatives:
                first, _ = self._pending.get(relative, (now, now))
                self._pending[relative] = (first, now + after_s)
            self._changed.notify_all()

    @property
    def waiting(self) -> int:
        with self._changed:
            return len(self._pending)

    def next_batch(self, stop: threading.Event, poll_s: float = 0.05) -> list[str]:
        """The paths due now, once the folder has been quiet for debounce_s (or a path has waited
        max_wait_s); [] when `stop` is set first."""
        with self._changed:
            while not stop.is_set():
                now = time.monotonic()
                due = [path for path, (_, not_before) in self._pending.items() if not_before <= now]
                quiet = now - self._last_event >= self.debounce_s
                overdue = any(now - self._pending[path][0] >= self.max_wait_s for path in due)
                if due and (quiet or overdue):
                    for path in due:
                        del self._pending[path]
                    return sorted(due)
                self._changed.wait(poll_s)
        return []


@dataclass
class Batch:
    """One applied batch: what the refresh did, and how many paths wait for a later one."""

    refreshed: Refreshed
    waiting: int


def follow(
    index_dir: str | Path,
    watch: FolderWatch,
    encoder: Encoder,
    *,
    stop: threading.Event,
    on_batch: Callable[[Batch], None],
    on_skip: Callable[[Skipped], None] | None = None,
    settle_s: float | None = None,
    include_hidden: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
    workers: int = DEFAULT_WORKERS,
) -> None:
    """Apply the watch's batches to the index until `stop` is set.

    Files changed less than `settle_s` ago (default: the debounce) are held back; files that fail
    to decode while they changed in the last RETRY_WINDOW_S are tried again; other failures are
    reported through `on_skip` and tried again only when they change.
    """
    settle_s = watch.debounce_s if settle_s is None else settle_s
    while not stop.is_set():
        batch = watch.next_batch(stop)
        if not batch:
            continue
        busy = {relative for relative in batch if _changed_within(watch.root / relative, settle_s)}
        watch.retry(sorted(busy), settle_s)
        settled = [relative for relative in batch if relative not in busy]
        if not settled:
            continue
        refreshed = refresh_index(index_dir, watch.root, encoder, scope=settled, include_hidden=include_hidden,
                                  batch_size=batch_size, workers=workers)
        again = [skip for skip in refreshed.skipped if _changed_within(skip.path, RETRY_WINDOW_S)]
        watch.retry([os.path.relpath(skip.path, watch.root) for skip in again], max(settle_s, watch.debounce_s))
        if on_skip is not None:
            for skip in refreshed.skipped:
                if skip not in again:
                    on_skip(skip)
        on_batch(Batch(refreshed, watch.waiting))


def _changed_within(path: Path, seconds: float) -> bool:
    """Whether the file changed less than `seconds` ago (a file that is gone did not)."""
    try:
        return time.time() - os.stat(path).st_mtime < seconds
    except OSError:
        return False
