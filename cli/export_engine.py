"""`export-engine`: export a model to ONNX (and FP16 / TensorRT artefacts) ahead of indexing."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fastret.export.models import ModelNotFound, resolve_model
from fastret.export.onnx_export import ExportError, ONNX_OPSET, export_dir_for, export_onnx
from fastret.export.tensorrt_build import DEFAULT_WORKSPACE_GIB, parse_profile
from fastret.export.text_tower import TEXT_ONNX, ensure_text_tower, export_text_fp16


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="export-engine",
        description="Export an encoder (both towers of a full CLIP checkpoint) to ONNX, FP16 ONNX and TensorRT plans.",
    )
    parser.add_argument("--model", default="auto", help="auto, efficientnet-lite2, clip-vit-b32, hf:ORG/NAME or a directory")
    parser.add_argument("--out", type=Path, default=None, help="export directory (default: the fastret model cache)")
    parser.add_argument("--images", type=Path, default=None, help="folder of real images for parity checks")
    parser.add_argument("--opset", type=int, default=ONNX_OPSET)
    parser.add_argument("--fp16", action="store_true", help="also write an FP16 ONNX and, where TensorRT is installed, an FP16 plan")
    parser.add_argument("--require-trt", action="store_true", help="fail when no TensorRT plan can be built")
    parser.add_argument(
        "--trt-batch", type=_batch_profile, default="1,64,256", metavar="MIN,OPT,MAX",
        help="TensorRT batch profile: smallest, tuned-for and largest batch (default: %(default)s)",
    )
    parser.add_argument(
        "--trt-workspace-gib", type=float, default=DEFAULT_WORKSPACE_GIB, help="TensorRT builder workspace limit in GiB"
    )
    return parser


def _batch_profile(text: str):
    try:
        return parse_profile(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        source, why = resolve_model(args.model)
        log(f"model: {source.model_id} ({why})")
        out_dir = args.out or export_dir_for(source)
        export_onnx(source, out_dir, image_dir=args.images, opset=args.opset, log=log)
        log(f"wrote {out_dir / 'model.onnx'}")
        text = ensure_text_tower(source, out_dir, log=log)  # a full CLIP checkpoint: both towers, one export
        if text:
            log(f"wrote {out_dir / TEXT_ONNX}")
        if args.fp16:
            from fastret.export.fp16 import export_fp16

            path, _ = export_fp16(out_dir, image_dir=args.images, log=log)
            log(f"wrote {path}")
            if text:
                log(f"wrote {export_text_fp16(out_dir, log=log)[0]}")
        if args.fp16 or args.require_trt:
            from fastret.export.tensorrt_build import (
                TensorRTUnavailable,
                build_plan_for_export,
                build_text_plan_for_export,
            )

            try:
                plan = build_plan_for_export(
                    out_dir, image_dir=args.images, log=log, profile=args.trt_batch, workspace_gib=args.trt_workspace_gib
                )
                log(f"wrote {plan}")
                if text:
                    log(f"wrote {build_text_plan_for_export(out_dir, log=log, workspace_gib=args.trt_workspace_gib)}")
            except TensorRTUnavailable as exc:
                log(f"no TensorRT plan built: {exc}")
                if args.require_trt:
                    return 1
    except (ExportError, ModelNotFound, ValueError, FileNotFoundError) as exc:
        log(f"export-engine: error: {exc}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
