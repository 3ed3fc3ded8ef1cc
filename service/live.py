"""A search service that follows its index: new versions are loaded in the background and swapped in.

`fastret serve` holds a LiveRetriever. A thread polls the version a reader would open now (an
hnswlib index's CURRENT pointer, a LanceDB store's table version); when it is not the one served,
it is opened (while requests go on being answered by the old one), given the same encoder, and
swapped in with one assignment. A request takes `current()` once and uses that Retriever
throughout, so it finishes on the version it started with: an hnswlib version's files stay
readable (memory-mapped, or read into memory) after a writer removes their names, and a LanceDB
store is read at the table version it was opened at. Each Retriever prepares its own re-ranking
state, so a swapped-in version never uses stale state.
"""

from __future__ import annotations

import threading
from pathlib import Path

from fastret.engine.index import BadIndex
from fastret.engine.log import Log, no_log
from fastret.service.search import Retriever
from fastret.service.stores import live_version_name, open_index, version_name

DEFAULT_POLL_S = 1.0


class LiveRetriever:
    """The live version's Retriever, replaced when the index changes; answers `current()`."""

    def __init__(self, index_dir: str | Path, retriever: Retriever, *, poll_s: float = DEFAULT_POLL_S,
                 log: Log = no_log) -> None:
        if retriever.encoder is None:
            raise ValueError("a live search service embeds queries: give it a Retriever with an encoder")
        self.index_dir = Path(index_dir)
        self.poll_s = poll_s
        self._current = retriever
        self._log = log
        self._refused: str | None = None  # the version last refused, reported once
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._reload_lock = threading.Lock()

    def current(self) -> Retriever:
        """The Retriever of the version live at the last poll: take it once per request."""
        return self._current

    def refresh(self) -> bool:
        """Load the live version if it is not the one served, and swap it in; True when swapped.

        A version that cannot be served (damaged, half-deleted under a racing writer, another
        model) is reported once and the old one stays; the next poll tries again."""
        with self._reload_lock:
            served = self._current
            name = live_version_name(self.index_dir)
            if name is None or name == version_name(served.index) or name == self._refused:
                return False
            try:
                index = open_index(self.index_dir)
                fresh = served.with_index(index)  # check_model: the encoders must fit the new version
                count = len(index)  # a LanceDB store reads its items here, not in a request
            except BadIndex as exc:
                self._refused = name
                self._log(f"not serving index version {name}: {exc}; still serving {version_name(served.index)}")
                return False
            if index.encoder != served.index.encoder:
                self._log(f"index version {version_name(index)} was embedded by another encoder recipe; queries go on "
                          f"running on {served.runtime} (restart fastret serve to use the new one)")
            self._current = fresh
            self._refused = None
            self._log(f"serving index version {version_name(index)}: {count} images")
            return True

    def start(self) -> "LiveRetriever":
        """Poll in a background thread every poll_s seconds (until close)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._follow, name="fastret-index-follower", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _follow(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.refresh()
            except Exception as exc:  # a bug must not end following silently
                self._log(f"following {self.index_dir} failed once: {type(exc).__name__}: {exc}")
