"""The text tower of a full CLIP checkpoint, exported beside the image tower in the same export directory.

One export directory holds both towers of one checkpoint: the image tower (``model.onnx``,
onnx_export.py) and here the text tower, ``text.onnx`` (token ids (N, L) int64 in, L2-normalised
float32 (N, D) out, in the image embeddings' space), with the checkpoint's tokenizer saved as
``text-tokenizer.json`` for the `tokenizers` library (fastret.engine.text, which tokenises
queries without transformers). metadata.json says how to run them (its ``text`` entry: files,
context length, padding id) and records each text artefact as it records the image tower's,
with its parity figures over a fixed set of prompts.

Checks at export: the saved tokenizer reproduces the checkpoint's CLIPTokenizerFast ids on every
prompt, and the ONNX text tower (no attention mask: the tower is causal and pools the end
token, so padding after it changes nothing) matches PyTorch with the tokenizer's attention mask
(min cosine >= 0.9999, max abs diff <= 2e-3). Derived models: dynamic INT8 for CPUs, kept at min
cosine >= 0.999 against fp32 (made with the fp32 export, since searches never write the cache),
and FP16 for GPUs (with ``export-engine --fp16``, as the image tower's).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from fastret.engine.log import Log, no_log
from fastret.engine.text import TextTokenizer
from fastret.export.fp16 import FP16_MIN_COSINE, FP16_SETTINGS, convert_fp16
from fastret.export.models import ModelNotFound, ModelSource
from fastret.export.onnx_export import (
    METADATA_FILE,
    ONNX_OPSET,
    OUTPUT_NAME,
    ExportError,
    Parity,
    Tower,
    artefact_record,
    compare_embeddings,
    derive_onnx,
    onnx_embed,
    read_metadata,
    require_parity,
    trace_to_onnx,
    write_json_atomic,
)
from fastret.export.quantize import INT8_DYNAMIC_SETTINGS, INT8_MIN_COSINE, quantize_dynamic_int8

TEXT_ONNX = "text.onnx"
TEXT_FP32_KIND = "text-onnx-fp32"
TEXT_INT8_STEM = "text.int8"
TEXT_INT8_KIND = "text-onnx-int8-dynamic"
TEXT_FP16_STEM = "text.fp16"
TEXT_FP16_KIND = "text-onnx-fp16"
TEXT_PLAN_FILE = "text.fp16.plan"
TEXT_PLAN_KIND = "text-tensorrt-plan"
TEXT_TOKENIZER = "text-tokenizer.json"
TEXT_TOKENIZER_KIND = "text-tokenizer"
TEXT_INPUT = "input_ids"
TEXT_ENTRY = "text"
"""metadata.json's entry for the text tower: files, context length, padding id."""
DEFAULT_CONTEXT_LENGTH = 77

PARITY_PROMPTS = (
    "a dog",
    "a photo of a red bus at night",
    "two cats sleeping on a sofa",
    "sunset over the sea",
    "a bowl of fruit on a wooden table",
    "snow-covered mountains under a clear blue sky",
    "an old man reading a newspaper in a cafe",
    "a close-up of a flower with a bee",
    "children playing football in a park",
    "a city street in the rain, reflections of neon signs",
    "horses running across a field",
    "a plate of pasta with tomato sauce and basil",
    "an elephant",
    "a black and white portrait of a woman smiling",
    "ÉTÉ À PARIS: la tour Eiffel, 2024!",
    " ".join(["a long description of a crowded market with many stalls of vegetables"] * 12),
)
"""Short and long prompts (the last one longer than any CLIP context, so truncation is checked too)."""


def text_entry(export_dir: Path) -> dict | None:
    """metadata.json's text entry when the export has a text tower whose files are present, else None."""
    entry = read_metadata(export_dir).get(TEXT_ENTRY)
    if not isinstance(entry, dict):
        return None
    if not all((export_dir / entry.get(key, "")).is_file() for key in ("onnx", "tokenizer")):
        return None
    return entry


