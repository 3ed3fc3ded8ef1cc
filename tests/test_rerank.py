"""Re-ranking, query expansion, whitening and test-time views on small fixtures with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from fastret.engine.rerank import (
    RerankOptions,
    alpha_query_expansion,
    database_augmentation,
    dba_neighbours,
    fit_pca_whitening,
    kreciprocal_distance,
    prepare_database,
    rerank_search,
)
from fastret.engine.tta import (
    FlipAveragedEncoder,
    average_views,
    ensemble_embeddings,
    flip_averaged,
    flip_horizontal,
    l2_normalise,
)


def on_circle(*degrees: float) -> np.ndarray:
    radians = np.deg2rad(np.asarray(degrees, dtype=np.float64))
    return np.stack([np.cos(radians), np.sin(radians)], axis=1).astype(np.float32)


def unit_rows(count: int, dim: int, seed: int = 0) -> np.ndarray:
    return l2_normalise(np.random.default_rng(seed).normal(size=(count, dim)))


# --- test-time views -----------------------------------------------------------------------------


class HalvesEncoder:
    """Embeds an image as (brightness of its left half, brightness of its right half), normalised."""

    backend = "fake"
    precision = "fp32"
    parallel_requests = 2
    info = None
    recipe = None

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        width = pixels.shape[2]
        left = pixels[:, :, : width // 2, 0].mean(axis=(1, 2))
        right = pixels[:, :, width // 2 :, 0].mean(axis=(1, 2))
        return l2_normalise(np.stack([left, right], axis=1))


def left_lit_image() -> np.ndarray:
    pixels = np.zeros((1, 4, 4, 3), np.uint8)
    pixels[:, :, :2] = 255
    return pixels


def test_flip_horizontal_mirrors_columns():
    pixels = np.arange(2 * 2 * 3 * 3, dtype=np.uint8).reshape(2, 2, 3, 3)
    flipped = flip_horizontal(pixels)
    assert flipped.flags.c_contiguous
    np.testing.assert_array_equal(flipped[:, :, 0], pixels[:, :, 2])
    np.testing.assert_array_equal(flip_horizontal(flipped), pixels)


def test_flip_averaged_is_the_normalised_mean_of_both_views():
    encoder = HalvesEncoder()
    np.testing.assert_allclose(encoder.encode(left_lit_image()), [[1.0, 0.0]])
    np.testing.assert_allclose(flip_averaged(encoder, left_lit_image()), [[2**-0.5, 2**-0.5]], rtol=1e-6)
    wrapped = FlipAveragedEncoder(encoder)
    assert wrapped.backend == "fake+flip" and wrapped.info is encoder.info
    assert (wrapped.precision, wrapped.parallel_requests) == ("fp32", 2)  # the wrapped encoder's
    np.testing.assert_allclose(wrapped.encode(left_lit_image()), [[2**-0.5, 2**-0.5]], rtol=1e-6)


def test_average_views_renormalises_and_needs_a_view():
    np.testing.assert_allclose(average_views(on_circle(0), on_circle(90)), on_circle(45), atol=1e-6)
    with pytest.raises(ValueError):
        average_views()


def test_ensemble_cosine_is_the_weighted_mean_of_part_cosines():
    a, b = unit_rows(5, 4, seed=1), unit_rows(5, 7, seed=2)
    joined = ensemble_embeddings(a * 3.0, b)  # parts are normalised first
    np.testing.assert_allclose(np.linalg.norm(joined, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(joined @ joined.T, ((a @ a.T) + (b @ b.T)) / 2, atol=1e-6)
    weighted = ensemble_embeddings(a, b, weights=(3.0, 1.0))
    np.testing.assert_allclose(weighted @ weighted.T, 0.75 * (a @ a.T) + 0.25 * (b @ b.T), atol=1e-6)
    with pytest.raises(ValueError):
        ensemble_embeddings(a, b[:3])
    with pytest.raises(ValueError):
        ensemble_embeddings(a, b, weights=(1.0,))


# --- PCA-whitening -------------------------------------------------------------------------------


def test_pca_whitening_gives_identity_covariance_on_its_training_set():
    rng = np.random.default_rng(3)
    database = rng.normal(size=(300, 6)) * [5.0, 3.0, 1.0, 0.5, 0.2, 0.1] + 2.0
    whitening = fit_pca_whitening(database)
    whitened = whitening.apply(database, normalise=False)
    np.testing.assert_allclose(np.cov(whitened.T), np.eye(6), atol=1e-4)
    reduced = fit_pca_whitening(database, dim=2).apply(database, normalise=False)
    assert reduced.shape == (300, 2)
    np.testing.assert_allclose(np.cov(reduced.T), np.eye(2), atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(whitening.apply(database), axis=1), 1.0, rtol=1e-5)


def test_pca_power_zero_is_plain_pca_and_dim_is_capped_by_rank():
    rng = np.random.default_rng(4)
    database = rng.normal(size=(200, 3)) * [4.0, 2.0, 1.0]
    projected = fit_pca_whitening(database, power=0.0).apply(database, normalise=False)
    variances = np.var(projected, axis=0, ddof=1)
    np.testing.assert_allclose(variances, sorted(variances, reverse=True))
    np.testing.assert_allclose(np.cov(projected.T), np.diag(variances), atol=1e-3)
    few = fit_pca_whitening(rng.normal(size=(4, 10)), dim=8)
    assert few.projection.shape == (10, 3)  # 4 points span at most 3 directions
    with pytest.raises(ValueError):
        fit_pca_whitening(database[:1])


# --- alpha query expansion and database-side augmentation ----------------------------------------


def test_alpha_query_expansion_reorders_a_toy_2d_set():
    # q at 0 deg; x1 at 30, x2 at -35, x3 at 50. Plain order: x1 (cos .866), x2 (.819), x3 (.643).
    # aQE n=1, alpha=1: q' = q + .866 x1 = (1.75, .433), at 13.9 deg, so x3 (36.1 deg away)
    # now beats x2 (48.9 deg away): x1, x3, x2.
    database = on_circle(30, -35, 50)
    query = on_circle(0)[0]
    expanded = alpha_query_expansion(query[None], database[[0]][None], alpha=1.0)[0]
    np.testing.assert_allclose(np.rad2deg(np.arctan2(expanded[1], expanded[0])), 13.9, atol=0.05)
    prepared = prepare_database(database, RerankOptions())
    assert rerank_search(prepared, query, 3, RerankOptions())[0].tolist() == [[0, 1, 2]]
    options = RerankOptions(qe_n=1)  # alpha 1 by default
    ids, scores = rerank_search(prepare_database(database, options), query, 3, options)
    assert ids.tolist() == [[0, 2, 1]]
    np.testing.assert_allclose(scores[0], np.cos(np.deg2rad([16.1, 36.1, 48.9])), atol=1e-3)


def test_database_augmentation_on_a_toy_set():
    database = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]], np.float32)
    neighbours = dba_neighbours(database, 1)
    assert neighbours.tolist() == [[0, 1], [1, 0], [2, 1]]
    augmented = database_augmentation(database, neighbours, alpha=1.0)
    expected_first = np.array([1.0 + 0.8 * 0.8, 0.8 * 0.6])  # x0 + cos(x0, x1) * x1
    np.testing.assert_allclose(augmented[0], expected_first / np.linalg.norm(expected_first), rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(augmented, axis=1), 1.0, rtol=1e-6)


FULL_PIPELINE = RerankOptions(dba_n=3, qe_n=2, kreciprocal=True, k1=5, k2=3, candidates=12)


@pytest.mark.parametrize("options", [RerankOptions(), RerankOptions(dba_n=3), RerankOptions(qe_n=2), FULL_PIPELINE])
def test_an_excluded_item_behaves_as_if_absent_from_the_database(options):
    """Leave-one-out: the query's own database copy never helps rank it, DBA included."""
    database = unit_rows(40, 6, seed=5)
    prepared = prepare_database(database, options)
    for q in (0, 17, 39):
        ids, scores = rerank_search(prepared, database[q], 39, options, excludes=[frozenset({q})])
        assert q not in ids[0]
        others = np.delete(np.arange(40), q)
        alone = prepare_database(database[others], options)
        ids_alone, scores_alone = rerank_search(alone, database[q], 39, options)
        np.testing.assert_array_equal(ids[0], others[ids_alone[0]])
        np.testing.assert_allclose(scores[0], scores_alone[0], rtol=1e-5, atol=1e-6)


