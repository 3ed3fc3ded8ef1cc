"""Incremental versions of an index: shared files, stable ids, the graph's upkeep, format 1, crashes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from test_index import DIM, INFO, kill_at_hook, make_index, unit_rows

import fastret.engine.index as index_module
from fastret.engine.index import (
    COMPACT_DEAD_SHARE,
    CURRENT,
    LOCK,
    MANIFEST,
    Additions,
    BadIndex,
    HnswParams,
    Index,
    IndexState,
    Item,
    Sources,
    build_hnsw,
    live_version,
    next_free_id,
    verify_index,
)

TESTS = Path(__file__).parent


def additions(count: int, seed: int, folder: str = "new") -> Additions:
    items = [Item(f"{folder}/{seed}-{i}.jpg", folder) for i in range(count)]
    return Additions(items, unit_rows(count, seed=seed), Sources.unknown(count))


def edit(index_dir: Path, added: Additions | None = None, removed=(), **options):
    return IndexState.read(index_dir).write(added, removed, **options)


def by_path(index: Index) -> dict[str, np.ndarray]:
    return {item.path: np.asarray(index.embeddings[row]) for row, item in enumerate(index.items)}


def leftovers(index_dir: Path) -> list[str]:
    return sorted(p.name for p in index_dir.iterdir() if p.name not in (CURRENT, LOCK))


@pytest.fixture()
def saved(tmp_path) -> Path:
    make_index(count=200).save(tmp_path / "idx")
    return tmp_path / "idx"


def test_an_edit_links_the_files_it_keeps_and_writes_only_small_ones(saved):
    before = live_version(saved)
    kept = ("seg-000000.npy", "seg-000000.items.json", "rerank-000000.vectors.npy", "rerank-000000.graph.bin")
    inodes = {name: os.stat(before / name).st_ino for name in kept}
    size = sum(path.stat().st_size for path in before.iterdir())
    shared = {path.stat().st_ino for path in before.iterdir()}
    written = edit(saved, additions(2, seed=1), removed=[7])
    assert written.graph == "kept" and not written.compacted  # 2 pending items are 1% of 200
    for name, inode in inodes.items():
        assert os.stat(written.version / name).st_ino == inode, name
    # the re-ranking state included: an edit writes the rows it changed, not the state
    assert written.bytes_written < size / 15  # the manifest (about 5 KB here) is most of it
    fresh = {path.name: path.stat().st_size for path in written.version.iterdir() if path.stat().st_ino not in shared}
    assert sum(count for name, count in fresh.items() if name != MANIFEST) < size / 25, fresh
    assert leftovers(saved) == [written.version.name]  # the old version's names are gone, its files live on
    assert verify_index(saved) == []


def test_survivors_keep_their_ids_and_embeddings_and_additions_get_new_ids(saved):
    original = Index.load(saved)
    written = edit(saved, additions(3, seed=1), removed=[0, 5, 199])
    loaded = Index.load(saved)
    assert written.added_ids.tolist() == [200, 201, 202] and len(loaded) == 200
    survivors = [i for i in range(200) if i not in (0, 5, 199)]
    assert loaded.ids.tolist() == survivors + [200, 201, 202]
    np.testing.assert_array_equal(loaded.embeddings[: len(survivors)], original.embeddings[survivors])
    np.testing.assert_array_equal(loaded.embeddings[-3:], additions(3, seed=1).embeddings)
    assert [loaded.items[row].path for row in loaded.rows_of([200, 6])] == ["new/1-0.jpg", original.items[6].path]


def test_an_id_is_never_given_out_twice(saved):
    edit(saved, removed=[199])  # the highest id goes
    assert edit(saved, additions(1, seed=2)).added_ids.tolist() == [200]
    edit(saved, compact=True)
    assert edit(saved, additions(1, seed=3)).added_ids.tolist() == [201]
    assert next_free_id(saved) == 202  # where a rebuild's ids start
    assert next_free_id(saved / "nothing") == 0


@pytest.mark.parametrize("exact", [True, False])
def test_items_outside_the_graph_are_found_like_the_others(tmp_path, exact):
    index_dir = tmp_path / "idx"
    make_index(count=1000).save(index_dir)
    added = additions(5, seed=3)
    assert edit(index_dir, added).graph == "kept"  # 5 of 1005: searched exactly until the graph takes them in
    loaded = Index.load(index_dir)
    assert loaded.graph_rows == 1000
    rows, scores = loaded.search(added.embeddings, 3, exact=exact)
    assert loaded.ids[rows[:, 0]].tolist() == [1000, 1001, 1002, 1003, 1004]
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    assert (np.diff(scores, axis=1) <= 0).all()


def test_the_graph_takes_pending_items_in_reusing_the_slots_of_removed_ones(saved):
    written = edit(saved, additions(3, seed=5), removed=[1, 2, 3])  # 3 pending > 1% of 200
    assert written.graph == "extended"
    manifest = json.loads((written.version / MANIFEST).read_text())
    assert manifest["graph"] == {"file": "graph-000002.bin", "slots": 200, "marked": 0, "id_bound": 203}
    loaded = Index.load(saved)
    assert loaded.graph_rows == len(loaded) == 200
    assert sorted(loaded.hnsw.get_ids_list()) == loaded.ids.tolist()


def test_removed_items_past_the_share_compact_the_index(saved):
    written = edit(saved, removed=list(range(0, 200, 10)))  # 10%: kept stored, skipped
    assert not written.compacted and len(np.load(written.version / "deleted.npy")) == 20
    written = edit(saved, removed=list(range(1, 200, 10)) + list(range(2, 200, 10)) + [3])  # past 20%
    assert written.compacted and written.graph == "rebuilt"
    manifest = json.loads((written.version / MANIFEST).read_text())
    assert len(manifest["segments"]) == 1 and manifest["deleted"] == manifest["graph_deleted"] == 0
    assert manifest["segments"][0]["rows"] == len(Index.load(saved)) == 139
    assert verify_index(saved) == []


def test_compact_on_request_keeps_ids_items_and_results(saved):
    edit(saved, additions(4, seed=6), removed=[10, 11])
    before = Index.load(saved)
    queries = unit_rows(6, seed=7)
    written = edit(saved, compact=True)
    after = Index.load(saved)
    assert written.compacted and after.items == before.items
    np.testing.assert_array_equal(after.ids, before.ids)
    np.testing.assert_array_equal(after.search(queries, 5, exact=True)[0], before.search(queries, 5, exact=True)[0])


def test_small_trailing_segments_are_merged(tmp_path):
    index_dir = tmp_path / "idx"
    make_index(count=20).save(index_dir)
    for seed in range(40):
        edit(index_dir, additions(1, seed=100 + seed))
    manifest = json.loads((live_version(index_dir) / MANIFEST).read_text())
    rows = [segment["rows"] for segment in manifest["segments"]]
    assert sum(rows) == 60 and len(rows) <= 2 + math.ceil(math.log2(40))
    assert all(earlier > 2 * later for earlier, later in zip(rows, rows[1:]))


def test_add_one_remove_one_a_hundred_times_keeps_the_graph_bounded_and_matches_a_fresh_build(tmp_path):
    """Acceptance: 100 x (add one, remove one) on 1,000 items; the graph never holds more than one
    compaction's worth of dead slots; exact search equals a fresh build's, HNSW recall@10 >= 0.99."""
    index_dir = tmp_path / "idx"
    params = HnswParams(M=16, ef_construction=200)
    items = [Item(f"c{i % 3}/{i}.jpg", f"c{i % 3}") for i in range(1000)]
    Index(INFO, "/gallery", items, unit_rows(1000, seed=11), params).save(index_dir)
    rng = np.random.default_rng(0)
    slot_bound = math.ceil(1000 / (1 - COMPACT_DEAD_SHARE))
    for step in range(100):
        state = IndexState.read(index_dir)
        victim = int(rng.choice(state.ids))
        state.write(additions(1, seed=1000 + step, folder="added"), [victim])
        graph = json.loads((live_version(index_dir) / MANIFEST).read_text())["graph"]
        assert graph["slots"] <= slot_bound, step
    edited = Index.load(index_dir)
    assert len(edited) == 1000
    fresh = Index(INFO, "/gallery", edited.items, np.array(edited.embeddings), params)
    fresh.hnsw = build_hnsw(fresh.embeddings, params)
    queries = unit_rows(200, seed=12)
    exact_edited, _ = edited.search(queries, 10, exact=True)
    exact_fresh, _ = fresh.search(queries, 10, exact=True)
    paths = lambda index, rows: [[index.items[r].path for r in row] for row in rows]  # noqa: E731
    assert paths(edited, exact_edited) == paths(fresh, exact_fresh)
    hnsw_edited, _ = edited.search(queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(paths(edited, hnsw_edited), paths(fresh, exact_fresh))])
    assert recall >= 0.99


def test_a_state_read_before_another_write_is_refused(saved):
    stale = IndexState.read(saved)
    edit(saved, removed=[1])
    with pytest.raises(BadIndex, match="another writer changed the index since it was read"):
        stale.write(removed=[2])


def test_removing_an_item_that_is_not_there_is_refused_before_writing(saved):
    version = live_version(saved)
    with pytest.raises(ValueError, match="no item 999 in the index"):
        edit(saved, removed=[3, 999])
    assert live_version(saved) == version and leftovers(saved) == [version.name]


def test_every_item_can_go_and_come_back(saved):
    edit(saved, removed=list(range(200)))
    empty = Index.load(saved)
    assert len(empty) == 0 and empty.search(unit_rows(1), 5)[0].shape == (1, 0)
    edit(saved, additions(2, seed=9))
    assert Index.load(saved).ids.tolist() == [200, 201]


# --- format 1 ---------------------------------------------------------------------------------


def save_format_1(index: Index, index_dir: Path) -> Path:
    """The layout fastret wrote before format 2: one embeddings.npy, items.json, hnsw.bin."""
    version = index_dir / "v-format-1"
    version.mkdir(parents=True)
    np.save(version / "embeddings.npy", index.embeddings)
    (version / "items.json").write_text(json.dumps([{"path": i.path, "label": i.label} for i in index.items]))
    build_hnsw(index.embeddings, index.hnsw_params).save_index(str(version / "hnsw.bin"))
    files = {name: index_module._file_fingerprint(version / name) for name in ("embeddings.npy", "items.json", "hnsw.bin")}
    manifest = {
        "format_version": 1, "model": INFO.to_dict(), "dim": DIM, "metric": "cosine", "count": len(index),
        "root": index.root, "hnsw": {"M": 8, "ef_construction": 100, "ef_search": 64}, "created": 1.0,
        "runtime": None, "encoder": None, "files": files,
    }
    (version / MANIFEST).write_text(json.dumps(manifest))
    (index_dir / CURRENT).write_text(version.name + "\n")
    return version


def test_a_format_1_index_loads_with_ids_equal_to_rows(tmp_path):
    original = make_index(count=50)
    save_format_1(original, tmp_path / "idx")
    loaded = Index.load(tmp_path / "idx")
    assert loaded.items == original.items and loaded.ids.tolist() == list(range(50)) and loaded.next_id == 50
    queries = unit_rows(4, seed=3)
    np.testing.assert_array_equal(loaded.search(queries, 5)[0], original.search(queries, 5)[0])
    assert verify_index(tmp_path / "idx") == [] and next_free_id(tmp_path / "idx") == 50


def test_the_first_edit_of_a_format_1_index_converts_it_linking_its_embeddings(tmp_path):
    original = make_index(count=200)
    old = save_format_1(original, tmp_path / "idx")
    inode = os.stat(old / "embeddings.npy").st_ino
    written = edit(tmp_path / "idx", additions(1, seed=4), removed=[3])
    manifest = json.loads((written.version / MANIFEST).read_text())
    assert manifest["format_version"] == 2
    assert os.stat(written.version / manifest["segments"][0]["embeddings_file"]).st_ino == inode
    loaded = Index.load(tmp_path / "idx")
    assert loaded.ids.tolist() == [i for i in range(200) if i != 3] + [200]
    assert loaded.items[:3] == original.items[:3] and verify_index(tmp_path / "idx") == []


# --- crashes and concurrent writers -----------------------------------------------------------

# A child process makes an edit and stops at a hook point, where the test kills it.
CHILD = textwrap.dedent(
    """
    import os, sys, time
    import numpy as np
    sys.path.insert(0, sys.argv[2])
    import fastret.engine.index as index_module
    from fastret.engine.index import IndexState
    from test_living_index import additions

    hook = os.environ["FASTRET_TEST_KILL_AT"]

    def stop_here():
        print("AT-HOOK", flush=True)
        time.sleep(60)

    def stop_after(name):
        real = getattr(index_module, name)

        def wrapped(*args, **kwargs):
            result = real(*args, **kwargs)
            stop_here()
            return result

        setattr(index_module, name, wrapped)

    if hook == "rename":  # the new version renamed into place, CURRENT not yet switched
        real_write = index_module.write_text_atomic
        index_module.write_text_atomic = lambda path, text: (stop_here(), real_write(path, text))
    else:
        stop_after(hook)
    compact = os.environ.get("FASTRET_TEST_COMPACT") == "1"
    IndexState.read(sys.argv[1]).write(additions(3, seed=8), [4, 5], compact=compact)
    """
)


@pytest.mark.parametrize(
    "hook, compact",
    [
        ("_link", False),  # a shared file linked into the staging directory
        ("_write_segment", False),  # the new segment written
        ("_write_deletions", False),  # the deletion lists written (the graph too, when it changed)
        ("rename", False),
        ("_write_segment", True),  # compaction: the one new segment written
        ("rename", True),
    ],
)
def test_sigkill_during_an_edit_leaves_the_previous_version_and_its_files_intact(saved, hook, compact):
    original = Index.load(saved)
    queries = unit_rows(3, seed=4)
    expected_ids, _ = original.search(queries, 5)
    kill_at_hook([sys.executable, "-c", CHILD, str(saved), str(TESTS)],
                 {"FASTRET_TEST_KILL_AT": hook, "FASTRET_TEST_COMPACT": str(int(compact))})
    assert len(leftovers(saved)) == 2  # the live version and the killed writer's debris
    loaded = Index.load(saved)
    assert loaded.version_dir == original.version_dir
    np.testing.assert_array_equal(loaded.embeddings, original.embeddings)
    np.testing.assert_array_equal(loaded.search(queries, 5)[0], expected_ids)
    # The next writer removes the debris, hard links to the live files included, and the files live on.
    written = edit(saved, additions(1, seed=9))
    assert leftovers(saved) == [written.version.name] and verify_index(saved) == []
    assert len(Index.load(saved)) == 201


# Adds one item per edit, five times, each edit read and written under the writer lock.
EDITOR = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[3])
    from fastret.engine.index import IndexState, index_writer_lock
    from test_living_index import additions

    for step in range(5):
        with index_writer_lock(sys.argv[1]):
            IndexState.read(sys.argv[1]).write(additions(1, seed=int(sys.argv[2]) * 100 + step))
    """
)


def test_two_editors_at_once_lose_no_edit(saved):
    editors = [subprocess.Popen([sys.executable, "-c", EDITOR, str(saved), str(seed), str(TESTS)]) for seed in (1, 2)]
    for editor in editors:
        assert editor.wait(timeout=120) == 0
    loaded = Index.load(saved)
    assert len(loaded) == 210 and loaded.ids[-10:].tolist() == list(range(200, 210))
    assert sorted(item.path for item in loaded.items[-10:]) == sorted(
        f"new/{seed * 100 + step}-0.jpg" for seed in (1, 2) for step in range(5)
    )
    assert verify_index(saved) == []


def test_a_reader_holding_an_old_version_keeps_reading_it_after_edits(saved):
    reader = Index.load(saved)
    expected = np.array(reader.embeddings)
    for seed in range(3):
        edit(saved, additions(5, seed=seed), removed=[seed])
    assert not reader.version_dir.exists()
    np.testing.assert_array_equal(reader.embeddings, expected)  # mapped files outlive their names
    assert reader.search(unit_rows(2, seed=5), 3)[0].shape == (2, 3)