def export_tokenizer(export_dir: Path) -> TextTokenizer:
    """The tokenizer an export saved, cut to its context length (ExportError when it has none)."""
    entry = text_entry(export_dir)
    if entry is None:
        raise ExportError(f"{export_dir}: the export has no text tower")
    return TextTokenizer(export_dir / entry["tokenizer"], entry["context_length"], entry["pad_id"])


def text_parity_ids(export_dir: Path, image_dir: Path | None = None) -> tuple[np.ndarray, str]:
    """The parity prompts as the export's tokenizer makes them (image_dir: unused, the image tower's)."""
    return export_tokenizer(export_dir)(PARITY_PROMPTS).ids, f"{len(PARITY_PROMPTS)} built-in prompts"


TEXT_TOWER = Tower(TEXT_ONNX, text_parity_ids, "prompts")


def _clip_tokenizer(directory: Path):
    """The checkpoint's own CLIPTokenizerFast; ModelNotFound in one line when it has none that loads."""
    from transformers import CLIPTokenizerFast

    has_files = (directory / "tokenizer.json").is_file() or all(
        (directory / name).is_file() for name in ("vocab.json", "merges.txt")
    )
    try:
        if not has_files:  # transformers 5 would build an empty tokenizer instead of failing
            raise FileNotFoundError("no tokenizer files")
        return CLIPTokenizerFast.from_pretrained(directory)
    except Exception as exc:  # transformers raises OSError, ValueError, TypeError, ... for a missing tokenizer
        reason = (str(exc).strip().splitlines() or [""])[0]
        raise ModelNotFound(
            f"{directory}: no CLIP tokenizer loads from the checkpoint (needs tokenizer.json, or vocab.json "
            f"and merges.txt; {type(exc).__name__}: {reason})"
        ) from None


def _context_length(directory: Path) -> int:
    config = json.loads((directory / "config.json").read_text())
    return int(config.get("text_config", {}).get("max_position_embeddings", DEFAULT_CONTEXT_LENGTH))


