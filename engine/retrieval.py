"""The two jobs users run: build an index of a folder, and search it with a query image."""

from __future__ import annotations

import base64
import os
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from fastret.engine.decode import list_images
from fastret.engine.encoders import Encoder
from fastret.engine.index import HnswParams, Index, build_hnsw
from fastret.engine.pipeline import DEFAULT_BATCH_SIZE, DEFAULT_WORKERS, EmbedResult, Skipped, embed_files
from fastret.engine.update import embed_paths

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
    include_hidden: bool = False,
    first_id: int = 0,
    embed: Callable[..., EmbedResult] = embed_files,
    graph: bool = True,
    thumbnails: bool = True,
) -> tuple[Index, EmbedResult]:
    """Embed every image under root and build the HNSW graph; bad files are skipped, not fatal.

    Files the listing leaves out (see list_images) count among the result's skipped files. Items
    get the ids first_id, first_id + 1, ... (a rebuild continues its predecessor's ids).
    `embed` has embed_files' signature (the Ray engine passes its own); `graph=False` leaves the
    HNSW graph out, for stores that index the vectors themselves; `thumbnails=False` keeps none, for
    an index that is searched once and never saved or checked for duplicates.
    """
    root = Path(root).resolve()
    unlisted: list[Skipped] = []
    paths = list_images(root, include_hidden=include_hidden, on_skip=unlisted.append)
    if on_skip is not None:
        for skip in unlisted:
            on_skip(skip)
    added, result = embed_paths(
        root, paths, encoder, batch_size=batch_size, workers=workers, draft=draft, on_skip=on_skip,
        on_progress=on_progress, embed=embed, thumbnails=thumbnails,
    )
    result.skipped[:0] = unlisted
    started = time.perf_counter()
    ids = np.arange(first_id, first_id + len(added), dtype=np.int64)
    index = Index(
        encoder.info, str(root), added.items, added.embeddings, hnsw_params, encoder=encoder.recipe.to_dict(),
        ids=ids, sources=added.sources, build={"draft": draft, "include_hidden": include_hidden}, next_id=first_id + len(added),
        thumbnails=added.thumbnails,
    )
    index.hnsw = build_hnsw(added.embeddings, hnsw_params, ids) if graph else None
    result.stage_seconds["hnsw_build"] = round(time.perf_counter() - started, 4)
    return index, result


@dataclass(frozen=True)
class Hit:
    rank: int
    item_id: int
    path: str  # as stored: undecodable bytes of the file name kept as surrogate escapes (os.fsdecode)
    label: str
    score: float

    def to_dict(self) -> dict:
        """JSON-safe: `path` shown escaped when needed, its raw bytes then in `path_bytes_b64`."""
        return {
            "rank": self.rank,
            "id": self.item_id,
            "path": display_path(self.path),
            "path_bytes_b64": raw_path_b64(self.path),
            "label": display_path(self.label),
            "score": self.score,
        }


def display_path(path: str) -> str:
    """A path safe to print and to put in JSON: undecodable bytes as \\xNN, control characters
    (a newline in a file name) as \\n, \\t or \\xNN; a plain path is returned unchanged."""
    if _is_plain(path):
        return path
    text = os.fsencode(path).decode("utf-8", "backslashreplace")
    return "".join(_CONTROL_ESCAPES.get(c, f"\\x{ord(c):02x}") if _is_control(c) else c for c in text)


def raw_path_b64(path: str) -> str | None:
    """Base64 of the file name's bytes when display_path had to escape it, else None."""
    return None if _is_plain(path) else base64.b64encode(os.fsencode(path)).decode("ascii")


_CONTROL_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _is_control(character: str) -> bool:
    return unicodedata.category(character) in ("Cc", "Cs")


def _is_plain(path: str) -> bool:
    return not any(_is_control(c) for c in path)


def hits_from(index: Index, rows: np.ndarray, scores: np.ndarray) -> list[Hit]:
    """Ranked hits for one row of search results (rows, as Index.search returns them) and their
    scores; rows of -1 (padding) are dropped. Hits carry the items' stable ids."""
    return [
        Hit(rank=r + 1, item_id=int(index.ids[i]), path=index.items[i].path, label=index.items[i].label, score=float(v))
        for r, (i, v) in enumerate((i, v) for i, v in zip(rows, scores) if i >= 0)
    ]


def softmax_over_database(
    index: Index, query: np.ndarray, rows: np.ndarray, exclude: frozenset[int] = frozenset()
) -> np.ndarray:
    """CLIP-style probabilities: softmax of 100 x cosine over the database (less the `exclude` rows), at `rows`."""
    logits = SOFTMAX_TEMPERATURE * (index.embeddings @ query)
    logits[list(exclude)] = -np.inf
    logits -= logits.max()
    probabilities = np.exp(logits)
    probabilities /= probabilities.sum()
    return probabilities[rows]


def rank_hits(
    index: Index,
    query: np.ndarray,
    k: int = 10,
    *,
    exact: bool = False,
    ef: int | None = None,
    score: str = "cosine",
    exclude: frozenset[int] = frozenset(),
) -> list[Hit]:
    """Top-k hits of one query embedding, scored by cosine or softmax, skipping the `exclude` rows."""
    if score not in SCORES:
        raise ValueError(f"unknown score {score!r}: choose one of {', '.join(SCORES)}")
    rows, cosines = index.search(query[None, :], k + len(exclude), exact=exact, ef=ef)
    keep = [j for j, i in enumerate(rows[0]) if int(i) not in exclude][:k]
    rows, values = rows[0][keep], cosines[0][keep]
    if score == "softmax":
        values = softmax_over_database(index, query, rows, exclude)
    return hits_from(index, rows, values)


def ids_of_file(index: Index, image: str | Path) -> frozenset[int]:
    """Item ids that are this very file (a query taken from the gallery should not find itself)."""
    try:
        relative = Path(image).resolve().relative_to(index.root).as_posix()
    except ValueError:
        return frozenset()
    return frozenset(int(index.ids[i]) for i, item in enumerate(index.items) if item.path == relative)
