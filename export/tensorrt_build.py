"""ONNX -> TensorRT FP16 plan (TensorRT 10 API), checked against ONNX Runtime fp32, tied to its GPU.

Precision: the plan is a *strongly typed* network parsed from the FP16 ONNX (export/fp16.py),
not a weakly typed fp32 network with ``BuilderFlag.FP16`` plus per-layer precision constraints.
Why: (1) the FP32 islands for LayerNorm / Softmax / L2-norm that FP16 transformers need
(NVIDIA/TensorRT#2564, #4111) are then decided in one place, `fastret.export.fp16.FP32_OPS`, and
already checked on the CPU, so ONNX Runtime CUDA and TensorRT compute the same mixed-precision
graph; (2) weak typing (FP16 flag, OBEY_PRECISION_CONSTRAINTS, layer.precision) is deprecated
since TensorRT 10.12 and removed in 11, while STRONGLY_TYPED works from 10.0 on.

Input: TensorRT accepts a uint8 network input only when it feeds a Cast directly
(NVIDIA/TensorRT#3985); our graphs transpose NHWC first, so `prepare_onnx_for_tensorrt` moves
the cast to the front. Pixels stay uint8 on the wire (4x less host->device traffic than float32).
The parser reads nodes in file order, so they are also sorted topologically (ONNX Runtime's fp16
converter appends its casts last).

Build: explicit batch (the TensorRT 10 default), one optimisation profile over the batch axis
(min/opt/max, default 1/64/256), a workspace limit, and a timing cache per GPU + TensorRT version
under $FASTRET_CACHE/tensorrt/ reused by later builds. The plan is kept only when its embeddings
match ONNX Runtime fp32 on real images (min cosine >= 0.999); its GPU name, compute capability
and TensorRT version go into metadata.json, and the runtime refuses it anywhere else.

A full CLIP export also gets a plan of its text tower (``text.fp16.plan``), built the same way
from the text tower's FP16 ONNX: int64 token ids in (no cast rewrite needed), one profile over
batch and token count (1 x 2 up to `TEXT_MAX_BATCH` x the context length), checked against ONNX
Runtime fp32 on the export's parity prompts.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from fastret.engine.decode import Preprocessing
from fastret.engine.encoders import ModelInfo
from fastret.engine.log import Log, no_log
from fastret.engine.text import TensorRTTextEncoder
from fastret.engine.tensorrt_runtime import (
    PLAN_FILE,
    PlanTarget,
    TensorRTEncoder,
    current_target,
    tensorrt_missing,
    trt_logger,
)
from fastret.export.fp16 import FP32_OPS, export_fp16
from fastret.export.onnx_export import (
    FP32_ONNX,
    INPUT_NAME,
    ExportError,
    Parity,
    add_artefact,
    cache_root,
    compare_embeddings,
    onnx_embed,
    parity_pixels,
    read_metadata,
)
from fastret.export.text_tower import (
    PARITY_PROMPTS,
    TEXT_PLAN_FILE,
    TEXT_PLAN_KIND,
    export_text_fp16,
    export_tokenizer,
    text_entry,
)

PLAN_KIND = "tensorrt-plan"
TRT_MIN_COSINE = 0.999
DEFAULT_WORKSPACE_GIB = 4.0
INPUT_CAST_NODE = "fastret_input_cast"
TEXT_MAX_BATCH = 64
"""Most text queries one text-plan call takes (more run in chunks)."""
TEXT_OPT_TOKENS = 16
"""Token count the text plan is tuned for: a query of a few words, with its start and end tokens."""


class TensorRTUnavailable(Exception):
    """TensorRT (or a CUDA GPU) is not present; str() says how to get a plan."""


@dataclass(frozen=True)
class BatchProfile:
    """The batch sizes a plan accepts (min, max) and is tuned for (opt)."""

    min: int = 1
    opt: int = 64
    max: int = 256

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise ValueError(f"batch profile needs 1 <= min <= opt <= max, got {self.min},{self.opt},{self.max}")

    def shapes(self, size: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(min, opt, max) NHWC input shapes for IOptimizationProfile.set_shape."""
        return tuple((batch, size, size, 3) for batch in (self.min, self.opt, self.max))  # type: ignore[return-value]

    def to_dict(self) -> dict:
        return {"min": self.min, "opt": self.opt, "max": self.max}


