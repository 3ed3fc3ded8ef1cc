"""The two jobs users run: build an index of a folder, and search it with a query image."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from fastret.engine.decode import ImageError, list_images, load_pixels
from fastret.engine.encoders import Encoder
from fastret.engine.index import HnswParams, Index, Item, build_hnsw
from fastret.engine.pipeline import DEFAULT_BATCH_SIZE, DEFAULT_WORKERS, EmbedResult, Skipped, embed_files

SCORES = ("cosine", "softmax")
SOFTMAX_TEMPERATURE = 100.0  # CLIP's logit scale


def build_index(
    root: str | Path,
    encoder: Encoder,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    workers: int = DEFAULT_WORKERS,
    draft: bool = True,
    hnsw_params: HnswParams = HnswParams(),
    on_skip: Callable[[Skipped], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> tuple[Index, EmbedResult]:
    """Embed every image under root and build the HNSW graph; bad files are skipped, not fatal."""
    root = Path(root).resolve()
    paths = list_images(root)
    result = embed_files(
        paths, encoder, batch_size=batch_size, workers=workers, draft=draft, on_skip=on_skip, on_progress=on_progress
    )
    items = [Item(path=p.relative_to(root).as_posix(), label=p.parent.name) for p in result.paths]
    started = time.perf_counter()
    index = Index(encoder.info, str(root), items, result.embeddings, hnsw_params, encoder=encoder.recipe.to_dict())
    index.hnsw = build_hnsw(result.embeddings, hnsw_params)
    result.stage_seconds["hnsw_build"] = round(time.perf_counter() - started, 4)
    return index, result


@dataclass(frozen=True)
class Hit:
    rank: int
    item_id: int
    path: str
    label: str
    score: float

    def to_dict(self) -> dict:
        return {"rank": self.rank, "id": self.item_id, "path": self.path, "label": self.label, "score": self.score}


def softmax_over_database(
    index: Index, query: np.ndarray, ids: np.ndarray, exclude: frozenset[int] = frozenset()
) -> np.ndarray:
    """CLIP-style probabilities: softmax of 100 x cosine over the database (less `exclude`), at `ids`."""
    logits = SOFTMAX_TEMPERATURE * (index.embeddings @ query)
    logits[list(exclude)] = -np.inf
    logits -= logits.max()
    probabilities = np.exp(logits)
    probabilities /= probabilities.sum()
    return probabilities[ids]


def rank_hits(
    index: Index,
    query: np.ndarray,
    k: int = 10,
    *,
    exact: bool = False,
    score: str = "cosine",
    exclude: frozenset[int] = frozenset(),
) -> list[Hit]:
    """Top-k hits of one query embedding, scored by cosine or softmax, skipping `exclude` ids."""
    if score not in SCORES:
        raise ValueError(f"unknown score {score!r}: choose one of {', '.join(SCORES)}")
    ids, cosines = index.search(query[None, :], k + len(exclude), exact=exact)
    keep = [j for j, i in enumerate(ids[0]) if int(i) not in exclude][:k]
    ids, values = ids[0][keep], cosines[0][keep]
    if score == "softmax":
        values = softmax_over_database(index, query, ids, exclude)
    return [
        Hit(rank=r + 1, item_id=int(i), path=index.items[i].path, label=index.items[i].label, score=float(v))
        for r, (i, v) in enumerate(zip(ids, values))
    ]


def ids_of_file(index: Index, image: str | Path) -> frozenset[int]:
    """Item ids that are this very file (a query taken from the gallery should not find itself)."""
    try:
        relative = Path(image).resolve().relative_to(index.root).as_posix()
    except ValueError:
        return frozenset()
    return frozenset(i for i, item in enumerate(index.items) if item.path == relative)


def embed_query(encoder: Encoder, image: str | Path) -> np.ndarray:
    """One query file -> its embedding (raises ImageError naming the file and the reason)."""
    try:
        pixels = load_pixels(image, encoder.info.preprocessing)
    except ImageError as exc:
        raise ImageError(f"{image}: {exc}") from None
    return encoder.encode(pixels[None])[0]
