"""What an edit of an index costs as it grows: time and bytes written for +10 / -10 images.

Synthetic indexes (`--synthetic N`): N random unit vectors of `--dim` dimensions, saved as one
version (the graph built with `--ef-construction`, low by default to keep the 1M build short: the
cost of an edit does not depend on the graph's quality). Then, in this process, through the engine
(IndexState.read + write, what `fastret add` / `remove` / `index` run after embedding):

- `edit`: `--repeats` edits of +10 new / -10 removed items, the graph kept (median shown);
- `graph`: the edit that takes the pending items into the graph (hnswlib replace_deleted);
- `compact`: a compaction (one segment, a fresh graph);
- `load`: Index.load after the edits (segments gathered into one array) and after compaction (mapped).

`--neighbours N`: why an edit changes the re-ranking rows it does, on N such vectors: the DBA
neighbourhoods found through a graph (as a fit above 50,000 items finds them) against exact ones
(their recall, and how often the stored 5th-neighbour similarity is too low), then `--repeats`
edits of +10 / -10 counted both ways: rows that lost a neighbour, rows a new item is nearer to than
their stored 5th, and rows whose exact 5 nearest a new item truly enters.

A real index (`--real DIR`): `fastret index DIR` once (full), then `--add` images (default 10)
copied in from `--pool` and `--remove` (default 10) deleted, and `fastret index DIR` again as a
fresh process, `--repeats` times.

Bytes written are the new version's files that are not hard links of the previous version's (and,
for in-process edits, the process's write() bytes from /proc/self/io).

    python benchmarks/make_scaled_set.py --src ../shared/data/wang1k --out /tmp/scaled
    python benchmarks/update_cost.py --real /tmp/scaled/db --pool /tmp/scaled/queries --work /tmp/uc
    python benchmarks/update_cost.py --synthetic 100000 --work /tmp/uc
    python benchmarks/update_cost.py --synthetic 1000000 --work /tmp/uc
    python benchmarks/update_cost.py --neighbours 100000 --work /tmp/uc   # ~5 min here, most of it the exact fit
    python benchmarks/update_cost.py --real /tmp/wang980 --pool /tmp/wang20 --add 20 --remove 10 --repeats 1 \
        --work /tmp/uc   # the acceptance check: wang1k less 20 images, then +20 / -10
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import OUT, machine, peak_rss_mib, table, write_json  # noqa: E402

from fastret.engine.decode import Preprocessing, list_images  # noqa: E402
from fastret.engine.encoders import ModelInfo  # noqa: E402
import fastret.engine.index as index_module  # noqa: E402
from fastret.engine.index import (  # noqa: E402
    Additions,
    HnswParams,
    Index,
    IndexState,
    Item,
    Sources,
    build_hnsw,
    live_version,
)

EDIT = 10


def index_bytes(version: Path) -> int:
    return sum(path.stat().st_size for path in version.iterdir())


def new_bytes(version: Path, previous_inodes: set[int]) -> int:
    """Bytes of the version's files that are not links of the previous version's."""
    return sum(path.stat().st_size for path in version.iterdir() if path.stat().st_ino not in previous_inodes)


def inodes(version: Path) -> set[int]:
    return {path.stat().st_ino for path in version.iterdir()}


def written_chars() -> int:
    """Bytes this process handed to write() so far (Linux /proc/self/io wchar)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    return 0


