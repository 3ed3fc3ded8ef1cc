"""Metrics against answers computed by hand on tiny fixtures."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fastret.engine.metrics import (
    average_precision,
    drop_self,
    exact_ranking,
    leave_one_out_ranking,
    macro_mean,
    nan_mean,
    per_class,
    precision_at_k,
    recall_at_k,
    relevance,
    relevant_counts,
    summarize,
)

# Database: ids 0-2 are "a", 3-4 "b", 5 "c".
DB_LABELS = np.array(["a", "a", "a", "b", "b", "c"])
QUERY_LABELS = np.array(["a", "b", "d"])
RANKED = np.array(
    [
        [0, 3, 1, 5, 2],  # a: relevant at ranks 1, 3, 5
        [3, -1, -1, -1, -1],  # b: one hit then padding
        [0, 1, 2, 3, 4],  # d: no such class in the database
    ]
)


def test_relevance_marks_same_label_and_never_padding():
    expected = np.array([[1, 0, 1, 0, 1], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=bool)
    np.testing.assert_array_equal(relevance(RANKED, DB_LABELS, QUERY_LABELS), expected)


def test_relevant_counts_split_and_leave_one_out():
    np.testing.assert_array_equal(relevant_counts(DB_LABELS, QUERY_LABELS), [3, 2, 0])
    np.testing.assert_array_equal(relevant_counts(DB_LABELS, DB_LABELS, leave_one_out=True), [2, 2, 2, 1, 1, 0])


def test_precision_recall_ap_by_hand():
    rel = relevance(RANKED, DB_LABELS, QUERY_LABELS)
    n = relevant_counts(DB_LABELS, QUERY_LABELS)
    np.testing.assert_allclose(precision_at_k(rel, 1), [1, 1, 0])
    np.testing.assert_allclose(precision_at_k(rel, 3), [2 / 3, 1 / 3, 0])
    np.testing.assert_allclose(precision_at_k(rel, 5), [3 / 5, 1 / 5, 0])
    np.testing.assert_allclose(recall_at_k(rel, n, 1), [1 / 3, 1 / 2, np.nan])
    np.testing.assert_allclose(recall_at_k(rel, n, 5), [1, 1 / 2, np.nan])
    # a: (1/1 + 2/3 + 3/5) / 3; b: (1/1) / 2, its second relevant item never found
    np.testing.assert_allclose(average_precision(rel, n), [(1 + 2 / 3 + 3 / 5) / 3, 0.5, np.nan])


def test_k_out_of_range_is_refused():
    rel = relevance(RANKED, DB_LABELS, QUERY_LABELS)
    with pytest.raises(ValueError, match="hold only 5 results"):
        precision_at_k(rel, 6)
    with pytest.raises(ValueError, match="at least 1"):
        precision_at_k(rel, 0)


def test_nan_safe_means_and_per_class():
    assert nan_mean(np.array([np.nan, 1.0, 0.0])) == 0.5
    assert math.isnan(nan_mean(np.array([np.nan])))
    by_class = per_class(np.array([1.0, 0.0, 1.0, np.nan]), np.array(["x", "x", "y", "z"]))
    assert by_class["x"] == 0.5 and by_class["y"] == 1.0 and math.isnan(by_class["z"])
    assert macro_mean(by_class) == 0.75


def test_summarize_overall_macro_and_per_class():
    summary = summarize(RANKED, DB_LABELS, QUERY_LABELS, ks=[1, 3])
    assert summary["queries"] == 3 and summary["queries_without_relevant"] == 1
    assert summary["map_over"] == "top 5"
    assert summary["overall"]["P@1"] == pytest.approx(2 / 3, abs=1e-6)
    assert summary["overall"]["R@1"] == pytest.approx((1 / 3 + 1 / 2) / 2, abs=1e-6)  # d left out
    assert summary["per_class"]["d"]["R@3"] is None and summary["per_class"]["d"]["P@3"] == 0.0
    assert summary["per_class"]["a"]["mAP"] == pytest.approx((1 + 2 / 3 + 3 / 5) / 3, abs=1e-6)
    assert summary["macro"]["P@3"] == pytest.approx((2 / 3 + 1 / 3 + 0) / 3, abs=1e-6)


def test_summarize_weights_queries_overall_and_classes_in_macro():
    db = np.array(["a", "a", "b"])
    ranked = np.array([[0], [0], [0], [2]])  # three "a" queries hit, one "b" query hits
    summary = summarize(ranked, db, np.array(["a", "a", "a", "b"]), ks=[1])
    assert summary["overall"]["P@1"] == 1.0
    ranked = np.array([[0], [0], [0], [0]])  # the "b" query misses
    summary = summarize(ranked, db, np.array(["a", "a", "a", "b"]), ks=[1])
    assert summary["overall"]["P@1"] == 0.75 and summary["macro"]["P@1"] == 0.5


def test_full_ranking_gives_map_over_everything():
    db = np.array(["a", "b", "a"])
    top1 = np.array([[1]])
    full = np.array([[1, 0, 2]])
    assert summarize(top1, db, np.array(["a"]), ks=[1])["overall"]["mAP"] == 0.0
    summary = summarize(top1, db, np.array(["a"]), ks=[1], full_ranking=full)
    assert summary["map_over"] == "full ranking"
    assert summary["overall"]["mAP"] == pytest.approx((1 / 2 + 2 / 3) / 2, abs=1e-6)


def _unit(rows):
    rows = np.array(rows, dtype=np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_leave_one_out_excludes_self_and_breaks_ties_by_lower_id():
    # 0 and 1 are duplicates: each is the other's best match; self never appears.
    embeddings = _unit([[1, 0], [1, 0], [0, 1], [0.6, 0.8]])
    ranked = leave_one_out_ranking(embeddings, 2)
    np.testing.assert_array_equal(ranked, [[1, 3], [0, 3], [3, 0], [2, 0]])


def test_leave_one_out_when_duplicates_push_self_out_of_the_list():
    embeddings = _unit([[1, 0], [1, 0], [1, 0], [0, 1]])
    np.testing.assert_array_equal(leave_one_out_ranking(embeddings, 1), [[1], [0], [0], [0]])


def test_leave_one_out_single_member_class_is_left_out_of_recall_and_map():
    embeddings = _unit([[1, 0], [0.9, 0.1], [0, 1]])
    labels = np.array(["a", "a", "solo"])
    ranked = leave_one_out_ranking(embeddings, 2)
    summary = summarize(ranked, labels, labels, ks=[1, 2], leave_one_out=True)
    assert summary["queries_without_relevant"] == 1
    assert summary["overall"]["R@1"] == 1.0 and summary["overall"]["mAP"] == 1.0
    assert summary["per_class"]["solo"] == {"P@1": 0.0, "R@1": None, "P@2": 0.0, "R@2": None, "mAP": None}
    assert summary["overall"]["P@2"] == pytest.approx((1 / 2 + 1 / 2 + 0) / 3, abs=1e-6)


def test_exact_ranking_matches_one_shot_ranking_across_chunks(monkeypatch):
    import fastret.engine.metrics as metrics

    rng = np.random.default_rng(0)
    db, queries = _unit(rng.normal(size=(50, 8))), _unit(rng.normal(size=(7, 8)))
    whole = exact_ranking(db, queries, 50)
    monkeypatch.setattr(metrics, "QUERY_CHUNK", 3)
    np.testing.assert_array_equal(exact_ranking(db, queries, 50), whole)
    expected = np.argsort(-(queries @ db.T), axis=1, kind="stable")
    np.testing.assert_array_equal(whole, expected)
    loo_whole = leave_one_out_ranking(db, 5)
    monkeypatch.setattr(metrics, "QUERY_CHUNK", 1000)
    np.testing.assert_array_equal(leave_one_out_ranking(db, 5), loo_whole)


def test_drop_self_removes_own_id_or_the_last_entry():
    ranked = np.array([[4, 0, 2], [1, 3, 4], [9, 8, 7]])
    np.testing.assert_array_equal(drop_self(ranked, np.array([0, 1, 5])), [[4, 2], [3, 4], [9, 8]])
