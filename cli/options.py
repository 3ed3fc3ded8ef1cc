"""Options several sub-commands share: how to pick the runtime that encodes images."""

from __future__ import annotations

import argparse

from fastret.engine.encoders import BACKENDS, PRECISIONS


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
    parser.add_argument("--threads", type=int, default=None, help="encoder threads (default: all cores)")