def unit_rows(count: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    rows = rng.standard_normal((count, dim), dtype=np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def synthetic_index(count: int, dim: int, params: HnswParams, index_dir: Path) -> float:
    """Save a synthetic index of `count` items; returns the build seconds (graph included)."""
    rng = np.random.default_rng(0)
    info = ModelInfo("synthetic", "0" * 64, dim, Preprocessing(224, 256, "bilinear", (0.0,) * 3, (1.0,) * 3))
    embeddings = np.empty((count, dim), np.float32)
    for start in range(0, count, 100_000):
        embeddings[start : start + 100_000] = unit_rows(min(100_000, count - start), dim, rng)
    items = [Item(f"c{i % 100:03d}/{i:07d}.jpg", f"c{i % 100:03d}") for i in range(count)]
    sizes = rng.integers(50_000, 500_000, count)
    digests = rng.integers(0, 256, (count, 32), dtype=np.uint8)
    sources = Sources(sizes, np.full(count, 1_700_000_000_000_000_000, np.int64), digests)
    started = time.perf_counter()
    index = Index(info, "/synthetic", items, embeddings, params, sources=sources, encoder={"synthetic": True})
    index.hnsw = build_hnsw(embeddings, params)
    index.save(index_dir)
    return time.perf_counter() - started


def timed_edit(index_dir: Path, added: int, removed: int, rng: np.random.Generator, *, compact: bool = False) -> dict:
    """One edit through the engine: read the live state, write +added / -removed."""
    before = live_version(index_dir)
    previous = inodes(before)
    rerank_before = rerank_of(before)
    wchar = written_chars()
    started = time.perf_counter()
    state = IndexState.read(index_dir)
    read_s = time.perf_counter() - started
    dim = state.model.dim
    stamp = state.layout.next_id
    additions = Additions(
        [Item(f"new/{stamp + i}.jpg", "new") for i in range(added)], unit_rows(added, dim, rng),
        Sources(np.full(added, 100_000, np.int64), np.full(added, 1, np.int64), rng.integers(0, 256, (added, 32), np.uint8)),
    )
    victims = rng.choice(state.ids, size=removed, replace=False) if removed else []
    changed_rows = []
    update_state = index_module.update_state

    def counted(*args):  # the re-ranking rows the edit changes, as the writer computes them
        updated, changed = update_state(*args)
        changed_rows.append(len(changed))
        return updated, changed

    index_module.update_state = counted
    try:
        written = state.write(additions, victims, compact=compact)
    finally:
        index_module.update_state = update_state
    seconds = time.perf_counter() - started
    return {
        "seconds": round(seconds, 3),
        "read_seconds": round(read_s, 3),
        "new_bytes": new_bytes(written.version, previous),
        "write_chars": written_chars() - wchar,
        "index_bytes": index_bytes(written.version),
        "graph": written.graph,
        "compacted": written.compacted,
        "rerank": {**rerank_of(written.version), "change": rerank_change(rerank_before, rerank_of(written.version)),
                   "changed_rows": changed_rows[0] if changed_rows else None},
    }


def rerank_of(version: Path) -> dict:
    """The version's re-ranking state in brief: its graph file, parts, and the rows outside its graph."""
    entry = json.loads((version / "manifest.json").read_text()).get("rerank") or {}
    if "parts" not in entry:
        return {}
    covered = entry["graph"].get("parts", 1)
    return {"graph": entry["graph"]["file"], "parts": len(entry["parts"]), "fitted": entry["fitted"],
            "pending_rows": sum(part["rows"] for part in entry["parts"][covered:])}


def rerank_change(before: dict, after: dict) -> str:
    """What an edit did to the re-ranking state: 'refit', 'graph taken in', or 'part added'."""
    if not after or after["fitted"] != before.get("fitted") or after["parts"] == 1:
        return "refit"
    return "graph taken in" if after["graph"] != before.get("graph") else "part added"


def timed_load(index_dir: Path) -> float:
    started = time.perf_counter()
    Index.load(index_dir)
    return round(time.perf_counter() - started, 3)


def run_synthetic(count: int, dim: int, params: HnswParams, work: Path, repeats: int) -> dict:
    index_dir = work / f"synthetic-{count}"
    if index_dir.exists():
        shutil.rmtree(index_dir)
    build_s = synthetic_index(count, dim, params, index_dir)
    rng = np.random.default_rng(1)
    edits = [timed_edit(index_dir, EDIT, EDIT, rng) for _ in range(repeats)]
    load_after_edits = timed_load(index_dir)
    state = IndexState.read(index_dir)
    pending = len(state.ids) - int(np.searchsorted(state.ids, state.layout.graph.id_bound))
    needed = int(0.011 * len(state.ids)) + 1 - pending  # enough additions for the graph to take them in
    graph = timed_edit(index_dir, max(needed, EDIT), EDIT, rng)
    compact = timed_edit(index_dir, 0, 0, rng, compact=True)
    return {
        "kind": "synthetic", "items": count, "dim": dim, "hnsw": asdict(params),
        "build_seconds": round(build_s, 1), "index_bytes": edits[0]["index_bytes"], "edits": edits,
        "load_seconds_after_edits": load_after_edits, "graph_edit": graph, "compact": compact,
        "load_seconds_after_compact": timed_load(index_dir), "peak_rss_mib": peak_rss_mib(),
    }


def neighbour_check(count: int, dim: int, params: HnswParams, repeats: int) -> dict:
    """Graph-found DBA neighbourhoods against exact ones, and the rows +10 / -10 edits change after each."""
    from fastret.engine.rerank import RECOMMENDED_RERANK, _graph_neighbours, fit_pca_whitening, nearest_others

    n, rng = RECOMMENDED_RERANK.dba_n, np.random.default_rng(0)
    whitening = fit_pca_whitening(unit_rows(count, dim, rng), RECOMMENDED_RERANK.pca_dim, RECOMMENDED_RERANK.pca_power)
    base = whitening.apply(unit_rows(count, dim, np.random.default_rng(0)))
    started = time.perf_counter()
    fits = {"graph": _graph_neighbours(base, n, lambda vectors, labels: build_hnsw(vectors, params, labels))}
    graph_s, started = time.perf_counter() - started, time.perf_counter()
    fits["exact"] = nearest_others(base, np.arange(count), n)
    exact_s = time.perf_counter() - started
    recall = float(np.mean([len(np.intersect1d(a, b)) for a, b in zip(fits["graph"][0], fits["exact"][0])])) / n
    too_low = float(np.mean(fits["graph"][1][:, -1] < fits["exact"][1][:, -1] - 1e-6))
    edits, edit_rng = [], np.random.default_rng(1)
    for _ in range(repeats):
        added, removed = whitening.apply(unit_rows(EDIT, dim, edit_rng)), edit_rng.choice(count, EDIT, replace=False)
        kept = np.setdiff1d(np.arange(count), removed)
        after = np.vstack([base[kept], added])
        edit = {}
        for name, (nearest, similarities) in fits.items():
            lost = np.isin(nearest[kept], removed).any(axis=1)
            nearer = (base[kept] @ added.T).max(axis=1) > similarities[kept, -1]
            candidates = np.flatnonzero(lost | nearer)
            entered = (nearest_others(after, candidates, n)[0] >= len(kept)).any(axis=1)
            edit[name] = {"lost": int(lost.sum()), "nearer_than_stored": int(nearer.sum()), "entered": int(entered.sum()),
                          "changed_if_nearer": len(candidates) + EDIT, "changed_if_entered": int((lost[candidates] | entered).sum()) + EDIT}
        edits.append(edit)
    return {"kind": "neighbours", "items": count, "dim": dim, "hnsw": asdict(params), "graph_fit_seconds": round(graph_s, 1),
            "exact_fit_seconds": round(exact_s, 1), "graph_recall_at_5": round(recall, 3), "reach_too_low_share": round(too_low, 4),
            "edits": edits}


def fastret(*argv: object) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "fastret.cli.main", *map(str, argv)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"fastret {' '.join(map(str, argv))} failed:\n{done.stderr}")
    return time.perf_counter() - started, done.stderr.strip().splitlines()[-1]


def run_real(folder: Path, pool: Path, work: Path, repeats: int, model: str, add: int, remove: int) -> dict:
    """A copy of the folder, indexed, then edited by copying in `add` and deleting `remove` images."""
    root = work / "real"
    if root.exists():
        shutil.rmtree(root)
    for path in list_images(folder):
        target = root / path.relative_to(folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    index_dir = work / "real-index"
    if index_dir.exists():
        shutil.rmtree(index_dir)
    full_s, full_line = fastret("index", root, "--out", index_dir, "--model", model, "-q")
    spare = list_images(pool)
    rng = np.random.default_rng(2)
    edits = []
    for repeat in range(repeats):
        previous = inodes(live_version(index_dir))
        rerank_before = rerank_of(live_version(index_dir))
        victims = rng.choice(list_images(root), size=remove, replace=False)
        for number, path in enumerate(spare[repeat * add : (repeat + 1) * add]):
            target = root / path.parent.name / f"added-{repeat}-{number}{path.suffix}"
            target.parent.mkdir(exist_ok=True)
            shutil.copy2(path, target)
        for path in victims:
            Path(path).unlink()
        seconds, line = fastret("index", root, "--out", index_dir, "-q")
        version = live_version(index_dir)
        edits.append({"seconds": round(seconds, 2), "new_bytes": new_bytes(version, previous),
                      "index_bytes": index_bytes(version), "summary": line,
                      "rerank": {**rerank_of(version), "change": rerank_change(rerank_before, rerank_of(version))}})
    return {"kind": "real", "folder": str(folder), "items": len(list_images(root)), "model": model,
            "full_index_seconds": round(full_s, 1), "full_index_line": full_line, "edits": edits}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--synthetic", type=int, action="append", default=[], metavar="N", help="items (repeatable)")
    parser.add_argument("--dim", type=int, default=512, help="synthetic embedding size (default: CLIP's 512)")
    parser.add_argument("--ef-construction", type=int, default=40, help="synthetic graph build ef (default: 40)")
    parser.add_argument("--neighbours", type=int, metavar="N", help="graph vs exact DBA neighbourhoods on N items")
    parser.add_argument("--real", type=Path, help="a folder of images to index and edit (a copy is made)")
    parser.add_argument("--pool", type=Path, help="images copied into the real folder by the edits")
    parser.add_argument("--add", type=int, default=EDIT, help="images each real edit copies in (default: %(default)s)")
    parser.add_argument("--remove", type=int, default=EDIT, help="images each real edit deletes (default: %(default)s)")
    parser.add_argument("--model", default="efficientnet-lite2")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--work", type=Path, required=True, help="scratch folder for the indexes (large at 1M)")
    parser.add_argument("--out", type=Path, default=OUT / "update_cost.json")
    args = parser.parse_args(argv)
    if args.real and not args.pool:
        parser.error("--real needs --pool (the images the edits copy in)")
    args.work.mkdir(parents=True, exist_ok=True)
    results = []
    if args.real:
        results.append(run_real(args.real.resolve(), args.pool, args.work, args.repeats, args.model, args.add,
                                args.remove))
    params = HnswParams(M=16, ef_construction=args.ef_construction)
    for count in args.synthetic:
        results.append(run_synthetic(count, args.dim, params, args.work, args.repeats))
    if args.neighbours:
        results.append(neighbour_check(args.neighbours, args.dim, params, args.repeats))
    write_json(args.out, {"command": " ".join(sys.argv), "machine": machine(), "results": results})
    rows = []
    for result in results:
        if result["kind"] == "neighbours":
            print(json.dumps({key: value for key, value in result.items() if key != "edits"}))
            for edit in result["edits"]:
                print(json.dumps(edit))
            continue
        for edit in result["edits"]:
            edit.setdefault("graph", "kept")
        median = lambda key: float(np.median([edit[key] for edit in result["edits"]]))  # noqa: E731
        rows.append([f"{result['kind']} {result['items']:,}", round(median("seconds"), 3),
                     int(median("new_bytes")), result["edits"][0]["index_bytes"],
                     f"{100 * median('new_bytes') / result['edits'][0]['index_bytes']:.4f}%"])
        taken = [edit for edit in result["edits"] if edit.get("rerank", {}).get("change") == "graph taken in"]
        if taken:
            rows.append([f"  re-ranking graph taken in ({len(taken)} of {len(result['edits'])})",
                         max(edit["seconds"] for edit in taken), max(edit["new_bytes"] for edit in taken),
                         taken[0]["index_bytes"], f"{100 * max(e['new_bytes'] for e in taken) / taken[0]['index_bytes']:.2f}%"])
        for name in ("graph_edit", "compact"):
            if name in result:
                edit = result[name]
                rows.append([f"  {name}", edit["seconds"], edit["new_bytes"], edit["index_bytes"],
                             f"{100 * edit['new_bytes'] / edit['index_bytes']:.2f}%"])
    print(table(["index", "seconds", "bytes written", "index bytes", "share"], rows))
    print(json.dumps({r["kind"] + str(r["items"]): {k: v for k, v in r.items() if k.startswith("load") or k.startswith(
        "build") or k.startswith("full")} for r in results if r["kind"] != "neighbours"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
