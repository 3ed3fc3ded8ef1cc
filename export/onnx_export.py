"""PyTorch -> ONNX export of an EmbeddingModel, checked against PyTorch, cached by weights hash.

An export directory holds ``model.onnx`` (fp32), the artefacts derived from it (FP16 and INT8
models, a TensorRT plan), and ``metadata.json``: model id, weights sha256, preprocessing, dim,
opset, and a record of every artefact (kind, sha256, parity figures). The directory is written
atomically, so a half-finished export is never picked up by a later run.

Derived models are named by a digest of their inputs (`addressed_name`): made again from the same
inputs they land on the same path, made from other inputs (another calibration folder) on a new
one, so an artefact an index was built with is never replaced.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from typing import TYPE_CHECKING, Callable, Iterable

import numpy as np

from fastret.engine.decode import ImageError, Preprocessing, list_images, load_pixels
from fastret.engine.encoders import artefact_files
from fastret.engine.files import sha256_files, write_text_atomic
from fastret.engine.log import Log, no_log
from fastret.export.models import ModelSource

if TYPE_CHECKING:
    import torch

ONNX_OPSET = 17
METADATA_FILE = "metadata.json"
FP32_ONNX = "model.onnx"
FP32_KIND = "onnx-fp32"
INPUT_NAME = "pixels"
OUTPUT_NAME = "embeddings"
PARITY_MIN_COSINE = 0.9999
PARITY_MAX_ABS = 2e-3
PARITY_IMAGES = 16


class ExportError(Exception):
    """An export that failed or whose parity check is outside tolerance."""


@dataclass(frozen=True)
class Parity:
    """How close one runtime's embeddings are to the fp32 PyTorch reference."""

    max_abs_diff: float
    min_cosine: float
    images: int
    source: str  # where the parity images came from
    mean_cosine: float = 1.0
    unit: str = "images"  # what was embedded: images, or prompts for a text tower

    def to_dict(self) -> dict:
        return {
            "max_abs_diff": self.max_abs_diff,
            "min_cosine": self.min_cosine,
            "mean_cosine": self.mean_cosine,
            "images": self.images,
            "source": self.source,
            "unit": self.unit,
        }

    def line(self, label: str) -> str:
        return (
            f"{label}: max abs diff {self.max_abs_diff:.2e}, min cosine {self.min_cosine:.6f}, "
            f"mean {self.mean_cosine:.6f} over {self.images} {self.unit} ({self.source})"
        )


def compare_embeddings(reference: np.ndarray, candidate: np.ndarray, source: str, unit: str = "images") -> Parity:
    """Max absolute difference and minimum row cosine between two (N, D) embedding sets."""
    ref = reference.astype(np.float64)
    cand = candidate.astype(np.float64)
    cosines = (ref * cand).sum(1) / (
        np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1) + 1e-30
    )
    return Parity(
        max_abs_diff=float(np.abs(ref - cand).max()),
        min_cosine=float(cosines.min()),
        images=len(ref),
        source=source,
        mean_cosine=float(cosines.mean()),
        unit=unit,
    )


def cache_root() -> Path:
    """Where exports live: $FASTRET_CACHE, else ~/.cache/fastret."""
    return Path(os.environ.get("FASTRET_CACHE", Path.home() / ".cache" / "fastret")).expanduser()


def export_dir_name(model_id: str, weights_sha256: str) -> str:
    """The name of one model's directory in a cache: keyed by model id and weights hash."""
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_id)[-60:]
    return f"{slug}-{weights_sha256[:16]}"


def export_dir_for(source: ModelSource, root: Path | None = None) -> Path:
    """The cache directory of one model (under $FASTRET_CACHE/models unless `root` is given)."""
    return (root or cache_root()) / "models" / export_dir_name(source.model_id, source.weights_sha256)


def decodable_crops(paths: Iterable[Path], spec: Preprocessing, count: int) -> tuple[list[Path], list[np.ndarray]]:
    """The first `count` of `paths` that decode, and their model-ready crops; the others are passed over."""
    kept: list[Path] = []
    crops: list[np.ndarray] = []
    for path in paths:
        try:
            crops.append(load_pixels(path, spec))
        except ImageError:
            continue
        kept.append(path)
        if len(crops) == count:
            break
    return kept, crops


def parity_pixels(spec: Preprocessing, image_dir: Path | None, count: int = PARITY_IMAGES) -> tuple[np.ndarray, str]:
    """Real images for parity checks when a folder is given, else seeded synthetic photos-like noise."""
    if image_dir is not None:
        _, crops = decodable_crops(list_images(image_dir), spec, count)
        if crops:
            return np.stack(crops), f"real images from {image_dir}"
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0 : spec.size, 0 : spec.size] / spec.size
    base = np.stack([yy, xx, (yy + xx) / 2], axis=-1)[None] * 255
    noise = rng.normal(0, 40, size=(count, spec.size, spec.size, 3))
    synthetic = np.clip(base * rng.uniform(0.3, 1.0, size=(count, 1, 1, 3)) + noise, 0, 255)
    return synthetic.astype(np.uint8), "seeded synthetic images (no image folder given)"


