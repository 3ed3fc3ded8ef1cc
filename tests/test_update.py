"""Keeping an index current with a stand-in encoder: what changed, watching a folder, serving the
live version. Images are solid colours; the 3-d mean-colour encoder makes their neighbours obvious."""

from __future__ import annotations

import io
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fakes import MeanColourEncoder
from fastret.engine.decode import Preprocessing
from fastret.engine.index import BadIndex, Index, IndexState, live_version
from fastret.engine.retrieval import build_index
from fastret.engine.update import apply_changes, check_updatable, find_changes, refresh_index
from fastret.service.search import Retriever, SearchOptions, rerank_request
from fastret.service.watch import FolderWatch, follow

COLOURS = {"red": (230, 20, 20), "green": (20, 230, 20), "blue": (20, 20, 230)}


def solid_png(colour: tuple[int, int, int], shift: int = 0) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (40, 30), tuple(min(255, c + shift) for c in colour)).save(out, format="PNG")
    return out.getvalue()


def write_image(path: Path, colour: tuple[int, int, int], shift: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(solid_png(colour, shift))
    return path


@pytest.fixture()
def gallery(tmp_path) -> Path:
    root = tmp_path / "gallery"
    for name, colour in COLOURS.items():
        for n in range(4):
            write_image(root / name / f"{n}.png", colour, shift=5 * n)
    return root.resolve()


@pytest.fixture()
def indexed(gallery, tmp_path) -> Path:
    index, _ = build_index(gallery, MeanColourEncoder(), workers=0)
    index.save(tmp_path / "idx")
    return tmp_path / "idx"


def refresh(index_dir: Path, gallery: Path, encoder=None, **options):
    return refresh_index(index_dir, gallery, encoder or MeanColourEncoder(), workers=0, **options)


def ids_by_path(index_dir: Path) -> dict[str, int]:
    index = Index.load(index_dir)
    return {item.path: int(index.ids[row]) for row, item in enumerate(index.items)}


def test_only_new_and_changed_files_are_embedded_and_other_items_keep_their_ids(gallery, indexed):
    before = ids_by_path(indexed)
    write_image(gallery / "red" / "9.png", COLOURS["red"], shift=40)
    write_image(gallery / "yellow" / "0.png", (230, 230, 20))
    write_image(gallery / "green" / "1.png", COLOURS["blue"])  # same name, new content
    (gallery / "blue" / "2.png").unlink()
    encoder = MeanColourEncoder()
    done = refresh(indexed, gallery, encoder)
    assert done.summary() == "added 2, updated 1, removed 1, unchanged 10"
    assert sum(encoder.batch_sizes) == 3
    after = ids_by_path(indexed)
    assert {path: after[path] for path in before if path in after and path != "green/1.png"} == {
        path: before[path] for path in before if path not in ("green/1.png", "blue/2.png")
    }
    assert after["green/1.png"] not in before.values()  # a changed file's item gets a new id
    assert sorted(after.values())[-3:] == [12, 13, 14]
    queries = MeanColourEncoder().encode(np.full((1, 32, 32, 3), COLOURS["blue"], np.uint8))
    index = Index.load(indexed)
    top = [index.items[row].path for row in index.search(queries, 4, exact=True)[0][0]]
    assert "green/1.png" in top  # its embedding is the new content's


def test_a_run_with_nothing_changed_writes_no_version(gallery, indexed):
    version = live_version(indexed)
    done = refresh(indexed, gallery)
    assert done.written is None and done.summary() == "added 0, updated 0, removed 0, unchanged 12"
    assert live_version(indexed) == version


def test_rehash_finds_new_contents_behind_the_same_size_and_mtime(gallery, indexed):
    path = gallery / "red" / "0.png"
    stamp = os.stat(path)
    replacement = solid_png(COLOURS["green"])
    assert len(replacement) == stamp.st_size  # the same size, so only the contents differ
    path.write_bytes(replacement)
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    state = IndexState.read(indexed)
    assert find_changes(state, gallery).changed == {}
    assert list(find_changes(state, gallery, rehash=True).changed) == [path]


def test_a_changed_file_that_no_longer_decodes_loses_its_item(gallery, indexed):
    path = gallery / "red" / "1.png"
    path.write_bytes(path.read_bytes()[:40])  # truncated
    done = refresh(indexed, gallery)
    assert done.summary() == "added 0, updated 0, removed 1, unchanged 11"
    assert [skip.path for skip in done.skipped] == [path]
    assert "red/1.png" not in ids_by_path(indexed)


def test_an_old_index_without_file_records_embeds_everything_once(gallery, indexed):
    state = IndexState.read(indexed)
    forgotten = state.paths
    index = Index.load(indexed)
    index.sources = None  # as an index converted from format 1 has: no sizes, times or hashes
    index.save(indexed)
    first = refresh(indexed, gallery)
    assert first.summary() == f"added 0, updated {len(forgotten)}, removed 0, unchanged 0"
    assert refresh(indexed, gallery).summary() == f"added 0, updated 0, removed 0, unchanged {len(forgotten)}"


@pytest.mark.parametrize(
    "problem, message",
    [
        ("root", "holds an index of .*, not of"),
        ("draft", "built with JPEG draft decoding, this run asks without it"),
        ("recipe", "records no encoder recipe"),
    ],
)
def test_an_update_that_would_not_fit_the_index_is_refused_naming_full(gallery, indexed, tmp_path, problem, message):
    state = IndexState.read(indexed)
    root, draft = gallery, None
    if problem == "root":
        root = tmp_path
    elif problem == "draft":
        draft = False
    else:
        state.manifest["encoder"] = None
    with pytest.raises(BadIndex, match=message) as caught:
        check_updatable(state, root, draft=draft)
    assert "--full" in str(caught.value)


@pytest.mark.parametrize(
    "encoder",
    [
        MeanColourEncoder(model_id="another-model"),
        MeanColourEncoder(spec=Preprocessing(32, 40, "bilinear", (0.0,) * 3, (1.0,) * 3)),  # other preprocessing
    ],
)
def test_an_encoder_that_embeds_differently_is_refused_before_embedding(gallery, indexed, encoder):
    write_image(gallery / "red" / "new.png", COLOURS["red"])
    state = IndexState.read(indexed)
    with pytest.raises(BadIndex, match="--full"):
        apply_changes(state, find_changes(state, gallery), encoder)
    assert encoder.batch_sizes == [] and live_version(indexed) == state.version


def test_another_encoder_is_not_even_needed_when_only_removals(gallery, indexed):
    (gallery / "red" / "0.png").unlink()
    state = IndexState.read(indexed)
    assert apply_changes(state, find_changes(state, gallery), None).summary() == "added 0, updated 0, removed 1, unchanged 11"


def test_a_refresh_limited_to_a_scope_leaves_the_rest_alone(gallery, indexed):
    (gallery / "red" / "0.png").unlink()
    (gallery / "green" / "0.png").unlink()
    write_image(gallery / "green" / "7.png", COLOURS["green"])
    done = refresh(indexed, gallery, scope=["green"], remove_gone=True)
    assert done.summary() == "added 1, updated 0, removed 1, unchanged 3"
    assert "red/0.png" in ids_by_path(indexed)


# --- watching a folder ------------------------------------------------------------------------


class Follower:
    """follow() in a thread over a real watchdog observer; stop() ends it and re-raises its error."""

    def __init__(self, index_dir: Path, root: Path, *, debounce_s: float = 0.2, settle_s: float | None = None) -> None:
        self.watch = FolderWatch(root, debounce_s=debounce_s, ignore=[index_dir]).start()
        self.stop_event = threading.Event()
        self.batches = []
        self.skipped = []
        self.errors = []

        def run():
            try:
                follow(index_dir, self.watch, MeanColourEncoder(), stop=self.stop_event, on_batch=self.batches.append,
                       on_skip=self.skipped.append, settle_s=settle_s, workers=0)
            except BaseException as exc:  # handed to the test's thread
                self.errors.append(exc)

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(timeout=30)
        self.watch.stop()
        if self.errors:
            raise self.errors[0]


def wait_for(condition, timeout_s: float) -> float:
    """Seconds until condition() held; fails the test after timeout_s."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout_s, "timed out"
        time.sleep(0.05)
    return time.monotonic() - started


def test_fifty_copied_images_are_searchable_within_ten_seconds_in_a_few_batches(gallery, indexed, tmp_path):
    source = tmp_path / "incoming"
    for n in range(50):
        write_image(source / f"{n}.png", COLOURS["blue"], shift=n)
    follower = Follower(indexed, gallery)
    try:
        shutil.copytree(source, gallery / "incoming")
        wait_for(lambda: len(Index.load(indexed)) == 62, timeout_s=10)
        assert len([batch for batch in follower.batches if batch.refreshed.written]) <= 5
        shutil.rmtree(gallery / "incoming")
        wait_for(lambda: len(Index.load(indexed)) == 12, timeout_s=10)
    finally:
        follower.stop()
    assert not any(path.startswith("incoming/") for path in ids_by_path(indexed))


def test_a_file_still_being_written_is_tried_again_until_it_is_whole(gallery, indexed):
    follower = Follower(indexed, gallery)
    path = gallery / "red" / "slow.png"
    whole = solid_png(COLOURS["red"])
    try:
        path.write_bytes(whole[:30])  # the first part of a copy
        time.sleep(1.0)  # several debounce periods: the watch tried it, or held it back, by now
        assert "red/slow.png" not in ids_by_path(indexed)
        with open(path, "ab") as handle:
            handle.write(whole[30:])
        wait_for(lambda: "red/slow.png" in ids_by_path(indexed), timeout_s=10)
    finally:
        follower.stop()
    assert follower.skipped == []  # never reported as skipped: it was retried


def test_a_file_changed_just_now_is_held_back_then_indexed_without_another_event(gallery, indexed):
    follower = Follower(indexed, gallery, settle_s=1.5)
    try:
        write_image(gallery / "red" / "late.png", COLOURS["red"])
        waited = wait_for(lambda: "red/late.png" in ids_by_path(indexed), timeout_s=10)
    finally:
        follower.stop()
    assert waited >= 1.0  # not in the first batch (0.2 s of quiet): it had changed less than 1.5 s before


def test_a_burst_of_events_waits_for_quiet(tmp_path):
    watch = FolderWatch(tmp_path, debounce_s=0.3)
    stop = threading.Event()
    watch.note("a.png")
    started = time.monotonic()
    threading.Timer(0.2, lambda: watch.note("b.png")).start()
    assert watch.next_batch(stop) == ["a.png", "b.png"]
    assert time.monotonic() - started >= 0.5
    stop.set()
    assert watch.next_batch(stop) == []


# --- serving the live version -----------------------------------------------------------------


def test_a_reranked_search_after_an_edit_reflects_the_edit(gallery, indexed):
    from fastret.service.live import LiveRetriever

    live = LiveRetriever(indexed, Retriever(Index.load(indexed), MeanColourEncoder()))
    options = SearchOptions(k=3, rerank=rerank_request(pca_dim=2, dba_n=2, qe_n=1))
    query = MeanColourEncoder().encode(np.full((1, 32, 32, 3), (230, 230, 20), np.uint8))[0]
    before = [hit.path for hit in live.current().search_vector(query, options)]
    assert not any(path.startswith("yellow/") for path in before)
    for n in range(3):
        write_image(gallery / "yellow" / f"{n}.png", (230, 230, 20), shift=3 * n)
    refresh(indexed, gallery)
    assert live.refresh()
    after = [hit.path for hit in live.current().search_vector(query, options)]
    assert sorted(after) == ["yellow/0.png", "yellow/1.png", "yellow/2.png"]


def test_serve_follows_the_index_with_only_200s_during_the_swap(gallery, indexed):
    pytest.importorskip("fastapi", reason="the web extra is not installed: pip install 'fastret[web]'")
    from fastapi.testclient import TestClient

    from fastret.service.live import LiveRetriever
    from fastret.web.app import create_app

    live = LiveRetriever(indexed, Retriever(Index.load(indexed), MeanColourEncoder()), poll_s=0.05).start()
    statuses: list[int] = []
    stop = threading.Event()
    try:
        with TestClient(create_app(live)) as client:
            first = client.get("/health").json()
            assert first["count"] == 12 and first["index_version"] == live_version(indexed).name

            def searches():
                upload = {"image": ("q.png", solid_png(COLOURS["red"]), "image/png")}
                while not stop.is_set():
                    statuses.append(client.post("/search", files=upload, params={"k": 3}).status_code)
                    statuses.append(client.post("/search/item/0", params={"k": 3}).status_code)

            searcher = threading.Thread(target=searches)
            searcher.start()
            for n in range(20):
                write_image(gallery / "purple" / f"{n}.png", (150, 20, 150), shift=n)
            refresh(indexed, gallery)
            waited = wait_for(lambda: client.get("/health").json()["count"] == 32, timeout_s=5)
            time.sleep(0.2)
            stop.set()
            searcher.join(timeout=30)
            health = client.get("/health").json()
            assert health["index_version"] == live_version(indexed).name != first["index_version"]
            newest = max(ids_by_path(indexed).values())
            assert client.get(f"/items/{newest}/thumbnail").status_code == 200
    finally:
        stop.set()
        live.close()
    assert waited < 5 and len(statuses) > 4 and set(statuses) == {200}
