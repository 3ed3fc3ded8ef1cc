"""Text-query latency on the CPU: tokenise + encode (CLIP text tower) + search, fp32 vs dynamic INT8.

The real openai/clip-vit-base-patch32 weights cannot be fetched here, so this times the same
architecture (transformers' default CLIPConfig: ViT-B/32 image tower, 12-layer 512-wide text
tower, 77-token context, 49,408-token vocabulary, projection 512) with seeded RANDOM weights,
exported by fastret as `fastret index` exports it (both towers, INT8 text tower when it keeps
min cosine >= 0.999). The tokenizer is CLIP's (byte-level BPE, the same normaliser and
pre-tokeniser) over a small vocabulary in which each prompt word is one token, as common words
are in CLIP's own vocabulary, so token counts match real queries. Timing only: these random
weights say nothing about retrieval quality.

The gallery: 10,000 random unit 512-d vectors in an HNSW index (the search service's default
parameters). Each query is timed warm, stage by stage, through the search service's own calls;
fp32 and INT8 alternate in blocks so that a slow phase of this shared VM lands on both.

    python benchmarks/text_query.py            # writes benchmarks/out/text_query.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from common import OUT, machine, table, write_json

DEFAULT_DIR = Path(os.environ.get("FASTRET_CLIP_RANDOM_FULL", "/tmp/fastret-clip-random-full"))
PROMPTS = (
    "a dog", "a red bus at night", "two cats sleeping on a sofa", "sunset over the sea",
    "a bowl of fruit on a wooden table", "snow covered mountains under a clear blue sky",
    "an old man reading a newspaper in a cafe", "children playing football in a park",
    "a city street in the rain with reflections of neon signs", "horses running across a field",
    "a plate of pasta with tomato sauce", "a black and white portrait of a woman smiling",
)
SPECIALS = ("<|startoftext|>", "<|endoftext|>")


def _byte_chars() -> list[str]:
    """The 256 characters byte-level BPE writes bytes as (GPT-2's table, as CLIP uses it)."""
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet())


def word_vocabulary(words: set[str]) -> tuple[dict[str, int], list[str]]:
    """Byte characters (alone and word-final), every prompt word as one token, and the merges that build them."""
    vocab: dict[str, int] = {}
    merges: list[str] = []

    def add(token: str) -> None:
        vocab.setdefault(token, len(vocab))

    for char in _byte_chars():
        add(char)
        add(char + "</w>")
    for word in sorted(words):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append(f"{pieces[0]} {pieces[1]}")
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            add(pieces[0])
    for special in SPECIALS:
        add(special)
    return vocab, list(dict.fromkeys(merges))


def clip_random_full_dir(directory: Path = DEFAULT_DIR, seed: int = 0) -> Path:
    """Create the random full CLIP ViT-B/32 checkpoint with its tokenizer once; return its directory."""
    if (directory / "model.safetensors").is_file() and (directory / "tokenizer.json").is_file():
        return directory
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizerFast

    staging = directory.with_name(directory.name + f".tmp-{os.getpid()}")
    staging.mkdir(parents=True)
    vocab, merges = word_vocabulary({word for prompt in PROMPTS for word in prompt.split()})
    (staging / "vocab.json").write_text(json.dumps(vocab))
    (staging / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizerFast.from_pretrained(staging, model_max_length=77)
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                     "pad_token_id": tokenizer.pad_token_id},
        projection_dim=512,
    )
    CLIPModel(config).eval().save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.rename(directory)
    return directory