def torch_embed(model: torch.nn.Module, pixels: np.ndarray, batch_size: int = 16) -> np.ndarray:
    import torch

    with torch.inference_mode():
        parts = [model(torch.from_numpy(pixels[i : i + batch_size])) for i in range(0, len(pixels), batch_size)]
    return torch.cat(parts).numpy()


def _export_graph(model: torch.nn.Module, spec: Preprocessing, path: Path, opset: int) -> None:
    import torch

    trace_to_onnx(model, torch.zeros((2, spec.size, spec.size, 3), dtype=torch.uint8), path, opset)


def trace_to_onnx(
    model: torch.nn.Module,
    example: torch.Tensor,
    path: Path,
    opset: int,
    input_name: str = INPUT_NAME,
    input_axes: dict[int, str] | None = None,
) -> None:
    """TorchScript-traced ONNX export: one input (`input_axes`: its dynamic axes, the batch by
    default), one (batch, D) output."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on constant folding are not actionable
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=[input_name],
            output_names=[OUTPUT_NAME],
            dynamic_axes={input_name: input_axes or {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=opset,
            dynamo=False,
        )


def _torch_version() -> str:
    import torch

    return torch.__version__


def onnx_embed(path: Path, inputs: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """Embeddings from an ONNX file (pixels, or token ids for a text tower) on the CPU provider, for parity checks."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    parts = [
        session.run([OUTPUT_NAME], {name: inputs[i : i + batch_size]})[0]
        for i in range(0, len(inputs), batch_size)
    ]
    return np.concatenate(parts).astype(np.float32)


def write_json_atomic(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True))


def read_metadata(export_dir: Path) -> dict:
    path = export_dir / METADATA_FILE
    if not path.is_file():
        raise ExportError(f"{export_dir}: no {METADATA_FILE}; not a fastret export")
    return json.loads(path.read_text())


def require_parity(parity: Parity, what: str) -> None:
    """ExportError unless an fp32 ONNX graph matches PyTorch within the export tolerance."""
    if parity.min_cosine < PARITY_MIN_COSINE or parity.max_abs_diff > PARITY_MAX_ABS:
        raise ExportError(
            f"{what} is outside tolerance: min cosine {parity.min_cosine:.6f} (need >= {PARITY_MIN_COSINE}), "
            f"max abs diff {parity.max_abs_diff:.2e} (need <= {PARITY_MAX_ABS:.0e})"
        )


def export_onnx(
    source: ModelSource,
    out_dir: Path | None = None,
    *,
    image_dir: Path | None = None,
    opset: int = ONNX_OPSET,
    log: Log = no_log,
) -> Path:
    """Export, check parity against PyTorch, write metadata; return the export directory."""
    if opset < 17:
        raise ExportError(f"opset {opset} is too old: fastret needs >= 17")
    out_dir = Path(out_dir) if out_dir is not None else export_dir_for(source)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    from fastret.export.torch_models import exportable, load_torch_model  # torch: imported only when exporting

    started = time.perf_counter()
    model = load_torch_model(source)
    pixels, pixel_source = parity_pixels(source.preprocessing, image_dir)
    reference = torch_embed(model, pixels)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        _export_graph(exportable(model), source.preprocessing, staging / FP32_ONNX, opset)
        parity = compare_embeddings(reference, onnx_embed(staging / FP32_ONNX, pixels), pixel_source)
        log(parity.line("ONNX fp32 vs PyTorch"))
        require_parity(parity, f"ONNX export of {source.model_id}")
        metadata = {
            "format": 1,
            "model_id": source.model_id,
            "family": source.family,
            "weights_sha256": source.weights_sha256,
            "dim": source.dim,
            "preprocessing": source.preprocessing.to_dict(),
            "opset": opset,
            "input": INPUT_NAME,
            "output": OUTPUT_NAME,
            "torch_version": _torch_version(),
            "artefacts": {
                FP32_ONNX: artefact_record(
                    staging / FP32_ONNX, FP32_KIND, precision="fp32", parity_vs_torch=parity.to_dict()
                )
            },
            "export_seconds": round(time.perf_counter() - started, 2),
        }
        write_json_atomic(staging / METADATA_FILE, metadata)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def ensure_exported(source: ModelSource, *, image_dir: Path | None = None, log: Log = no_log) -> Path:
    """The cached export of a model, exporting on first use only."""
    out_dir = export_dir_for(source)
    if (out_dir / METADATA_FILE).is_file() and (out_dir / FP32_ONNX).is_file():
        metadata = read_metadata(out_dir)
        if metadata.get("weights_sha256") == source.weights_sha256:
            return out_dir
    log(f"exporting {source.model_id} to ONNX (first use; cached in {out_dir})")
    return export_onnx(source, out_dir, image_dir=image_dir, log=log)


