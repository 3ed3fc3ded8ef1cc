"""What the speed benchmarks share: the task's files, result files, scoring, machine, memory, tables.

Imported as `common` by the scripts beside it (run as `python benchmarks/NAME.py`).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
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
