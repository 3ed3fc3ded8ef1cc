"""`fastret index` run again, `fastret add / remove / compact / watch`, from the command line.

Fast tests embed with the tiny random CLIP of conftest (exported to ONNX once per session); the
acceptance run on wang1k uses the bundled model and is marked slow."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastret.cli.main import main
from fastret.engine.index import Index, IndexState, live_version, verify_index


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    return code, out, err


def random_image(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture()
def gallery(tmp_path) -> Path:
    root = tmp_path / "gallery"
    for n in range(12):
        random_image(root / f"class{n % 3}" / f"{n}.png", seed=n)
    return root


@pytest.fixture()
def model_args(tiny_clip_dir) -> list:
    # fp32: dynamic INT8 scales activations per batch, so an image embedded in another batch moves a little
    return ["--model", tiny_clip_dir, "--backend", "onnxruntime", "--precision", "fp32", "-q"]


@pytest.fixture()
def indexed(gallery, tmp_path, model_args, capsys) -> Path:
    code, _, err = run(capsys, "index", gallery, "--out", tmp_path / "idx", *model_args)
    assert code == 0, err
    return tmp_path / "idx"


def paths_of(index_dir: Path) -> list[str]:
    return sorted(item.path for item in Index.load(index_dir).items)


def exact_paths(capsys, query: Path, index_dir: Path) -> list[str]:
    code, out, err = run(capsys, "search", query, "--index", index_dir, "--exact", "--json", "-k", "8")
    assert code == 0, err
    return [hit["path"] for hit in json.loads(out)["results"]]


def summary(err: str) -> str:
    (line,) = [line for line in err.splitlines() if line.startswith("added ")]
    return line.split(", skipped")[0]


def test_index_again_embeds_only_what_changed_and_matches_a_full_rebuild(gallery, indexed, tmp_path, model_args,
                                                                          capsys):
    for n in range(12, 15):
        random_image(gallery / "class3" / f"{n}.png", seed=n)
    (gallery / "class0" / "0.png").unlink()
    (gallery / "class1" / "1.png").unlink()
    random_image(gallery / "class2" / "2.png", seed=99)  # new contents under an indexed name
    code, _, err = run(capsys, "index", gallery, "--out", indexed, "-q")  # --model auto: the index's own
    assert code == 0, err
    assert summary(err) == "added 3, updated 1, removed 2, unchanged 9"
    code, _, err = run(capsys, "index", gallery, "--out", tmp_path / "full", "--full", *model_args)
    assert code == 0, err
    assert paths_of(indexed) == paths_of(tmp_path / "full")
    query = gallery / "class2" / "5.png"
    assert exact_paths(capsys, query, indexed) == exact_paths(capsys, query, tmp_path / "full")
    code, _, err = run(capsys, "index", gallery, "--out", indexed, "-q")
    assert summary(err) == "added 0, updated 0, removed 0, unchanged 13" and "unchanged, v-" in err


def test_full_rebuilds_and_continues_the_ids(gallery, indexed, model_args, capsys):
    last = int(Index.load(indexed).ids[-1])
    code, _, err = run(capsys, "index", gallery, "--out", indexed, "--full", *model_args)
    assert code == 0 and "indexed 12 images" in err
    assert Index.load(indexed).ids.tolist() == list(range(last + 1, last + 13))


@pytest.mark.parametrize(
    "change, message",
    [
        (["--model", "efficientnet-lite2"], "holds an index made with local:"),
        (["--precision", "int8"], "this run would embed with"),
        (["--no-draft"], "built with JPEG draft decoding"),
        (["--hnsw-m", "8"], "other HNSW parameters need a rebuild"),
        (["--elsewhere"], "holds an index of"),
    ],
)
def test_an_update_that_would_not_fit_is_refused_naming_full(gallery, indexed, tmp_path, capsys, change, message):
    random_image(gallery / "class0" / "new.png", seed=50)
    version = live_version(indexed)
    root = gallery
    if change == ["--elsewhere"]:
        root, change = tmp_path / "other", []
        random_image(root / "a" / "x.png", seed=51)
    code, _, err = run(capsys, "index", root, "--out", indexed, "-q", *change)
    assert code == 2, err
    assert message in err and "--full" in err
    assert live_version(indexed) == version


def test_add_files_under_the_root_or_copies_of_others(gallery, indexed, tmp_path, capsys):
    inside = random_image(gallery / "class0" / "added.png", seed=60)
    code, _, err = run(capsys, "add", indexed, inside, "-q")
    assert code == 0 and summary(err) == "added 1, updated 0, removed 0, unchanged 0"
    outside = random_image(tmp_path / "downloads" / "cat.png", seed=61)
    code, _, err = run(capsys, "add", indexed, outside)
    assert code == 2 and "not under the index root" in err and "--copy-into" in err
    code, _, err = run(capsys, "add", indexed, outside, "--copy-into", "cats", "-q")
    assert code == 0 and summary(err) == "added 1, updated 0, removed 0, unchanged 0"
    assert (gallery / "cats" / "cat.png").read_bytes() == outside.read_bytes()
    index = Index.load(indexed)
    assert {item.path: item.label for item in index.items}["cats/cat.png"] == "cats"
    code, _, err = run(capsys, "add", indexed, gallery / "class1", "-q")  # a folder: its changed files only
    assert code == 0 and summary(err) == "added 0, updated 0, removed 0, unchanged 4"


def test_remove_by_path_folder_or_id_and_report_what_is_not_there(gallery, indexed, capsys):
    index = Index.load(indexed)
    by_path = {item.path: int(index.ids[row]) for row, item in enumerate(index.items)}
    code, _, err = run(capsys, "remove", indexed, "class0/0.png", gallery / "class1" / "1.png",
                       "--id", by_path["class2/2.png"])
    assert code == 0 and "removed 3 ->" in err
    assert not {"class0/0.png", "class1/1.png", "class2/2.png"} & set(paths_of(indexed))
    code, _, err = run(capsys, "remove", indexed, "class1", "nothing/here.png", "--id", by_path["class0/0.png"])
    assert code == 1
    assert "not in the index: nothing/here.png" in err and f"not in the index: id {by_path['class0/0.png']}" in err
    assert not any(path.startswith("class1/") for path in paths_of(indexed)) and len(paths_of(indexed)) == 6
    assert verify_index(indexed) == []


def test_compact_rewrites_one_segment_and_keeps_the_items(gallery, indexed, capsys):
    random_image(gallery / "class0" / "x.png", seed=70)
    run(capsys, "add", indexed, gallery / "class0" / "x.png", "-q")
    run(capsys, "remove", indexed, "class1/1.png")
    before = Index.load(indexed)
    code, _, err = run(capsys, "compact", indexed)
    assert code == 0 and "-> one segment of 12 items and a fresh graph" in err
    after = Index.load(indexed)
    assert after.items == before.items and after.ids.tolist() == before.ids.tolist()
    assert len(IndexState.read(indexed).layout.segments) == 1


def index_process(gallery: Path, out: Path, tiny_clip_dir: Path) -> subprocess.Popen:
    argv = [sys.executable, "-m", "fastret.cli.main", "index", str(gallery), "--out", str(out), "--model",
            str(tiny_clip_dir), "--backend", "onnxruntime", "--precision", "fp32", "-q"]
    return subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)


def test_two_index_runs_on_one_index_at_once_both_finish_and_the_index_is_whole(gallery, tmp_path, tiny_clip_dir,
                                                                                 model_args, capsys):
    run(capsys, "index", gallery, "--out", tmp_path / "warm", *model_args)  # the export is made before the race
    runs = [index_process(gallery, tmp_path / "idx", tiny_clip_dir) for _ in range(2)]
    errors = [process.communicate(timeout=300)[1] for process in runs]
    assert [process.returncode for process in runs] == [0, 0], errors
    assert any("indexed 12 images" in err for err in errors), errors  # one built it
    assert any("added 0, updated 0, removed 0, unchanged 12" in err for err in errors), errors  # the other found it
    assert verify_index(tmp_path / "idx") == [] and len(Index.load(tmp_path / "idx")) == 12


def test_watch_follows_the_folder_and_ctrl_c_stops_it(gallery, indexed, tmp_path, tiny_clip_dir):
    argv = [sys.executable, "-m", "fastret.cli.main", "watch", str(gallery), "--out", str(indexed), "--debounce",
            "0.3", "-q"]
    watcher = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(line.rstrip("\n") for line in watcher.stderr), daemon=True)
    reader.start()

    def wait_for_line(predicate) -> None:
        started = time.monotonic()
        while not any(predicate(line) for line in list(lines)):
            assert watcher.poll() is None, f"watch ended: {lines}"
            assert time.monotonic() - started < 60, lines  # generous: the CLI flow is under test, not speed
            time.sleep(0.05)

    try:
        wait_for_line(lambda line: line.startswith("watching "))
        for n in range(3):
            random_image(gallery / "class4" / f"{n}.png", seed=80 + n)
        (gallery / "class0" / "0.png").unlink()
        wait_for_line(lambda line: line[:2].isdigit() and line.endswith(", 14 items)"))  # a batch line
    finally:
        watcher.send_signal(signal.SIGINT)
        try:
            watcher.wait(timeout=60)
        finally:
            if watcher.poll() is None:  # a watcher that ignored Ctrl-C must not outlive the test
                watcher.kill()
                watcher.wait()
        reader.join(timeout=60)
    assert watcher.returncode == 0, lines
    assert len(Index.load(indexed)) == 14 and "class0/0.png" not in paths_of(indexed)
    assert lines[-1].startswith("stopped watching ")
    assert verify_index(indexed) == []


# --- acceptance on real images ----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.data
def test_wang1k_edit_costs_a_fifth_of_a_full_index_and_matches_a_rebuild(wang1k, tmp_path):
    """980 images indexed; 20 more copied in and 10 deleted; `fastret index` again takes at most a
    fifth of the first run, says added 20 / removed 10, and --exact search for 299.jpg lists the
    same paths as a --full rebuild of the final folder."""
    files = sorted(wang1k.rglob("*.jpg"))
    assert len(files) == 1000
    held_back = [path for path in files if path.name != "299.jpg"][-20:]
    root = tmp_path / "wang"
    for path in files:
        if path not in held_back:
            target = root / path.relative_to(wang1k)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
    cache = {**os.environ, "FASTRET_CACHE": str(tmp_path / "cache")}

    def fastret(*argv) -> tuple[float, str]:
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "fastret.cli.main", *map(str, argv)], capture_output=True,
                              text=True, env=cache, timeout=1800)
        assert done.returncode == 0, done.stderr
        return time.perf_counter() - started, done.stderr + done.stdout

    model = ["--model", "efficientnet-lite2", "-q"]
    fastret("index", root, "--out", tmp_path / "warm", *model)  # the model's export and INT8 calibration, once
    first, _ = fastret("index", root, "--out", tmp_path / "idx", *model)
    for path in held_back:
        shutil.copy2(path, root / path.relative_to(wang1k))
    removed = [path for path in sorted(root.rglob("*.jpg")) if path.name != "299.jpg"][:10]
    for path in removed:
        path.unlink()
    again, log = fastret("index", root, "--out", tmp_path / "idx", "-q")
    assert "added 20, updated 0, removed 10, unchanged 970" in log
    assert again <= first / 5, (again, first)
    fastret("index", root, "--out", tmp_path / "full", "--full", *model)
    query = root / "buildings" / "299.jpg"
    found = []
    for index_dir in ("idx", "full"):
        _, out = fastret("search", query, "--index", tmp_path / index_dir, "--exact", "--json", "-k", "20")
        found.append([hit["path"] for hit in json.loads(out[out.index("{"):])["results"]])
    assert found[0] == found[1]
