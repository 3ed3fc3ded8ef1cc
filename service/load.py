"""Encoders for jobs: a model name + backend -> a ready Encoder, and an index -> its own encoder.

Jobs that embed a gallery (index, eval) open encoders by name and make what they need in the
model cache on first use (ONNX export, FP16 / INT8 models). Jobs that embed queries against an
index (search, serve) reopen exactly the encoder the index recorded (its `EncoderRecipe`): the
same artefact file, backend and precision, opened read-only; they never write into the model
cache and never silently embed with another model or runtime.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from fastret.engine.cuda_torch import TorchCudaEncoder, cuda_missing
from fastret.engine.encoders import (
    BACKENDS,
    PRECISIONS,
    Encoder,
    EncoderRecipe,
    ModelInfo,
    OnnxEncoder,
    TorchEncoder,
    artefact_files,
    artefact_size,
    ort_providers,
    ort_tensorrt_options,
)
from fastret.engine.index import Index
from fastret.engine.log import Log, no_log
from fastret.engine.openvino_runtime import (
    QUERY_MODELS_DIR,
    OpenVinoEncoder,
    cpu_supports_bf16,
    openvino_missing,
    save_query_model,
)
from fastret.engine.tensorrt_runtime import PLAN_FILE, TensorRTEncoder, plan_status
from fastret.engine.text import OnnxTextEncoder, TensorRTTextEncoder, TextEncoder
from fastret.export.models import CLIP_B32, EFFICIENTNET_LITE, ModelSource, efficientnet_architecture, resolve_model
from fastret.export.onnx_export import (
    FP32_ONNX,
    INPUT_NAME,
    ExportError,
    METADATA_FILE,
    cache_root,
    ensure_exported,
    export_dir_name,
    find_artefact,
    read_metadata,
)
from fastret.export.text_tower import (
    TEXT_FP16_KIND,
    TEXT_INT8_KIND,
    TEXT_PLAN_FILE,
    ensure_text_tower,
    export_tokenizer,
    text_entry,
)

TORCH_PRECISIONS = {"torch": "fp32", "torch-cuda": "fp32", "torch-cuda-fp16": "fp16"}
"""The PyTorch backends and the one precision each runs."""
ARTEFACT_BACKENDS = ("onnxruntime", "onnxruntime-trt", "openvino", "tensorrt")
"""The backends that run an exported artefact file."""
OPENVINO_CACHE = "openvino-cache"


class BackendUnavailable(Exception):
    """The requested runtime is not installed or has no artefact for this model."""


def model_info(source: ModelSource) -> ModelInfo:
    return ModelInfo(
        model_id=source.model_id,
        weights_sha256=source.weights_sha256,
        dim=source.dim,
        preprocessing=source.preprocessing,
    )


def encoder_for_source(
    source: ModelSource,
    backend: str = "auto",
    *,
    threads: int | None = None,
    image_dir: Path | None = None,
    precision: str = "auto",
    workload: str = "latency",
    log: Log = no_log,
) -> Encoder:
    """An Encoder for a resolved model on the chosen backend and precision, making its artefacts
    in the model cache on first use (INT8 CNNs are calibrated on `image_dir`).

    `workload`: "latency" for one query at a time, "throughput" for batch jobs (index, eval), where
    CPU runtimes then serve several batches at once; GPU runtimes ignore it.
    """
    if backend not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if precision not in PRECISIONS:
        raise BackendUnavailable(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    info = model_info(source)
    extra = {"threads": threads} if threads else {}
    if backend in TORCH_PRECISIONS:
        return _torch_encoder(source, backend, precision, **extra)
    export_dir = ensure_exported(source, image_dir=image_dir, log=log)
    ensure_text_tower(source, export_dir, log=log)  # searches open it read-only: it is made with the image tower
    if backend in ("tensorrt", "auto"):
        plan, reason = plan_status(export_dir / PLAN_FILE, _record(export_dir, PLAN_FILE))
        if plan is not None:
            try:
                return TensorRTEncoder(plan, info, artefact_sha256=_recorded_sha256(export_dir, plan))
            except RuntimeError as exc:  # a plan TensorRT cannot load: say so, never crash `auto`
                plan, reason = None, str(exc)
        if backend == "tensorrt":
            raise BackendUnavailable(f"backend tensorrt: {reason}")
        if (export_dir / PLAN_FILE).is_file():
            log(f"not using the TensorRT plan: {reason}")
    cpu_only = _cpu_only()
    if backend == "auto" and cpu_only:
        backend = _cpu_backend(source.family, precision)
    if backend == "openvino":
        return _openvino_encoder(
            export_dir, info, source.family, precision, workload, image_dir=image_dir, log=log, **extra
        )
    if precision == "bf16":
        raise BackendUnavailable(f"precision bf16 runs on the openvino backend, not {backend}")
    if precision == "int8" or (precision == "auto" and backend == "onnxruntime" and cpu_only):
        path = _int8_onnx(export_dir, source.family, image_dir, required=precision == "int8", log=log)
        if path is not None:
            return OnnxEncoder(
                path,
                info,
                providers=["CPUExecutionProvider"],
                precision="int8",
                workload=workload,
                artefact_sha256=_recorded_sha256(export_dir, path),
                **extra,
            )
    tensorrt_ep = backend == "onnxruntime-trt"
    return _onnx_encoder(export_dir, info, tensorrt_ep=tensorrt_ep, image_dir=image_dir, log=log, workload=workload, **extra)


def _torch_encoder(source: ModelSource, backend: str, precision: str, **extra) -> Encoder:
    """PyTorch eager on the CPU (fp32), or on a CUDA GPU: fp32, or FP16 with CUDA graphs."""
    from fastret.export.torch_models import load_torch_model  # torch: imported only for these backends

    runs = TORCH_PRECISIONS[backend]
    if precision not in ("auto", runs):
        raise BackendUnavailable(f"backend {backend} runs {runs}, not {precision}")
    if backend == "torch":
        return TorchEncoder(load_torch_model(source), model_info(source), **extra)
    missing = cuda_missing()
    if missing:
        raise BackendUnavailable(f"backend {backend}: {missing}")
    fast = backend == "torch-cuda-fp16"  # else fp32 eager: the GPU PyTorch baseline
    return TorchCudaEncoder(load_torch_model(source), model_info(source), half=fast, graphs=fast)


def _cpu_backend(family: str, precision: str) -> str:
    """`auto` on a CPU, by measurement (BENCHMARKS.md, "CPU speed"): for CLIP, ONNX Runtime's
    dynamic INT8 (as fast as OpenVINO's INT8 weights, starts in a third of the time with half the
    memory, no NNCF step); for the CNN, OpenVINO's static INT8 once calibrated, else bf16 where the
    CPU has it (1.6x ONNX Runtime fp32), else ONNX Runtime, where OpenVINO would only run fp32."""
    from fastret.export.quantize import INT8_FAMILIES, OPENVINO_INT8_FAMILIES

    if openvino_missing() or (precision in ("auto", "int8") and family in INT8_FAMILIES):
        return "onnxruntime"
    if precision in ("auto", "int8") and family in OPENVINO_INT8_FAMILIES:
        return "openvino"
    if precision == "auto":
        return "openvino" if cpu_supports_bf16() else "onnxruntime"
    return "openvino" if precision == "bf16" else "onnxruntime"


def _cpu_only() -> bool:
    """No GPU runtime here: ONNX Runtime has no CUDA provider."""
    import onnxruntime as ort

    return "CUDAExecutionProvider" not in ort.get_available_providers()


def _record(export_dir: Path, name: str) -> dict | None:
    """What the export's metadata.json records of one artefact (None: nothing)."""
    try:
        return read_metadata(export_dir).get("artefacts", {}).get(name)
    except ExportError:
        return None