def test_short_rows_are_padded_and_options_are_checked():
    database = unit_rows(5, 3)
    options = RerankOptions(qe_n=2)
    ids, scores = rerank_search(prepare_database(database, options), database[:2], 5, options,
                                excludes=[frozenset({0}), frozenset({1, 2})])
    assert ids[0, -1] == -1 and ids[1, -2:].tolist() == [-1, -1] and np.isneginf(scores[1, -1])
    assert set(ids[1, :3].tolist()) == {0, 3, 4}
    with pytest.raises(ValueError):
        rerank_search(prepare_database(database, options), database[:2], 5, options, excludes=[frozenset()])
    with pytest.raises(ValueError):
        RerankOptions(pca_dim=0)
    assert not RerankOptions().active and RerankOptions(qe_n=1).active


# --- k-reciprocal re-ranking ---------------------------------------------------------------------


def reference_kreciprocal(vectors: np.ndarray, k1: int, k2: int, lam: float) -> np.ndarray:
    """The paper's loop code (Zhong et al., re_ranking), for one query at row 0 of a local graph."""
    m = len(vectors)
    original = np.clip(2 - 2 * vectors @ vectors.T, 0, None)
    original = (original / original.max(axis=0)).T
    rank = np.argsort(original, axis=1, kind="stable")
    encoding = np.zeros((m, m))

    def reciprocal(i: int, k: int) -> np.ndarray:
        forward = rank[i, : k + 1]
        backward = rank[forward, : k + 1]
        return forward[np.where(backward == i)[0]]

    for i in range(m):
        found = reciprocal(i, k1)
        expanded = found
        for candidate in found:
            half = reciprocal(candidate, int(np.around(k1 / 2)))
            if len(np.intersect1d(half, found)) > 2 / 3 * len(half):
                expanded = np.append(expanded, half)
        expanded = np.unique(expanded)
        weights = np.exp(-original[i, expanded])
        encoding[i, expanded] = weights / weights.sum()
    if k2 > 1:
        encoding = np.array([encoding[rank[i, :k2]].mean(axis=0) for i in range(m)])
    jaccard = np.array([1 - np.minimum(encoding[0], encoding[j]).sum() / np.maximum(encoding[0], encoding[j]).sum()
                        for j in range(m)])
    return (1 - lam) * jaccard + lam * original[0]


