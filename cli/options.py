"""Options several sub-commands share, and argument types that refuse bad values before any work."""

from __future__ import annotations

import argparse

from fastret.engine.encoders import BACKENDS, PRECISIONS
from fastret.engine.rerank import RECOMMENDED_RERANK, RerankOptions
from fastret.service.search import MAX_K, SearchOptions, rerank_request


def int_in(low: int, high: int | None = None):
    """An argparse type: a whole number in [low, high] (no upper bound when high is None)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value

    parse.__name__ = "number"  # argparse names the type in its error messages
    return parse


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def add_runtime_options(parser: argparse.ArgumentParser) -> None:
    """--backend, --precision and --threads, the same everywhere an encoder is opened."""
    parser.add_argument("--backend", default="auto", choices=BACKENDS, help="runtime (default: auto)")
    parser.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help="auto (the fastest that passed its parity check here), fp32, bf16 (openvino), int8 "
        "(efficientnet-lite2 on openvino, calibrated on the indexed folder; CLIP on onnxruntime, or on openvino "
        "with INT8 weights and --backend openvino)",
    )
    parser.add_argument("--threads", type=int_in(1, 1024), default=None, help="encoder threads (default: all cores)")


def add_search_options(parser: argparse.ArgumentParser, *, with_k: bool = True) -> None:
    """The search service's options (fastret.service.search.SearchOptions), as flags."""
    if with_k:
        parser.add_argument("-k", type=int_in(1, MAX_K), default=10, help="results to show (default: 10)")
    parser.add_argument("--exact", action="store_true", help="brute-force search instead of HNSW (the same pipeline)")
    parser.add_argument("--ef", "--ef-search", type=int_in(1), default=None,
                        help="HNSW ef at query time (default: the index's; re-ranked: the one measured at build time)")
    group = parser.add_argument_group("re-ranking (on by default; see README 'Re-ranking and query expansion')")
    recommended = RECOMMENDED_RERANK
    choice = group.add_mutually_exclusive_group()
    choice.add_argument(
        "--rerank",
        action="store_true",
        help=f"the recommended re-ranking, the default: PCA {recommended.pca_dim} + DBA {recommended.dba_n} + "
        f"alpha-QE {recommended.qe_n}, searched through the index's re-ranking graph",
    )
    choice.add_argument("--no-rerank", action="store_true",
                        help="the plain ranking: cosine of the raw embeddings (scores comparable across queries)")
    group.add_argument("--flip-tta", action="store_true", help="average each embedding made now with its mirror image's")
    group.add_argument("--pca", type=int_in(1), default=None, metavar="DIM", help="PCA to DIM dims, fitted on the database")
    group.add_argument("--pca-power", type=float, default=None, help="0 plain PCA (default), 0.5 full whitening")
    group.add_argument("--dba", type=int_in(0), default=None, metavar="N", help="database-side augmentation with N neighbours")
    group.add_argument("--qe", type=int_in(0), default=None, metavar="N", help="alpha query expansion with the top N results")
    group.add_argument("--alpha", type=float, default=None, help="DBA / QE neighbour weight = similarity ** alpha (1)")
    group.add_argument("--kreciprocal", action="store_true", help="k-reciprocal re-ranking of the top 100")


def rerank_options(args: argparse.Namespace) -> RerankOptions:
    """The options the flags ask for: the recommended set unless --no-rerank, then overrides."""
    return rerank_request(
        not args.no_rerank,
        pca_dim=args.pca,
        pca_power=args.pca_power,
        dba_n=args.dba,
        qe_n=args.qe,
        alpha=args.alpha,
        kreciprocal=args.kreciprocal or None,
    )


def search_options(args: argparse.Namespace, *, k: int | None = None) -> SearchOptions:
    """SearchOptions from the flags of add_search_options (ValueError for a bad combination)."""
    return SearchOptions(
        k=k if k is not None else args.k,
        exact=args.exact,
        ef=args.ef,
        score=getattr(args, "score", "cosine"),
        rerank=rerank_options(args),
        flip_tta=args.flip_tta,
        include_self=getattr(args, "include_self", False),
    )