def _recorded_sha256(export_dir: Path, path: Path) -> str | None:
    """The sha256 the export recorded for an artefact in it (None for artefacts made before that)."""
    record = _record(export_dir, path.relative_to(export_dir).as_posix())
    return None if record is None else record.get("sha256")


def _openvino_encoder(
    export_dir: Path,
    info: ModelInfo,
    family: str,
    precision: str,
    workload: str,
    *,
    image_dir: Path | None,
    log: Log,
    **extra,
) -> Encoder:
    """OpenVINO on the CPU: INT8 where the model has it, else bf16 where the CPU has it, else fp32."""
    missing = openvino_missing()
    if missing:
        raise BackendUnavailable(f"backend openvino: {missing}")
    cache_dir = export_dir / OPENVINO_CACHE
    model = None
    if precision in ("auto", "int8"):
        model = _openvino_int8(export_dir, family, image_dir, required=precision == "int8", log=log)
    if model is not None:
        precision = "int8"
    else:
        model = export_dir / FP32_ONNX
        if precision == "auto":
            precision = "bf16" if cpu_supports_bf16() else "fp32"
        if precision == "bf16" and not cpu_supports_bf16():
            raise BackendUnavailable("precision bf16: this CPU has no native bfloat16 arithmetic")
    sha256 = _recorded_sha256(export_dir, model)
    if workload == "throughput":  # a batch job (index, eval): save what later searches import instead of compiling
        try:
            save_query_model(model, info, precision, export_dir / QUERY_MODELS_DIR, artefact_sha256=sha256)
        except (OSError, RuntimeError) as exc:
            log(f"no compiled query model saved (searches compile in memory): {exc}")
    return OpenVinoEncoder(
        model, info, precision=precision, cache_dir=cache_dir, workload=workload, artefact_sha256=sha256, **extra
    )