@pytest.mark.parametrize("k1,k2,lam", [(5, 3, 0.3), (8, 1, 0.0), (3, 2, 0.6)])
def test_kreciprocal_matches_the_reference_loop_code(k1, k2, lam):
    vectors = unit_rows(25, 4, seed=k1)
    np.testing.assert_allclose(
        kreciprocal_distance(vectors, k1, k2, lam), reference_kreciprocal(vectors, k1, k2, lam), atol=1e-5
    )


def test_kreciprocal_prefers_the_query_cluster_over_a_nearer_outsider():
    # Query at 0 deg in cluster A (-3, -5, -7, -9); cluster B (4.5 .. 8.5) starts nearer than most
    # of A, but the query is not among B's own 4 nearest: B items are not reciprocal neighbours.
    a_side, b_side = [-3, -5, -7, -9], [4.5, 5.5, 6.5, 7.5, 8.5]
    database = on_circle(*a_side, *b_side)
    query = on_circle(0)[0]
    plain, _ = rerank_search(prepare_database(database, RerankOptions()), query, 4, RerankOptions())
    assert plain[0].tolist() == [0, 4, 1, 5]  # -3, 4.5, -5, 5.5
    options = RerankOptions(kreciprocal=True, k1=4, k2=1, lam=0.0)  # Jaccard distance alone
    ids, scores = rerank_search(prepare_database(database, options), query, 9, options)
    assert ids[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8]  # all of A, then B (tied: lower id first)
    np.testing.assert_allclose(scores[0, 4:], 0.0, atol=1e-6)  # no shared neighbour: distance 1
    assert np.all(np.diff(scores[0]) <= 0)
    same, _ = rerank_search(prepare_database(database, options), query, 9, RerankOptions(kreciprocal=True, lam=1.0))
    full, _ = rerank_search(prepare_database(database, options), query, 9, RerankOptions())
    np.testing.assert_array_equal(same, full)  # lam = 1: the original distance alone


