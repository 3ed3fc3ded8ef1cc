"""Command-line flags for re-ranking, shared by `fastret search` and `fastret eval`.

Off unless asked for: `--rerank` turns on the recommended setting (RECOMMENDED_RERANK), and
each step's own flag sets or overrides that step.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from fastret.engine.rerank import RECOMMENDED_RERANK, RerankOptions


def add_rerank_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("re-ranking (off by default; see README 'Re-ranking and query expansion')")
    recommended = RECOMMENDED_RERANK
    group.add_argument(
        "--rerank",
        action="store_true",
        help=f"the recommended re-ranking: PCA {recommended.pca_dim} + DBA {recommended.dba_n} + alpha-QE "
        f"{recommended.qe_n} (exact search)",
    )
    group.add_argument("--flip-tta", action="store_true", help="average each embedding made now with its mirror image's")
    group.add_argument("--pca", type=int, default=None, metavar="DIM", help="PCA to DIM dims, fitted on the database")
    group.add_argument("--pca-power", type=float, default=None, help="0 plain PCA (default), 0.5 full whitening")
    group.add_argument("--dba", type=int, default=None, metavar="N", help="database-side augmentation with N neighbours")
    group.add_argument("--qe", type=int, default=None, metavar="N", help="alpha query expansion with the top N results")
    group.add_argument("--alpha", type=float, default=None, help="DBA / QE neighbour weight = similarity ** alpha (1)")
    group.add_argument("--kreciprocal", action="store_true", help="k-reciprocal re-ranking of the top 100")


def rerank_options(args: argparse.Namespace) -> RerankOptions:
    """The options the flags ask for: the recommended set under --rerank, else none, then overrides."""
    given = {
        "pca_dim": args.pca,
        "pca_power": args.pca_power,
        "dba_n": args.dba,
        "qe_n": args.qe,
        "dba_alpha": args.alpha,
        "qe_alpha": args.alpha,
        "kreciprocal": args.kreciprocal or None,
    }
    base = RECOMMENDED_RERANK if args.rerank else RerankOptions()
    return replace(base, **{name: value for name, value in given.items() if value is not None})
