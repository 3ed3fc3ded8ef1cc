"""Evaluation: the embeddings seam, the `fastret eval` CLI, and the scaled-set generator."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastret.cli.main import main
from fastret.engine.evaluation import evaluate_embeddings, index_search
from fastret.engine.index import HnswParams, Index, Item, build_hnsw

REPO = Path(__file__).resolve().parents[1]


def _unit(rows) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


# Two tight clusters plus one stray "a" that sits next to the "b" cluster.
DB = _unit([[1, 0.0], [1, 0.1], [1, 0.2], [0.1, 1], [0.0, 1], [0.2, 1]])
LABELS = ["a", "a", "a", "b", "b", "b"]


def test_leave_one_out_on_embeddings_by_hand():
    result = evaluate_embeddings(DB, LABELS, None, None, ks=[1, 2])
    assert result["queries"] == 6 and result["ks"] == [1, 2]
    assert result["overall"]["P@1"] == 1.0 and result["overall"]["P@2"] == 1.0
    assert result["overall"]["R@2"] == 1.0 and result["overall"]["mAP"] == 1.0
    assert set(result["per_class"]) == {"a", "b"}


def test_split_on_embeddings_by_hand():
    # query "a" at the "b" cluster: ranks b, b, b, then a, a, a -> P@1 0, AP = (1/4 + 2/5 + 3/6) / 3
    queries = _unit([[0.05, 1], [1, 0.05]])
    result = evaluate_embeddings(DB, LABELS, queries, ["a", "a"], ks=[1, 3])
    assert result["per_class"]["a"]["P@1"] == 0.5
    assert result["overall"]["R@3"] == pytest.approx(0.5, abs=1e-6)
    expected_ap = ((1 / 4 + 2 / 5 + 3 / 6) / 3 + 1.0) / 2
    assert result["overall"]["mAP"] == pytest.approx(expected_ap, abs=1e-6)


def test_k_larger_than_database_is_dropped_or_refused():
    result = evaluate_embeddings(DB, LABELS, None, None, ks=[1, 10])
    assert result["ks"] == [1] and "P@10" not in result["overall"]
    with pytest.raises(ValueError, match="larger than"):
        evaluate_embeddings(DB, LABELS, None, None, ks=[6])


def test_hnsw_search_seam_matches_exact_on_a_small_set():
    rng = np.random.default_rng(1)
    embeddings = _unit(rng.normal(size=(200, 16)))
    labels = [str(i % 4) for i in range(200)]
    from fastret.engine.encoders import ModelInfo
    from fastret.engine.decode import Preprocessing

    info = ModelInfo("test", "0" * 64, 16, Preprocessing(8, 8, "bilinear", (0.0,) * 3, (1.0,) * 3))
    index = Index(info, "/nowhere", [Item(f"{i}.jpg", labels[i]) for i in range(200)], embeddings)
    index.hnsw = build_hnsw(embeddings, HnswParams(ef_search=200))
    exact = evaluate_embeddings(embeddings, labels, None, None, ks=[5])
    approximate = evaluate_embeddings(embeddings, labels, None, None, ks=[5], search=index_search(index))
    assert approximate["overall"] == exact["overall"]


@pytest.mark.data
def test_eval_cli_leave_one_out_on_animals10(animals10, bundled_onnx, tmp_path, capsys):
    out = tmp_path / "eval.json"
    code = main(
        ["eval", "--db", str(animals10), "--leave-one-out", "--model", "efficientnet-lite2",
         "--backend", "onnxruntime", "-k", "1", "10", "--json", str(out)]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "P@10" in printed and "mAP" in printed and "butterfly" in printed
    result = json.loads(out.read_text())
    assert result["protocol"] == "leave-one-out" and result["queries"] == 320
    assert len(result["per_class"]) == 10
    assert result["overall"]["P@10"] > 0.7  # random ranking: about 0.1
    # recall@10 = hits / 31, precision@10 = hits / 10 for every query of this balanced set
    assert result["overall"]["R@10"] == pytest.approx(result["overall"]["P@10"] * 10 / 31, abs=1e-5)
    assert set(result["seconds"]) == {"model_load", "database_embedding", "rerank_prepare", "search"}


def test_eval_cli_needs_a_protocol(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--db", "somewhere"])
    assert "--queries" in capsys.readouterr().err


# --- the scaled set -------------------------------------------------------------------------------


@pytest.fixture
def tiny_source(tmp_path) -> Path:
    """2 classes x 10 small random photos named 0..9."""
    rng = np.random.default_rng(0)
    root = tmp_path / "src"
    for label in ("cats", "dogs"):
        (root / label).mkdir(parents=True)
        for i in range(10):
            pixels = rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / label / f"{i}.jpg", quality=90)
    return root


def _make(src: Path, out: Path, workers: int) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO / "benchmarks" / "make_scaled_set.py"), "--src", str(src), "--out", str(out),
               "--db", "40", "--queries", "6", "--seed", "7", "--query-every", "5", "--workers", str(workers)]
    return subprocess.run(command, capture_output=True, text=True, check=True)


def _digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*.jpg")}


def test_make_scaled_set_counts_labels_disjoint_and_deterministic(tiny_source, tmp_path):
    first = _make(tiny_source, tmp_path / "one", workers=2)
    assert "augmented" in first.stdout
    _make(tiny_source, tmp_path / "two", workers=1)
    one, two = _digests(tmp_path / "one"), _digests(tmp_path / "two")
    assert one == two  # same seed -> same bytes, whatever the number of processes

    db = [Path(p) for p in one if p.startswith("db/")]
    queries = [Path(p) for p in one if p.startswith("queries/")]
    assert len(db) == 40 and len(queries) == 6
    assert {p.parent.name for p in db} == {p.parent.name for p in queries} == {"cats", "dogs"}

    def source(path: Path) -> str:
        return f"{path.parent.name}/{path.stem.rsplit('_', 1)[0]}"

    # every 5th source of each class (sorted: 0, 5) is held out for queries, 8 per class feed the database
    assert {source(p) for p in queries} == {"cats/0", "cats/5", "dogs/0", "dogs/5"}
    assert not {source(p) for p in db} & {source(p) for p in queries}
    assert len({source(p) for p in db}) == 16

    manifest = json.loads((tmp_path / "one" / "scaled_set.json").read_text())
    assert manifest["seed"] == 7 and manifest["db_images"] == 40 and manifest["errors"] == []
    assert sorted(manifest["query_sources"]) == ["cats/0.jpg", "cats/5.jpg", "dogs/0.jpg", "dogs/5.jpg"]
    with Image.open(tmp_path / "one" / db[0]) as img:
        assert img.format == "JPEG"


def test_different_seeds_give_different_images(tiny_source, tmp_path):
    _make(tiny_source, tmp_path / "one", workers=1)
    command = [sys.executable, str(REPO / "benchmarks" / "make_scaled_set.py"), "--src", str(tiny_source), "--out",
               str(tmp_path / "other"), "--db", "40", "--queries", "6", "--seed", "8", "--query-every", "5"]
    subprocess.run(command, capture_output=True, check=True)
    assert _digests(tmp_path / "one") != _digests(tmp_path / "other")


@pytest.mark.slow
@pytest.mark.data
def test_ta_speed_runs_both_sides_on_a_small_limit(wang1k, tmp_path):
    scaled = tmp_path / "scaled"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "make_scaled_set.py"), "--src", str(wang1k), "--out",
                    str(scaled), "--per-class", "10", "--db", "60", "--queries", "10"], check=True, capture_output=True)
    out = tmp_path / "ta"
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "ta_speed.py"), "--db", str(scaled / "db"),
                          "--queries", str(scaled / "queries"), "--limit", "40", "--out", str(out)],
                         check=True, capture_output=True, text=True)
    assert "speed-up" in run.stdout
    summary = json.loads((out / "ta_speed.json").read_text())
    assert summary["limit"] == 40 and set(summary["speedup"]) >= {"db_embed", "queries", "total"}
    for side in ("baseline", "fastret"):
        result = summary["results"][side]
        assert result["db_images"] == 40 and result["query_images"] == 4
        assert 0.0 <= result["P@10"] <= 1.0 and result["peak_rss_mib"] > 0
        lists = sorted((out / side / "results").rglob("*.txt"))
        assert len(lists) == 4
        assert all(len(path.read_text().splitlines()) == 10 for path in lists)


def test_eval_cli_split_and_saved_index_with_a_tiny_model(tiny_source, tiny_clip_dir, tmp_path, capsys):
    """The split protocol through the CLI, then the same through a saved index (no data needed)."""
    common = ["--db", str(tiny_source), "--queries", str(tiny_source), "--backend", "torch", "-k", "1", "3"]
    out = tmp_path / "split.json"
    assert main(["eval", *common, "--model", str(tiny_clip_dir), "--exact", "--no-rerank", "--json", str(out)]) == 0
    split = json.loads(out.read_text())
    assert split["protocol"] == "split" and split["queries"] == 20 and split["db_images"] == 20
    assert split["search"] == "exact" and set(split["per_class"]) == {"cats", "dogs"}
    assert set(split["seconds"]) == {"model_load", "database_embedding", "query_embedding", "search"}
    assert split["overall"]["P@1"] == 1.0  # every query is in the database: it finds itself first

    assert main(["index", str(tiny_source), "--model", str(tiny_clip_dir), "--backend", "torch",
                 "--out", str(tmp_path / "index"), "-q"]) == 0
    out = tmp_path / "indexed.json"
    assert main(["eval", *common, "--index", str(tmp_path / "index"), "--exact", "--no-rerank", "--json", str(out)]) == 0
    indexed = json.loads(out.read_text())
    assert "index_load" in indexed["seconds"] and "database_embedding" not in indexed["seconds"]
    assert indexed["overall"] == split["overall"]

    assert main(["eval", "--db", str(tmp_path), "--leave-one-out", "--index", str(tmp_path / "index")]) == 2
    assert "the index was built from" in capsys.readouterr().err


def test_a_benchmark_side_reports_its_own_peak_memory_not_its_parents():
    """Regression: ru_maxrss survives fork + exec, so ta_speed's fastret side reported the 750 MiB
    its parent held after INT8 calibration; peak_rss_mib reads the process's own high-water mark."""
    held = np.ones(400 * 2**20 // 8)  # 400 MiB resident in this (parent) process
    code = f"import sys; sys.path.insert(0, {str(REPO / 'benchmarks')!r}); from common import peak_rss_mib; print(peak_rss_mib())"
    child_peak = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert held.sum() > 0 and 0 < child_peak < 300


def _benchmark_module(name: str):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


def test_e2e_latency_rotates_turns_and_takes_the_median_block_ratio():
    e2e = _benchmark_module("e2e_latency")
    sides = ["openvino", "torch", "baseline"]
    assert [e2e.turn_order(sides, n)[0] for n in range(4)] == ["openvino", "torch", "baseline", "openvino"]
    assert sorted(e2e.turn_order(sides, 5)) == sorted(sides)
    # A slow phase of the machine doubles both sides in block 2: the ratio stays 4 in every block.
    rows = [{"side": "openvino"}, {"side": "baseline"}]
    blocks = [{"openvino": 7.0, "baseline": 28.0}, {"openvino": 14.0, "baseline": 56.0}, {"openvino": 8.0, "baseline": 24.0}]
    e2e.add_speed_ups(rows, blocks)
    assert rows[0]["p50_speed_up"] == {"median_of_blocks": 4.0, "min_block": 3.0, "max_block": 4.0}
    assert rows[1]["p50_speed_up"]["median_of_blocks"] == 1.0


@pytest.mark.slow
@pytest.mark.data
def test_e2e_latency_interleaves_a_runtime_and_the_baseline(wang1k, tmp_path):
    out = tmp_path / "e2e"
    command = [sys.executable, str(REPO / "benchmarks" / "e2e_latency.py"), "--db", str(wang1k), "--db-limit", "20",
               "--queries", str(wang1k), "--n-queries", "6", "--block", "3", "--backends", "onnxruntime", "--out", str(out)]
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=600)
    result = json.loads((out / "e2e_latency.json").read_text())
    assert [row["side"] for row in result["results"]] == ["onnxruntime", "baseline"]
    assert all(row["queries"] == 6 for row in result["results"]) and len(result["block_p50_ms"]) == 2
    assert result["results"][1]["p50_speed_up"]["median_of_blocks"] == 1.0


@pytest.mark.data
def test_e2e_latency_ends_when_a_side_process_fails(wang1k, tmp_path):
    """Regression: the parent kept its copy of the child's pipe end, so a side that died (here on an
    unknown model) left the benchmark waiting forever instead of ending with an error."""
    command = [sys.executable, str(REPO / "benchmarks" / "e2e_latency.py"), "--db", str(wang1k), "--db-limit", "10",
               "--queries", str(wang1k), "--n-queries", "2", "--backends", "onnxruntime", "--model", "no-such-model",
               "--out", str(tmp_path / "e2e")]
    run = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert "the onnxruntime process stopped" in run.stderr and "unknown model 'no-such-model'" in run.stderr
