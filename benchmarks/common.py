"""What the speed benchmarks share: the task's files, result files, scoring, machine, memory, tables.

Imported as `common` by the scripts beside it (run as `python benchmarks/NAME.py`).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from fastret.engine.decode import list_images
from fastret.engine.encoders import default_threads
from fastret.engine.metrics import summarize

OUT = Path(__file__).resolve().parent / "out"
TOP_K = 10


def spread(paths: list[Path], limit: int | None) -> list[Path]:
    """At most `limit` paths, evenly spaced over the sorted list so that every class keeps some."""
    if limit is None or limit >= len(paths):
        return paths
    picks = np.linspace(0, len(paths) - 1, max(limit, 1)).round().astype(int)
    return [paths[i] for i in picks]


def limited_view(src: Path, limit: int, dest: Path) -> Path:
    """A folder of symlinks to `limit` images of src spread over its classes (class folders kept)."""
    src = src.resolve()
    for path in spread(list_images(src), limit):
        link = dest / path.relative_to(src)
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            link.symlink_to(path)
    return dest


def task_dirs(db: Path, queries: Path, limit: int | None, scratch: Path) -> tuple[Path, Path]:
    """The task's database and query folders; --limit N: views of N database and N // 10 query images."""
    if limit is None:
        return db.resolve(), queries.resolve()
    view = scratch / f"limit-{limit}"
    return limited_view(db, limit, view / "db"), limited_view(queries, max(1, limit // 10), view / "queries")


def write_results(
    out: Path, query_root: Path, query_paths: Sequence[Path], db_root: Path, db_paths: Sequence[Path],
    ids: np.ndarray, scores: np.ndarray,
) -> None:
    """One text file per query (its relative path + .txt): rank, database file, cosine score."""
    for query, row_ids, row_scores in zip(query_paths, ids, scores):
        target = out / (Path(query).relative_to(query_root).as_posix() + ".txt")
        target.parent.mkdir(parents=True, exist_ok=True)
        lines = [
            f"{rank}\t{Path(db_paths[i]).relative_to(db_root).as_posix()}\t{score:.4f}"
            for rank, (i, score) in enumerate(zip(row_ids, row_scores), start=1)
        ]
        target.write_text("\n".join(lines) + "\n")


def score_top_k(ids: np.ndarray, db_paths: Sequence[Path], query_paths: Sequence[Path]) -> dict:
    """P@10 and R@10 over the queries (label = parent folder), the course's definitions."""
    summary = summarize(
        ids, [Path(p).parent.name for p in db_paths], [Path(p).parent.name for p in query_paths], [TOP_K]
    )
    return {f"P@{TOP_K}": summary["overall"][f"P@{TOP_K}"], f"R@{TOP_K}": summary["overall"][f"R@{TOP_K}"]}


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB.

    Linux's VmHWM, not getrusage's ru_maxrss: a child keeps the ru_maxrss its parent had when it
    forked, even across exec, so a benchmark side started by a 750 MiB parent reported 750 MiB.
    """
    try:
        status = Path("/proc/self/status").read_text()
        return round(int(status.split("VmHWM:")[1].split()[0]) / 1024, 1)
    except (OSError, IndexError, ValueError):  # not Linux: the best the OS offers
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": default_threads(),
        "load_average_1m_5m_15m": [round(v, 2) for v in os.getloadavg()],  # other work on the machine
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain fixed-width table, first column left-aligned, the others right-aligned."""
    cells = [[str(h) for h in header]] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = []
    for n, row in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return "-" if value is None else str(value)


def leave_one_out_quality(embeddings: np.ndarray, labels: Sequence[str], query_rows: np.ndarray | None = None,
                          ranked: np.ndarray | None = None) -> dict:
    """P@10, R@10 and mAP (full ranking) of `query_rows` (default: every row) against all the other
    rows, label = class; `ranked` (Q, >= 10, self removed) scores another search's top 10 instead."""
    embeddings = np.asarray(embeddings, dtype=np.float32)
    labels = np.asarray(labels)
    rows = np.arange(len(embeddings)) if query_rows is None else np.asarray(query_rows)
    scores = embeddings[rows] @ embeddings.T
    scores[np.arange(len(rows)), rows] = -np.inf
    full = np.argsort(-scores, axis=1, kind="stable")[:, :-1]  # the query itself sorts last
    top = full[:, :TOP_K] if ranked is None else np.asarray(ranked)[:, :TOP_K]
    summary = summarize(top, labels, labels[rows], [TOP_K], leave_one_out=True, full_ranking=full)
    return {name: summary["overall"][name] for name in (f"P@{TOP_K}", f"R@{TOP_K}", "mAP")}


def query_quality(db: np.ndarray, db_labels: Sequence[str], queries: np.ndarray, query_labels: Sequence[str]) -> dict:
    """P@10, R@10 and mAP (full ranking) of separate query embeddings against a database, label = class."""
    full = np.argsort(-(np.asarray(queries, np.float32) @ np.asarray(db, np.float32).T), axis=1, kind="stable")
    summary = summarize(full[:, :TOP_K], np.asarray(db_labels), np.asarray(query_labels), [TOP_K], full_ranking=full)
    return {name: summary["overall"][name] for name in (f"P@{TOP_K}", f"R@{TOP_K}", "mAP")}


def timed_process(command: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one child process (its own rusage, via wait4)."""
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed with status {os.waitstatus_to_exitcode(status)}")
    return wall, usage.ru_maxrss / 1024