def _openvino_int8(export_dir: Path, family: str, image_dir: Path | None, *, required: bool, log: Log) -> Path | None:
    """The export's INT8 OpenVINO model, made on first use (CNNs: calibrated on `image_dir`)."""
    from fastret.export.quantize import (
        OPENVINO_INT8_FAMILIES,
        OPENVINO_INT8_KIND,
        OPENVINO_STATIC_INT8_FAMILIES,
        OPENVINO_STATIC_INT8_GRAPH,
        export_openvino_int8,
    )

    if family not in OPENVINO_INT8_FAMILIES:
        if required:
            raise BackendUnavailable(
                f"backend openvino runs int8 for {', '.join(OPENVINO_INT8_FAMILIES)} models, not {family}"
            )
        return None
    return _derived_model(
        export_dir,
        OPENVINO_INT8_KIND,
        lambda: export_openvino_int8(export_dir, image_dir, log=log)[0],
        required=required,
        fallback=f"OpenVINO {'bf16' if cpu_supports_bf16() else 'fp32'} instead of int8",
        log=log,
        current=lambda record: family not in OPENVINO_STATIC_INT8_FAMILIES
        or record.get("graph") == OPENVINO_STATIC_INT8_GRAPH,
    )


def _int8_onnx(export_dir: Path, family: str, image_dir: Path | None, *, required: bool, log: Log) -> Path | None:
    """The export's dynamic-INT8 ONNX (transformer models), written on first use; None when not offered."""
    from fastret.export.quantize import INT8_FAMILIES, INT8_ONNX_KIND, OPENVINO_INT8_FAMILIES, export_int8

    if family not in INT8_FAMILIES:
        if required:
            where = "runs on the openvino backend" if family in OPENVINO_INT8_FAMILIES else "is not offered"
            raise BackendUnavailable(f"precision int8 for {family} models {where}")
        return None
    return _derived_model(
        export_dir,
        INT8_ONNX_KIND,
        lambda: export_int8(export_dir, image_dir=image_dir, log=log)[0],
        required=required,
        fallback="using the fp32 ONNX",
        log=log,
    )


def _derived_model(
    export_dir: Path,
    kind: str,
    make: Callable[[], Path],
    *,
    required: bool,
    fallback: str,
    log: Log,
    current: Callable[[dict], bool] = lambda record: True,
) -> Path | None:
    """The export's newest model of a kind (fp16, int8), made when it has none, or none that is
    `current` (its record says it is made the current way; an older one serves when a current one
    cannot be made); None, and the fp32 ONNX stays, when none can be made or passes its parity check
    (an error when the user asked for it)."""
    found = find_artefact(export_dir, kind)
    if found is not None and current(found[1]):
        return found[0]
    try:
        return make()
    except ValueError as exc:
        if found is not None:
            log(f"keeping {found[0]} ({exc})")
            return found[0]
        if required:
            raise BackendUnavailable(str(exc)) from None
        log(f"{fallback}: {exc}")
        return None