def random_index(count: int, dim: int, seed: int = 0):
    from fastret.engine.decode import Preprocessing
    from fastret.engine.encoders import ModelInfo
    from fastret.engine.index import HnswParams, Index, Item, build_hnsw

    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((count, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    spec = Preprocessing(size=224, resize=224, interpolation="bicubic", mean=(0.0,) * 3, std=(1.0,) * 3)
    info = ModelInfo("random-gallery", "0" * 64, dim, spec)
    items = [Item(f"{i % 10}/{i}.jpg", str(i % 10)) for i in range(count)]
    params = HnswParams()
    return Index(info, "/gallery", items, vectors, params, build_hnsw(vectors, params))


def time_query(retriever, encoder, text: str) -> dict:
    """One text query through the service's calls, each stage timed (ms)."""
    from fastret.service.search import SearchOptions

    options = SearchOptions(k=10)
    t0 = time.perf_counter()
    tokens = encoder.tokenizer([text])
    t1 = time.perf_counter()
    vector = encoder.encode_ids(tokens.ids)[0]
    t2 = time.perf_counter()
    hits = retriever.search_vector(vector, options)
    t3 = time.perf_counter()
    assert len(hits) == 10
    return {"tokenise": 1000 * (t1 - t0), "encode": 1000 * (t2 - t1), "search": 1000 * (t3 - t2),
            "total": 1000 * (t3 - t0), "tokens": int(tokens.lengths[0])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gallery", type=int, default=10_000, help="random gallery vectors (default: %(default)s)")
    parser.add_argument("--blocks", type=int, default=8, help="alternating blocks per runtime (default: %(default)s)")
    args = parser.parse_args(argv)
    os.environ.setdefault("FASTRET_CACHE", tempfile.mkdtemp(prefix="fastret-text-bench-"))
    from fastret.engine.text import OnnxTextEncoder
    from fastret.export.models import clip_source
    from fastret.export.onnx_export import ensure_exported, find_artefact, read_metadata
    from fastret.export.text_tower import TEXT_INT8_KIND, TEXT_ONNX, ensure_text_tower, export_tokenizer
    from fastret.service.search import Retriever

    source = clip_source(clip_random_full_dir(), "clip-random-full")
    started = time.perf_counter()
    export_dir = ensure_exported(source, log=print)
    assert ensure_text_tower(source, export_dir, log=print)
    export_s = time.perf_counter() - started
    tokenizer = export_tokenizer(export_dir)
    found = find_artefact(export_dir, TEXT_INT8_KIND)
    runtimes = {"fp32": OnnxTextEncoder(export_dir / TEXT_ONNX, tokenizer, source.model_id, source.dim,
                                        providers=["CPUExecutionProvider"])}
    if found is not None:
        runtimes["int8"] = OnnxTextEncoder(found[0], tokenizer, source.model_id, source.dim, precision="int8",
                                           providers=["CPUExecutionProvider"])
    index = random_index(args.gallery, source.dim)
    retrievers = {name: Retriever(index, text_encoder=encoder) for name, encoder in runtimes.items()}
    samples: dict[str, list[dict]] = {name: [] for name in runtimes}
    for _ in range(args.blocks):
        for name, encoder in runtimes.items():
            time_query(retrievers[name], encoder, PROMPTS[0])  # untimed warm-up of the block
            samples[name].extend(time_query(retrievers[name], encoder, text) for text in PROMPTS)
    artefacts = read_metadata(export_dir)["artefacts"]
    results = {
        "model": "CLIP ViT-B/32 architecture, random weights, timing only",
        "machine": machine(),
        "gallery": args.gallery,
        "queries_per_runtime": len(samples["fp32"]),
        "mean_tokens": round(float(np.mean([s["tokens"] for s in samples["fp32"]])), 1),
        "export_seconds": round(export_s, 1),
        "text_parity_vs_torch": artefacts[TEXT_ONNX]["parity_vs_torch"],
        "int8_parity_vs_fp32": None if found is None else found[1]["parity_vs_onnx_fp32"],
        "text_onnx_mb": {name: round(e.artefact.stat().st_size / 2**20, 1) for name, e in runtimes.items()},
        "ms": {
            name: {stage: {f"p{q}": round(float(np.percentile([s[stage] for s in rows], q)), 3) for q in (50, 95)}
                   for stage in ("tokenise", "encode", "search", "total")}
            for name, rows in samples.items()
        },
    }
    write_json(OUT / "text_query.json", results)
    rows = [
        [name, results["text_onnx_mb"][name], *(results["ms"][name][stage]["p50"] for stage in
                                                ("tokenise", "encode", "search", "total")),
         results["ms"][name]["total"]["p95"]]
        for name in runtimes
    ]
    print(table(["text tower", "MB", "tokenise p50", "encode p50", "search p50", "total p50", "total p95"], rows))
    print(json.dumps({k: results[k] for k in ("mean_tokens", "text_parity_vs_torch", "int8_parity_vs_fp32")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