DEFAULT_PROFILE = BatchProfile()


def parse_profile(text: str) -> BatchProfile:
    """'MIN,OPT,MAX' (e.g. '1,64,256') -> BatchProfile; ValueError with the reason otherwise."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise ValueError(f"batch profile {text!r} is not MIN,OPT,MAX (three positive integers, e.g. 1,64,256)")
    return BatchProfile(*(int(p) for p in parts))


def prepare_onnx_for_tensorrt(model, input_name: str = INPUT_NAME):
    """The ONNX model as TensorRT's parser needs it: uint8 input straight into a Cast, nodes sorted.

    The graph's own later Cast becomes a float->float (or float->float16) no-op. Nodes are put in
    topological order: the parser reads them in file order, and ONNX Runtime's fp16 converter
    appends its casts at the end. Shape/type hints in value_info are dropped, since the tensors
    after the input change type; runtimes re-infer them.
    """
    import onnx
    from onnx import TensorProto, helper

    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    graph = rewritten.graph
    if not any(node.name == INPUT_CAST_NODE for node in graph.node):
        as_float = f"{input_name}_as_float"
        for node in graph.node:
            for i, name in enumerate(node.input):
                if name == input_name:
                    node.input[i] = as_float
        graph.node.insert(0, helper.make_node("Cast", [input_name], [as_float], name=INPUT_CAST_NODE, to=TensorProto.FLOAT))
        del graph.value_info[:]
    return sorted_for_tensorrt(rewritten)


def sorted_for_tensorrt(model):
    """The ONNX model (changed in place) with its nodes in topological order, as TensorRT's parser reads them."""
    graph = model.graph
    known = {""} | {t.name for t in graph.input} | {t.name for t in graph.initializer}
    ordered = topological_order([(list(n.input), list(n.output)) for n in graph.node], known)
    nodes = [graph.node[i] for i in ordered]
    del graph.node[:]
    graph.node.extend(nodes)
    return model


def topological_order(nodes: list[tuple[list[str], list[str]]], known: set[str]) -> list[int]:
    """Indices of (inputs, outputs) nodes so each comes after its producers, else in given order."""
    import heapq

    producer = {name: i for i, (_, outputs) in enumerate(nodes) for name in outputs}
    dangling = sorted({n for inputs, _ in nodes for n in inputs if n not in known and n not in producer})
    if dangling:
        raise ExportError(f"ONNX graph has undefined inputs: {', '.join(dangling[:5])}")
    waiting = [{producer[n] for n in inputs if n not in known} for inputs, _ in nodes]
    consumers: dict[int, list[int]] = {}
    for i, needs in enumerate(waiting):
        for j in needs:
            consumers.setdefault(j, []).append(i)
    ready = [i for i, needs in enumerate(waiting) if not needs]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for j in consumers.get(i, []):
            waiting[j].discard(i)
            if not waiting[j]:
                heapq.heappush(ready, j)
    if len(order) != len(nodes):
        raise ExportError("ONNX graph has a cycle; TensorRT cannot parse it")
    return order


def timing_cache_path(target: PlanTarget, root: Path | None = None) -> Path:
    """One reusable timing cache per GPU model and TensorRT version (caches are tied to both)."""
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", f"{target.gpu_name}-sm{target.compute_capability}-trt{target.tensorrt_version}")
    return (root or cache_root()) / "tensorrt" / f"timing-{slug}.cache"


