"""The on-disk index: round trips, exact vs HNSW, deterministic ties, refusals, crash safety."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import struct
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from fastret.engine.decode import Preprocessing
from fastret.engine.encoders import ModelInfo
import fastret.engine.index as index_module
from fastret.engine.index import (
    CURRENT,
    DELETED,
    GRAPH_DELETED,
    MANIFEST,
    BadIndex,
    HnswParams,
    Index,
    Item,
    build_hnsw,
    exact_search,
    live_version,
    verify_index,
)

DIM = 16
# The files of a freshly saved index: one segment and one graph.
EMBEDDINGS, ITEMS, FILES, HNSW = "seg-000000.npy", "seg-000000.items.json", "seg-000000.files.npy", "graph-000000.bin"
# make_index's re-ranking state: 60 items are too few for PCA 256, enough for DBA 5
RERANK_FILES = (*(f"rerank-000000.{array}.npy" for array in index_module.RERANK_ARRAYS), "rerank-000000.graph.bin")
ALL_FILES = (EMBEDDINGS, ITEMS, FILES, HNSW, DELETED, GRAPH_DELETED, *RERANK_FILES)
INFO = ModelInfo("test-model", "ab" * 32, DIM, Preprocessing(32, 32, "bilinear", (0.0,) * 3, (1.0,) * 3))


def unit_rows(count: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    rows = np.random.default_rng(seed).normal(size=(count, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def make_index(count: int = 60, seed: int = 0) -> Index:
    items = [Item(path=f"c{i % 3}/{i}.jpg", label=f"c{i % 3}") for i in range(count)]
    return Index(INFO, "/gallery", items, unit_rows(count, seed=seed), HnswParams(M=8, ef_construction=100))


def rewrite_manifest(index_dir: Path, change) -> None:
    path = live_version(index_dir) / MANIFEST
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def test_round_trip_keeps_items_embeddings_and_results(tmp_path):
    index = make_index()
    queries = unit_rows(5, seed=1)
    version = index.save(tmp_path / "idx")
    assert (tmp_path / "idx" / CURRENT).read_text().strip() == version.name
    loaded = Index.load(tmp_path / "idx")
    assert loaded.items == index.items and loaded.model == index.model and loaded.root == index.root
    assert loaded.hnsw_params == index.hnsw_params
    np.testing.assert_array_equal(loaded.embeddings, index.embeddings)
    for exact in (True, False):
        ids, scores = index.search(queries, 7, exact=exact)
        loaded_ids, loaded_scores = loaded.search(queries, 7, exact=exact)
        np.testing.assert_array_equal(loaded_ids, ids)
        np.testing.assert_allclose(loaded_scores, scores, atol=1e-6)


def test_the_embedding_runtime_is_recorded_and_optional(tmp_path):
    runtime = {"backend": "openvino", "precision": "int8"}
    replace(make_index(), runtime=runtime).save(tmp_path / "idx")
    assert Index.load(tmp_path / "idx").runtime == runtime
    rewrite_manifest(tmp_path / "idx", lambda manifest: manifest.pop("runtime"))  # an index from before
    assert Index.load(tmp_path / "idx").runtime is None


def test_the_encoder_recipe_is_recorded_and_optional(tmp_path):
    recipe = {"kind": "bundled", "name": "efficientnet-lite2", "options": {"flip": True}}
    replace(make_index(), encoder=recipe).save(tmp_path / "idx")
    assert json.loads((live_version(tmp_path / "idx") / MANIFEST).read_text())["encoder"] == recipe
    assert Index.load(tmp_path / "idx").encoder == recipe
    rewrite_manifest(tmp_path / "idx", lambda manifest: manifest.pop("encoder"))  # an index from before
    assert Index.load(tmp_path / "idx").encoder is None


def test_saving_again_replaces_the_version_and_removes_the_old_one(tmp_path):
    make_index(seed=0).save(tmp_path / "idx")
    second = make_index(count=30, seed=3)
    version = second.save(tmp_path / "idx")
    assert [p.name for p in (tmp_path / "idx").iterdir() if p.is_dir()] == [version.name]
    np.testing.assert_array_equal(Index.load(tmp_path / "idx").embeddings, second.embeddings)


def test_exact_and_hnsw_agree_on_top1():
    index = make_index(count=300)
    index.hnsw = build_hnsw(index.embeddings, index.hnsw_params)
    noisy = index.embeddings[::7] + 0.05 * unit_rows(len(index.embeddings[::7]), seed=2)
    noisy /= np.linalg.norm(noisy, axis=1, keepdims=True)  # queries are unit rows, like encoder output
    exact_ids, exact_scores = index.search(noisy, 5, exact=True)
    hnsw_ids, hnsw_scores = index.search(noisy, 5)
    np.testing.assert_array_equal(hnsw_ids[:, 0], exact_ids[:, 0])
    np.testing.assert_array_equal(exact_ids[:, 0], np.arange(0, 300, 7))
    np.testing.assert_allclose(hnsw_scores[:, 0], exact_scores[:, 0], atol=1e-5)
    assert (np.diff(exact_scores, axis=1) <= 0).all()


def test_exact_search_matches_brute_force_sort():
    embeddings, queries = unit_rows(200), unit_rows(9, seed=5)
    ids, scores = exact_search(embeddings, queries, 10)
    expected = np.argsort(-(queries @ embeddings.T), axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(ids, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ embeddings.T, expected, axis=1))


@pytest.mark.parametrize("k", [1, 3, 7, 40])
def test_exact_search_breaks_ties_by_lower_id(k):
    # One-hot rows give bit-exact equal scores; the tied group straddles the k-th place.
    rng = np.random.default_rng(k)
    for _ in range(30):
        basis = np.eye(4, dtype=np.float32)
        owners = rng.integers(0, 4, size=40)
        embeddings = basis[owners]
        ids, scores = exact_search(embeddings, basis[[0, 2]], k)
        for row, direction in enumerate((0, 2)):
            tied = np.flatnonzero(owners == direction).tolist()
            others = np.flatnonzero(owners != direction).tolist()
            assert ids[row].tolist() == (tied + others)[:k]
            assert scores[row].tolist() == [1.0] * min(k, len(tied)) + [0.0] * max(0, k - len(tied))


def test_k_larger_than_the_index_and_empty_k():
    index = make_index(count=4)
    ids, scores = index.search(unit_rows(2, seed=9), 10, exact=True)
    assert ids.shape == (2, 4) and sorted(ids[0].tolist()) == [0, 1, 2, 3]
    ids, _ = index.search(unit_rows(1), 0)
    assert ids.shape == (1, 0)


def test_shape_mismatch_is_refused():
    with pytest.raises(BadIndex, match="does not match 3 items"):
        Index(INFO, "/", [Item("a.jpg", "x")] * 3, unit_rows(2))


@pytest.fixture()
def saved(tmp_path) -> Path:
    make_index().save(tmp_path / "idx")
    return tmp_path / "idx"


def test_format_version_change_is_refused(saved):
    rewrite_manifest(saved, lambda m: m.update(format_version=3))
    with pytest.raises(BadIndex, match=r"format version 3 is not supported .*re-index"):
        Index.load(saved)


def test_dim_in_manifest_that_disagrees_with_the_files_is_refused(saved):
    def halve_dim(manifest):
        manifest["dim"] = manifest["model"]["dim"] = DIM // 2

    rewrite_manifest(saved, halve_dim)
    with pytest.raises(BadIndex, match=r"manifest says 60 x 8"):
        Index.load(saved)


@pytest.mark.parametrize(
    "other, shown",
    [
        (replace(INFO, model_id="other-model"), "encoder is other-model"),
        (replace(INFO, weights_sha256="cd" * 32), "weights cdcdcdcdcdcd"),
        (replace(INFO, dim=DIM * 2), "dim 32"),
    ],
)
def test_check_model_refuses_another_model(saved, other, shown):
    index = Index.load(saved)
    index.check_model(INFO)  # the same model passes
    with pytest.raises(BadIndex, match="index was built with test-model") as caught:
        index.check_model(other)
    assert shown in str(caught.value) and "re-index" in str(caught.value)


def test_truncated_embeddings_are_refused(saved):
    path = live_version(saved) / EMBEDDINGS
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(BadIndex, match=rf"damaged index, {EMBEDDINGS} has \d+ bytes, the manifest says"):
        Index.load(saved)


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", [HNSW, EMBEDDINGS])
def test_a_flipped_byte_passes_the_cheap_load_but_not_verification(saved, name):
    # Documented limit of the default load: a changed byte that keeps the size is not seen.
    flip_a_byte(live_version(saved) / name)
    assert len(Index.load(saved)) == 60
    expected = f"{saved}: damaged index, {name} checksum mismatch (changed after it was written)"
    assert verify_index(saved) == [expected]
    with pytest.raises(BadIndex, match=rf"damaged index, {name} checksum mismatch"):
        Index.load(saved, verify=True)


def test_a_healthy_index_verifies_clean(saved):
    assert verify_index(saved) == []


def test_the_default_load_hashes_nothing_but_a_failing_check_names_the_changed_file(saved, monkeypatch):
    hashed = []
    real_sha256 = index_module.sha256_files

    def counting_sha256(paths):
        hashed.extend(path.name for path in paths)
        return real_sha256(paths)

    monkeypatch.setattr(index_module, "sha256_files", counting_sha256)
    Index.load(saved)
    assert hashed == []
    items = live_version(saved) / ITEMS
    items.write_bytes(b"x" * items.stat().st_size)  # same size: only the JSON parse fails
    with pytest.raises(BadIndex, match=rf"damaged index, {ITEMS} checksum mismatch"):
        Index.load(saved)
    assert sorted(hashed) == sorted(ALL_FILES)


def test_loaded_embeddings_are_a_read_only_mapping_that_searches_like_the_original(saved):
    original = make_index()
    loaded = Index.load(saved)
    assert not loaded.embeddings.flags.writeable and not loaded.embeddings.flags.owndata
    with pytest.raises(ValueError, match="read-only"):
        loaded.embeddings[0, 0] = 1.0
    queries = unit_rows(4, seed=7)
    np.testing.assert_array_equal(loaded.embeddings @ queries[0], original.embeddings @ queries[0])
    for exact in (True, False):
        expected_ids, _ = original.search(queries, 5, exact=exact)
        np.testing.assert_array_equal(loaded.search(queries, 5, exact=exact)[0], expected_ids)


def test_missing_current_is_refused(saved):
    (saved / CURRENT).unlink()
    with pytest.raises(BadIndex, match=r"not a fastret index \(no CURRENT file\)"):
        Index.load(saved)


def test_current_naming_a_missing_version_is_refused(saved):
    (saved / CURRENT).write_text("v-gone\n")
    with pytest.raises(BadIndex, match="CURRENT names a missing version"):
        Index.load(saved)


@pytest.mark.parametrize(
    "garbage, reason",
    [
        (b"\x00\xffnot json{", "manifest.json is not valid JSON"),  # not even UTF-8
        (b'{"format_version": 1, "count": ', "manifest.json is not valid JSON"),
        (b"[1, 2, 3]", "format version None is not supported"),
        (b'{"format_version": 1, "count": 60}', "manifest.json lacks files, model, dim, root, hnsw, created"),
    ],
)
def test_garbage_manifest_is_refused(saved, garbage, reason):
    (live_version(saved) / MANIFEST).write_bytes(garbage)
    with pytest.raises(BadIndex, match=reason):
        Index.load(saved)


def test_missing_index_says_how_to_build_one(tmp_path):
    with pytest.raises(BadIndex, match=r"no index here; build one with `fastret index DIR`"):
        Index.load(tmp_path / "nowhere")


def test_refuses_to_write_into_a_foreign_folder(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(BadIndex, match="folder is not empty and is not a fastret index"):
        make_index().save(tmp_path / "photos")
    assert sorted(p.name for p in (tmp_path / "photos").iterdir()) == ["holiday.jpg"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(BadIndex, match="exists and is not a directory"):
        make_index().save(tmp_path / "file")


# A child process starts saving a new version and stops at a hook point, where the test kills it.
CHILD = textwrap.dedent(
    """
    import os, sys, time
    import numpy as np
    import fastret.engine.index as index_module
    from fastret.engine.index import Index

    hook = os.environ["FASTRET_TEST_KILL_AT"]

    def stop_here():
        print("AT-HOOK", flush=True)
        time.sleep(60)

    if hook == "np.save":
        real_save = np.save

        def save_then_stop(path, array, *args, **kwargs):
            real_save(path, array, *args, **kwargs)
            stop_here()

        index_module.np.save = save_then_stop
    else:  # after the new version is renamed into place, before CURRENT points at it
        real_write = index_module.write_text_atomic

        def stop_then_write(path, text):
            stop_here()
            real_write(path, text)

        index_module.write_text_atomic = stop_then_write

    index = Index.load(sys.argv[1])
    index.embeddings = -index.embeddings
    index.hnsw = None
    index.save(sys.argv[1])
    """
)


def kill_at_hook(argv: list[str], env: dict[str, str]) -> None:
    """Run a child until it prints AT-HOOK, then SIGKILL it there."""
    child = subprocess.Popen(argv, env={**os.environ, **env}, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "AT-HOOK"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL


@pytest.mark.parametrize("hook", ["np.save", "rename"])
def test_sigkill_while_saving_leaves_the_previous_index(tmp_path, hook):
    index_dir = tmp_path / "idx"
    original = make_index()
    original.save(index_dir)
    queries = unit_rows(3, seed=4)
    expected_ids, _ = original.search(queries, 5)
    kill_at_hook([sys.executable, "-c", CHILD, str(index_dir)], {"FASTRET_TEST_KILL_AT": hook})
    # The half-written version is on disk, but CURRENT still names the old one.
    assert len([p for p in index_dir.iterdir() if p.is_dir()]) == 2
    loaded = Index.load(index_dir)
    np.testing.assert_array_equal(loaded.embeddings, original.embeddings)
    np.testing.assert_array_equal(loaded.search(queries, 5)[0], expected_ids)
    # The next save succeeds and cleans the debris up.
    make_index(count=10, seed=8).save(index_dir)
    assert len([p for p in index_dir.iterdir() if p.is_dir()]) == 1
    assert len(Index.load(index_dir)) == 10


def set_files(files):
    return lambda manifest: manifest.update(files=files)


def change_listed(name, **change):
    return lambda manifest: manifest["files"].setdefault(name, {}).update(change)


@pytest.mark.parametrize(
    "change, reason",
    [
        (set_files(None), "files is NoneType, not a table of files"),
        (set_files([EMBEDDINGS, ITEMS, HNSW]), "files is list, not a table of files"),
        (set_files({}), f"files does not list {', '.join(ALL_FILES)}"),  # no silent skip
        (lambda manifest: manifest["files"].pop(HNSW), f"files does not list {HNSW}"),
        (lambda manifest: manifest["files"].update({HNSW: "ok"}), f"bad entry for '{HNSW}'"),
        (change_listed(EMBEDDINGS, bytes="5760"), f"bad entry for '{EMBEDDINGS}'"),
        (change_listed(ITEMS, sha256=None), f"bad entry for '{ITEMS}'"),
        (change_listed("../../x", bytes=1, sha256=""), r"bad entry for '\.\./\.\./x'"),
        (lambda manifest: manifest.update(count="60"), "count is '60', not a non-negative integer"),
        (lambda manifest: manifest.update(dim=-1), "dim is -1, not a non-negative integer"),
        (lambda manifest: manifest.update(encoder=["not", "a", "table"]), "encoder is not a table"),
        (lambda manifest: manifest["hnsw"].update(M="8"), "hnsw parameters .* are not positive integers"),
    ],
)
def test_damaged_manifest_is_refused(saved, change, reason):
    rewrite_manifest(saved, change)
    with pytest.raises(BadIndex, match=reason):
        Index.load(saved)
    assert re.search(reason, verify_index(saved)[0])


@pytest.mark.parametrize(
    "pointer, reason",
    [
        (b"\xff\xfe\x00v-\x80\n", r"CURRENT: damaged index, CURRENT is not text; re-index"),
        (b"../elsewhere\n", r"CURRENT names '../elsewhere', not a version"),
        (b"\n", r"CURRENT names '', not a version"),
    ],
)
def test_damaged_current_is_refused_naming_the_file(saved, pointer, reason):
    (saved / CURRENT).write_bytes(pointer)
    with pytest.raises(BadIndex, match=reason) as caught:
        Index.load(saved)
    assert str(caught.value).startswith(str(saved / CURRENT))


def test_an_unreadable_version_is_refused_with_what_to_do(saved, monkeypatch):
    # Root reads anything, so the refusal of the file system is simulated where Python opens files.
    version = live_version(saved)
    real_open = Path.open

    def refusing_open(path, *args, **kwargs):
        if path.parent == version:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(Path, "open", refusing_open)
    advice = r"permission denied reading the index; ask its owner .*chmod -R a\+rX"
    with pytest.raises(BadIndex, match=rf"{MANIFEST}: {advice}"):
        Index.load(saved)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads unreadable directories")
def test_an_unreadable_version_directory_is_refused(saved):
    version = live_version(saved)
    version.chmod(0)
    try:
        with pytest.raises(BadIndex, match="permission denied reading the index"):
            Index.load(saved)
    finally:
        version.chmod(0o755)


def test_a_load_racing_a_writer_retries_with_the_new_version(saved, monkeypatch):
    # The interleaving: the loader reads CURRENT and the manifest, then a writer makes a new
    # version live and deletes the old one before the loader opens the other files.
    newer = make_index(count=30, seed=6)
    real_read_manifest = index_module.read_manifest
    read = []

    def read_then_a_writer_switches(version):
        manifest = real_read_manifest(version)
        if not read:
            newer.save(saved)
            assert not version.exists()
        read.append(version.name)
        return manifest

    monkeypatch.setattr(index_module, "read_manifest", read_then_a_writer_switches)
    loaded = Index.load(saved)
    np.testing.assert_array_equal(loaded.embeddings, newer.embeddings)
    assert read[1] == live_version(saved).name == loaded.version_dir.name != read[0]


# hnswlib's saveIndex header: where each field is and how it is packed (little-endian).
HNSW_HEADER_FIELDS = {
    "offsetLevel0": (0, "<Q"),
    "max_elements": (8, "<Q"),
    "cur_element_count": (16, "<Q"),
    "size_data_per_element": (24, "<Q"),
    "label_offset": (32, "<Q"),
    "offsetData": (40, "<Q"),
    "maxlevel": (48, "<i"),
    "enterpoint_node": (52, "<I"),
    "maxM": (56, "<Q"),
    "maxM0": (64, "<Q"),
    "M": (72, "<Q"),
    "mult": (80, "<d"),
    "ef_construction": (88, "<Q"),
}

LOAD_AND_SEARCH = textwrap.dedent(
    """
    import sys
    import numpy as np
    from fastret.engine.index import BadIndex, Index

    try:
        index = Index.load(sys.argv[1])
        index.search(np.full((1, index.model.dim), index.model.dim ** -0.5, np.float32), 5)
    except BadIndex as exc:
        print(exc)
        sys.exit(3)
    print("LOADED")
    """
)


@pytest.mark.parametrize(
    "name, value",
    [
        ("offsetLevel0", 1 << 20),  # these five crash hnswlib (SIGSEGV) if it is handed the file
        ("label_offset", 1 << 30),
        ("offsetData", 1 << 30),
        ("enterpoint_node", 10**6),
        ("maxM", 1 << 20),
        ("max_elements", 59),
        ("cur_element_count", 59),
        ("size_data_per_element", 100),
        ("maxlevel", 10**6),
        ("maxM0", 1 << 20),
        ("M", 0),
        ("mult", -1.0),
        ("ef_construction", 0),
    ],
)
def test_a_graph_with_a_bad_header_and_a_matching_checksum_is_refused_not_crashed(saved, name, value):
    path = live_version(saved) / HNSW
    data = bytearray(path.read_bytes())
    offset, packing = HNSW_HEADER_FIELDS[name]
    struct.pack_into(packing, data, offset, value)
    path.write_bytes(bytes(data))
    rewrite_manifest(saved, change_listed(HNSW, bytes=len(data), sha256=hashlib.sha256(data).hexdigest()))
    child = subprocess.run(
        [sys.executable, "-c", LOAD_AND_SEARCH, str(saved)], capture_output=True, text=True, timeout=60
    )
    assert child.returncode == 3, f"exit {child.returncode}: {child.stdout}{child.stderr}"
    assert "damaged HNSW graph, its header disagrees with the manifest" in child.stdout
    assert f"{name} is " in child.stdout
