"""fastret duplicates: identical files, near-duplicates verified in pixels, star groups, the kept file, safe actions."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageEnhance

from fakes import MeanColourEncoder
from fastret.cli.main import main
from fastret.engine.duplicates import (
    AUTO_THRESHOLD,
    FileFacts,
    Group,
    Member,
    PixelMatch,
    file_facts,
    identical_files,
    is_duplicate,
    keep_priority,
    pixel_features,
    star_groups,
    trim_uniform_border,
)
from fastret.engine.retrieval import build_index
from fastret.service.duplicates import find_duplicates, parse_threshold
from fastret.service.search import Retriever


def scene(seed: int, size: tuple[int, int] = (384, 256)) -> Image.Image:
    """A photo stand-in with corners for keypoints: random rectangles and ellipses over a gradient."""
    rng = np.random.default_rng(seed)
    width, height = size
    ramp = np.linspace(60, 190, width, dtype=np.float32)[None, :, None] + rng.uniform(-30, 30, (1, 1, 3))
    img = Image.fromarray(np.clip(np.broadcast_to(ramp, (height, width, 3)), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(60):
        x, y = rng.integers(0, width), rng.integers(0, height)
        w, h = rng.integers(8, 60, size=2)
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        (draw.rectangle if rng.random() < 0.5 else draw.ellipse)((x, y, x + w, y + h), fill=colour)
    return img


def crop(img: Image.Image, keep: float) -> Image.Image:
    width, height = img.size
    w, h = round(width * keep**0.5), round(height * keep**0.5)
    return img.crop((width - w, 0, width, h))


def save(img: Image.Image, path: Path, mtime: float, **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **options)
    os.utime(path, (mtime, mtime))
    return path


@pytest.fixture
def library(tmp_path) -> Path:
    """One photo with an identical copy, a resized JPEG and a crop of it; two unrelated photos."""
    root = tmp_path / "photos"
    photo = scene(0)
    save(photo, root / "a" / "photo.png", 1000)
    (root / "b").mkdir()
    (root / "b" / "photo-copy.png").write_bytes((root / "a" / "photo.png").read_bytes())
    os.utime(root / "b" / "photo-copy.png", (2000, 2000))
    save(photo.resize((230, 154), Image.Resampling.LANCZOS), root / "b" / "photo-small.jpg", 500, quality=60)
    save(crop(photo, 0.8), root / "c" / "photo-crop.jpg", 500, quality=85)
    save(scene(1), root / "a" / "other.png", 1000)
    save(scene(2), root / "c" / "third.jpg", 1000, quality=90)
    return root


def index_of(root: Path):
    index, _ = build_index(root, MeanColourEncoder())
    return index


def paths_of(group) -> list[str]:
    return [group.kept.path, *(copy.path for copy in group.duplicates)]


# --- identical files ----------------------------------------------------------------------------


def test_identical_files_are_grouped_by_bytes_not_by_size(tmp_path):
    files = {"a": b"x" * 100, "b": b"x" * 100, "c": b"y" * 100, "d": b"x" * 99}
    paths = []
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        paths.append(tmp_path / name)
    missing = tmp_path / "gone"  # listed, then deleted: left out, not fatal
    assert identical_files([*paths, missing], [100, 100, 100, 99, 100]) == [[0, 1]]


def test_identical_copy_is_grouped_with_reason_and_the_oldest_kept(library):
    report = find_duplicates(Retriever(index_of(library)))
    assert len(report.groups) == 1
    group = report.groups[0]
    assert group.kept.path == "a/photo.png"  # same pixels and size as its copy, and older
    reasons = {copy.path: copy.reason for copy in group.duplicates}
    assert reasons == {"b/photo-copy.png": "identical bytes", "b/photo-small.jpg": "near-duplicate",
                       "c/photo-crop.jpg": "near-duplicate"}


def test_identical_copies_of_a_near_duplicate_join_its_group_once(library):
    small = library / "b" / "photo-small.jpg"
    (library / "c" / "photo-small (1).jpg").write_bytes(small.read_bytes())
    [group] = find_duplicates(Retriever(index_of(library))).groups
    reasons = {copy.path: copy.reason for copy in group.duplicates}
    assert len(group.duplicates) == len(reasons) == 4
    assert reasons["b/photo-small.jpg"] == "near-duplicate"
    assert reasons["c/photo-small (1).jpg"] == "identical bytes"


def test_identical_pixels_in_another_file_format(tmp_path):
    photo = scene(3)
    save(photo, tmp_path / "photo.png", 1000)
    save(photo, tmp_path / "photo.bmp", 1000)
    [group] = find_duplicates(Retriever(index_of(tmp_path))).groups
    assert [copy.reason for copy in group.duplicates] == ["identical pixels"]


# --- the kept candidate -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("better", "worse"),
    [
        (FileFacts(400, 300, 10_000, 50.0), FileFacts(300, 200, 90_000, 1.0)),  # resolution first
        (FileFacts(400, 300, 20_000, 50.0), FileFacts(400, 300, 10_000, 1.0)),  # then the larger file
        (FileFacts(400, 300, 20_000, 1.0), FileFacts(400, 300, 20_000, 50.0)),  # then the older one
    ],
)
def test_kept_candidate_rule(better, worse):
    assert keep_priority(better, "z.jpg") < keep_priority(worse, "a.jpg")


def test_the_largest_copy_is_kept_even_when_found_from_a_smaller_one(tmp_path):
    photo = scene(4, (600, 400))
    save(photo.resize((300, 200), Image.Resampling.LANCZOS), tmp_path / "a-small.jpg", 1, quality=90)
    save(photo, tmp_path / "z-large.jpg", 99, quality=90)
    [group] = find_duplicates(Retriever(index_of(tmp_path))).groups
    assert group.kept.path == "z-large.jpg"
    assert (group.kept.width, group.kept.height) == (600, 400)


# --- grouping: the chaining guard ----------------------------------------------------------------

MATCH = PixelMatch(agreement=0.9, mirrored=False)


def test_a_chain_of_similar_pairs_is_not_one_group():
    """A~B and B~C, but not A~C: C must not join A's group through B."""
    similar = {frozenset({0, 1}), frozenset({1, 2})}
    candidates = {0: [(1, 0.9)], 1: [(0, 0.9), (2, 0.9)], 2: [(1, 0.9)]}
    groups = star_groups([0, 1, 2], candidates, lambda a, b: MATCH if frozenset({a, b}) in similar else None)
    assert groups == [Group(0, [Member(1, 0.9, MATCH)])]