# --- `fastret search` with re-ranking flags ------------------------------------------------------


class MeanColourEncoder:
    """Embeds an image as its normalised mean RGB: a stand-in model, no weights to load."""

    backend = "fake"
    precision = "fp32"
    parallel_requests = 1
    recipe = None

    def __init__(self, info):
        self.info = info

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        return l2_normalise(pixels.reshape(len(pixels), -1, 3).mean(axis=1) + 1.0)


@pytest.fixture()
def colour_index(tmp_path, monkeypatch):
    """An index of 12 flat-colour photos (reds and blues) made with MeanColourEncoder."""
    from PIL import Image

    import fastret.service.search as service
    from fastret.engine.decode import Preprocessing
    from fastret.engine.encoders import ModelInfo
    from fastret.engine.index import Index, Item

    info = ModelInfo("fake-mean-colour", "0" * 64, 3, Preprocessing(8, 8, "bilinear", (0.0,) * 3, (1.0,) * 3))
    encoder = MeanColourEncoder(info)
    monkeypatch.setattr(service, "encoder_for_index", lambda *args, **kwargs: encoder)
    root = tmp_path / "gallery"
    rng = np.random.default_rng(9)
    items, pixels = [], []
    for i in range(12):
        label = "red" if i % 2 else "blue"
        colour = [200, 30, 30] if label == "red" else [30, 30, 200]
        image = np.clip(np.array(colour) + rng.integers(-25, 26, 3), 0, 255).astype(np.uint8)
        path = root / label / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.tile(image, (8, 8, 1))).save(path)
        items.append(Item(f"{label}/{i}.png", label))
        pixels.append(np.tile(image, (8, 8, 1)))
    Index(info, str(root.resolve()), items, encoder.encode(np.stack(pixels))).save(tmp_path / "index")
    return root, tmp_path / "index"


