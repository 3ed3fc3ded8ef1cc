"""`fastret duplicates`: groups of identical and near-duplicate images, and safe actions on them."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from fastret.cli.options import add_runtime_options, int_in

CSV_COLUMNS = ("group", "role", "id", "path", "width", "height", "bytes", "reason", "cosine", "agreement", "mirrored")


def register(commands) -> None:
    """Add the `duplicates` sub-command to fastret's parser."""
    parser = commands.add_parser(
        "duplicates",
        help="find duplicate images: identical files and near-duplicates (resized, re-saved, cropped, padded...)",
        description="Groups of duplicates, the file to keep first (largest resolution, then largest file, then "
        "oldest). Nothing is changed unless --move-to ... --apply is given, and nothing is ever deleted.",
    )
    parser.add_argument("path", type=Path, help="an index directory, or a folder of images (indexed in memory first)")
    parser.add_argument(
        "--threshold", default="auto",
        help="auto (measured, see README) or the least pixel agreement of a near-duplicate, in (0, 1]: higher is stricter",
    )
    parser.add_argument("--no-mirrored", action="store_true", help="do not count mirror images as duplicates")
    parser.add_argument("--neighbours", type=int_in(1, 100), default=None, help="candidates per image from the index (default: 6)")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="machine-readable report")
    output.add_argument("--csv", action="store_true", help="one row per file of each group")
    parser.add_argument("--move-to", type=Path, default=None, metavar="DIR",
                        help="move each duplicate (never the kept file) into DIR, keeping its path; a dry run unless --apply")
    parser.add_argument("--link", action="store_true", help="with --move-to: put symbolic links in DIR instead of moving")
    parser.add_argument("--apply", action="store_true", help="with --move-to: really move (or link)")
    parser.add_argument("--model", default="auto", help="for a folder: the model to index it with (default: auto)")
    add_runtime_options(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from fastret.engine.duplicates import NEIGHBOURS
    from fastret.engine.encoders import default_threads
    from fastret.service.duplicates import apply_actions, find_duplicates, open_for_duplicates, parse_threshold, plan_actions

    threshold = parse_threshold(args.threshold)  # bad values are refused before any work
    if (args.link or args.apply) and args.move_to is None:
        raise ValueError("--link and --apply go with --move-to DIR")
    retriever = open_for_duplicates(
        args.path, model=args.model, backend=args.backend, precision=args.precision, threads=args.threads,
        on_skip=lambda skip: log(skip.line()), log=log,
    )
    report = find_duplicates(retriever, threshold=threshold, mirrored=not args.no_mirrored,
                             neighbours=args.neighbours or NEIGHBOURS, workers=args.threads,
                             processes=args.threads or default_threads())
    for skip in report.skipped:
        log(skip.line())
    actions = plan_actions(report, args.move_to, link=args.link) if args.move_to is not None else []
    if args.json:
        data = report.to_dict()
        data["threshold_setting"] = args.threshold
        if args.move_to is not None:
            data["actions"] = {"applied": args.apply, "link": args.link,
                               "planned": [{"from": str(a.source), "to": str(a.target)} for a in actions]}
        print(json.dumps(data, indent=2))
    elif args.csv:
        write_csv(report, sys.stdout)
    else:
        print(listing(report, args.threshold))
    if actions:
        if args.apply:
            done = apply_actions(actions, on_skip=lambda skip: log(skip.line()))
            log(f"{'linked' if args.link else 'moved'} {done} of {len(actions)} duplicates into {args.move_to}")
        else:
            for action in actions:
                log(f"would {action.line()}")
            log(f"dry run: nothing changed; add --apply to {'link' if args.link else 'move'} these {len(actions)} files")
    return 0


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def listing(report, threshold_setting: str) -> str:
    """Each group with the kept file first, then a summary line."""
    from fastret.engine.retrieval import display_path
    from fastret.service.duplicates import KEEP_RULE

    lines = []
    for number, group in enumerate(report.groups, 1):
        lines.append(f"group {number}: {1 + len(group.duplicates)} files")
        kept = group.kept
        lines.append(f"  keep       {display_path(kept.path)}  {kept.width}x{kept.height}  {_size(kept.bytes)}")
        for copy in group.duplicates:
            scores = "" if copy.reason != "near-duplicate" else (
                f"  agreement {copy.agreement:.2f}, cosine {copy.cosine:.2f}" + (", mirrored" if copy.mirrored else ""))
            lines.append(f"  duplicate  {display_path(copy.path)}  {copy.width}x{copy.height}  {_size(copy.bytes)}  "
                         f"{copy.reason}{scores}")
    setting = f"{report.threshold:g} (auto)" if threshold_setting == "auto" else f"{report.threshold:g}"
    duplicates = sum(len(group.duplicates) for group in report.groups)
    lines.append(f"{len(report.groups)} groups, {duplicates} duplicates among {report.items} images "
                 f"(kept: {KEEP_RULE}; agreement threshold {setting}; {report.seconds['total']:.1f} s)")
    return "\n".join(lines)


def write_csv(report, out) -> None:
    from fastret.engine.retrieval import display_path

    writer = csv.writer(out)
    writer.writerow(CSV_COLUMNS)
    for number, group in enumerate(report.groups, 1):
        for role, copy in [("keep", group.kept)] + [("duplicate", c) for c in group.duplicates]:
            writer.writerow([number, role, copy.item_id, display_path(copy.path), copy.width, copy.height, copy.bytes,
                             copy.reason, "" if copy.cosine is None else f"{copy.cosine:.4f}",
                             "" if copy.agreement is None else f"{copy.agreement:.4f}", int(copy.mirrored)])


def _size(count: int) -> str:
    return f"{count / 1024:.0f} KB" if count < 1024 * 1024 else f"{count / 1024 / 1024:.1f} MB"