def _write_bytes_replacing(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    staging.write_bytes(data)
    os.replace(staging, path)


def build_serialized_plan(
    onnx_bytes: bytes,
    input_name: str,
    size: int,
    profile: BatchProfile,
    workspace_bytes: int,
    timing_cache: Path,
    log: Log = no_log,
) -> bytes:
    """Parse a (mixed-precision) image-tower ONNX model into a strongly typed network and build a plan."""
    return build_plan_bytes(onnx_bytes, {input_name: profile.shapes(size)}, workspace_bytes, timing_cache, log)


def build_plan_bytes(
    onnx_bytes: bytes,
    input_shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]],
    workspace_bytes: int,
    timing_cache: Path,
    log: Log = no_log,
) -> bytes:
    """A strongly typed plan of an ONNX model, one optimisation profile: each input's (min, opt, max) shapes."""
    import tensorrt as trt

    logger = trt_logger()
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT could not parse the ONNX model: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    optimisation = builder.create_optimization_profile()
    for name, shapes in input_shapes.items():
        optimisation.set_shape(name, *shapes)
    config.add_optimization_profile(optimisation)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    if not config.set_timing_cache(cache, False):
        log(f"timing cache {timing_cache} does not match this build; starting an empty one")
        config.set_timing_cache(config.create_timing_cache(b""), False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError("TensorRT build_serialized_network failed (its log above says why)")
    _write_bytes_replacing(timing_cache, bytes(memoryview(config.get_timing_cache().serialize())))
    return bytes(memoryview(serialized))


def build_plan_for_export(
    export_dir: Path,
    *,
    image_dir: Path | None = None,
    log: Log = no_log,
    profile: BatchProfile = DEFAULT_PROFILE,
    workspace_gib: float = DEFAULT_WORKSPACE_GIB,
) -> Path:
    """Build, check and record ``model.fp16.plan`` in an export directory; return its path."""
    missing = tensorrt_missing()
    if missing:
        raise TensorRTUnavailable(missing)
    import onnx

    export_dir = Path(export_dir)
    metadata = read_metadata(export_dir)
    info = ModelInfo.from_dict(metadata)
    spec: Preprocessing = info.preprocessing
    fp16_onnx, _ = export_fp16(export_dir, image_dir=image_dir, log=log)  # the recorded one, or made now
    target = current_target()
    cache = timing_cache_path(target)
    log(
        f"building TensorRT {target.tensorrt_version} plan for {target.gpu_name} (sm {target.compute_capability}): "
        f"batch {profile.min}/{profile.opt}/{profile.max}, workspace {workspace_gib:g} GiB, timing cache {cache}"
    )
    started = time.perf_counter()
    model = prepare_onnx_for_tensorrt(onnx.load(str(fp16_onnx)), metadata.get("input", INPUT_NAME))
    plan_bytes = build_serialized_plan(
        model.SerializeToString(),
        metadata.get("input", INPUT_NAME),
        spec.size,
        profile,
        int(workspace_gib * (1 << 30)),
        cache,
        log,
    )
    build_seconds = time.perf_counter() - started
    pixels, source = parity_pixels(spec, image_dir)
    parity = _keep_checked_plan(
        export_dir, PLAN_FILE, plan_bytes, lambda path: TensorRTEncoder(path, info).encode(pixels),
        onnx_embed(export_dir / FP32_ONNX, pixels), source, "images", log,
    )
    _record_plan(export_dir, PLAN_FILE, PLAN_KIND, target, fp16_onnx, workspace_gib, cache, build_seconds, parity,
                 batch_profile=profile.to_dict())
    return export_dir / PLAN_FILE


def _record_plan(
    export_dir: Path, name: str, kind: str, target: PlanTarget, fp16_onnx: Path, workspace_gib: float,
    cache: Path, build_seconds: float, parity: Parity, **shapes,
) -> None:
    """metadata.json's record of a plan: what it is tied to, how it was built, its parity."""
    add_artefact(
        export_dir,
        name,
        kind,
        **target.to_dict(),
        precision=f"fp16, strongly typed from {fp16_onnx.name}",
        fp32_ops=FP32_OPS,
        **shapes,
        workspace_gib=workspace_gib,
        timing_cache=str(cache),
        build_seconds=round(build_seconds, 1),
        parity_vs_onnx_fp32=parity.to_dict(),
    )


def _keep_checked_plan(
    export_dir: Path,
    name: str,
    plan_bytes: bytes,
    run_plan: Callable[[Path], np.ndarray],
    reference: np.ndarray,
    source: str,
    unit: str,
    log: Log,
) -> Parity:
    """Write a plan under a staging name, run it (`run_plan`) and rename it to `name` in the export
    when its embeddings match `reference` (ONNX Runtime fp32) at min cosine >= 0.999; else ExportError."""
    plan = export_dir / name
    staging = export_dir / f".{name}.tmp-{os.getpid()}"
    try:
        staging.write_bytes(plan_bytes)
        try:
            candidate = run_plan(staging)
        except RuntimeError as exc:
            raise ExportError(f"the TensorRT plan just built does not run: {exc}") from None
        parity = compare_embeddings(reference, candidate, source, unit)
        log(parity.line(f"TensorRT fp16 {name} vs ONNX Runtime fp32"))
        if parity.min_cosine < TRT_MIN_COSINE:
            raise ExportError(f"TensorRT plan min cosine {parity.min_cosine:.5f} < {TRT_MIN_COSINE}; not kept")
        os.replace(staging, plan)
    finally:
        staging.unlink(missing_ok=True)
    return parity


def build_text_plan_for_export(
    export_dir: Path,
    *,
    log: Log = no_log,
    max_batch: int = TEXT_MAX_BATCH,
    workspace_gib: float = DEFAULT_WORKSPACE_GIB,
) -> Path:
    """Build, check and record ``text.fp16.plan``, the text tower's plan, in a full CLIP export; return its path."""
    missing = tensorrt_missing()
    if missing:
        raise TensorRTUnavailable(missing)
    import onnx

    export_dir = Path(export_dir)
    metadata = read_metadata(export_dir)
    entry = text_entry(export_dir)
    if entry is None:
        raise ExportError(f"{export_dir}: the export has no text tower to build a plan of")
    fp16_onnx, _ = export_text_fp16(export_dir, log=log)
    target = current_target()
    cache = timing_cache_path(target)
    context = int(entry["context_length"])
    shapes = ((1, 2), (1, min(TEXT_OPT_TOKENS, context)), (max_batch, context))
    log(f"building TensorRT {target.tensorrt_version} text-tower plan for {target.gpu_name}: token ids "
        f"{shapes[0]} to {shapes[2]}, workspace {workspace_gib:g} GiB")
    started = time.perf_counter()
    plan_bytes = build_plan_bytes(
        sorted_for_tensorrt(onnx.load(str(fp16_onnx))).SerializeToString(),
        {entry["input"]: shapes},
        int(workspace_gib * (1 << 30)),
        cache,
        log,
    )
    build_seconds = time.perf_counter() - started
    tokenizer = export_tokenizer(export_dir)
    ids = tokenizer(PARITY_PROMPTS).ids
    parity = _keep_checked_plan(
        export_dir,
        TEXT_PLAN_FILE,
        plan_bytes,
        lambda path: TensorRTTextEncoder(path, tokenizer, metadata["model_id"], int(metadata["dim"])).encode_ids(ids),
        onnx_embed(export_dir / entry["onnx"], ids),
        f"{len(PARITY_PROMPTS)} built-in prompts",
        "prompts",
        log,
    )
    _record_plan(export_dir, TEXT_PLAN_FILE, TEXT_PLAN_KIND, target, fp16_onnx, workspace_gib, cache, build_seconds,
                 parity, token_id_shapes={"min": shapes[0], "opt": shapes[1], "max": shapes[2]})
    return export_dir / TEXT_PLAN_FILE
