"""`fastret index` past one machine: `--engine ray` embeds on a Ray cluster, `--store lancedb` keeps
the index in a LanceDB table. Both are extras; without them the job is the default single-process
one with hnswlib.

The store of an existing index is the one it has: `--store` picks the store of a new index (or of
`--full`), and naming the other store of an existing one is refused rather than silently replacing
it. `--engine ray` embeds what the job embeds: everything on a first or `--full` run, only the new
and changed files when INDEX already holds an index of DIR.
"""

from __future__ import annotations

import argparse
from pathlib import Path, PurePath
from typing import Callable

from fastret.engine.index import Index
from fastret.engine.pipeline import embed_files
from fastret.service.stores import holds_lance_store, next_free_id, save_lance

__all__ = ["add_index_options", "next_free_id", "prepare", "save", "wants_graph"]

ENGINES = ("local", "ray")
STORES = ("hnswlib", "lancedb")
HNSW_OPTIONS = ("hnsw_m", "ef_construction", "ef_search")


def add_index_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--engine", choices=ENGINES, default="local",
                        help="local (default: this process) or ray (a Ray cluster; extra fastret[ray])")
    parser.add_argument("--ray-address", default=None, metavar="ADDRESS",
                        help="with --engine ray: the cluster to join, e.g. ray://head:10001 or auto "
                        "(default: start a local one)")
    parser.add_argument("--store", choices=STORES, default=None,
                        help="for a new index: hnswlib (default: INDEX holds the graph) or lancedb (a LanceDB "
                        "table; extra fastret[lancedb]); an existing index keeps its store")
    parser.add_argument("--lance-uri", default=None, metavar="URI",
                        help="with --store lancedb: the table's folder or object-storage URI, e.g. "
                        "s3://bucket/gallery (default: INDEX/lance)")


def store_of(args: argparse.Namespace) -> str:
    """The store this job writes: the existing index's, else --store (default hnswlib)."""
    existing = "lancedb" if holds_lance_store(args.out) else "hnswlib" if (Path(args.out) / "CURRENT").exists() else None
    if existing is not None and args.store not in (None, existing):
        raise ValueError(f"{args.out} holds a {existing} index; --store {args.store} needs another --out "
                         f"(or delete {args.out} first)")
    return existing or args.store or "hnswlib"


def prepare(args: argparse.Namespace, log: Callable[[str], None]) -> Callable:
    """Check the engine and store options before any work (sets args.store to the store written);
    returns the embed function the job runs (embed_files, or the Ray job's)."""
    from fastret.engine.lance_store import lancedb_missing

    if args.ray_address is not None and args.engine != "ray":
        raise ValueError("--ray-address goes with --engine ray")
    if args.store == "lancedb" and lancedb_missing():
        raise ValueError(lancedb_missing())
    args.store = store_of(args)
    if args.lance_uri is not None and args.store != "lancedb":
        raise ValueError("--lance-uri goes with --store lancedb")
    if args.store == "lancedb":
        given = [f"--{name.replace('_', '-')}" for name in HNSW_OPTIONS if getattr(args, name) is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: HNSW options do not apply to a LanceDB store (it builds its own ANN index)")
        if args.command == "watch":
            raise ValueError("fastret watch follows hnswlib indexes; keep a LanceDB store current with "
                             "`fastret index DIR --out INDEX` again, or fastret add / remove")
    if args.engine == "local":
        return embed_files
    from fastret.service.ray_job import RayOptions, ray_embedder

    return ray_embedder(RayOptions(address=args.ray_address), log=log)


def wants_graph(args: argparse.Namespace) -> bool:
    """Whether the full build makes an HNSW graph (a LanceDB store indexes the vectors itself)."""
    return args.store == "hnswlib"


def save(index: Index, args: argparse.Namespace) -> PurePath:
    """Write a full build to the chosen store; the path to name in the summary line."""
    if args.store == "hnswlib":
        return index.save(args.out)
    return save_lance(index, args.out, uri=args.lance_uri)