def test_a_members_candidates_join_when_they_match_the_representative():
    """The representative's own neighbours need not list every copy: its members' neighbours are tried too."""
    candidates = {0: [(1, 0.9)], 1: [(0, 0.9), (2, 0.8)], 2: [(1, 0.8)]}
    groups = star_groups([0, 1, 2], candidates, lambda a, b: MATCH)
    assert groups == [Group(0, [Member(1, 0.9, MATCH), Member(2, 0.8, MATCH)])]


@pytest.mark.parametrize("processes", [1, 3])
def test_components_grouped_in_processes_give_the_groups_of_one_pass(processes):
    """Groups never span components of the candidate graph, so verifying components apart changes nothing."""
    rng = np.random.default_rng(0)
    rows = 60
    candidates: dict[int, list[tuple[int, float]]] = {}
    for a, b in {tuple(sorted(pair)) for pair in rng.integers(0, rows, size=(45, 2)) if pair[0] != pair[1]}:
        candidates.setdefault(int(a), []).append((int(b), 0.9))
        candidates.setdefault(int(b), []).append((int(a), 0.9))
    similar = {frozenset(pair) for pair in rng.integers(0, rows, size=(400, 2)).tolist()}
    priority = rng.permutation(rows).tolist()

    def verify(a, b):
        return MATCH if frozenset({a, b}) in similar else None

    expected = star_groups(priority, candidates, verify)
    assert len(expected) > 3
    assert star_groups(priority, candidates, verify, processes=processes) == expected


# --- pixel verification -------------------------------------------------------------------------


def features(img: Image.Image, tmp_path: Path, name: str, **options):
    path = save(img, tmp_path / name, 1, **options)
    return pixel_features(path, file_facts(path))


