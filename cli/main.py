"""`fastret`: index a folder of images, search it with a query image."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from fastret import __version__
from fastret.cli import duplicates, edit, evaluate, scale_out, serve
from fastret.cli.options import add_runtime_options, add_search_options, int_in, search_options
from fastret.engine.decode import ImageError, list_images
from fastret.engine.encoders import describe_runtime
from fastret.engine.index import (
    BadIndex,
    HnswParams,
    default_index_dir,
    index_writer_lock,
)
from fastret.engine.pipeline import DEFAULT_BATCH_SIZE, DEFAULT_WORKERS
from fastret.engine.retrieval import SCORES, build_index, display_path
from fastret.engine.text import check_query_text
from fastret.export.models import ModelNotFound
from fastret.export.onnx_export import ExportError
from fastret.service import stores
from fastret.service.load import BackendUnavailable, open_encoder
from fastret.service.search import Retriever

USER_ERRORS = (BadIndex, BackendUnavailable, ExportError, FileNotFoundError, ImageError, ModelNotFound, ValueError)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default="auto",
        help="auto (default), efficientnet-lite2, efficientnet-lite1, efficientnet-lite0 (NAME@SIDE: another input "
        "side), clip-vit-b32, hf:ORG/NAME or a CLIP checkpoint directory",
    )
    add_runtime_options(parser)


def cmd_index(args: argparse.Namespace) -> int:
    from tqdm import tqdm  # only the indexing job shows a progress bar

    root = Path(args.dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a directory")
    embed = scale_out.prepare(args, log)  # --engine / --store checked; embed_files or the Ray job
    # The whole job holds the index's writer lock: a second writer waits (or, --no-wait, fails) before any work.
    with index_writer_lock(args.out, wait=not args.no_wait, on_wait=log):
        existing = None if args.full else edit.existing_index(args.out, log)
        if existing is not None:  # embed only what changed
            return edit.index_incrementally(args, existing, embed=embed)
        encoder = open_encoder(
            args.model,
            args.backend,
            threads=args.threads,
            image_dir=root,
            precision=args.precision,
            workload="throughput",
            log=log,
        )
        log(f"indexing {root} with {encoder.info.model_id} on {describe_runtime(encoder)}")
        total = len(list_images(root, include_hidden=args.include_hidden))
        with tqdm(total=total, unit="img", disable=args.quiet, file=sys.stderr, dynamic_ncols=True) as bar:
            index, result = build_index(
                root,
                encoder,
                batch_size=args.batch_size,
                workers=args.workers,
                draft=not args.no_draft,
                hnsw_params=edit.hnsw_params(args, HnswParams()),
                on_skip=lambda skip: bar.write(skip.line(), file=sys.stderr),
                on_progress=bar.update,
                include_hidden=args.include_hidden,
                first_id=scale_out.next_free_id(args.out),
                embed=embed,
                graph=scale_out.wants_graph(args),
            )
        if len(index) == 0:
            log(f"fastret: error: no image in {root} could be indexed ({len(result.skipped)} skipped)")
            return 1
        version = scale_out.save(index, args)  # index.save(args.out), or the LanceDB store
    seconds = result.stage_seconds
    graph = f", HNSW {seconds['hnsw_build']:.2f} s" if args.store == "hnswlib" else ""  # LanceDB: in the save
    log(
        f"indexed {len(index)} images, skipped {len(result.skipped)}, in {seconds['total']:.1f} s "
        f"({result.images_per_second:.1f} images/s; waited on the encoder {seconds['encode']:.1f} s{graph}) "
        f"-> {args.out} ({version.name})"
    )
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    found = stores.verify(args.index)  # an hnswlib index or a LanceDB store
    for problem in found.problems:
        print(f"{display_path(str(args.index))}: {problem}")
    if found.problems:
        log(f"fastret: error: {args.index} is damaged ({len(found.problems)} problems); {found.advice}")
        return 1
    print(f"{display_path(str(args.index))}: ok, {'; '.join(found.checked)}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    options = search_options(args)  # a bad combination is refused before the index is opened
    words = [check_query_text(text) for text in (args.text, args.negative) if text is not None]
    if args.image is None and not args.text:
        raise ValueError("give a query image, --text \"WORDS\", or both")
    started = time.perf_counter()
    retriever = Retriever.open(
        args.index, backend=args.backend, precision=args.precision, threads=args.threads, log=log,
        images=args.image is not None, searches=options,
    )
    loaded = time.perf_counter()
    if words:
        query = retriever.text_query(args.text, options, negative=args.negative, image=args.image)
        for note in query.notes:
            log(f"note: {note}")
        hits, name = retriever.search_vector(query.vector, options, query.exclude), query.description
        backend = retriever.text_encoder().backend
    else:
        hits, name, backend = retriever.search_file(args.image, options), str(args.image), retriever.encoder.backend
    finished = time.perf_counter()
    described = retriever.describe(options)  # what ran: a LanceDB store has no re-ranking
    if args.json:
        print(
            json.dumps(
                {
                    "query": display_path(name),
                    "model": retriever.index.model.model_id,
                    "backend": backend,
                    **described,
                    "seconds": {"load": round(loaded - started, 4), "query": round(finished - loaded, 4)},
                    "results": [hit.to_dict() for hit in hits],
                },
                indent=2,
            )
        )
        return 0
    label = "Probability" if options.score == "softmax" else "Similarity Score"
    if "rerank_unavailable" in described:
        log(f"note: {described['rerank_unavailable']}")
    if described["rerank"] is not None:
        label = "Re-ranked Score"  # cosine in the re-ranking space (README 'What a score means')
    print(f"Top {len(hits)} most similar images:")
    for hit in hits:
        print(f"{hit.rank}. {display_path(hit.path)} - {label}: {hit.score:.2f}")
    return 0


def add_index_options(parser: argparse.ArgumentParser) -> None:
    """The options of `fastret index` after DIR and --out (`fastret watch` takes them too)."""
    add_model_options(parser)
    parser.add_argument("--batch-size", type=int_in(1, 4096), default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--workers", type=int_in(0, 256), default=DEFAULT_WORKERS, help="decoder threads (0: decode inline)")
    parser.add_argument("--no-draft", action="store_true", help="decode JPEGs at full size (no DCT downscaling)")
    parser.add_argument("--hnsw-m", type=int_in(2, 256), default=None, help=f"HNSW links per node (default: {HnswParams.M})")
    parser.add_argument("--ef-construction", type=int_in(1), default=None,
                        help=f"HNSW ef at build time (default: {HnswParams.ef_construction})")
    parser.add_argument("--ef-search", type=int_in(1), default=None,
                        help=f"default HNSW ef at query time (default: {HnswParams.ef_search})")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--include-hidden", action="store_true",
                        help="also index hidden files and folders (names starting with '.', e.g. .thumbnails/)")
    parser.add_argument("--no-wait", action="store_true", help="fail at once when another fastret writer is writing --out")
    parser.add_argument("--full", action="store_true",
                        help="embed every image again into a new index, even where --out holds an index of DIR")
    parser.add_argument("--rehash", action="store_true",
                        help="tell changed files by their contents (sha256), not by size and modification time")
    scale_out.add_index_options(parser)  # --engine, --ray-address, --store, --lance-uri


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastret", description="Fast image-to-image retrieval.")
    parser.add_argument("--version", action="version", version=f"fastret {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    index = commands.add_parser(
        "index", help="embed the images under DIR into an index (again: only new and changed files)"
    )
    index.add_argument("dir", help="folder of images (sub-folder names become labels)")
    index.add_argument("--out", type=Path, default=default_index_dir(), help="index directory (default: %(default)s)")
    add_index_options(index)
    index.set_defaults(run=cmd_index)

    verify = commands.add_parser("verify", help="check an index: every file against its checksums (a LanceDB "
                                    "store: its manifest, table, rows and ANN index)")
    verify.add_argument("index", type=Path, nargs="?", default=default_index_dir(), help="index directory (default: %(default)s)")
    verify.set_defaults(run=cmd_verify)

    search = commands.add_parser("search", help="find the images most similar to IMG, or to words (CLIP models)")
    search.add_argument("image", type=Path, nargs="?", default=None, help="query image (optional with --text)")
    search.add_argument("-t", "--text", default=None, metavar="WORDS",
                        help='a text query, e.g. "a red bus at night" (CLIP models); with IMG: their normalised sum')
    search.add_argument("--not", dest="negative", default=None, metavar="WORDS",
                        help="subtract this text from the query (CLIP models), e.g. --not \"people\"")
    search.add_argument("--index", type=Path, default=default_index_dir(), help="index directory (default: %(default)s)")
    search.add_argument("--score", choices=SCORES, default="cosine", help="cosine (default) or softmax over the database")
    search.add_argument("--json", action="store_true", help="machine-readable output")
    search.add_argument(
        "--include-self", action="store_true", help="keep the query file itself when it is in the index"
    )
    add_search_options(search)
    add_runtime_options(search)
    search.set_defaults(run=cmd_search, ends_process_at_once=True)
    # Sub-commands that live in their own modules register below, one line each.
    evaluate.register(commands)
    serve.register(commands)
    edit.register(commands, add_index_options=add_index_options, index_job=cmd_index)
    duplicates.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser().parse_args(argv))


def run_command(args: argparse.Namespace) -> int:
    try:
        return args.run(args)
    except USER_ERRORS as exc:
        log(f"fastret: error: {exc}")
        return 2
    except KeyboardInterrupt:
        log("fastret: interrupted")
        return 130


def entry() -> None:
    """The `fastret` program. A search, which writes nothing, ends its process as soon as its output is
    flushed: tearing down the interpreter and the loaded runtime (OpenVINO's plugin, the compiled model)
    would add a good part of a cold search's wall time and do nothing the user needs."""
    args = build_parser().parse_args()
    code = run_command(args)
    if getattr(args, "ends_process_at_once", False):
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except OSError:  # a closed pipe (`fastret search ... | head -1`): nothing more to deliver
                pass
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