def _tensorrt_ep_missing() -> str | None:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if "TensorrtExecutionProvider" in available:
        return None
    return (
        "backend onnxruntime-trt needs an onnxruntime build with the TensorRT execution provider "
        f"(this one has {', '.join(available)}); on an NVIDIA GPU run `pip install 'fastret[gpu]'`"
    )


def _tensorrt_ep_providers(info: ModelInfo, cache_dir: Path | None) -> list:
    from fastret.export.tensorrt_build import DEFAULT_PROFILE

    batches = (DEFAULT_PROFILE.min, DEFAULT_PROFILE.opt, DEFAULT_PROFILE.max)
    return ort_providers(tensorrt_options=ort_tensorrt_options(cache_dir, INPUT_NAME, info.preprocessing.size, batches))


def _onnx_encoder(
    export_dir: Path, info: ModelInfo, *, tensorrt_ep: bool, image_dir: Path | None, log: Log, **extra
) -> OnnxEncoder:
    """ONNX Runtime on the best provider this build has; the FP16 ONNX when CUDA runs it."""
    import onnxruntime as ort

    if tensorrt_ep:
        missing = _tensorrt_ep_missing()
        if missing:
            raise BackendUnavailable(missing)
        path = export_dir / FP32_ONNX
        return OnnxEncoder(
            path,
            info,
            providers=_tensorrt_ep_providers(info, export_dir / "ort-tensorrt-cache"),
            precision="fp16",
            backend="onnxruntime-trt",
            artefact_sha256=_recorded_sha256(export_dir, path),
            **extra,
        )
    fp16 = _fp16_onnx(export_dir, image_dir, log) if "CUDAExecutionProvider" in ort.get_available_providers() else None
    path = fp16 or export_dir / FP32_ONNX
    return OnnxEncoder(
        path,
        info,
        providers=ort_providers(),
        precision="fp32" if fp16 is None else "fp16",
        artefact_sha256=_recorded_sha256(export_dir, path),
        **extra,
    )


def _fp16_onnx(export_dir: Path, image_dir: Path | None, log: Log) -> Path | None:
    """The export's FP16 ONNX, written on first use; None (fp32 stays) when it fails its parity check."""
    from fastret.export.fp16 import FP16_KIND, export_fp16

    return _derived_model(
        export_dir,
        FP16_KIND,
        lambda: export_fp16(export_dir, image_dir=image_dir, log=log)[0],
        required=False,
        fallback="using the fp32 ONNX on CUDA",
        log=log,
    )


def open_encoder(
    model: str = "auto",
    backend: str = "auto",
    *,
    threads: int | None = None,
    image_dir: Path | None = None,
    precision: str = "auto",
    workload: str = "latency",
    log: Log = no_log,
) -> Encoder:
    """Resolve a model name (see fastret.export.models), say what was chosen, open the runtime."""
    source, why = resolve_model(model)
    log(f"model: {source.model_id} ({why})")
    return encoder_for_source(
        source, backend, threads=threads, image_dir=image_dir, precision=precision, workload=workload, log=log
    )


REINDEX = "`fastret index DIR --out INDEX`"


