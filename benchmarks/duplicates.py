"""Near-duplicate finding, measured: fastret duplicates vs the perceptual hashes users use today.

The set is built at run time from wang1k with a seed (never committed): every wang1k original,
plus, for a seeded sample of originals, one copy per transformation in CATEGORIES, written as
users' copies are (JPEG at a random quality 20-95, PNG for screenshots). All other wang1k images
are the negatives: same class, often the same scene a moment apart, the hardest ones.

Scoring is over pairs of images. A pair is a duplicate when both come from one original; pairs of
two different originals named in ALLOWED_PAIRS (one photo re-cropped or mirrored, or nearly
identical shots, see ../shared/data/README.md) count neither way. fastret predicts a pair when it
puts both files in one group; a hash predicts it when the two hashes are within its threshold,
each hash at its best threshold on this set. "overall" leaves out the flip copies (mirror images:
a category of their own); a category's row is the pairs that hold a copy of that category.

    python benchmarks/duplicates.py [--originals 100] [--seed 0] [--check-seed 1]
        [--scaled-index /tmp/fastret-scaled-index [--scaled-only]]

--scaled-index times `fastret duplicates INDEX --json` on an existing index (the 10,000-image
augmented set of make_scaled_set.py, indexed with `fastret index`). --index-cost DIR measures what
keeping thumbnails costs `fastret index`: the embedding pipeline over DIR's images with and
without them, alternating in one process, and the bytes they take per image.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import math
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance

from common import OUT, machine, table, write_json
from fastret.engine.decode import list_images
from fastret.service.duplicates import find_duplicates, open_for_duplicates

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("FASTRET_DATA", REPO.parent / "shared" / "data"))

CATEGORIES = ("resize", "jpeg", "crop", "rotate", "brightness", "border", "screenshot", "flip")
MANIFEST = "duplicate_set.json"

# Pairs of different wang1k originals that are one photo or one scene a moment apart
# (../shared/data/README.md): the acceptance allows grouping them, so they count neither way.
ALLOWED_PAIRS = frozenset({frozenset(pair) for pair in (("918", "924"), ("935", "981"), ("768", "789"), ("761", "776"))})


@dataclass(frozen=True)
class Entry:
    path: str  # relative to the set's folder
    source: str  # the wang1k original's id (file stem)
    category: str  # "original" or one of CATEGORIES
    params: dict


def jpeg(img: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def png(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def rotated_crop(img: Image.Image, degrees: float) -> Image.Image:
    """Rotate and keep the largest upright rectangle of the same aspect inside (a photo editor's straighten)."""
    width, height = img.size
    angle = math.radians(abs(degrees))
    # Largest w x h with w/h = width/height inside the rotated frame.
    scale = 1 / (math.cos(angle) + math.sin(angle) * max(width / height, height / width))
    inner_w, inner_h = width * scale, height * scale
    rotated = img.rotate(degrees, resample=Image.Resampling.BICUBIC)
    left, top = (width - inner_w) / 2, (height - inner_h) / 2
    return rotated.crop((round(left), round(top), round(left + inner_w), round(top + inner_h)))


def screenshot(img: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, dict]:
    """The photo as a phone screenshot shows it: scaled to the screen's width between a status bar and UI."""
    dark = bool(rng.random() < 0.5)
    background = (18, 18, 18) if dark else (250, 250, 250)
    ink = (235, 235, 235) if dark else (30, 30, 30)
    screen_w = int(rng.integers(360, 541))
    photo_w = round(screen_w * rng.uniform(0.9, 1.0))
    photo_h = round(img.height * photo_w / img.width)
    top_bar, bottom_bar = int(rng.integers(40, 90)), int(rng.integers(60, 140))
    canvas = Image.new("RGB", (screen_w, top_bar + photo_h + bottom_bar), background)
    canvas.paste(img.resize((photo_w, photo_h), Image.Resampling.BILINEAR), ((screen_w - photo_w) // 2, top_bar))
    draw = ImageDraw.Draw(canvas)
    draw.text((12, top_bar // 3), "9:41", fill=ink)
    draw.rectangle((screen_w - 40, top_bar // 3, screen_w - 14, top_bar // 3 + 10), outline=ink)
    for row in range(2):
        y = top_bar + photo_h + 18 + row * 26
        draw.rectangle((12, y, 12 + int(rng.integers(80, screen_w - 40)), y + 10), fill=ink)
    return canvas, {"screen_width": screen_w, "photo_width": photo_w, "bars": [top_bar, bottom_bar], "dark": dark}


def make_copy(img: Image.Image, category: str, rng: np.random.Generator) -> tuple[bytes, str, dict]:
    """One copy of `img` made by `category`: (file bytes, suffix, the drawn parameters)."""
    quality = int(rng.integers(20, 96))
    params: dict = {"quality": quality}
    width, height = img.size
    if category == "resize":
        scale = float(rng.uniform(0.3, 0.8))
        params["scale"] = round(scale, 3)
        out = img.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.LANCZOS)
    elif category == "jpeg":
        out = img
    elif category == "crop":
        area = float(rng.uniform(0.70, 0.95))
        aspect = float(rng.uniform(0.9, 1.1))
        crop_w = min(width, round(width * math.sqrt(area) * aspect))
        crop_h = min(height, round(width * height * area / crop_w))
        left, top = int(rng.integers(0, width - crop_w + 1)), int(rng.integers(0, height - crop_h + 1))
        params.update(area=round(crop_w * crop_h / (width * height), 3), box=[left, top, left + crop_w, top + crop_h])
        out = img.crop((left, top, left + crop_w, top + crop_h))
    elif category == "rotate":
        degrees = float(rng.uniform(1.0, 8.0) * rng.choice((-1, 1)))
        params["degrees"] = round(degrees, 2)
        out = rotated_crop(img, degrees)
    elif category == "brightness":
        brightness, contrast = (float(rng.uniform(0.6, 1.4)) for _ in range(2))
        params.update(brightness=round(brightness, 3), contrast=round(contrast, 3))
        out = ImageEnhance.Contrast(ImageEnhance.Brightness(img).enhance(brightness)).enhance(contrast)
    elif category == "border":
        side = max(2, round(min(width, height) * rng.uniform(0.03, 0.12)))
        colour = tuple(int(c) for c in rng.choice([(255, 255, 255), (0, 0, 0), (128, 128, 128)]))
        params.update(border=side, colour=colour)
        out = Image.new("RGB", (width + 2 * side, height + 2 * side), colour)
        out.paste(img, (side, side))
    elif category == "screenshot":
        out, drawn = screenshot(img, rng)
        params = drawn
        return png(out), ".png", params
    elif category == "flip":
        out = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    else:
        raise ValueError(f"unknown category {category!r}")
    return jpeg(out, quality), ".jpg", params


def make_set(src: Path, out: Path, originals: int, seed: int) -> list[Entry]:
    """Link every original under out/originals and write copies of a seeded sample under out/copies.

    Reuses out/ when its manifest records the same source, sample size and seed.
    """
    wanted = {"src": str(src.resolve()), "originals": originals, "seed": seed, "categories": list(CATEGORIES)}
    manifest = out / MANIFEST
    if manifest.is_file():
        recorded = json.loads(manifest.read_text())
        if recorded["parameters"] == wanted:
            return [Entry(**entry) for entry in recorded["entries"]]
    paths = list_images(src)
    rng = np.random.default_rng(seed)
    sample = sorted(rng.choice(len(paths), size=min(originals, len(paths)), replace=False).tolist())
    entries: list[Entry] = []
    for path in paths:
        link = out / "originals" / path.relative_to(src)
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            link.symlink_to(path.resolve())
        entries.append(Entry(link.relative_to(out).as_posix(), path.stem, "original", {}))
    for number in sample:
        path = paths[number]
        with Image.open(path) as opened:
            img = opened.convert("RGB")
        for c, category in enumerate(CATEGORIES):
            data, suffix, params = make_copy(img, category, np.random.default_rng([seed, number, c]))
            target = out / "copies" / path.relative_to(src).parent / f"{path.stem}_{category}{suffix}"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            entries.append(Entry(target.relative_to(out).as_posix(), path.stem, category, params))
    manifest.write_text(json.dumps({"parameters": wanted, "entries": [asdict(e) for e in entries]}, indent=1))
    return entries


# --- scoring over pairs -------------------------------------------------------------------------


@dataclass
class Pairs:
    """Every pair (i < j) of the set's images, and what the truth says of it."""

    first: np.ndarray
    second: np.ndarray
    duplicate: np.ndarray  # both from one original
    ignored: np.ndarray  # two originals the acceptance allows to be grouped (ALLOWED_PAIRS)
    flip: np.ndarray  # holds a flip copy
    originals: np.ndarray  # two different originals

    @classmethod
    def of(cls, entries: list[Entry]) -> "Pairs":
        source = np.array([e.source for e in entries])
        category = np.array([e.category for e in entries])
        first, second = np.triu_indices(len(entries), 1)
        allowed = np.zeros(len(first), dtype=bool)
        for pair in ALLOWED_PAIRS:
            a, b = sorted(pair)
            allowed |= ((source[first] == a) & (source[second] == b)) | ((source[first] == b) & (source[second] == a))
        return cls(
            first, second, source[first] == source[second], allowed,
            (category[first] == "flip") | (category[second] == "flip"),
            (category[first] == "original") & (category[second] == "original") & (source[first] != source[second]),
        )

    def subsets(self, entries: list[Entry]) -> dict[str, np.ndarray]:
        """The pairs each row of the tables scores (allowed pairs never count)."""
        category = np.array([e.category for e in entries])
        counted = ~self.ignored
        rows = {"overall": counted & ~self.flip, "overall incl. flip": counted}
        for name in CATEGORIES:
            holds = (category[self.first] == name) | (category[self.second] == name)
            rows[name] = counted & holds & (~self.flip if name != "flip" else True)
        return rows


def scores(predicted: np.ndarray, pairs: Pairs, subset: np.ndarray) -> dict:
    tp = int((predicted & pairs.duplicate & subset).sum())
    fp = int((predicted & ~pairs.duplicate & subset).sum())
    fn = int((~predicted & pairs.duplicate & subset).sum())
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"tp": tp, "fp": fp, "fn": fn, "precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4)}


# --- fastret ------------------------------------------------------------------------------------


def fastret_index(folder: Path, index_dir: Path) -> float:
    """Index the set with the CLI's defaults (the bundled model on CPU); reuse an index already there."""
    if (index_dir / "CURRENT").exists():
        return 0.0
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fastret.cli.main", "index", str(folder), "--out", str(index_dir), "-q"],
                   check=True)
    return time.perf_counter() - started


def fastret_run(index_dir: Path, entries: list[Entry], pairs: Pairs, threshold: float) -> dict:
    """Groups at one threshold -> predicted pairs, scores per row, groups holding two originals."""
    position = {e.path: k for k, e in enumerate(entries)}
    retriever = open_for_duplicates(index_dir)
    started = time.perf_counter()
    report = find_duplicates(retriever, threshold=threshold)
    seconds = time.perf_counter() - started
    group_of = np.full(len(entries), -1)
    mixed = []
    for number, group in enumerate(report.groups):
        members = [position[copy.path] for copy in [group.kept, *group.duplicates]]
        group_of[members] = number
        sources = sorted({entries[m].source for m in members})
        if len(sources) > 1 and not all(frozenset(p) in ALLOWED_PAIRS for p in itertools.combinations(sources, 2)):
            mixed.append([entries[m].path for m in members])
    predicted = (group_of[pairs.first] == group_of[pairs.second]) & (group_of[pairs.first] >= 0)
    return {"threshold": threshold, "seconds": round(seconds, 2), "groups": len(report.groups),
            "mixed_groups": mixed, "predicted": predicted}


# --- perceptual hashes (the imagehash package) ---------------------------------------------------

HASHES = ("phash", "dhash", "whash", "crop-resistant")


def _hash_one(task: tuple[str, str]) -> np.ndarray:
    """One image's hash as uint64 words (crop-resistant: one word per segment)."""
    import imagehash

    name, path = task
    with Image.open(path) as opened:
        img = opened.convert("RGB")
    if name == "crop-resistant":
        found = imagehash.crop_resistant_hash(img)
        return np.array([_word(h) for h in found.segment_hashes], dtype=np.uint64)
    return np.array([_word(getattr(imagehash, name)(img))], dtype=np.uint64)


def _word(image_hash) -> int:
    return int("".join("1" if bit else "0" for bit in image_hash.hash.flatten()), 2)


def hash_distances(name: str, paths: list[Path], cache: Path, timed: int = 50) -> tuple[np.ndarray, float, float]:
    """(N, N) distances as the imagehash package defines them; the seconds hashing all N images
    would take on one core (timed on `timed` of them) and the seconds comparing took.

    Hashes are cached per file (cache/NAME.json) so another run re-hashes only new files.
    """
    cache_file = cache / f"{name}.json"
    known = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    keys = [f"{p.resolve()}:{p.stat().st_size}" for p in paths]
    missing = [k for k, key in enumerate(keys) if key not in known]
    with Pool(os.cpu_count() or 1) as pool:
        for k, words in zip(missing, pool.map(_hash_one, [(name, str(paths[k])) for k in missing], chunksize=8)):
            known[keys[k]] = [int(w) for w in words]
    cache.mkdir(parents=True, exist_ok=True)
    cache_file.write_text(json.dumps(known))
    sample = paths[:: max(1, len(paths) // timed)][:timed]
    started = time.perf_counter()
    for path in sample:
        _hash_one((name, str(path)))
    hashing = (time.perf_counter() - started) / len(sample) * len(paths)
    words = [np.array(known[key], dtype=np.uint64) for key in keys]
    started = time.perf_counter()
    distances = crop_resistant_distances(words) if name == "crop-resistant" else _hamming(np.concatenate(words))
    return distances, hashing, time.perf_counter() - started


def _hamming(words: np.ndarray) -> np.ndarray:
    return np.bitwise_count(words[:, None] ^ words[None, :]).astype(np.float32)


def crop_resistant_distances(segments: list[np.ndarray], bit_error_rate: float = 0.25) -> np.ndarray:
    """imagehash's ImageMultiHash `a - b` for every pair, the smaller of both directions.

    a - b = len(a) - (matches - summed distance / (matches * 64)), where a segment of a matches
    when its nearest segment of b is within 64 * bit_error_rate bits; len(a) when none matches.
    """
    counts = np.array([len(s) for s in segments])
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    flat = np.concatenate(segments)
    cutoff = 64 * bit_error_rate
    distances = np.empty((len(segments), len(segments)), dtype=np.float32)
    for k, words in enumerate(segments):
        bits = np.bitwise_count(words[:, None] ^ flat[None, :]).astype(np.float32)  # (segments of k, all segments)
        nearest = np.minimum.reduceat(bits, starts, axis=1)  # (segments of k, images)
        close = nearest <= cutoff
        matches = close.sum(axis=0)
        summed = np.where(close, nearest, 0).sum(axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            distances[k] = np.where(matches > 0, len(words) - (matches - summed / (matches * 64)), len(words))
    return np.minimum(distances, distances.T)


def embedding_distances(index_dir: Path, entries: list[Entry]) -> np.ndarray:
    """1 - cosine of the index's stored embeddings, in the set's order: the embeddings alone as a baseline."""
    from fastret.engine.index import Index

    index = Index.load(index_dir)
    position = {item.path: row for row, item in enumerate(index.items)}
    vectors = np.asarray(index.embeddings)[[position[e.path] for e in entries]]
    return 1.0 - vectors @ vectors.T


def sweep(distances: np.ndarray, pairs: Pairs, subsets: dict[str, np.ndarray]) -> dict:
    """Scores of a pairwise distance at every threshold; the best (overall F1) with its per-row scores."""
    values = distances[pairs.first, pairs.second]
    candidates = np.unique(values)
    if len(candidates) > 400:
        candidates = np.unique(np.quantile(values, np.linspace(0, 0.05, 400)))
    curve = []
    for threshold in candidates:
        curve.append({"threshold": float(threshold), **scores(values <= threshold, pairs, subsets["overall"])})
    best = max(curve, key=lambda point: (point["f1"], -point["threshold"]))
    predicted = values <= best["threshold"]
    return {
        "threshold": best["threshold"],
        "rows": {row: scores(predicted, pairs, subset) for row, subset in subsets.items()},
        "original_pairs_flagged": int((predicted & pairs.originals & ~pairs.ignored).sum()),
        "curve": [{"threshold": p["threshold"], "precision": p["precision"], "recall": p["recall"]} for p in curve],
    }


# --- the run ------------------------------------------------------------------------------------


def evaluate(src: Path, work: Path, originals: int, seed: int, thresholds: list[float], hashes: bool) -> dict:
    folder = work / f"set-seed{seed}"
    entries = make_set(src, folder, originals, seed)
    index_seconds = fastret_index(folder, work / f"index-seed{seed}")
    pairs = Pairs.of(entries)
    subsets = pairs.subsets(entries)
    runs = []
    for threshold in thresholds:
        run = fastret_run(work / f"index-seed{seed}", entries, pairs, threshold)
        run["rows"] = {row: scores(run["predicted"], pairs, subset) for row, subset in subsets.items()}
        run["original_pairs_flagged"] = int((run.pop("predicted") & pairs.originals & ~pairs.ignored).sum())
        print(f"[seed {seed}] fastret threshold {threshold}: F1 {run['rows']['overall']['f1']}, "
              f"{len(run['mixed_groups'])} groups holding two originals, {run['seconds']} s", flush=True)
        runs.append(run)
    started = time.perf_counter()
    cosine = embedding_distances(work / f"index-seed{seed}", entries)
    baselines = {"embedding cosine": {**sweep(cosine, pairs, subsets), "seconds": round(time.perf_counter() - started, 1)}}
    if hashes:
        paths = [folder / e.path for e in entries]
        for name in HASHES:
            distances, hashing, comparing = hash_distances(name, paths, work / "hash-cache")
            baselines[name] = {**sweep(distances, pairs, subsets), "seconds": round(hashing + comparing, 1),
                               "hash_seconds": round(hashing, 1), "compare_seconds": round(comparing, 1)}
    for name, found in baselines.items():
        print(f"[seed {seed}] {name}: best F1 {found['rows']['overall']['f1']} at {found['threshold']:g}", flush=True)
    return {"seed": seed, "images": len(entries), "originals_copied": originals, "index_seconds": round(index_seconds, 1),
            "fastret": runs, "baselines": baselines}


def choose_auto(runs: list[dict]) -> dict:
    """The threshold the finder should default to: the best overall F1 among the thresholds at
    which no group holds two different originals (except the allowed pairs); ties: the stricter."""
    clean = [run for run in runs if not run["mixed_groups"]]
    if not clean:
        raise SystemExit("no threshold keeps different originals apart; extend --thresholds")
    return max(clean, key=lambda run: (run["rows"]["overall"]["f1"], run["threshold"]))


def time_scaled(index_dir: Path, repeats: int) -> dict:
    """Wall and CPU time of `fastret duplicates INDEX --json` (a new process each time), with the machine's load."""
    runs = []
    for _ in range(repeats):
        load = os.getloadavg()[0]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "fastret.cli.main", "duplicates", str(index_dir), "--json"],
                              check=True, capture_output=True, text=True)
        wall = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)  # its verifying processes too
        report = json.loads(done.stdout)
        runs.append({"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "load_1m_before": round(load, 2),
                     "items": report["items"], "groups": len(report["groups"]), "duplicates": report["duplicates"],
                     "seconds": report["seconds"]})
        print(f"[scaled] {report['items']} items: {wall:.2f} s wall, {cpu:.2f} s CPU (load {load:.2f}), "
              f"{len(report['groups'])} groups", flush=True)
    return {"index": str(index_dir), "runs": runs}


def index_cost(folder: Path, images: int, repeats: int) -> dict:
    """Images/s of the index job's pipeline (decode, embed) without and with thumbnails, alternating
    (the same files, encoder and process), and the thumbnails' bytes per image."""
    from common import spread
    from fastret.engine.pipeline import embed_files
    from fastret.service.load import open_encoder

    encoder = open_encoder(image_dir=folder, workload="throughput")
    paths = spread(list_images(folder), images)
    embed_files(paths[:64], encoder, thumbnails=True)  # warm up the runtime, OpenCV and the page cache
    runs = []
    for repeat in range(repeats):
        for thumbnails in (False, True):
            load = os.getloadavg()[0]
            started = time.perf_counter()
            result = embed_files(paths, encoder, thumbnails=thumbnails)
            seconds = time.perf_counter() - started
            run = {"repeat": repeat, "thumbnails": thumbnails, "images": len(result.paths), "seconds": round(seconds, 2),
                   "images_per_s": round(len(result.paths) / seconds, 1), "load_1m_before": round(load, 2)}
            if thumbnails:
                kept = result.thumbnails
                run["bytes_per_image"] = round((sum(part.nbytes for part in kept.parts) + kept.table.nbytes) / len(kept), 1)
                run["embedding_bytes_per_image"] = result.embeddings.shape[1] * 4
            print(f"[index cost] thumbnails {thumbnails}: {run['images_per_s']} images/s (load {load:.2f})", flush=True)
            runs.append(run)
    return {"folder": str(folder), "model": encoder.info.model_id, "runs": runs}


def plot(result: dict, auto: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 5))
    runs = result["fastret"]
    ax.plot([r["rows"]["overall"]["recall"] for r in runs], [r["rows"]["overall"]["precision"] for r in runs], "o-",
            color="black", label="fastret (thresholds " + ", ".join(f"{r['threshold']:g}" for r in runs) + ")")
    ax.plot([auto["rows"]["overall"]["recall"]], [auto["rows"]["overall"]["precision"]], "*", color="red", markersize=14,
            label=f"fastret auto ({auto['threshold']:g})")
    for name, found in result["baselines"].items():
        ax.plot([p["recall"] for p in found["curve"]], [p["precision"] for p in found["curve"]], "-", label=name)
    ax.set_xlabel("pair recall")
    ax.set_ylabel("pair precision")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title(f"Near-duplicates in wang1k + {result['images'] - 1000} copies (seed {result['seed']}, flips aside)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", type=Path, default=DATA / "wang1k")
    parser.add_argument("--originals", type=int, default=100, help="originals that get copies (default: 100)")
    parser.add_argument("--seed", type=int, default=0, help="the set the thresholds are chosen on")
    parser.add_argument("--check-seed", type=int, default=1, help="a second set scored at the chosen thresholds (-1: none)")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9])
    parser.add_argument("--no-hashes", action="store_true", help="fastret only (the hashes take minutes)")
    parser.add_argument("--scaled-index", type=Path, default=None, help="time `fastret duplicates` on this index")
    parser.add_argument("--scaled-only", action="store_true", help="only the --scaled-index timing")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--index-cost", type=Path, default=None, metavar="DIR",
                        help="only: images/s of the index pipeline over DIR without and with thumbnails")
    parser.add_argument("--index-cost-images", type=int, default=1000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/fastret-duplicates"), help="sets, indexes, hash cache")
    parser.add_argument("--out", type=Path, default=OUT / "duplicates")
    parser.add_argument("--plot", type=Path, default=REPO / "docs" / "duplicates-pr.png")
    args = parser.parse_args(argv)
    if args.index_cost is not None:
        write_json(args.out / "duplicates-index-cost.json",
                   {"command": " ".join(sys.argv), "machine": machine(),
                    "index_cost": index_cost(args.index_cost, args.index_cost_images, args.repeats)})
        return 0
    if args.scaled_only:
        if args.scaled_index is None:
            parser.error("--scaled-only needs --scaled-index")
        write_json(args.out / "duplicates-scaled.json",
                   {"command": " ".join(sys.argv), "machine": machine(), "scaled": time_scaled(args.scaled_index, args.repeats)})
        return 0

    result = evaluate(args.src, args.work, args.originals, args.seed, args.thresholds, not args.no_hashes)
    auto = choose_auto(result["fastret"])
    summary = {"command": " ".join(sys.argv), "machine": machine(), "chosen": result, "auto_threshold": auto["threshold"]}
    if args.check_seed >= 0:
        check = evaluate(args.src, args.work, args.originals, args.check_seed, [auto["threshold"]], not args.no_hashes)
        summary["check"] = check
    if args.scaled_index is not None:
        summary["scaled"] = time_scaled(args.scaled_index, args.repeats)
    write_json(args.out / "duplicates.json", summary)
    if not args.no_hashes:
        plot(result, auto, args.plot)
    for name, found in [(f"seed {args.seed}", result)] + ([(f"seed {args.check_seed}", summary["check"])] if "check" in summary else []):
        print_tables(name, found, auto["threshold"])
    print(f"auto threshold: {auto['threshold']} -> {args.out / 'duplicates.json'}")
    return 0


def print_tables(name: str, result: dict, auto_threshold: float) -> None:
    run = next(r for r in result["fastret"] if r["threshold"] == auto_threshold)
    methods = {f"fastret (auto {auto_threshold:g})": run, **result["baselines"]}
    rows = []
    for method, found in methods.items():
        seconds = found["seconds"]
        overall = found["rows"]["overall"]
        rows.append([method, f"{found['threshold']:g}", overall["precision"], overall["recall"], overall["f1"],
                     found["rows"]["overall incl. flip"]["f1"], found["original_pairs_flagged"], round(seconds, 1)])
    print(f"\n{name}: {result['images']} images")
    print(table(["method", "threshold", "P", "R", "F1", "F1 incl. flip", "original pairs", "seconds"], rows))
    print(table(["category"] + [m.split(" ")[0] for m in methods],
                [[row] + [f"{found['rows'][row]['precision']:.3f}/{found['rows'][row]['recall']:.3f}/"
                          f"{found['rows'][row]['f1']:.3f}" for found in methods.values()]
                 for row in ["overall", *CATEGORIES]]))
    if run["mixed_groups"]:
        print("groups holding two originals:", run["mixed_groups"])


if __name__ == "__main__":
    sys.exit(main())