def artefact_record(path: Path, kind: str, **info) -> dict:
    """What metadata.json says of an artefact: its kind, sha256 (for verification; opening checks only
    the size), when it was made (the newest of a kind is the one new jobs use), and `info`."""
    return {**info, "kind": kind, "sha256": sha256_files(artefact_files(path)), "made": round(time.time(), 3)}


def add_artefact(export_dir: Path, name: str, kind: str, **info) -> None:
    """Record an artefact made in the export (FP16 / INT8 model, TensorRT plan) in metadata.json.

    `name`: the path of the file a runtime opens, relative to the export directory.
    """
    metadata = read_metadata(export_dir)
    metadata.setdefault("artefacts", {})[name] = artefact_record(export_dir / name, kind, **info)
    write_json_atomic(export_dir / METADATA_FILE, metadata)


def find_artefact(export_dir: Path, kind: str) -> tuple[Path, dict] | None:
    """The newest recorded artefact of a kind whose files are all present, and its record; None when none is."""
    recorded = read_metadata(export_dir).get("artefacts", {})
    of_kind = sorted(
        ((record.get("made", 0.0), name) for name, record in recorded.items() if record.get("kind") == kind),
        reverse=True,
    )
    for _, name in of_kind:
        if all(part.is_file() for part in artefact_files(export_dir / name)):
            return export_dir / name, recorded[name]
    return None


def fp32_sha256(export_dir: Path, name: str = FP32_ONNX) -> str:
    """sha256 of one of the export's fp32 ONNX graphs (`name`: the image tower's by default):
    recorded at export, hashed here for exports made before that."""
    recorded = read_metadata(export_dir)["artefacts"][name].get("sha256")
    return recorded or sha256_files([export_dir / name])


def addressed_name(stem: str, inputs: dict, suffix: str = "") -> str:
    """`stem.DIGEST` + suffix: a derived artefact's name, DIGEST a hash of everything it is made from."""
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
    return f"{stem}.{digest}{suffix}"


@dataclass(frozen=True)
class Tower:
    """One tower of an export, as derive_onnx needs it: its fp32 graph and the inputs its parity
    checks embed (`parity_inputs(export_dir, image_dir)` -> (inputs, where they came from))."""

    fp32: str
    parity_inputs: Callable[[Path, Path | None], tuple[np.ndarray, str]]
    unit: str


def _image_parity_pixels(export_dir: Path, image_dir: Path | None) -> tuple[np.ndarray, str]:
    return parity_pixels(Preprocessing.from_dict(read_metadata(export_dir)["preprocessing"]), image_dir)


IMAGE_TOWER = Tower(FP32_ONNX, _image_parity_pixels, "images")


def recorded_parity(record: dict) -> Parity:
    """The parity check an artefact passed when it was made, from its record."""
    return Parity(**record["parity_vs_onnx_fp32"])


def derive_onnx(
    export_dir: Path,
    stem: str,
    convert: Callable[[Path, Path], None],
    *,
    kind: str,
    label: str,
    min_cosine: float,
    settings: dict,
    image_dir: Path | None = None,
    log: Log = no_log,
    tower: Tower = IMAGE_TOWER,
) -> tuple[Path, Parity]:
    """A variant of a tower's fp32 ONNX (fp16, int8), kept only if its parity against fp32 holds.

    Its name carries a digest of the fp32 graph and the conversion `settings`: when that file is
    already recorded it is returned as it is. Otherwise the variant is converted into a staging file
    and renamed into place after the check, so a failed or interrupted conversion never leaves a
    file that later runs would pick up.
    """
    name = addressed_name(stem, {"kind": kind, "from": fp32_sha256(export_dir, tower.fp32), **settings}, ".onnx")
    target = export_dir / name
    record = read_metadata(export_dir).get("artefacts", {}).get(name)
    if record is not None and target.is_file():
        return target, recorded_parity(record)
    fd, staging_name = tempfile.mkstemp(dir=export_dir, prefix=f".{name}.", suffix=".tmp")
    os.close(fd)
    staging = Path(staging_name)
    try:
        convert(export_dir / tower.fp32, staging)
        inputs, source = tower.parity_inputs(export_dir, image_dir)
        parity = compare_embeddings(
            onnx_embed(export_dir / tower.fp32, inputs), onnx_embed(staging, inputs), source, tower.unit
        )
        log(parity.line(f"{label} vs ONNX fp32"))
        if parity.min_cosine < min_cosine:
            raise ValueError(f"{label} min cosine {parity.min_cosine:.5f} < {min_cosine}; not kept")
        os.replace(staging, target)
    finally:
        staging.unlink(missing_ok=True)
    add_artefact(export_dir, name, kind, **settings, parity_vs_onnx_fp32=parity.to_dict())
    return target, parity
