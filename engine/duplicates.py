"""Duplicate finding: identical files by content hash, near-duplicates by kNN candidates verified in pixels.

Embeddings alone cannot tell a copy from a similar shot: a copy resized for a chat app can be
further from its original than two photos of one scene taken a moment apart. So the index's
neighbours only propose candidate pairs; a pair is a duplicate when the two images align under
one similarity transform (ORB keypoints, RANSAC) and then agree pixel for pixel in every part of
their overlap (block by block, after normalising brightness and contrast): a resized, re-saved,
cropped, rotated, padded or brightened copy does; a second shot, where something moved, does not.

Groups are stars: every member is verified against the group's representative, the candidate to
keep (largest resolution, then largest file, then oldest), so a group cannot grow along a chain
of pairwise-similar shots. Functions work on row positions (0..N-1) of the caller's lists.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from fastret.engine.decode import DEFAULT_MAX_PIXELS, Decoded, ImageError, decode_image, upright_size
from fastret.engine.files import sha256_files
from fastret.engine.thumbnails import Thumbnail

NEIGHBOURS = 6
"""Candidates proposed per image (its nearest neighbours in the index)."""
MIN_COSINE = 0.5
"""Candidates less similar than this are not verified: no copy in the benchmark is below it."""
AUTO_THRESHOLD = 0.7
"""Least pixel agreement of a near-duplicate at `--threshold auto` (chosen by benchmarks/duplicates.py)."""

THUMB_SIDE = 96  # verification works on grey thumbnails whose longer side is this
ORB_FEATURES = 100
ORB_PATCH = 11  # pixels: ORB's default 31 leaves too little of a 96-pixel thumbnail
ORB_LEVELS = 2  # thumbnails have one size, so copies differ in scale by little
ORB_FAST = 10  # FAST corner threshold (grey levels)
MAX_HAMMING = 48  # of 256 bits: a keypoint match further apart is noise
MIN_INLIERS = 12  # keypoint matches consistent with one transform
RANSAC_PIXELS = 3.0
RANSAC_ITERATIONS = 100  # finds a transform held by a third of 12 matches with p > 0.9999
MAX_ROTATION_DEGREES = 20.0
MAX_SCALE = 3.0  # between the two thumbnails, both THUMB_SIDE long
SAME_SHAPE = 0.03  # aspect ratios this close (relatively): the thumbnails may frame the same view
SKETCH = 8  # same-shape thumbnails are compared in full only when their SKETCH x SKETCH block means
SKETCH_CORRELATION = 0.8  # correlate at least this well (a copy's do: near 1)
MIN_OVERLAP = 0.35  # of each image, once aligned
SMOOTHING = 0.7  # pixels (Gaussian sigma) at the compared resolution
GRID = 4  # agreement is checked in GRID x GRID blocks
MAD_OF_UNRELATED = 2 / math.sqrt(math.pi)  # mean |a - b| of two independent standardised values
BORDER_TOLERANCE = 10  # grey levels: a border row or column is this close to uniform

REASON_BYTES = "identical bytes"
REASON_PIXELS = "identical pixels"
REASON_NEAR = "near-duplicate"


# --- the candidate to keep ----------------------------------------------------------------------


@dataclass(frozen=True)
class FileFacts:
    """What the kept-candidate rule looks at: upright pixel size, bytes, modification time."""

    width: int
    height: int
    bytes: int
    mtime: float


def file_facts(path: Path) -> FileFacts:
    """Size from the image header (no decode); raises ImageError or OSError for an unreadable file."""
    stat = os.stat(path)
    try:
        with Image.open(path) as img:
            width, height = upright_size(img)
    except Exception as exc:  # any Pillow plugin error is this file's problem
        raise ImageError(f"cannot read its size: {' '.join(str(exc).split()) or type(exc).__name__}") from None
    return FileFacts(width, height, stat.st_size, stat.st_mtime)


def keep_priority(facts: FileFacts, path: str) -> tuple:
    """Sort key, best first: largest resolution, then largest file, then oldest, then path."""
    return (-facts.width * facts.height, -facts.bytes, facts.mtime, path)


# --- identical files ----------------------------------------------------------------------------


def identical_files(paths: Sequence[Path], sizes: Sequence[int]) -> list[list[int]]:
    """Groups (two or more positions) of files with identical bytes; only files sharing a size are hashed.

    A file that cannot be read is left out of every group.
    """
    by_size: dict[int, list[int]] = {}
    for position, size in enumerate(sizes):
        by_size.setdefault(size, []).append(position)
    groups: list[list[int]] = []
    for positions in by_size.values():
        if len(positions) < 2:
            continue
        by_hash: dict[str, list[int]] = {}
        for position in positions:
            try:
                by_hash.setdefault(sha256_files([paths[position]]), []).append(position)
            except OSError:
                continue
        groups.extend(same for same in by_hash.values() if len(same) > 1)
    return sorted(groups)


# --- candidates from the index ------------------------------------------------------------------

Search = Callable[[np.ndarray, int], np.ndarray]
"""(queries (Q, D), k) -> (Q, k) row ids, best first (-1: padding), e.g. Retriever.ranker(...)."""


def candidate_pairs(
    embeddings: np.ndarray,
    search: Search,
    rows: Sequence[int],
    *,
    neighbours: int = NEIGHBOURS,
    min_cosine: float = MIN_COSINE,
    batch_size: int = 2048,
) -> dict[int, list[tuple[int, float]]]:
    """Each row's candidates among `rows` (both directions of every kNN pair), most similar first.

    One batched search per `batch_size` queries; the cosines are recomputed from the embeddings
    (once per pair, a slice at a time), so they do not depend on how the search scored.
    """
    rows = np.asarray(rows, dtype=np.int64)
    wanted = np.zeros(len(embeddings), dtype=bool)
    wanted[rows] = True
    found_pairs = [np.empty((0, 2), np.int64)]
    for start in range(0, len(rows), batch_size):
        queries = rows[start : start + batch_size]
        vectors = np.asarray(embeddings[queries], dtype=np.float32)
        found = np.asarray(search(vectors, min(neighbours + 1, len(embeddings))), dtype=np.int64)
        usable = (found >= 0) & (found != queries[:, None])
        usable[usable] = wanted[found[usable]]
        query_at, column = np.nonzero(usable)
        found_pairs.append(np.sort(np.stack([queries[query_at], found[query_at, column]], axis=1), axis=1))
    pairs = np.concatenate(found_pairs)
    keys = np.unique(pairs[:, 0] * len(embeddings) + pairs[:, 1])
    pairs = np.stack([keys // len(embeddings), keys % len(embeddings)], axis=1)
    cosines = np.concatenate([np.empty(0, np.float32)] + [
        np.einsum("ij,ij->i", np.asarray(embeddings[chunk[:, 0]], np.float32), np.asarray(embeddings[chunk[:, 1]], np.float32))
        for chunk in np.split(pairs, range(COSINE_CHUNK, len(pairs), COSINE_CHUNK))
    ])
    close = cosines >= min_cosine
    candidates: dict[int, list[tuple[int, float]]] = {}
    for (a, b), cosine in zip(pairs[close].tolist(), cosines[close].tolist()):
        candidates.setdefault(a, []).append((b, cosine))
        candidates.setdefault(b, []).append((a, cosine))
    for listed in candidates.values():
        listed.sort(key=lambda pair: (-pair[1], pair[0]))
    return candidates


COSINE_CHUNK = 1024  # pairs whose rows are gathered at once: small enough to stay in cache


# --- pixel verification -------------------------------------------------------------------------


Keypoints = tuple[np.ndarray, "np.ndarray | None"]  # (n, 2) float32 positions, (n, 32) uint8 ORB descriptors


class PixelFeatures:
    """A grey thumbnail with uniform borders trimmed, and its ORB keypoints, plain and mirrored,
    each found when first needed (a copy of the same shape may never need them) unless given."""

    def __init__(self, thumb: np.ndarray, keypoints: Keypoints | None = None) -> None:
        self.thumb = thumb  # (h, w) uint8
        self._keypoints: dict[bool, Keypoints] = {} if keypoints is None else {False: keypoints}
        self._sketch: np.ndarray | None = None

    def sketch(self, mirrored: bool) -> np.ndarray:
        """The thumbnail as SKETCH x SKETCH block means, standardised: a cheap first look at a pair."""
        if self._sketch is None:
            import cv2

            blocks = cv2.resize(self.thumb.astype(np.float32), (SKETCH, SKETCH), interpolation=cv2.INTER_AREA)
            self._sketch = ((blocks - blocks.mean()) / (blocks.std() + 1e-3)).ravel()
        return self._sketch.reshape(SKETCH, SKETCH)[:, ::-1].ravel() if mirrored else self._sketch

    def view(self, mirrored: bool) -> np.ndarray:
        return np.ascontiguousarray(self.thumb[:, ::-1]) if mirrored else self.thumb

    def keypoints(self, mirrored: bool) -> Keypoints:
        if mirrored not in self._keypoints:
            self._keypoints[mirrored] = _orb(self.view(mirrored))
        return self._keypoints[mirrored]


@dataclass(frozen=True)
class PixelMatch:
    """How two images align: `agreement` 1 = the same pixels, 0 = as unlike as unrelated images."""

    agreement: float
    mirrored: bool


def trim_uniform_border(grey: np.ndarray, tolerance: int = BORDER_TOLERANCE) -> np.ndarray:
    """Drop rows and columns at the edges that are one flat colour (a border, a letterbox), and
    the line next to them, where downscaling blended the border into the picture."""

    def flat(lines: np.ndarray) -> np.ndarray:  # per line (axis 1): nearly one grey level
        lines = lines.astype(np.int16)
        return (lines.max(axis=1) - lines.min(axis=1)) <= 2 * tolerance

    def leading(flags: np.ndarray, limit: int) -> int:  # flat lines at the start, and the blended one
        flat_lines = _leading(flags, limit)
        return min(flat_lines + 1, limit) if flat_lines else 0

    minimum = 8
    rows, cols = flat(grey), flat(grey.T)
    top = leading(rows, len(rows) - minimum)
    bottom = len(rows) - leading(rows[::-1], len(rows) - minimum - top)
    left = leading(cols, len(cols) - minimum)
    right = len(cols) - leading(cols[::-1], len(cols) - minimum - left)
    return grey[top:bottom, left:right]


def _leading(flags: np.ndarray, limit: int) -> int:
    """How many True values `flags` starts with, at most `limit` (never below 0)."""
    if limit <= 0:
        return 0
    false = np.flatnonzero(~flags[:limit])
    return int(false[0]) if len(false) else limit


def short_side_needed(size: tuple[int, int]) -> int:
    """The shorter side a decode of an image of this size needs for its thumbnail."""
    return max(1, math.ceil(THUMB_SIDE * min(size) / max(size)))


def grey_thumbnail(decoded: Decoded) -> np.ndarray:
    """The grey thumbnail pixels are compared on: longer side THUMB_SIDE (never enlarged), uniform borders trimmed.

    It is resampled from the JPEG reduction a decode for it alone would use (pixel_features): a
    larger decode (the index's, for its encoder) is box-reduced to that scale first, as the JPEG
    decoder's DCT scaling does, so both make nearly the same thumbnail.
    """
    rgb = decoded.rgb
    if decoded.format == "JPEG":
        wanted = _draft_scale(decoded.size, short_side_needed(decoded.size))
        extra = wanted // max(1, round(decoded.size[0] / rgb.width))
        if extra > 1:
            rgb = rgb.reduce(extra)
    grey = rgb.convert("L")
    scale = THUMB_SIDE / max(grey.size)
    if scale < 1:
        size = (max(1, round(grey.width * scale)), max(1, round(grey.height * scale)))
        grey = grey.resize(size, Image.Resampling.BILINEAR)
    return np.ascontiguousarray(trim_uniform_border(np.asarray(grey)))


def _draft_scale(size: tuple[int, int], side: int) -> int:
    """The DCT reduction (1, 2, 4 or 8) Pillow's JPEG draft picks so that both sides stay >= side."""
    fits = min(size[0] // side, size[1] // side)
    return next(scale for scale in (8, 4, 2, 1) if fits >= scale or scale == 1)


def thumbnail_of(decoded: Decoded, path: Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Thumbnail:
    """What an index keeps of an image it decoded from `path`, for this module to verify it later
    without decoding it again. A decode reduced below the thumbnail's size (for an encoder of
    small inputs) is redone for it; raises ImageError."""
    if min(decoded.rgb.size) < min(short_side_needed(decoded.size), *decoded.size):
        decoded = decode_image(path, max_pixels=max_pixels, reduce_to=short_side_needed(decoded.size))
    pixels = grey_thumbnail(decoded)
    points, descriptors = _orb(pixels)
    if descriptors is None:
        descriptors = np.empty((0, 32), np.uint8)
    return Thumbnail(decoded.size[0], decoded.size[1], pixels, points.astype(np.float32), descriptors)


def stored_features(thumbnail: Thumbnail) -> PixelFeatures:
    """PixelFeatures of a thumbnail kept in the index (its plain keypoints included)."""
    descriptors = thumbnail.descriptors if len(thumbnail.descriptors) else None
    return PixelFeatures(thumbnail.pixels, (thumbnail.points, descriptors))


def pixel_features(path: Path, facts: FileFacts, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> PixelFeatures:
    """Decode small (EXIF orientation applied) and trim borders; raises ImageError.

    JPEGs decode reduced in the DCT domain to no less than the thumbnail needs.
    """
    decoded = decode_image(path, max_pixels=max_pixels, reduce_to=short_side_needed((facts.width, facts.height)))
    return PixelFeatures(grey_thumbnail(decoded))


def facts_and_features(
    paths: Sequence[Path], *, workers: int = 2, max_pixels: int = DEFAULT_MAX_PIXELS
) -> list[tuple[FileFacts, PixelFeatures] | ImageError]:
    """file_facts and pixel_features of each path (decoding runs outside the GIL); a file that
    cannot be read gives its ImageError instead."""

    def one(path: Path) -> tuple[FileFacts, PixelFeatures] | ImageError:
        try:
            facts = file_facts(path)
            return facts, pixel_features(path, facts, max_pixels=max_pixels)
        except ImageError as exc:
            return exc
        except OSError as exc:
            return ImageError(f"cannot read: {exc.strerror or exc}")

    if workers <= 1:
        return [one(path) for path in paths]
    with ThreadPoolExecutor(workers, thread_name_prefix="fastret-duplicates") as pool:
        return list(pool.map(one, paths, chunksize=64))


def match_pixels(
    a: PixelFeatures, b: PixelFeatures, *, mirrored: bool = True, enough: float = 1.0
) -> PixelMatch | None:
    """The best alignment of b onto a (onto a's mirror image too when `mirrored`), or None.

    Cheapest first, stopping once one agrees `enough`: the two thumbnails as they are when they
    have one shape (a resized, re-saved or brightened copy), plain then mirrored, then keypoint
    alignment, plain then mirrored.
    """
    best: PixelMatch | None = None
    for align in (_same_frame, _aligned):
        for flipped in (False, True) if mirrored else (False,):
            found = align(a, b, flipped)
            if found is not None and (best is None or found.agreement > best.agreement):
                best = found
            if best is not None and best.agreement >= enough:
                return best
    return best


def is_duplicate(a: PixelFeatures, b: PixelFeatures, threshold: float, *, mirrored: bool = True) -> PixelMatch | None:
    """The match when b is a near-duplicate of a at this agreement threshold, else None."""
    found = match_pixels(a, b, mirrored=mirrored, enough=threshold)
    return found if found is not None and found.agreement >= threshold else None


def _same_frame(a: PixelFeatures, b: PixelFeatures, mirrored: bool) -> PixelMatch | None:
    """Agreement of the thumbnails laid on each other, when their shapes say they frame the same view."""
    (height_a, width_a), (height_b, width_b) = a.thumb.shape, b.thumb.shape
    if abs(width_a * height_b - width_b * height_a) > SAME_SHAPE * width_a * height_b:
        return None
    if float(a.sketch(mirrored) @ b.sketch(False)) < SKETCH_CORRELATION * SKETCH * SKETCH:
        return None  # not the same view, at a glance
    transform = np.array([[width_b / width_a, 0, 0], [0, height_b / height_a, 0]])
    agreement = _agreement(a.view(mirrored), b.thumb, transform)
    return None if agreement is None else PixelMatch(agreement, mirrored)


def _aligned(a: PixelFeatures, b: PixelFeatures, mirrored: bool) -> PixelMatch | None:
    """Agreement once b is aligned on a (or a's mirror image) by ORB keypoint matches and RANSAC."""
    import cv2

    points, descriptors = a.keypoints(mirrored)
    b_points, b_descriptors = b.keypoints(False)
    if descriptors is None or b_descriptors is None or min(len(descriptors), len(b_descriptors)) < MIN_INLIERS:
        return None
    matches = [m for m in _matcher().match(descriptors, b_descriptors) if m.distance <= MAX_HAMMING]
    if len(matches) < MIN_INLIERS:
        return None
    source = points[[m.queryIdx for m in matches]]
    target = b_points[[m.trainIdx for m in matches]]
    transform, inliers = cv2.estimateAffinePartial2D(
        source, target, method=cv2.RANSAC, ransacReprojThreshold=RANSAC_PIXELS, maxIters=RANSAC_ITERATIONS,
        refineIters=0,  # refined below, only when it will be used
    )
    if transform is None or int(inliers.sum()) < MIN_INLIERS:
        return None
    held = inliers.ravel().astype(bool)
    transform = _similarity_fit(source[held], target[held])
    scale = math.hypot(transform[0, 0], transform[1, 0])
    rotation = math.degrees(math.atan2(transform[1, 0], transform[0, 0]))
    if not (1 / MAX_SCALE <= scale <= MAX_SCALE) or abs(rotation) > MAX_ROTATION_DEGREES:
        return None
    agreement = _agreement(a.view(mirrored), b.thumb, transform)
    return None if agreement is None else PixelMatch(agreement, mirrored)


def _similarity_fit(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The least-squares similarity transform (rotation, one scale, shift) taking source points to target points."""
    source_mean, target_mean = source.mean(axis=0), target.mean(axis=0)
    s, t = (source - source_mean).astype(np.float64), (target - target_mean).astype(np.float64)
    norm = float((s * s).sum())
    cos = float((s * t).sum()) / norm
    sin = float((s[:, 0] * t[:, 1] - s[:, 1] * t[:, 0]).sum()) / norm
    rotation = np.array([[cos, -sin], [sin, cos]])
    return np.hstack([rotation, (target_mean - rotation @ source_mean)[:, None]])


def _agreement(a: np.ndarray, b: np.ndarray, transform: np.ndarray) -> float | None:
    """1 - (the worst block's mean |difference| once aligned) / that of unrelated images.

    The pair is compared in the frame of the image that shows the common content smaller (the
    other is warped down onto it, not blurred up), both lightly smoothed against resampling and
    JPEG noise, intensities standardised over the overlap so brightness and contrast changes
    cancel. None when the images overlap too little to judge.
    """
    import cv2

    area = abs(float(np.linalg.det(transform[:, :2])))  # of a's pixels, once in b's frame
    if area > 1:  # a shows the content larger: warp it down onto b
        a, b, transform, area = b, a, cv2.invertAffineTransform(transform), 1 / area
    height, width = b.shape
    source = cv2.GaussianBlur(a.astype(np.float32), (0, 0), SMOOTHING / math.sqrt(area))
    warped = cv2.warpAffine(source, transform, (width, height), flags=cv2.INTER_LINEAR)
    target = cv2.GaussianBlur(b.astype(np.float32), (0, 0), SMOOTHING)
    inside = cv2.warpAffine(np.ones(a.shape, np.uint8), transform, (width, height), flags=cv2.INTER_NEAREST)
    inside = cv2.erode(inside, _EDGE)
    overlap = cv2.countNonZero(inside)
    if overlap < max(64, MIN_OVERLAP * a.size * area, MIN_OVERLAP * b.size):  # a corner of one is no copy
        return None
    (mean_x,), (std_x,) = cv2.meanStdDev(warped, mask=inside)
    (mean_y,), (std_y,) = cv2.meanStdDev(target, mask=inside)
    weight = inside.astype(np.float32)
    difference = np.abs((warped - mean_x) / (std_x + 1e-3) - (target - mean_y) / (std_y + 1e-3)) * weight
    # Per block: the mean difference over its pixels inside the overlap (area averages of GRID x GRID cells).
    sums = cv2.resize(difference, (GRID, GRID), interpolation=cv2.INTER_AREA)
    counts = cv2.resize(weight, (GRID, GRID), interpolation=cv2.INTER_AREA)
    judged = counts > 0.5  # blocks mostly inside the overlap
    if not judged.any():
        return None
    worst = float((sums[judged] / counts[judged]).max())
    return max(0.0, 1.0 - worst / MAD_OF_UNRELATED)


_EDGE = np.ones((3, 3), np.uint8)  # the overlap's outer pixel mixes in what lies outside


def _orb(thumb: np.ndarray) -> Keypoints:
    import cv2

    keypoints, descriptors = _detector().detectAndCompute(thumb, None)
    if not keypoints:  # a flat picture: nothing to align by
        return np.empty((0, 2), np.float32), None
    return cv2.KeyPoint_convert(keypoints).reshape(-1, 2), descriptors


_local = threading.local()


def _detector():
    """One ORB detector per thread (OpenCV objects are not shared between threads)."""
    if not hasattr(_local, "orb"):
        import cv2

        cv2.setNumThreads(1)
        _local.orb = cv2.ORB_create(
            nfeatures=ORB_FEATURES, scaleFactor=1.3, nlevels=ORB_LEVELS, edgeThreshold=ORB_PATCH, patchSize=ORB_PATCH,
            fastThreshold=ORB_FAST,
        )
    return _local.orb


def _matcher():
    if not hasattr(_local, "matcher"):
        import cv2

        _local.matcher = cv2.BFMatcher(cv2.NORM_HAMMING, crossCheck=True)
    return _local.matcher


# --- grouping -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Member:
    """A row grouped with a representative: the embeddings' cosine and how the pixels matched."""

    row: int
    cosine: float
    match: PixelMatch


@dataclass(frozen=True)
class Group:
    representative: int
    members: list[Member]


def star_groups(
    priority: Sequence[int],
    candidates: dict[int, list[tuple[int, float]]],
    verify: Callable[[int, int], PixelMatch | None],
    *,
    processes: int = 1,
) -> list[Group]:
    """Groups around representatives, each verified member against its representative.

    Rows are visited in `priority` order (best candidate to keep first); a row not yet grouped
    becomes a representative and takes each ungrouped candidate for which verify(rep, row)
    returns a match. Since every member is checked against the representative itself, A~B and
    B~C never put A and C in one group unless A~C.

    A group never leaves its connected component of the candidate graph, so with `processes` > 1
    the components are grouped in that many forked processes (where the platform forks; the
    verification holds the GIL too often for threads to help) with the same result.
    """
    import multiprocessing  # here: the pipeline imports this module, and a search should not wait for it
    from concurrent.futures import ProcessPoolExecutor

    if processes <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        return _star_groups(priority, candidates, verify)
    order = {row: position for position, row in enumerate(priority)}
    chunks = _balanced_chunks(connected_components(priority, candidates), processes * 4)
    global _forked_job
    _forked_job = (order, candidates, verify)
    try:
        with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("fork")) as pool:
            found = [group for groups in pool.map(_star_groups_of, chunks) for group in groups]
    finally:
        _forked_job = None
    return sorted(found, key=lambda group: order[group.representative])


_forked_job: tuple | None = None  # what forked workers group: (priority positions, candidates, verify)


def _star_groups_of(rows: list[int]) -> list[Group]:
    order, candidates, verify = _forked_job
    return _star_groups(sorted(rows, key=order.__getitem__), candidates, verify)


def connected_components(rows: Sequence[int], candidates: dict[int, list[tuple[int, float]]]) -> list[list[int]]:
    """The rows split into connected components of the candidate graph (each row once)."""
    seen: set[int] = set()
    components = []
    for start in rows:
        if start in seen:
            continue
        seen.add(start)
        component, stack = [], [start]
        while stack:
            row = stack.pop()
            component.append(row)
            for other, _ in candidates.get(row, ()):
                if other not in seen:
                    seen.add(other)
                    stack.append(other)
        components.append(component)
    return components


def _balanced_chunks(components: list[list[int]], count: int) -> list[list[int]]:
    """Components dealt into about `count` chunks of similar size, largest first."""
    chunks: list[list[int]] = [[] for _ in range(max(1, min(count, len(components))))]
    for component in sorted(components, key=len, reverse=True):
        min(chunks, key=len).extend(component)
    return [chunk for chunk in chunks if chunk]


def _star_groups(
    priority: Sequence[int], candidates: dict[int, list[tuple[int, float]]], verify: Callable[[int, int], PixelMatch | None]
) -> list[Group]:
    grouped: set[int] = set()
    groups: list[Group] = []
    for rep in priority:
        if rep in grouped:
            continue
        members: list[Member] = []
        tried = {rep}
        frontier = [rep]
        while frontier:  # the representative's candidates, then its new members' candidates
            others = [
                (row, cosine)
                for source in frontier
                for row, cosine in candidates.get(source, ())
                if row not in grouped and row not in tried and not tried.add(row)
            ]
            found = [member for member in (_verified(verify, rep, other) for other in others) if member is not None]
            members.extend(found)
            frontier = [member.row for member in found]
        if members:
            grouped.add(rep)
            grouped.update(member.row for member in members)
            groups.append(Group(rep, members))
    return groups


def _verified(verify: Callable[[int, int], PixelMatch | None], rep: int, candidate: tuple[int, float]) -> Member | None:
    row, cosine = candidate
    found = verify(rep, row)
    return None if found is None else Member(row, cosine, found)