def encoder_from_recipe(
    recipe: EncoderRecipe,
    *,
    threads: int | None = None,
    workload: str = "latency",
    reindex: str = REINDEX,
    log: Log = no_log,
) -> Encoder:
    """Exactly the encoder a recipe records: its backend and precision on the very artefact it names.

    Opens only: never exports, quantises or compiles into the model cache (OpenVINO compiles in
    memory). The artefact is looked for at its recorded path, then at the same place in this
    machine's cache ($FASTRET_CACHE); its size must match the recipe (its sha256 is for a full
    verification, not for every query). Where the artefact is gone or its runtime cannot run here,
    BackendUnavailable says why and what to do (`reindex`: the command that rebuilds the index):
    queries are never embedded by another model or runtime.
    """
    if recipe.backend not in (TORCH_PRECISIONS if recipe.artefact is None else ARTEFACT_BACKENDS):
        raise BackendUnavailable(
            f"the index's encoder record names backend {recipe.backend!r} with artefact {recipe.artefact}, "
            "which no runtime opens; re-index with `fastret index`"
        )
    info = recipe.model
    extra = {"threads": threads} if threads else {}
    if recipe.artefact is None:  # the PyTorch backends: the weights are the artefact
        source = checked_source(info)
        return _runs_here(recipe, lambda: _torch_encoder(source, recipe.backend, "auto", **extra))
    path = _artefact_here(recipe, reindex, log)
    common = {"artefact_sha256": recipe.artefact_sha256, **extra}
    if recipe.backend == "tensorrt":
        plan, reason = plan_status(path, _record(path.parent, path.name))
        if plan is None:
            raise _cannot_run_here(recipe, reason)
        return _runs_here(recipe, lambda: TensorRTEncoder(plan, info, artefact_sha256=recipe.artefact_sha256))
    if recipe.backend == "openvino":
        missing = openvino_missing()
        if missing is None and recipe.precision == "bf16" and not cpu_supports_bf16():
            missing = "this CPU has no native bfloat16 arithmetic"
        if missing:
            raise _cannot_run_here(recipe, missing)
        return OpenVinoEncoder(
            path, info, precision=recipe.precision, workload=workload, query_models=_query_models(path, info), **common
        )
    if recipe.backend == "onnxruntime-trt":
        missing = _tensorrt_ep_missing()
        if missing:
            raise _cannot_run_here(recipe, missing)
        providers = _tensorrt_ep_providers(info, None)
        return OnnxEncoder(
            path, info, providers=providers, precision=recipe.precision, backend="onnxruntime-trt", **common
        )
    providers = ["CPUExecutionProvider"] if recipe.precision == "int8" else ort_providers()
    return OnnxEncoder(path, info, providers=providers, precision=recipe.precision, workload=workload, **common)


def _artefact_here(recipe: EncoderRecipe, reindex: str, log: Log) -> Path:
    """The recipe's artefact on this machine: at its recorded path, else at the same place in this
    machine's cache; refused when it is absent or its size is not the recorded one."""
    recorded = Path(recipe.artefact)
    candidates = [recorded]
    export_name = export_dir_name(recipe.model.model_id, recipe.model.weights_sha256)
    if export_name in recorded.parts:
        inside = recorded.parts[recorded.parts.index(export_name) + 1 :]
        candidates.append(cache_root() / "models" / export_name / Path(*inside))
    for path in candidates:
        if not all(part.is_file() for part in artefact_files(path)):
            continue
        size = artefact_size(path)
        if recipe.artefact_bytes is not None and size != recipe.artefact_bytes:
            raise BackendUnavailable(
                f"the index's encoder artefact {path} is {size} bytes, the index recorded {recipe.artefact_bytes}: "
                f"it is not the file the gallery was embedded with; re-run {reindex}"
            )
        if path != recorded:
            log(f"the index's encoder artefact {recorded} is not on this machine; "
                f"using the same file in {cache_root()}")
        return path
    raise BackendUnavailable(
        f"the index's encoder artefact {recorded} is not on this machine; re-run {reindex} (it embeds the "
        "gallery again with an artefact made here), or point FASTRET_CACHE at the cache that made it"
    )


def _export_dir_above(artefact: Path, info: ModelInfo) -> Path | None:
    """The export directory of `info`'s model that an artefact lies in (None: not in one)."""
    name = export_dir_name(info.model_id, info.weights_sha256)
    parts = Path(artefact).parts
    return Path(*parts[: parts.index(name) + 1]) if name in parts else None


def _query_models(artefact: Path, info: ModelInfo) -> Path | None:
    """Where the compiled query models of an artefact's export are (None: not in an export)."""
    export_dir = _export_dir_above(artefact, info)
    return None if export_dir is None else export_dir / QUERY_MODELS_DIR


def _runs_here(recipe: EncoderRecipe, open_: Callable[[], Encoder]) -> Encoder:
    """open_(), with a runtime that cannot start here refused in the recipe's words."""
    try:
        return open_()
    except BackendUnavailable as exc:
        raise _cannot_run_here(recipe, str(exc)) from None
    except RuntimeError as exc:  # a TensorRT plan that does not load
        raise _cannot_run_here(recipe, str(exc)) from None


