"""`fastret eval`: retrieval quality (P@k, R@k, mAP, overall and per class) and stage times."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fastret.cli.options import add_runtime_options, add_search_options, int_in, search_options
from fastret.engine.evaluation import DEFAULT_KS
from fastret.service.evaluate import evaluate_folders


def register(commands) -> None:
    """Add the `eval` sub-command to fastret's parser."""
    parser = commands.add_parser("eval", help="measure retrieval quality on labelled folders (label = folder name)")
    parser.add_argument("--db", type=Path, required=True, help="database folder (sub-folder names are labels)")
    protocol = parser.add_mutually_exclusive_group(required=True)
    protocol.add_argument("--queries", type=Path, help="query folder, labelled the same way")
    protocol.add_argument(
        "--leave-one-out", action="store_true", help="every database image queries all the others"
    )
    parser.add_argument("-k", type=int_in(1), nargs="+", default=list(DEFAULT_KS), help="cut-offs (default: 1 5 10)")
    parser.add_argument("--model", default="auto", help="auto, efficientnet-lite2, clip-vit-b32, hf:ORG/NAME or a dir")
    add_runtime_options(parser)
    parser.add_argument("--index", type=Path, default=None, help="use this index of --db instead of embedding it")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the full result here")
    add_search_options(parser, with_k=False)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    options = search_options(args, k=1)  # the cut-offs are -k, handed to evaluate_folders
    result = evaluate_folders(
        args.db,
        None if args.leave_one_out else args.queries,
        args.k,
        model=args.model,
        backend=args.backend,
        precision=args.precision,
        threads=args.threads,
        index_dir=args.index,
        options=options,
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )
    print(format_report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


def format_report(result: dict) -> str:
    """Plain-text tables: overall, macro and per class, then stage times."""
    columns = [f"{m}@{k}" for k in result["ks"] for m in ("P", "R")] + ["mAP"]
    queries = result["queries"]
    lines = [
        f"{result['protocol']}: {queries} queries against {result['db_images']} images of {result['db']}",
        f"model {result['model']} on {result['backend']}, search {result['search']}; mAP over the {result['map_over']}",
    ]
    if result["queries_without_relevant"]:
        lines.append(f"{result['queries_without_relevant']} queries have no relevant image: left out of R@k and mAP")
    width = max([len("overall"), *(len(label) for label in result["per_class"])])
    lines.append(f"{'':{width}}  " + "  ".join(f"{c:>6}" for c in columns))
    rows = [("overall", result["overall"]), ("macro", result["macro"]), *result["per_class"].items()]
    for name, values in rows:
        lines.append(f"{name:{width}}  " + "  ".join(_cell(values[c]) for c in columns))
    lines.append("seconds: " + ", ".join(f"{stage} {value:.2f}" for stage, value in result["seconds"].items()))
    return "\n".join(lines)


def _cell(value: float | None) -> str:
    return f"{'n/a':>6}" if value is None else f"{value:6.3f}"
