"""The thumbnails `fastret index` keeps for the duplicate finder: what they hold, that edits keep
them with their items, that indexes without them still work, that verify checks them."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fakes import MeanColourEncoder
from fastret.engine.duplicates import _orb, file_facts, pixel_features
from fastret.engine.index import Index, IndexState, live_version, thumbnail_files, verify_index
from fastret.engine.retrieval import build_index
from fastret.engine.update import refresh_index
from fastret.service.duplicates import find_duplicates
from fastret.service.search import Retriever
from test_duplicates import crop, save, scene


@pytest.fixture
def photos(tmp_path) -> Path:
    """Large JPEGs (a reduced decode for the encoder, another for the finder), one EXIF-rotated, a crop and a PNG."""
    root = tmp_path / "photos"
    photo = scene(0).resize((1152, 768), Image.Resampling.BICUBIC)
    save(photo, root / "a" / "photo.jpg", 1000, quality=90)
    save(photo.resize((600, 400), Image.Resampling.LANCZOS), root / "b" / "small.jpg", 900, quality=60)
    save(crop(photo, 0.8), root / "b" / "crop.jpg", 900, quality=85)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored on its side: shown rotated 90 degrees clockwise
    save(scene(1, (1000, 700)).transpose(Image.Transpose.ROTATE_90), root / "c" / "turned.jpg", 800, exif=exif)
    save(scene(2, (500, 300)), root / "c" / "other.png", 800)
    return root.resolve()


def indexed(root: Path, index_dir: Path) -> Path:
    index, _ = build_index(root, MeanColourEncoder(), workers=0)
    index.save(index_dir)
    return index_dir


def assert_thumbnails_match_the_files(index: Index) -> None:
    """Each row's kept thumbnail is what the finder would decode from that row's file now."""
    assert index.thumbnails is not None and index.thumbnails.stored() == len(index)
    for row, item in enumerate(index.items):
        path = Path(index.root) / item.path
        kept, facts = index.thumbnails[row], file_facts(path)
        decoded = pixel_features(path, facts).thumb
        assert (kept.width, kept.height) == (facts.width, facts.height), item.path
        assert kept.pixels.shape == decoded.shape, item.path
        assert np.abs(kept.pixels.astype(int) - decoded).mean() < 2.0, item.path  # other JPEG reductions
        points, descriptors = _orb(kept.pixels)
        np.testing.assert_allclose(kept.points, points, atol=1 / 64)
        np.testing.assert_array_equal(kept.descriptors, descriptors)


def test_kept_thumbnails_are_what_the_finder_decodes(photos, tmp_path):
    index = Index.load(indexed(photos, tmp_path / "idx"))
    assert_thumbnails_match_the_files(index)
    turned = next(row for row, item in enumerate(index.items) if item.path == "c/turned.jpg")
    assert (index.thumbnails[turned].width, index.thumbnails[turned].height) == (1000, 700)  # upright


def test_edits_and_compaction_keep_each_thumbnail_with_its_item(photos, tmp_path):
    for number in range(10):  # enough items that one edit neither merges segments nor compacts
        save(scene(10 + number, (160, 120)), photos / "f" / f"{number}.png", 600)
    index_dir = indexed(photos, tmp_path / "idx")
    save(scene(3, (800, 600)), photos / "d" / "new.jpg", 700, quality=80)
    (photos / "b" / "small.jpg").unlink()
    done = refresh_index(index_dir, photos, MeanColourEncoder(), workers=0)
    assert (done.added, done.removed, done.written.compacted) == (1, 1, False)
    layout = IndexState.read(index_dir).layout
    assert len(layout.segments) == 2 and len(layout.deleted) == 1  # a linked segment with a removed row, a new one
    assert_thumbnails_match_the_files(Index.load(index_dir))
    assert IndexState.read(index_dir).write(compact=True).compacted
    assert_thumbnails_match_the_files(Index.load(index_dir))


def groups_of(report) -> list[list[str]]:
    return sorted(sorted([group.kept.path, *(copy.path for copy in group.duplicates)]) for group in report.groups)


def test_an_index_without_thumbnails_finds_the_same_groups(photos, tmp_path):
    index_dir = indexed(photos, tmp_path / "idx")
    with_thumbnails = find_duplicates(Retriever(Index.load(index_dir)))
    assert groups_of(with_thumbnails) == [["a/photo.jpg", "b/crop.jpg", "b/small.jpg"]]
    old = Index.load(index_dir)
    old.thumbnails = None  # as written before thumbnails were kept
    old.save(tmp_path / "old")
    assert not any(name.endswith(".npy") and ".thumbs" in name for name in os.listdir(live_version(tmp_path / "old")))
    assert Index.load(tmp_path / "old").thumbnails is None
    assert groups_of(find_duplicates(Retriever(Index.load(tmp_path / "old")))) == groups_of(with_thumbnails)
    # An incremental edit of the old index keeps it readable: old rows without thumbnails, new ones with.
    save(scene(5, (700, 500)), photos / "e" / "added.jpg", 500, quality=80)
    refresh_index(tmp_path / "old", photos, MeanColourEncoder(), workers=0)
    mixed = Index.load(tmp_path / "old")
    assert mixed.thumbnails.stored() == 1
    assert groups_of(find_duplicates(Retriever(mixed))) == groups_of(with_thumbnails)


def test_a_file_changed_since_it_was_indexed_is_decoded_again(photos, tmp_path):
    index_dir = indexed(photos, tmp_path / "idx")
    small = photos / "b" / "small.jpg"
    save(scene(6, (600, 400)), small, 900, quality=60)  # another picture under the same name
    os.utime(small, ns=(10**18, 10**18))
    report = find_duplicates(Retriever(Index.load(index_dir)))
    assert groups_of(report) == [["a/photo.jpg", "b/crop.jpg"]]


def test_verify_checks_the_thumbnail_files(photos, tmp_path):
    index_dir = indexed(photos, tmp_path / "idx")
    version = live_version(index_dir)
    segment = IndexState.read(index_dir).layout.segments[0]
    table, data = thumbnail_files(segment)
    assert verify_index(index_dir) == []
    with open(version / data, "r+b") as handle:  # flip a byte of a thumbnail, the size unchanged
        handle.seek(-100, os.SEEK_END)
        byte = handle.read(1)
        handle.seek(-100, os.SEEK_END)
        handle.write(bytes([byte[0] ^ 0xFF]))
    problems = verify_index(index_dir)
    assert len(problems) == 1 and f"{data} checksum mismatch" in problems[0]
    (version / table).unlink()
    assert any(f"{table} is missing" in line for line in verify_index(index_dir))