def _cannot_run_here(recipe: EncoderRecipe, reason: str) -> BackendUnavailable:
    return BackendUnavailable(
        f"the index was embedded on {recipe.line()}, which cannot run here: {reason}; pass --backend / "
        "--precision to embed queries on another runtime (scores may then differ slightly)"
    )


def checked_source(info: ModelInfo) -> ModelSource:
    """The model an index was built with, refused when its weights changed since (hashes them)."""
    source, _ = resolve_model(info.model_id)
    if source.weights_sha256 != info.weights_sha256:
        raise BackendUnavailable(
            f"the index was built with {info.model_id} weights sha256 {info.weights_sha256[:12]}…, "
            f"but the weights found now hash to {source.weights_sha256[:12]}…; re-index with "
            "`fastret index`"
        )
    return source


def index_recipe(index: Index) -> EncoderRecipe | None:
    """The encoder recipe an index recorded (None for indexes made before recipes were)."""
    if index.encoder is None:
        return None
    try:
        return EncoderRecipe.from_dict(index.encoder)
    except ValueError as exc:
        raise BackendUnavailable(
            f"the index's encoder record is damaged ({exc}); re-index with `fastret index`"
        ) from None


def encoder_for_index(
    index: Index,
    backend: str = "auto",
    *,
    threads: int | None = None,
    precision: str = "auto",
    workload: str = "latency",
    log: Log = no_log,
) -> Encoder:
    """The encoder that embeds queries for an index.

    With `backend` and `precision` both auto, the index's recorded recipe is reopened exactly
    (encoder_from_recipe: read-only, no weights hashing, a refusal rather than another runtime).
    An explicit backend or precision opens that runtime on the index's model instead (the weights
    are checked), and says so when it differs from the recorded one. Indexes made before recipes
    were recorded: the weights are checked and the runtime they recorded (`index.runtime`) is tried
    first, else `auto`.
    """
    options = {"threads": threads, "workload": workload, "log": log}
    recipe = index_recipe(index)
    if recipe is not None and backend == precision == "auto":
        where = index.version_dir.parent if index.version_dir is not None else "INDEX"
        return encoder_from_recipe(recipe, reindex=f"`fastret index {index.root} --out {where}`", **options)
    source = checked_source(index.model)
    if recipe is not None:
        encoder = encoder_for_source(source, backend, precision=precision, **options)
        opened = encoder.recipe
        if (opened.backend, opened.precision, opened.artefact) != (recipe.backend, recipe.precision, recipe.artefact):
            log(f"the index was embedded on {recipe.line()}; queries run on {opened.line()} as asked: "
                "scores may differ slightly")
        return encoder
    recorded = index.runtime
    if backend == precision == "auto" and recorded and recorded.get("backend") in BACKENDS:
        same = recorded.get("precision") if recorded.get("precision") in PRECISIONS else "auto"
        try:
            return encoder_for_source(source, recorded["backend"], precision=same, **options)
        except BackendUnavailable as exc:
            log(f"the index was embedded on {recorded['backend']} ({recorded.get('precision')}), not available "
                f"here ({exc}); queries use the auto runtime, scores may differ slightly")
    return encoder_for_source(source, backend, precision=precision, **options)


class TextUnavailable(BackendUnavailable):
    """Text queries cannot run on an index: its model has no text tower, or its export lacks one."""


TEXT_MODELS = f"--model {CLIP_B32} (or hf:ORG/NAME, or a CLIP checkpoint directory)"


def model_export_dir(index: Index) -> Path | None:
    """The export directory of the index's model: the one its recipe's artefact lies in, else the one
    in this machine's cache; None when neither exists."""
    candidates = []
    recipe = index_recipe(index)
    if recipe is not None and recipe.artefact is not None:
        candidates.append(_export_dir_above(Path(recipe.artefact), index.model))
    candidates.append(cache_root() / "models" / export_dir_name(index.model.model_id, index.model.weights_sha256))
    return next((path for path in candidates if path is not None and (path / METADATA_FILE).is_file()), None)


def _no_text_tower(index: Index, why: str) -> TextUnavailable:
    where = index.version_dir.parent if index.version_dir is not None else "INDEX"
    return TextUnavailable(
        f"text queries need a CLIP model with its text tower: {why}; index the images with {TEXT_MODELS}, e.g. "
        f"`fastret index {index.root} --model {CLIP_B32} --out {where}`"
    )


