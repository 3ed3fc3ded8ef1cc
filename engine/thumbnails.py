"""What the duplicate finder verifies with, kept per image at index time: a grey thumbnail and its ORB keypoints.

`fastret index` decodes every image anyway; keeping the small grey thumbnail that pixel
verification compares (fastret.engine.duplicates) and its keypoints spares `fastret duplicates`
decoding every file again. A segment's thumbnails are two files beside it, written once like the
segment: a table (one record per stored row: its item id, the file's upright size, the thumbnail's
shape, where its bytes start, how many keypoints) and the bytes (each thumbnail's pixels, row by
row, then its keypoints as KEYPOINT records).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TABLE = np.dtype(
    [("id", "<i8"), ("width", "<i4"), ("height", "<i4"), ("rows", "<u2"), ("cols", "<u2"), ("points", "<u2"), ("at", "<i8")]
)
"""A thumbnail table's record; width 0: no thumbnail stored for that row."""
POINT_SCALE = 64  # keypoint positions are stored in 1/64 pixel
KEYPOINT = np.dtype([("xy", "<u2", (2,)), ("descriptor", "u1", (32,))])
"""A stored keypoint: its position (1/POINT_SCALE pixel) and its 256-bit ORB descriptor."""


@dataclass(frozen=True)
class Thumbnail:
    """One image as the duplicate finder sees it."""

    width: int  # the file's upright size in pixels
    height: int
    pixels: np.ndarray  # (h, w) uint8 grey
    points: np.ndarray  # (n, 2) float32 ORB keypoint positions in the thumbnail
    descriptors: np.ndarray  # (n, 32) uint8 ORB descriptors


@dataclass(frozen=True)
class Thumbnails:
    """Thumbnails of a run of rows (None where a row has none), packed: `table` (TABLE, ids unset
    until written) and the byte buffers its `at` offsets point into (`part_of[row]`: which)."""

    table: np.ndarray
    parts: tuple[np.ndarray, ...]
    part_of: np.ndarray

    def __len__(self) -> int:
        return len(self.table)

    @classmethod
    def of(cls, thumbnails: Sequence[Thumbnail | None]) -> "Thumbnails":
        table = np.zeros(len(thumbnails), TABLE)
        data = bytearray()
        for row, thumbnail in enumerate(thumbnails):
            if thumbnail is None:
                continue
            keypoints = np.empty(len(thumbnail.points), KEYPOINT)
            keypoints["xy"] = np.rint(thumbnail.points * POINT_SCALE)
            keypoints["descriptor"] = thumbnail.descriptors
            (rows, cols), record = thumbnail.pixels.shape, table[row]
            record["width"], record["height"], record["rows"], record["cols"] = thumbnail.width, thumbnail.height, rows, cols
            record["points"], record["at"] = len(keypoints), len(data)
            data += thumbnail.pixels.tobytes()
            data += keypoints.tobytes()
        return cls(table, (np.frombuffer(bytes(data), np.uint8),), np.zeros(len(table), np.int32))

    @classmethod
    def absent(cls, count: int) -> "Thumbnails":
        return cls(np.zeros(count, TABLE), (), np.zeros(count, np.int32))

    @classmethod
    def concat(cls, pieces: Sequence["Thumbnails"]) -> "Thumbnails":
        starts = np.cumsum([0, *(len(piece.parts) for piece in pieces)])
        return cls(
            np.concatenate([piece.table for piece in pieces]) if pieces else np.zeros(0, TABLE),
            tuple(part for piece in pieces for part in piece.parts),
            np.concatenate([piece.part_of + start for piece, start in zip(pieces, starts)]).astype(np.int32)
            if pieces else np.zeros(0, np.int32),
        )

    def take(self, rows: np.ndarray) -> "Thumbnails":
        rows = np.asarray(rows, dtype=np.int64)
        return Thumbnails(self.table[rows], self.parts, self.part_of[rows])

    def stored(self) -> int:
        """How many rows have a thumbnail."""
        return int((self.table["width"] > 0).sum())

    def __getitem__(self, row: int) -> Thumbnail | None:
        record = self.table[row]
        if record["width"] == 0:
            return None
        data, at = self.parts[self.part_of[row]], int(record["at"])
        rows, cols = int(record["rows"]), int(record["cols"])
        pixels = np.asarray(data[at : at + rows * cols]).reshape(rows, cols)
        start = at + rows * cols
        keypoints = np.frombuffer(data[start : start + int(record["points"]) * KEYPOINT.itemsize].tobytes(), KEYPOINT)
        return Thumbnail(int(record["width"]), int(record["height"]), pixels,
                         keypoints["xy"].astype(np.float32) / POINT_SCALE, np.ascontiguousarray(keypoints["descriptor"]))

    def save(self, table_path: Path, data_path: Path, ids: np.ndarray) -> None:
        """Write the table (with these item ids) and the rows' bytes, packed into one buffer."""
        packed = Thumbnails.of([self[row] for row in range(len(self))])
        table = packed.table.copy()
        table["id"] = ids
        np.save(table_path, table)
        np.save(data_path, packed.parts[0])

    @classmethod
    def load(cls, table_path: Path, data_path: Path, ids: np.ndarray) -> "Thumbnails":
        """A segment's thumbnails (the bytes memory-mapped); ValueError when the files do not fit its ids."""
        table = np.load(table_path, allow_pickle=False)
        data = np.load(data_path, mmap_mode="r", allow_pickle=False)
        if table.dtype != TABLE or table.shape != ids.shape or not np.array_equal(table["id"], ids):
            raise ValueError(f"{table_path.name} is not a thumbnail table of the segment's {len(ids)} items")
        ends = table["at"] + table["rows"].astype(np.int64) * table["cols"] + table["points"].astype(np.int64) * KEYPOINT.itemsize
        if data.dtype != np.uint8 or data.ndim != 1 or (len(table) and int(ends.max()) > len(data)) or (table["at"] < 0).any():
            raise ValueError(f"{data_path.name} does not hold the bytes its table points to")
        return cls(table, (data,), np.zeros(len(table), np.int32))