@pytest.mark.parametrize(
    "make_copy",
    [
        lambda img: img.resize((img.width // 2, img.height // 2), Image.Resampling.LANCZOS),
        lambda img: crop(img, 0.75),
        lambda img: img.rotate(4, resample=Image.Resampling.BICUBIC).crop((20, 20, img.width - 20, img.height - 20)),
        lambda img: ImageEnhance.Contrast(ImageEnhance.Brightness(img).enhance(1.3)).enhance(0.7),
        lambda img: Image.fromarray(np.pad(np.asarray(img), ((25, 25), (25, 25), (0, 0)), constant_values=255)),
    ],
    ids=["resize", "crop", "rotate", "brightness", "border"],
)
def test_copies_are_near_duplicates(tmp_path, make_copy):
    photo = scene(5)
    original = features(photo, tmp_path, "original.png")
    copy = features(make_copy(photo), tmp_path, "copy.jpg", quality=40)
    assert is_duplicate(original, copy, AUTO_THRESHOLD) is not None


def test_mirror_image_matches_only_when_mirrors_count(tmp_path):
    photo = scene(6)
    original = features(photo, tmp_path, "original.png")
    mirrored = features(photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT), tmp_path, "mirror.png")
    assert is_duplicate(original, mirrored, AUTO_THRESHOLD).mirrored
    assert is_duplicate(original, mirrored, AUTO_THRESHOLD, mirrored=False) is None


def test_an_unrelated_image_is_no_duplicate(tmp_path):
    assert is_duplicate(features(scene(7), tmp_path, "a.png"), features(scene(8), tmp_path, "b.png"), 0.1) is None


@pytest.mark.data
@pytest.mark.parametrize(("first", "second"), [("elephants/521.jpg", "elephants/564.jpg"),
                                               ("elephants/503.jpg", "elephants/567.jpg")])
def test_shots_a_moment_apart_are_not_duplicates(wang1k, first, second):
    a, b = (pixel_features(wang1k / name, file_facts(wang1k / name)) for name in (first, second))
    assert is_duplicate(a, b, AUTO_THRESHOLD) is None
    assert is_duplicate(b, a, AUTO_THRESHOLD) is None


@pytest.mark.data
def test_a_recropped_photo_is_a_near_duplicate(wang1k):
    """food 918/924 is one photo, re-cropped (../shared/data/README.md)."""
    a, b = (pixel_features(wang1k / name, file_facts(wang1k / name)) for name in ("food/918.jpg", "food/924.jpg"))
    assert is_duplicate(a, b, AUTO_THRESHOLD) is not None


def test_uniform_border_is_trimmed_with_the_line_next_to_it():
    """Downscaling blends a border into the picture's first line: that line goes too."""
    picture = np.random.default_rng(0).integers(0, 256, (40, 60), dtype=np.uint8)
    framed = np.pad(picture, ((5, 7), (3, 0)), constant_values=255)
    np.testing.assert_array_equal(trim_uniform_border(framed), picture[1:-1, 1:])


# --- the job and its actions --------------------------------------------------------------------


def test_a_file_gone_since_indexing_is_skipped_with_a_reason(library):
    index = index_of(library)
    (library / "c" / "photo-crop.jpg").unlink()
    report = find_duplicates(Retriever(index))
    assert [(skip.path.name, skip.reason.startswith("cannot read")) for skip in report.skipped] == [("photo-crop.jpg", True)]
    assert paths_of(report.groups[0]) == ["a/photo.png", "b/photo-copy.png", "b/photo-small.jpg"]


@pytest.mark.parametrize("text", ["0", "1.5", "-0.2", "high", "nan"])
def test_bad_thresholds_are_refused(text):
    with pytest.raises(ValueError, match="threshold must be 'auto' or a number in"):
        parse_threshold(text)


@pytest.fixture
def saved_index(library, tmp_path) -> Path:
    out = tmp_path / "index"
    index_of(library).save(out)
    return out


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_dry_run_moves_nothing(saved_index, library, tmp_path, capsys):
    before = tree(library)
    destination = tmp_path / "review"
    assert main(["duplicates", str(saved_index), "--move-to", str(destination)]) == 0
    assert tree(library) == before
    assert not destination.exists()
    err = capsys.readouterr().err
    assert f"would move {library / 'b' / 'photo-small.jpg'} -> {destination / 'b' / 'photo-small.jpg'}" in err
    assert "dry run: nothing changed; add --apply" in err


@pytest.mark.parametrize("link", [False, True])
def test_apply_moves_or_links_duplicates_and_never_the_kept_file(saved_index, library, tmp_path, link):
    before = tree(library)
    destination = tmp_path / "review"
    assert main(["duplicates", str(saved_index), "--move-to", str(destination), "--apply", *(["--link"] if link else [])]) == 0
    moved = ["b/photo-copy.png", "b/photo-small.jpg", "c/photo-crop.jpg"]
    assert tree(destination) == {name: before[name] for name in moved}
    assert all((destination / name).is_symlink() == link for name in moved)
    assert tree(library) == (before if link else {n: d for n, d in before.items() if n not in moved})


def test_move_into_the_indexed_folder_is_refused(saved_index, library, capsys):
    assert main(["duplicates", str(saved_index), "--move-to", str(library / "dupes"), "--apply"]) == 2
    assert "inside the indexed folder" in capsys.readouterr().err
    assert not (library / "dupes").exists()


def test_json_report_shape(saved_index, capsys):
    assert main(["duplicates", str(saved_index), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"root", "items", "threshold", "threshold_setting", "mirrored", "keep_rule", "groups",
                           "duplicates", "skipped", "seconds"}
    assert (report["items"], report["threshold"], report["threshold_setting"], report["duplicates"]) == (6, AUTO_THRESHOLD, "auto", 3)
    assert report["keep_rule"] == "largest resolution, then largest file, then oldest"
    [group] = report["groups"]
    assert set(group) == {"kept", "duplicates"}
    fields = {"id", "path", "width", "height", "bytes", "mtime", "reason", "cosine", "agreement", "mirrored"}
    assert all(set(copy) == fields for copy in [group["kept"], *group["duplicates"]])
    assert group["kept"] | {"id": 0} == {"id": 0, "path": "a/photo.png", "width": 384, "height": 256,
                                         "bytes": group["kept"]["bytes"], "mtime": 1000.0, "reason": "kept",
                                         "cosine": None, "agreement": None, "mirrored": False}
    near = [copy for copy in group["duplicates"] if copy["reason"] == "near-duplicate"]
    assert near and all(AUTO_THRESHOLD <= copy["agreement"] <= 1 and -1 <= copy["cosine"] <= 1 for copy in near)


def test_csv_lists_every_file_of_each_group(saved_index, capsys):
    assert main(["duplicates", str(saved_index), "--csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [(row["group"], row["role"], row["path"]) for row in rows] == [
        ("1", "keep", "a/photo.png"), ("1", "duplicate", "b/photo-copy.png"),
        ("1", "duplicate", "b/photo-small.jpg"), ("1", "duplicate", "c/photo-crop.jpg"),
    ]


def test_listing_names_the_rule_and_the_threshold(saved_index, capsys):
    assert main(["duplicates", str(saved_index), "--threshold", "0.7"]) == 0
    out = capsys.readouterr().out
    assert "  keep       a/photo.png  384x256" in out
    assert out.rstrip().endswith("s)") and "1 groups, 3 duplicates among 6 images" in out
    assert "agreement threshold 0.7;" in out


def test_get_duplicates_endpoint(library):
    pytest.importorskip("fastapi", reason="the web extra is not installed")
    from fastapi.testclient import TestClient

    from fastret.web.app import create_app

    client = TestClient(create_app(Retriever(index_of(library), MeanColourEncoder())))
    response = client.get("/duplicates")
    assert response.status_code == 200
    data = response.json()
    assert data["threshold_setting"] == "auto" and data["duplicates"] == 3
    assert [group["kept"]["path"] for group in data["groups"]] == ["a/photo.png"]
    kept_id = data["groups"][0]["kept"]["id"]
    assert client.get(f"/items/{kept_id}/thumbnail").status_code == 200
    assert client.get("/duplicates", params={"threshold": "2"}).status_code == 400


def test_reported_ids_are_the_items_stable_ids_after_an_edit(library, tmp_path):
    from fastret.engine.index import Index
    from fastret.engine.update import refresh_index

    index_of(library).save(tmp_path / "idx")
    (library / "a" / "other.png").unlink()  # the first row: every later row moves up one
    refresh_index(tmp_path / "idx", library, MeanColourEncoder(), workers=0)
    index = Index.load(tmp_path / "idx")
    id_of = {item.path: int(index.ids[row]) for row, item in enumerate(index.items)}
    [group] = find_duplicates(Retriever(index)).groups
    assert {copy.path: copy.item_id for copy in [group.kept, *group.duplicates]} == {
        path: id_of[path] for path in ("a/photo.png", "b/photo-copy.png", "b/photo-small.jpg", "c/photo-crop.jpg")
    }
    assert id_of["a/photo.png"] != 0  # ids are not rows here


def test_flat_pictures_without_keypoints_are_compared_not_fatal(tmp_path):
    for number, grey in enumerate((40, 41, 200)):
        save(Image.new("RGB", (300, 200 + number), (grey, grey, grey)), tmp_path / f"flat-{number}.png", 1000)
    report = find_duplicates(Retriever(index_of(tmp_path)))
    assert report.skipped == []
