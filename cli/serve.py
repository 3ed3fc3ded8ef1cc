"""`fastret serve`: the search page and JSON API over an index, on 127.0.0.1 by default."""

from __future__ import annotations

import argparse
import ipaddress
import socket
import sys
from pathlib import Path

from fastret.cli.options import add_runtime_options, int_in, positive_float
from fastret.engine.decode import DEFAULT_SERVER_MAX_PIXELS
from fastret.engine.index import default_index_dir
from fastret.service.live import DEFAULT_POLL_S, LiveRetriever
from fastret.web import DEFAULT_MAX_DECODES, DEFAULT_MAX_UPLOAD_BYTES
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


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the index is opened: a busy port fails at once."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def upload_limit(text: str) -> int:
    """--max-upload-mb in bytes: a positive number of MiB that comes to at least one byte."""
    size = int(positive_float(text) * 2**20)
    if size < 1:
        raise argparse.ArgumentTypeError(f"must come to at least 1 byte, got {text} MiB")
    return size


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from fastret.web.app import create_app
    except ImportError as exc:
        log(f"fastret: error: the web app needs its extra: pip install 'fastret[web]' ({exc})")
        return 2
    from fastret.service.search import Retriever

    sock = bind(args.host, args.port)
    retriever = Retriever.open(args.index, backend=args.backend, precision=args.precision, threads=args.threads, log=log)
    live = None if args.no_follow else LiveRetriever(args.index, retriever, poll_s=args.poll, log=log)
    app = create_app(
        live or retriever,
        max_upload_bytes=args.max_upload_bytes,
        max_pixels=args.max_pixels,
        max_batch=args.max_batch,
        max_decodes=args.max_decodes,
    )
    if not is_loopback(args.host):
        log(f"warning: serving on {args.host}: anyone who can reach it can search and view the indexed images")
    following = f", following {args.index} every {args.poll:g} s" if live else ""
    log(f"serving {len(retriever.index)} images ({retriever.index.model.model_id} on {retriever.runtime}) "
        f"at http://{args.host}:{args.port}/{following}")
    if live:
        live.start()
    try:
        uvicorn.Server(uvicorn.Config(app, log_level=args.log_level)).run(sockets=[sock])
    finally:
        if live:
            live.close()
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser("serve", help="search page and HTTP API over an index")
    serve.add_argument("--index", type=Path, default=default_index_dir(), help="index directory (default: %(default)s)")
    serve.add_argument("--host", default=DEFAULT_HOST, help="address to bind (default: %(default)s, this machine only)")
    serve.add_argument("--port", type=int_in(1, 65535), default=DEFAULT_PORT, help="port (default: %(default)s)")
    add_runtime_options(serve)
    serve.add_argument("--max-upload-mb", dest="max_upload_bytes", type=upload_limit, metavar="MIB",
                       default=DEFAULT_MAX_UPLOAD_BYTES,
                       help=f"largest accepted upload in MiB (default: {DEFAULT_MAX_UPLOAD_BYTES / 2**20:g})")
    serve.add_argument("--max-pixels", type=int_in(1), default=DEFAULT_SERVER_MAX_PIXELS,
                       help="largest upload in pixels (width x height) decoded (default: %(default)s)")
    serve.add_argument("--max-decodes", type=int_in(1, 256), default=DEFAULT_MAX_DECODES,
                       help="uploads decoded at once; the others wait (default: %(default)s)")
    serve.add_argument("--max-batch", type=int_in(1, 1024), default=DEFAULT_MAX_BATCH,
                       help="most queries encoded together (default: %(default)s)")
    serve.add_argument("--poll", type=positive_float, default=DEFAULT_POLL_S,
                       help="seconds between checks for a new version of the index, which is loaded and swapped in "
                       "without a restart (default: %(default)s)")
    serve.add_argument("--no-follow", action="store_true", help="serve the version opened at start until stopped")
    serve.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"))
    serve.set_defaults(run=cmd_serve)
