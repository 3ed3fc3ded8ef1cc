"""Build the course-sized speed set (10,000 database + 1,000 query images) by augmenting a small one.

Every image written is an augmented copy of a source photo (random resized crop, flip, colour
jitter, rescale, JPEG re-encode at a random quality), labelled by its source's class folder.
Query images come only from held-out sources: in each class, every 10th source in sorted order
(positions 0, 10, 20, ...) is a query source and never appears in the database, so a query never
has an augmented twin of itself in the database.

Each output image has its own random stream seeded by (seed, role, source number, copy number),
so the bytes do not depend on how work is split between processes. The seed and every parameter
go to OUT/scaled_set.json.

    python benchmarks/make_scaled_set.py --src ../shared/data/wang1k --out /tmp/fastret-scaled
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

from fastret.engine.decode import list_images

ROLES = {"db": 0, "queries": 1}
MANIFEST = "scaled_set.json"


@dataclass(frozen=True)
class Augmentation:
    """Ranges the random augmentations are drawn from (uniformly)."""

    crop_area: tuple[float, float] = (0.35, 1.0)  # fraction of the source area kept
    crop_aspect: tuple[float, float] = (3 / 4, 4 / 3)
    flip_probability: float = 0.5
    brightness: tuple[float, float] = (0.7, 1.3)
    contrast: tuple[float, float] = (0.7, 1.3)
    saturation: tuple[float, float] = (0.6, 1.4)
    short_side: tuple[int, int] = (160, 384)  # output rescaled so its short side is in this range
    jpeg_quality: tuple[int, int] = (40, 95)


@dataclass(frozen=True)
class Task:
    source: str
    target: str
    seed: tuple[int, ...]


def split_sources(paths: list[Path], root: Path, query_every: int) -> tuple[list[Path], list[Path]]:
    """(database sources, query sources): every `query_every`-th file of each class is a query source."""
    by_class: dict[str, list[Path]] = {}
    for path in paths:
        by_class.setdefault(path.relative_to(root).parent.as_posix(), []).append(path)
    db: list[Path] = []
    queries: list[Path] = []
    for label in sorted(by_class):
        for position, path in enumerate(sorted(by_class[label])):
            (queries if position % query_every == 0 else db).append(path)
    return db, queries


def copies_per_source(total: int, sources: int) -> list[int]:
    """Spread `total` copies over the sources as evenly as possible, the extra ones evenly spaced."""
    return [(i + 1) * total // sources - i * total // sources for i in range(sources)]


def plan(sources: list[Path], root: Path, out: Path, role: str, total: int, seed: int) -> list[Task]:
    """One task per output image: source, target path (class folder kept) and its seed."""
    tasks = []
    for number, (source, copies) in enumerate(zip(sources, copies_per_source(total, len(sources)))):
        relative = source.relative_to(root)
        for copy in range(copies):
            target = out / role / relative.parent / f"{relative.stem}_{copy:02d}.jpg"
            tasks.append(Task(str(source), str(target), (seed, ROLES[role], number, copy)))
    return tasks


def augment(img: Image.Image, rng: np.random.Generator, aug: Augmentation) -> tuple[Image.Image, int]:
    """One random augmented copy of an RGB image, and the JPEG quality to save it at."""
    width, height = img.size
    area = width * height * rng.uniform(*aug.crop_area)
    aspect = np.exp(rng.uniform(np.log(aug.crop_aspect[0]), np.log(aug.crop_aspect[1])))
    crop_w = int(min(width, max(8, round(np.sqrt(area * aspect)))))
    crop_h = int(min(height, max(8, round(np.sqrt(area / aspect)))))
    left = int(rng.integers(0, width - crop_w + 1))
    top = int(rng.integers(0, height - crop_h + 1))
    img = img.crop((left, top, left + crop_w, top + crop_h))
    if rng.random() < aug.flip_probability:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(*aug.brightness))
    img = ImageEnhance.Contrast(img).enhance(rng.uniform(*aug.contrast))
    img = ImageEnhance.Color(img).enhance(rng.uniform(*aug.saturation))
    short = int(rng.integers(aug.short_side[0], aug.short_side[1] + 1))
    scale = short / min(img.size)
    img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.BILINEAR)
    return img, int(rng.integers(aug.jpeg_quality[0], aug.jpeg_quality[1] + 1))


def jpeg_bytes(img: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def run_task(task: Task, aug: Augmentation = Augmentation()) -> str | None:
    """Write one augmented image; return a one-line reason instead of raising if the source is bad."""
    try:
        with Image.open(task.source) as img:
            rgb = img.convert("RGB")
        augmented, quality = augment(rgb, np.random.default_rng(list(task.seed)), aug)
        Path(task.target).parent.mkdir(parents=True, exist_ok=True)
        Path(task.target).write_bytes(jpeg_bytes(augmented, quality))
    except OSError as exc:
        return f"skipped {task.source}: {exc}"
    return None


def make_scaled_set(
    src: Path, out: Path, *, n_db: int, n_queries: int, seed: int, query_every: int, per_class: int | None, workers: int
) -> dict:
    """Write OUT/db and OUT/queries plus the manifest; return the manifest."""
    src = src.resolve()
    paths = list_images(src)
    if per_class is not None:
        paths = _first_per_class(paths, src, per_class)
    db_sources, query_sources = split_sources(paths, src, query_every)
    if not db_sources or not query_sources:
        raise ValueError(f"{src}: need at least one database and one query source, found {len(paths)} images")
    tasks = plan(db_sources, src, out, "db", n_db, seed) + plan(query_sources, src, out, "queries", n_queries, seed)
    started = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        errors = [e for e in pool.imap(run_task, tasks, chunksize=16) if e]
    for line in errors:
        print(line, file=sys.stderr)
    manifest = {
        "what": "augmented copies of real photos, for speed and scale tests (not a quality benchmark)",
        "source": str(src),
        "seed": seed,
        "query_every": query_every,
        "per_class": per_class,
        "augmentation": asdict(Augmentation()),
        "db_images": n_db,
        "query_images": n_queries,
        "db_sources": len(db_sources),
        "query_sources": [p.relative_to(src).as_posix() for p in query_sources],
        "errors": errors,
        "seconds": round(time.perf_counter() - started, 2),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def _first_per_class(paths: list[Path], root: Path, per_class: int) -> list[Path]:
    kept: dict[str, list[Path]] = {}
    for path in paths:
        group = kept.setdefault(path.relative_to(root).parent.as_posix(), [])
        if len(group) < per_class:
            group.append(path)
    return [p for label in sorted(kept) for p in kept[label]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", type=Path, default=Path("../shared/data/wang1k"), help="class-per-folder images")
    parser.add_argument("--out", type=Path, default=Path("/tmp/fastret-scaled"))
    parser.add_argument("--db", type=int, default=10_000, help="database images (default: %(default)s)")
    parser.add_argument("--queries", type=int, default=1_000, help="query images (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--query-every", type=int, default=10, help="every N-th source of a class is a query source")
    parser.add_argument("--per-class", type=int, default=None, help="use only the first N sources of each class")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()):
        parser.error(f"{args.out} is not empty; choose another --out or remove it")
    manifest = make_scaled_set(
        args.src,
        args.out,
        n_db=args.db,
        n_queries=args.queries,
        seed=args.seed,
        query_every=args.query_every,
        per_class=args.per_class,
        workers=args.workers,
    )
    print(
        f"wrote {args.db} augmented database images ({manifest['db_sources']} sources) to {args.out / 'db'} and "
        f"{args.queries} augmented query images ({len(manifest['query_sources'])} held-out sources) to "
        f"{args.out / 'queries'} in {manifest['seconds']} s (seed {args.seed}; {len(manifest['errors'])} errors)"
    )
    return 1 if manifest["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
