"""The PyTorch baseline: the course task done the way a careful student writes it.

Same model weights as fastret (fastret.export.torch_models.load_torch_model), but the usual reference
pipeline around them:

* PIL decoding at full size, the model's reference preprocessing on the host (resize the short
  side, centre crop, to a float tensor, normalise with the model's mean/std);
* torch eager fp32, torch.set_num_threads(all cores), inference_mode;
* the database in batches of 32, decoded in the main thread;
* the "index" = the stacked (N, D) unit embeddings; each query answered one at a time: decode,
  embed, cosine scores by a torch matrix product, torch.topk(10);
* each query's top-10 list written to a file, then P@10 and R@10.

    python benchmarks/baseline.py --db DIR --queries DIR [--limit N] [--model efficientnet-lite2|clip-random]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from clip_random import model_argument, model_label
from fastret.engine.decode import list_images

from common import OUT, TOP_K, machine, peak_rss_mib, score_top_k, task_dirs, write_json, write_results

BATCH = 32
_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def reference_tensor(path: Path, spec) -> np.ndarray:
    """torchvision-style Resize(short side) + CenterCrop + ToTensor + Normalize, in PIL and numpy."""
    with Image.open(path) as img:
        img = img.convert("RGB")
    width, height = img.size
    scale = spec.resize / min(width, height)
    img = img.resize((max(spec.size, round(width * scale)), max(spec.size, round(height * scale))),
                     _RESAMPLE[spec.interpolation])
    left, top = (img.width - spec.size) // 2, (img.height - spec.size) // 2
    img = img.crop((left, top, left + spec.size, top + spec.size))
    pixels = np.asarray(img, dtype=np.float32)
    pixels = (pixels - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return pixels.transpose(2, 0, 1)  # CHW


class Baseline:
    """The student's model: backbone of the shared weights, host-side float preprocessing, fp32 eager."""

    def __init__(self, model: str) -> None:
        import torch

        from fastret.engine.encoders import default_threads
        from fastret.export.models import resolve_model
        from fastret.export.torch_models import load_torch_model

        torch.set_num_threads(default_threads())
        source, _ = resolve_model(model_argument(model))
        self.backbone = load_torch_model(source).backbone.eval()
        self.spec = source.preprocessing

    def embed(self, batch: np.ndarray):
        """(N, 3, H, W) normalised float32 -> (N, D) unit torch rows."""
        import torch

        with torch.inference_mode():
            features = self.backbone(torch.from_numpy(batch))
            return features / features.norm(dim=-1, keepdim=True)

    def embed_files(self, paths: list[Path]):
        """The database: batches of 32, decoded in the main thread, stacked into one (N, D) tensor."""
        import torch

        parts = []
        for start in range(0, len(paths), BATCH):
            parts.append(self.embed(np.stack([reference_tensor(p, self.spec) for p in paths[start : start + BATCH]])))
        return torch.cat(parts)

    def answer(self, path: Path, database) -> tuple[np.ndarray, np.ndarray]:
        """One query file -> top-10 ids and cosine scores by a matrix product and torch.topk."""
        import torch

        query = self.embed(reference_tensor(path, self.spec)[None])
        with torch.inference_mode():
            top = torch.topk(query @ database.T, TOP_K, dim=1)
        return top.indices[0].numpy(), top.values[0].numpy()


def run_baseline(db: Path, queries: Path, model: str, out: Path) -> dict:
    db_paths, query_paths = list_images(db), list_images(queries)
    seconds: dict[str, float] = {}
    started = total_started = time.perf_counter()
    baseline = Baseline(model)
    seconds["model_load"] = _lap(started)

    started = time.perf_counter()
    embeddings = baseline.embed_files(db_paths)
    seconds["db_embed"] = _lap(started)
    seconds["index_build"] = 0.0  # the stacked embeddings are the index

    started = time.perf_counter()
    ids = np.empty((len(query_paths), TOP_K), dtype=np.int64)
    scores = np.empty((len(query_paths), TOP_K), dtype=np.float32)
    for row, path in enumerate(query_paths):
        ids[row], scores[row] = baseline.answer(path, embeddings)
    seconds["queries"] = _lap(started)

    started = time.perf_counter()
    write_results(out / "results", queries, query_paths, db, db_paths, ids, scores)
    seconds["write"] = _lap(started)
    seconds["total"] = _lap(total_started)
    return {
        "side": "baseline (PyTorch eager fp32, PIL, batch 32, queries one at a time, exact search)",
        "model": model_label(model),
        "db_images": len(db_paths),
        "query_images": len(query_paths),
        "seconds": seconds,
        "db_images_per_s": round(len(db_paths) / seconds["db_embed"], 2),
        "query_ms": round(1000 * seconds["queries"] / len(query_paths), 2),
        "peak_rss_mib": peak_rss_mib(),
        **score_top_k(ids, db_paths, query_paths),
        "machine": machine(),
    }


def _lap(started: float) -> float:
    return round(time.perf_counter() - started, 3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", type=Path, required=True)
    parser.add_argument("--queries", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=None, help="N database and N // 10 query images")
    parser.add_argument("--model", default="efficientnet-lite2", help="efficientnet-lite2 or clip-random")
    parser.add_argument("--out", type=Path, default=OUT / "baseline")
    args = parser.parse_args(argv)
    db, queries = task_dirs(args.db, args.queries, args.limit, args.out)
    result = run_baseline(db, queries, args.model, args.out)
    write_json(args.out / "result.json", result)
    print(f"baseline: {result['seconds']}, P@10 {result['P@10']}, R@10 {result['R@10']}, "
          f"peak RSS {result['peak_rss_mib']} MiB -> {args.out / 'result.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
