"""`fastret serve`: the search page and JSON API over an index, on 127.0.0.1 by default."""

from __future__ import annotations

import argparse
import ipaddress
import sys
from pathlib import Path

from fastret.cli.options import add_runtime_options
from fastret.engine.index import Index, default_index_dir
from fastret.web import DEFAULT_MAX_UPLOAD_BYTES
from fastret.web.batcher import DEFAULT_MAX_BATCH

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from fastret.web.app import create_app
    except ImportError as exc:
        log(f"fastret: error: the web app needs its extra: pip install 'fastret[web]' ({exc})")
        return 2
    from fastret.engine.encoders import describe_runtime
    from fastret.service.load import encoder_for_index

    index = Index.load(args.index)
    encoder = encoder_for_index(
        index.model, args.backend, threads=args.threads, precision=args.precision, recorded=index.runtime, log=log
    )
    app = create_app(
        index, encoder, max_upload_bytes=int(args.max_upload_mb * 2**20), max_batch=args.max_batch
    )
    if not is_loopback(args.host):
        log(f"warning: serving on {args.host}: anyone who can reach it can search and view the indexed images")
    log(f"serving {len(index)} images ({index.model.model_id} on {describe_runtime(encoder)}) at http://{args.host}:{args.port}/")
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser("serve", help="search page and HTTP API over an index")
    serve.add_argument("--index", type=Path, default=default_index_dir(), help="index directory (default: %(default)s)")
    serve.add_argument("--host", default=DEFAULT_HOST, help="address to bind (default: %(default)s, this machine only)")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (default: %(default)s)")
    add_runtime_options(serve)
    serve.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_BYTES / 2**20, help="largest accepted upload in MiB (default: %(default)s)")
    serve.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH, help="most queries encoded together (default: %(default)s)")
    serve.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"))
    serve.set_defaults(run=cmd_serve)
