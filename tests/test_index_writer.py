"""Writing an index: one writer at a time, crash leftovers, permissions, clean-up."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
from test_index import make_index

import fastret.engine.index as index_module
from fastret.engine.index import CURRENT, LOCK, BadIndex, Index, IndexLocked, index_writer_lock, live_version

TESTS = Path(__file__).parent

# Holds the writer lock of argv[1] until a line arrives on stdin (or it is killed).
HOLDER = textwrap.dedent(
    """
    import sys
    from fastret.engine.index import index_writer_lock

    with index_writer_lock(sys.argv[1]):
        print("LOCKED", flush=True)
        sys.stdin.readline()
    """
)

# Saves its own index into argv[1] five times, pausing between the rename of the new version
# and the switch of CURRENT, and logs both events to argv[2].
WRITER = textwrap.dedent(
    """
    import os, sys, time
    sys.path.insert(0, sys.argv[4])
    import fastret.engine.index as index_module
    from test_index import make_index

    index_dir, log, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    real_write = index_module.write_text_atomic

    def note(event):
        with open(log, "a") as handle:
            handle.write(f"{os.getpid()} {event}\\n")

    def paused_switch(path, text):
        note("renamed")
        time.sleep(0.05)  # widens the window another writer could interleave in
        real_write(path, text)
        note("switched")

    index_module.write_text_atomic = paused_switch
    index = make_index(count=20 + seed, seed=seed)
    for _ in range(5):
        index.save(index_dir)
    """
)


@pytest.fixture()
def holder(tmp_path):
    child = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path / "idx")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "LOCKED"
        yield child
    finally:
        child.kill()
        child.wait(timeout=30)


def leftovers(index_dir: Path) -> list[str]:
    return sorted(p.name for p in index_dir.iterdir() if p.name not in (CURRENT, LOCK))


def run_in_thread(action) -> None:
    """Run action in another thread; re-raise what it raised."""
    failures = []

    def run():
        try:
            action()
        except BaseException as exc:  # handed back to the caller's thread
            failures.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if failures:
        raise failures[0]


def test_two_writers_saving_in_loops_never_interleave(tmp_path):
    index_dir, log = tmp_path / "idx", tmp_path / "log"
    writers = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(index_dir), str(log), str(seed), str(TESTS)])
        for seed in (1, 2)
    ]
    for writer in writers:
        assert writer.wait(timeout=120) == 0
    events = [line.split() for line in log.read_text().splitlines()]
    assert len(events) == 20
    for renamed, switched in zip(events[::2], events[1::2]):  # each switch follows its own rename
        assert renamed[1] == "renamed" and switched == [renamed[0], "switched"]
    loaded = Index.load(index_dir)
    assert len(loaded) in (21, 22)
    assert leftovers(index_dir) == [live_version(index_dir).name]


def test_a_second_writer_without_wait_is_refused_naming_the_holder(tmp_path, holder):
    with pytest.raises(IndexLocked, match=rf"another fastret writer \(pid {holder.pid}\) is writing this index"):
        make_index().save(tmp_path / "idx", wait=False)
    assert not (tmp_path / "idx" / CURRENT).exists()


def test_a_waiting_writer_is_told_once_and_goes_on_when_the_holder_leaves(tmp_path, holder):
    messages = []

    def on_wait(message):
        messages.append(message)
        holder.stdin.write("\n")  # the holder leaves its block: the lock is released
        holder.stdin.flush()

    version = make_index().save(tmp_path / "idx", on_wait=on_wait)
    assert messages == [f"waiting for another fastret writer on {tmp_path / 'idx'} (pid {holder.pid})…"]
    assert live_version(tmp_path / "idx") == version


def test_the_kernel_releases_the_lock_of_a_killed_writer(tmp_path, holder):
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    with index_writer_lock(tmp_path / "idx", wait=False):
        pass


def test_saving_inside_the_lock_does_not_wait_for_itself(tmp_path):
    with index_writer_lock(tmp_path / "idx", wait=False):
        make_index().save(tmp_path / "idx", wait=False)
        with pytest.raises(IndexLocked):  # another thread is another writer
            run_in_thread(lambda: make_index().save(tmp_path / "idx", wait=False))
    assert len(Index.load(tmp_path / "idx")) == 60


def test_the_lock_refuses_a_foreign_folder_before_creating_anything(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(BadIndex, match="not a fastret index"):
        with index_writer_lock(tmp_path / "photos"):
            pass
    assert sorted(p.name for p in (tmp_path / "photos").iterdir()) == ["holiday.jpg"]


def test_a_first_index_killed_before_current_existed_is_taken_over(tmp_path):
    # kill -9 during the very first save, after the version was renamed into place, inside
    # write_text_atomic: a complete version, its half-made pointer, a lock file, no CURRENT.
    index_dir = tmp_path / "idx"
    make_index().save(index_dir)
    (index_dir / CURRENT).rename(index_dir / f".{CURRENT}.k3x9q1ab")
    (index_dir / ".tmp-deadbeef").mkdir()  # and another writer's staging, also killed
    with pytest.raises(BadIndex, match=r"no CURRENT file"):
        Index.load(index_dir)
    second = make_index(count=10, seed=2)
    version = second.save(index_dir)
    assert leftovers(index_dir) == [version.name]
    np.testing.assert_array_equal(Index.load(index_dir).embeddings, second.embeddings)


def test_a_save_that_fails_after_the_rename_removes_its_own_version(tmp_path, monkeypatch):
    index_dir = tmp_path / "idx"
    make_index().save(index_dir)
    live = live_version(index_dir)

    def disk_full(path, text):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(index_module, "write_text_atomic", disk_full)
    with pytest.raises(OSError, match="No space left"):
        make_index(count=10, seed=2).save(index_dir)
    assert leftovers(index_dir) == [live.name] and live_version(index_dir) == live
    assert len(Index.load(index_dir)) == 60


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_the_version_directory_follows_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        version = make_index().save(tmp_path / "idx")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(version.stat().st_mode) == 0o777 & ~umask  # like mkdir: others can read a shared index
    for path in version.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path.name