def _torch_reference(
    model, tokenizer, prompts: tuple[str, ...], context_length: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token ids and attention mask from the checkpoint's tokenizer, and PyTorch's unit text embeddings
    of them (the attention mask given, as transformers' own examples do)."""
    import torch

    batch = tokenizer(list(prompts), padding=True, truncation=True, max_length=context_length, return_tensors="pt")
    with torch.inference_mode():
        features = model.clip_text(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).text_embeds
    features = features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return batch["input_ids"].numpy(), batch["attention_mask"].numpy(), features.numpy()


def _check_tokenizer(expected_ids: np.ndarray, mask: np.ndarray, saved: TextTokenizer, prompts: tuple[str, ...]) -> None:
    """ExportError unless the saved tokenizer makes the checkpoint tokenizer's ids for every prompt."""
    tokens = saved(prompts)
    for prompt, want, row_mask, got, length in zip(prompts, expected_ids, mask, tokens.ids, tokens.lengths):
        want = want[row_mask.astype(bool)]
        if len(want) != length or not np.array_equal(want, got[:length]):
            raise ExportError(f"the saved tokenizer does not reproduce the checkpoint's tokens for {prompt[:40]!r}")


def export_text_tower(
    source: ModelSource, export_dir: Path, *, opset: int = ONNX_OPSET, log: Log = no_log
) -> Parity:
    """Add the text tower (ONNX + tokenizer, checked against PyTorch) to an export that has the image
    tower, then its dynamic INT8 model when that keeps its parity; return the fp32 parity.

    Files are written under staging names and renamed into place before metadata.json records
    them, so an interrupted export leaves no text tower that later runs would pick up.
    """
    import torch

    from fastret.export.torch_models import load_torch_text_model  # torch: imported only when exporting

    started = time.perf_counter()
    model = load_torch_text_model(source)
    tokenizer = _clip_tokenizer(source.location)
    context_length = _context_length(source.location)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ModelNotFound(f"{source.location}: the CLIP tokenizer has neither a padding nor an end token")
    staged = {name: export_dir / f".{name}.tmp-{os.getpid()}" for name in (TEXT_TOKENIZER, TEXT_ONNX)}
    try:
        tokenizer.backend_tokenizer.save(str(staged[TEXT_TOKENIZER]))
        saved = TextTokenizer(staged[TEXT_TOKENIZER], context_length, pad_id)
        expected_ids, mask, reference = _torch_reference(model, tokenizer, PARITY_PROMPTS, context_length)
        _check_tokenizer(expected_ids, mask, saved, PARITY_PROMPTS)
        example = torch.from_numpy(saved(PARITY_PROMPTS[:2]).ids)  # shorter than the parity batch: lengths vary
        trace_to_onnx(model, example, staged[TEXT_ONNX], opset, TEXT_INPUT, {0: "batch", 1: "tokens"})
        ids = saved(PARITY_PROMPTS).ids
        parity = compare_embeddings(
            reference, onnx_embed(staged[TEXT_ONNX], ids), f"{len(PARITY_PROMPTS)} built-in prompts", "prompts"
        )
        log(parity.line("ONNX text tower fp32 vs PyTorch"))
        require_parity(parity, f"ONNX export of {source.model_id}'s text tower")
        for name, path in staged.items():
            os.replace(path, export_dir / name)
    finally:
        for path in staged.values():
            path.unlink(missing_ok=True)
    metadata = read_metadata(export_dir)
    metadata[TEXT_ENTRY] = {
        "onnx": TEXT_ONNX,
        "tokenizer": TEXT_TOKENIZER,
        "context_length": context_length,
        "pad_id": int(pad_id),
        "input": TEXT_INPUT,
        "output": OUTPUT_NAME,
        "dim": source.dim,
        "export_seconds": round(time.perf_counter() - started, 2),
    }
    artefacts = metadata.setdefault("artefacts", {})
    artefacts[TEXT_TOKENIZER] = artefact_record(export_dir / TEXT_TOKENIZER, TEXT_TOKENIZER_KIND)
    artefacts[TEXT_ONNX] = artefact_record(
        export_dir / TEXT_ONNX, TEXT_FP32_KIND, precision="fp32", parity_vs_torch=parity.to_dict()
    )
    write_json_atomic(export_dir / METADATA_FILE, metadata)
    try:
        export_text_int8(export_dir, log=log)
    except ValueError as exc:  # outside its tolerance: the fp32 text tower serves every precision
        log(f"text tower: {exc}")
    return parity


def ensure_text_tower(source: ModelSource, export_dir: Path, *, log: Log = no_log) -> bool:
    """Whether the export has the text tower of a full CLIP checkpoint, exporting it when it is missing.

    A failure is logged, not raised: image indexing goes on, and text searches say the export has
    no text tower.
    """
    if source.family != "clip" or not source.text_tower:
        return False
    if text_entry(export_dir) is not None:
        return True
    log(f"exporting {source.model_id}'s text tower to ONNX (first use; cached in {export_dir})")
    try:
        export_text_tower(source, export_dir, log=log)
    except (ExportError, ModelNotFound) as exc:
        log(f"text queries will not be available for this model: {exc}")
        return False
    return True


def export_text_int8(export_dir: Path, *, log: Log = no_log) -> tuple[Path, Parity]:
    """The text tower's text.int8.DIGEST.onnx (dynamic INT8 MatMuls), kept when min cosine >= 0.999."""
    return derive_onnx(
        export_dir,
        TEXT_INT8_STEM,
        quantize_dynamic_int8,
        kind=TEXT_INT8_KIND,
        label="ONNX text tower int8 (dynamic)",
        min_cosine=INT8_MIN_COSINE,
        settings=INT8_DYNAMIC_SETTINGS,
        log=log,
        tower=TEXT_TOWER,
    )


def export_text_fp16(export_dir: Path, *, log: Log = no_log) -> tuple[Path, Parity]:
    """The text tower's text.fp16.DIGEST.onnx for GPUs (LayerNorm, Softmax, L2 norm kept fp32)."""
    return derive_onnx(
        export_dir,
        TEXT_FP16_STEM,
        convert_fp16,
        kind=TEXT_FP16_KIND,
        label="ONNX text tower fp16 (CPU provider)",
        min_cosine=FP16_MIN_COSINE,
        settings=FP16_SETTINGS,
        log=log,
        tower=TEXT_TOWER,
    )