def text_encoder_for_index(
    index: Index,
    backend: str = "auto",
    *,
    precision: str = "auto",
    threads: int | None = None,
    log: Log = no_log,
) -> TextEncoder:
    """The text tower of the index's model, opened read-only (see _text_encoder_for_index); a damaged
    text tower (unreadable metadata, tokenizer or graph) is refused as TextUnavailable too."""
    try:
        return _text_encoder_for_index(index, backend, precision=precision, threads=threads, log=log)
    except BackendUnavailable:
        raise
    except Exception as exc:  # json, tokenizers and onnxruntime raise their own kinds for damaged files
        raise TextUnavailable(
            f"the text tower of {index.model.model_id} cannot be opened ({type(exc).__name__}: {exc}); re-run "
            "`fastret index` with the same model to export it again"
        ) from None


def _text_encoder_for_index(
    index: Index,
    backend: str,
    *,
    precision: str,
    threads: int | None,
    log: Log,
) -> TextEncoder:
    """The text tower of the index's model, opened read-only from its export (never exports anything).

    Its runtime follows the image side's: the index's recipe when `backend` and `precision` are
    auto, else what they ask for; a TensorRT plan, an INT8 or FP16 text model where the export has
    one, else the fp32 text ONNX (which serves every runtime: text embeddings are made at query
    time only, so no gallery depends on their runtime). TextUnavailable (a BackendUnavailable)
    says why text queries cannot run and which model to index with.
    """
    model_id = index.model.model_id
    export_dir = model_export_dir(index)
    if efficientnet_architecture(model_id) in EFFICIENTNET_LITE or (export_dir is not None and read_metadata(export_dir).get("family") != "clip"):
        raise _no_text_tower(index, f"the index was built with {model_id}, an image-only model")
    if export_dir is None:
        raise TextUnavailable(
            f"no export of {model_id} on this machine (looked in {cache_root() / 'models'}); re-run "
            f"`fastret index {index.root} --model {model_id}` here, which exports both towers"
        )
    metadata = read_metadata(export_dir)
    if text_entry(export_dir) is None:
        raise _no_text_tower(
            index,
            f"the export {export_dir} has none (the checkpoint is a vision tower alone, lacks a tokenizer, or was "
            "exported before text queries; `fastret index` adds it for a full CLIP checkpoint)",
        )
    if metadata.get("weights_sha256") != index.model.weights_sha256 or int(metadata.get("dim", -1)) != index.model.dim:
        raise TextUnavailable(f"the export {export_dir} is not of the index's model weights; re-index with `fastret index`")
    recipe = index_recipe(index)
    runs_backend = backend if backend != "auto" or recipe is None else recipe.backend
    runs_precision = precision if precision != "auto" or recipe is None else recipe.precision
    common = {"tokenizer": export_tokenizer(export_dir), "model_id": model_id, "dim": index.model.dim}
    if runs_backend == "tensorrt":
        plan, reason = plan_status(export_dir / TEXT_PLAN_FILE, _record(export_dir, TEXT_PLAN_FILE))
        if plan is not None:
            try:
                return TensorRTTextEncoder(plan, **common)
            except RuntimeError as exc:  # a plan TensorRT cannot load: the ONNX text tower answers instead
                reason = str(exc)
        log(f"text queries run on ONNX Runtime, not TensorRT: {reason}")
    extra = {"threads": threads} if threads else {}
    derived = {"int8": (TEXT_INT8_KIND, ["CPUExecutionProvider"])}
    if not _cpu_only():
        derived["fp16"] = (TEXT_FP16_KIND, ort_providers())
    if runs_precision in derived:
        kind, providers = derived[runs_precision]
        found = find_artefact(export_dir, kind)
        if found is not None:
            return OnnxTextEncoder(found[0], precision=runs_precision, providers=providers, **common, **extra)
        log(f"the export has no {runs_precision} text tower; text queries run fp32")
    return OnnxTextEncoder(export_dir / text_entry(export_dir)["onnx"], providers=ort_providers(), **common, **extra)