def test_search_flags_rerank_and_write_nothing_into_the_index(colour_index, capsys):
    import json

    from fastret.cli.main import main
    from fastret.engine.index import Index

    root, index_dir = colour_index
    before = sorted((p.relative_to(index_dir), p.stat().st_mtime_ns) for p in index_dir.rglob("*"))
    argv = ["search", str(root / "red" / "1.png"), "--index", str(index_dir), "--json", "-k", "5"]
    assert main([*argv, "--dba", "2", "--qe", "2", "--flip-tta"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rerank"]["dba_n"] == 2 and report["rerank"]["qe_n"] == 2 and report["flip_tta"]
    assert [hit["label"] for hit in report["results"]] == ["red"] * 5
    assert "red/1.png" not in [hit["path"] for hit in report["results"]]
    index = Index.load(index_dir)
    options = RerankOptions(dba_n=2, qe_n=2)
    ids, _ = rerank_search(prepare_database(index.embeddings, options), index.embeddings[1], 5, options,
                           excludes=[frozenset({1})])
    assert [hit["id"] for hit in report["results"]] == ids[0].tolist()
    assert main([*argv, "--dba", "2", "--qe", "2"]) == 0  # the state is prepared in memory again, identically
    assert [hit["id"] for hit in json.loads(capsys.readouterr().out)["results"]] == ids[0].tolist()
    assert main([*argv]) == 0  # the default: the index's own re-ranking state, loaded, through its graph
    report = json.loads(capsys.readouterr().out)
    assert report["search"] == "hnsw" and report["rerank"]["source"] == "index"
    assert [hit["label"] for hit in report["results"]] == ["red"] * 5
    assert sorted((p.relative_to(index_dir), p.stat().st_mtime_ns) for p in index_dir.rglob("*")) == before
    assert main([*argv, "--no-rerank"]) == 0
    assert json.loads(capsys.readouterr().out)["rerank"] is None
    assert main([*argv, "--qe", "1", "--score", "softmax"]) == 2
    assert "does not combine" in capsys.readouterr().err
    assert main([*argv, "--score", "softmax"]) == 2  # re-ranking is on by default
    assert "add --no-rerank" in capsys.readouterr().err
    assert main([*argv, "--score", "softmax", "--no-rerank"]) == 0


# --- evaluation through the re-ranking pipeline --------------------------------------------------


@pytest.mark.parametrize("leave_one_out", [True, False])
def test_evaluation_scores_the_reranked_lists(leave_one_out):
    from fastret.engine.evaluation import evaluate_embeddings
    from fastret.engine.metrics import summarize
    from fastret.engine.rerank import rerank_ranker

    database = unit_rows(30, 5, seed=11)
    labels = np.array(["a", "b", "c"] * 10)
    queries = None if leave_one_out else unit_rows(6, 5, seed=12)
    query_labels = None if leave_one_out else np.array(["a", "b", "c"] * 2)
    plain = evaluate_embeddings(database, labels, queries, query_labels, (1, 5))
    same = rerank_ranker(prepare_database(database, RerankOptions()), RerankOptions(), leave_one_out=leave_one_out)
    assert evaluate_embeddings(database, labels, queries, query_labels, (1, 5), search=same, full_search=same)[
        "overall"
    ] == plain["overall"]

    options = RerankOptions(dba_n=2, qe_n=2)
    ranker = rerank_ranker(prepare_database(database, options), options, leave_one_out=leave_one_out)
    result = evaluate_embeddings(database, labels, queries, query_labels, (1, 5), search=ranker, full_search=ranker)
    rows = database if leave_one_out else queries
    excludes = [frozenset({i}) for i in range(30)] if leave_one_out else None
    depth = 29 if leave_one_out else 30
    ranked, _ = rerank_search(prepare_database(database, options), rows, depth, options, excludes=excludes)
    expected = summarize(ranked[:, :depth], labels, labels if leave_one_out else query_labels, (1, 5),
                         leave_one_out=leave_one_out, full_ranking=ranked[:, :depth])
    assert result["overall"] == expected["overall"]
    assert result["overall"] != plain["overall"]


def test_tiny_databases_skip_pca_and_shrink_neighbourhoods():
    options = RerankOptions(pca_dim=8, dba_n=5, qe_n=5, kreciprocal=True)
    for count in (1, 2, 8):
        database = unit_rows(count, 16, seed=count)
        prepared = prepare_database(database, options)
        assert prepared.whitening is None  # no more items than pca_dim
        ids, scores = rerank_search(prepared, database[0], 10, options, excludes=[frozenset({0})])
        assert sorted(ids[0][ids[0] >= 0].tolist()) == list(range(1, count))
        if count > 1:  # item 0 absent: no rebuilt neighbourhood may lean on it, even when too few are left
            ids_alone, scores_alone = rerank_search(prepare_database(database[1:], options), database[0], 10, options)
            np.testing.assert_array_equal(ids[0][: count - 1], ids_alone[0][: count - 1] + 1)
            np.testing.assert_allclose(scores[0][: count - 1], scores_alone[0][: count - 1], rtol=1e-5)
    assert prepare_database(unit_rows(9, 16), options).whitening is not None


def test_cli_flags_build_the_options():
    import argparse
    from dataclasses import replace

    from fastret.cli.options import add_search_options, rerank_options
    from fastret.engine.rerank import RECOMMENDED_RERANK

    parser = argparse.ArgumentParser()
    add_search_options(parser)

    def options(*argv: str) -> RerankOptions:
        return rerank_options(parser.parse_args(list(argv)))

    assert options() == options("--rerank") == RECOMMENDED_RERANK  # on by default
    assert options("--no-rerank") == RerankOptions() and not options("--no-rerank").active
    assert options("--qe", "0") == replace(RECOMMENDED_RERANK, qe_n=0)
    assert options("--rerank", "--pca-power", "0.5").pca_power == 0.5
    assert options("--no-rerank", "--dba", "3", "--alpha", "2") == RerankOptions(dba_n=3, dba_alpha=2.0, qe_alpha=2.0)
    assert options("--no-rerank", "--pca", "64", "--kreciprocal") == RerankOptions(pca_dim=64, kreciprocal=True)
    with pytest.raises(SystemExit):
        options("--rerank", "--no-rerank")
