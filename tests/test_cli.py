"""`fastret index` / `fastret search` end to end: bad files skipped, output format, exit codes."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastret.cli.main import main
from fastret.engine.index import Index

HIT_LINE = re.compile(r"^(\d+)\. (\S+) - (Similarity Score|Re-ranked Score|Probability): (\d+\.\d\d)$")
QUERY = "buildings/299.jpg"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def parse_hits(out: str) -> list[tuple[int, str, str, float]]:
    header, *lines = out.strip().splitlines()
    assert header == f"Top {len(lines)} most similar images:"
    hits = []
    for line in lines:
        match = HIT_LINE.match(line)
        assert match, line
        hits.append((int(match[1]), match[2], match[3], float(match[4])))
    assert [rank for rank, *_ in hits] == list(range(1, len(hits) + 1))
    return hits


def json_results(capsys, *argv: str) -> list[dict]:
    code, out, _ = run(capsys, "search", *argv, "--json")
    assert code == 0
    return json.loads(out)["results"]


@pytest.fixture()
def mixed_folder(tmp_path, bad_images, odd_mode_images) -> tuple[Path, list[str], dict[str, str]]:
    """Good photos in two classes, odd-mode images, and one broken file of each kind."""
    root = tmp_path / "gallery"
    rng = np.random.default_rng(7)
    good = []
    for i in range(4):
        path = root / f"class{i % 2}" / f"photo{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)).save(path, quality=90)
        good.append(path.relative_to(root).as_posix())
    (root / "odd").mkdir()
    for name, (path, _) in odd_mode_images.items():
        shutil.copy(path, root / "odd" / name)
        good.append(f"odd/{name}")
    (root / "bad").mkdir()
    for name, (path, _) in bad_images.items():
        shutil.copy(path, root / "bad" / name)
    return root, sorted(good), {f"bad/{name}": fragment for name, (_, fragment) in bad_images.items()}


def test_index_skips_each_bad_file_with_its_reason(mixed_folder, tmp_path, capsys, bundled_onnx):
    root, good, bad = mixed_folder
    code, out, err = run(capsys, "index", root, "--model", "efficientnet-lite2", "--out", tmp_path / "idx", "-q")
    assert code == 0, err
    assert out == ""
    skipped = [line for line in err.splitlines() if line.startswith("skipped ")]
    assert len(skipped) == len(bad)
    for relative, fragment in bad.items():
        (line,) = [line for line in skipped if line.startswith(f"skipped {root.resolve() / relative}: ")]
        assert fragment in line
    assert f"indexed {len(good)} images, skipped {len(bad)}" in err
    index = Index.load(tmp_path / "idx")
    assert sorted(item.path for item in index.items) == good
    assert {item.label for item in index.items} == {"class0", "class1", "odd"}
    # Searching with an indexed file finds the others, never itself.
    hits = json_results(capsys, root / "class0" / "photo0.jpg", "--index", tmp_path / "idx", "-k", "3")
    assert len(hits) == 3 and "class0/photo0.jpg" not in [hit["path"] for hit in hits]


def test_index_of_a_folder_with_only_bad_files_fails(tmp_path, bad_images, capsys, bundled_onnx):
    for name, (path, _) in bad_images.items():
        shutil.copy(path, tmp_path / name)
    code, _, err = run(capsys, "index", tmp_path, "--model", "efficientnet-lite2", "--out", tmp_path / "idx", "-q")
    assert code == 1
    assert err.splitlines()[-1] == f"fastret: error: no image in {tmp_path} could be indexed ({len(bad_images)} skipped)"
    assert not (tmp_path / "idx" / "CURRENT").exists()  # at most the writer lock file was made


def test_index_refuses_a_foreign_output_folder(tmp_path, capsys, bundled_onnx):
    (tmp_path / "photos").mkdir()
    Image.new("RGB", (40, 40)).save(tmp_path / "photos" / "a.png")
    code, _, err = run(capsys, "index", tmp_path / "photos", "--model", "efficientnet-lite2", "--out", tmp_path / "photos", "-q")
    assert code == 2
    assert err.splitlines()[-1].startswith("fastret: error: ") and "is not a fastret index" in err


def test_search_with_a_missing_index_exits_2_with_one_line(tmp_path, capsys):
    code, out, err = run(capsys, "search", tmp_path / "q.jpg", "--index", tmp_path / "nowhere")
    assert code == 2 and out == ""
    assert err == f"fastret: error: {tmp_path / 'nowhere'}: no index here; build one with `fastret index DIR`\n"


def test_search_with_a_missing_index_as_a_process(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "fastret.cli.main", "search", str(tmp_path / "q.jpg"), "--index", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and done.stdout == ""
    assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith("fastret: error: ")


# --- end to end on wang1k -------------------------------------------------------------------


@pytest.mark.data
def test_a_search_process_delivers_all_its_output_before_it_ends(wang1k_index, wang1k):
    """The program ends a search's process without the interpreter's teardown: every byte of a long
    piped answer must still arrive, and the exit status must be the command's."""
    query = wang1k / "buildings" / "299.jpg"
    command = [sys.executable, "-m", "fastret.cli.main", "search", str(query), "--index", str(wang1k_index)]
    buffered = {name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"}
    done = subprocess.run([*command, "-k", "1000"], capture_output=True, text=True, timeout=120, env=buffered)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()  # one print a line: the last ones sit in stdout's buffer at the end
    assert lines[0] == "Top 999 most similar images:" and lines[-1].startswith("999. ") and done.stdout.endswith("\n")
    refused = subprocess.run([*command, "--score", "softmax"], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and refused.stdout == "" and "add --no-rerank" in refused.stderr



@pytest.mark.data
def test_wang1k_index_holds_every_photo(wang1k_index):
    index = Index.load(wang1k_index)
    assert len(index) == 1000
    assert sorted(set(index.labels)) == [
        "africans", "beach", "buildings", "buses", "dinosaurs", "elephants", "flowers", "food", "horses", "mountains",
    ]
    np.testing.assert_allclose(np.linalg.norm(index.embeddings, axis=1), 1.0, atol=1e-4)


@pytest.mark.data
def test_search_prints_ten_buildings(wang1k, wang1k_index, capsys):
    code, out, _ = run(capsys, "search", wang1k / QUERY, "--index", wang1k_index)
    assert code == 0
    hits = parse_hits(out)
    assert len(hits) == 10
    assert all(label == "Re-ranked Score" for _, _, label, _ in hits)  # re-ranking is on by default
    paths = [path for _, path, _, _ in hits]
    assert all(path.startswith("buildings/") for path in paths), paths
    assert QUERY not in paths  # the query itself is excluded by default
    scores = [score for *_, score in hits]
    assert scores == sorted(scores, reverse=True) and 0 < scores[-1] and scores[0] < 1


@pytest.mark.data
def test_include_self_keeps_the_query_first(wang1k, wang1k_index, capsys):
    code, out, _ = run(capsys, "search", wang1k / QUERY, "--index", wang1k_index, "--include-self")
    hits = parse_hits(out)
    assert code == 0 and len(hits) == 10 and hits[0][1] == QUERY
    code, out, _ = run(capsys, "search", wang1k / QUERY, "--index", wang1k_index, "--include-self", "--no-rerank")
    hits = parse_hits(out)
    assert code == 0 and hits[0][1] == QUERY and hits[0][3] == 1.0 and hits[0][2] == "Similarity Score"


@pytest.mark.data
def test_json_softmax_and_exact(wang1k, wang1k_index, capsys):
    query = wang1k / QUERY
    hnsw = json_results(capsys, query, "--index", wang1k_index)
    assert len(hnsw) == 10 and [hit["rank"] for hit in hnsw] == list(range(1, 11))
    assert set(hnsw[0]) == {"rank", "id", "path", "path_bytes_b64", "label", "score"}
    assert all(hit["label"] == "buildings" for hit in hnsw)
    exact = json_results(capsys, query, "--index", wang1k_index, "--exact")
    assert [hit["path"] for hit in exact] == [hit["path"] for hit in hnsw]
    np.testing.assert_allclose([h["score"] for h in exact], [h["score"] for h in hnsw], atol=1e-4)
    softmax = json_results(capsys, query, "--index", wang1k_index, "--score", "softmax", "--no-rerank")
    probabilities = [hit["score"] for hit in softmax]
    assert all(0 < p <= 1 for p in probabilities) and sum(probabilities) <= 1 + 1e-6
    assert probabilities == sorted(probabilities, reverse=True)
    code, out, _ = run(capsys, "search", query, "--index", wang1k_index, "--score", "softmax", "--no-rerank")
    assert code == 0 and all(label == "Probability" for _, _, label, _ in parse_hits(out))


@pytest.mark.data
def test_unreadable_query_is_a_one_line_error_naming_it(wang1k_index, bad_images, capsys):
    path, fragment = bad_images["text.png"]
    code, out, err = run(capsys, "search", path, "--index", wang1k_index)
    assert code == 2 and out == ""
    assert err.splitlines()[-1] == f"fastret: error: {path}: not an image (unrecognised format)"


@pytest.mark.data
def test_leave_one_out_precision_at_10(wang1k_index):
    index = Index.load(wang1k_index)
    similarities = index.embeddings @ index.embeddings.T
    np.fill_diagonal(similarities, -np.inf)
    top10 = np.argsort(-similarities, axis=1, kind="stable")[:, :10]
    labels = index.labels
    precision = float((labels[top10] == labels[:, None]).mean())
    assert precision >= 0.97, precision


# --- the index writer through the CLI -------------------------------------------------------


def test_index_into_a_foreign_folder_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    import fastret.cli.main as cli

    monkeypatch.setattr(cli, "open_encoder", lambda *a, **k: pytest.fail("the encoder was opened"))
    (tmp_path / "gallery").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    code, _, err = run(capsys, "index", tmp_path / "gallery", "--out", tmp_path / "out")
    assert code == 2 and "not a fastret index; choose another --out" in err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["notes.txt"]


def test_index_of_a_missing_folder_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    import fastret.cli.main as cli

    monkeypatch.setattr(cli, "open_encoder", lambda *a, **k: pytest.fail("the encoder was opened"))
    code, _, err = run(capsys, "index", tmp_path / "absent", "--out", tmp_path / "out")
    assert code == 2 and err.strip() == f"fastret: error: {tmp_path / 'absent'}: not a directory"


def test_a_second_writer_with_no_wait_fails_at_once(tmp_path, capsys):
    """Another process holds the index's writer lock: `fastret index --no-wait` exits 2 naming it."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom fastret.engine.index import index_writer_lock\n"
         "with index_writer_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(60)", str(tmp_path / "x")],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        (tmp_path / "gallery").mkdir()
        code, _, err = run(capsys, "index", tmp_path / "gallery", "--out", tmp_path / "x", "--no-wait")
        assert code == 2 and f"another fastret writer (pid {holder.pid}) is writing this index" in err
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.data
def test_verify_finds_a_flipped_byte_that_loading_does_not_read(wang1k_index, tmp_path, capsys):
    copy = tmp_path / "index"
    shutil.copytree(wang1k_index, copy)
    assert run(capsys, "verify", copy)[0] == 0
    embeddings = Index.load(copy).version_dir / "seg-000000.npy"  # the embeddings of its one segment
    data = bytearray(embeddings.read_bytes())
    data[-5] ^= 0xFF
    embeddings.write_bytes(bytes(data))
    code, out, err = run(capsys, "verify", copy)
    assert code == 1 and "seg-000000.npy" in out and "rebuild it with `fastret index" in err


def test_hidden_files_are_left_out_unless_asked_for(tmp_path, capsys, bundled_onnx):
    rng = np.random.default_rng(3)
    root = tmp_path / "gallery"
    for relative in ("a/shown.jpg", "a/.hidden.jpg", ".thumbnails/t.jpg", "a/._shown.jpg"):
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / relative)
    (root / "a" / "gone.jpg").symlink_to(tmp_path / "missing.jpg")
    argv = ["index", root, "--backend", "onnxruntime", "--model", "efficientnet-lite2", "-q"]
    code, _, err = run(capsys, *argv, "--out", tmp_path / "plain")
    assert code == 0 and [item.path for item in Index.load(tmp_path / "plain").items] == ["a/shown.jpg"]
    assert f"skipped {root / 'a' / 'gone.jpg'}: " in err and "skipped 1," in err  # the dangling link is counted
    code, _, _ = run(capsys, *argv, "--out", tmp_path / "all", "--include-hidden")
    assert code == 0 and len(Index.load(tmp_path / "all")) == 4
