"""Command-line flags for the opt-in re-ranking steps, shared by `fastret search` and `fastret eval`."""

from __future__ import annotations

import argparse

from fastret.engine.rerank import RerankOptions

DEFAULTS = RerankOptions()


def add_rerank_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("re-ranking (opt-in; see README 'Re-ranking and query expansion')")
    group.add_argument("--flip-tta", action="store_true", help="average each embedding with its mirror image's")
    group.add_argument("--pca", type=int, default=None, metavar="DIM", help="PCA to DIM dims, fitted on the database")
    group.add_argument(
        "--pca-power", type=float, default=DEFAULTS.pca_power, help="whitening power: 0 plain PCA, 0.5 full whitening"
    )
    group.add_argument("--dba", type=int, default=DEFAULTS.dba_n, metavar="N", help="database-side augmentation, N neighbours")
    group.add_argument("--qe", type=int, default=DEFAULTS.qe_n, metavar="N", help="alpha query expansion, top N results")
    group.add_argument("--alpha", type=float, default=DEFAULTS.qe_alpha, help="DBA / QE weight power (default: 1)")
    group.add_argument("--kreciprocal", action="store_true", help="k-reciprocal re-ranking of the top 100")


def rerank_options(args: argparse.Namespace) -> RerankOptions:
    return RerankOptions(
        pca_dim=args.pca,
        pca_power=args.pca_power,
        dba_n=args.dba,
        dba_alpha=args.alpha,
        qe_n=args.qe,
        qe_alpha=args.alpha,
        kreciprocal=args.kreciprocal,
    )
