"""gmic.metrics against scikit-learn and hand computations."""

from __future__ import annotations

import numpy as np
import pytest

from gmic.metrics import (
    MetricError,
    bootstrap_auc,
    dice,
    max_projection,
    pixel_average_precision,
    roc_auc,
    roc_curve,
)

sklearn_metrics = pytest.importorskip("sklearn.metrics")


def test_auc_by_hand_with_ties() -> None:
    # pairs (pos, neg): (0.8 > 0.3), (0.8 > 0.5), (0.5 = 0.5 -> 1/2), (0.5 > 0.3) -> 3.5 / 4
    assert roc_auc([1, 0, 1, 0], [0.8, 0.3, 0.5, 0.5]) == pytest.approx(0.875)


def test_auc_and_curve_match_sklearn() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    s = np.round(rng.random(200) + 0.3 * y, 2)  # rounded: many ties
    assert roc_auc(y, s) == pytest.approx(sklearn_metrics.roc_auc_score(y, s))
    fpr, tpr, thresholds = roc_curve(y, s)
    ref_fpr, ref_tpr, _ = sklearn_metrics.roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, ref_fpr)
    np.testing.assert_allclose(tpr, ref_tpr)
    assert np.all(np.diff(thresholds) < 0)


def test_auc_needs_both_classes() -> None:
    with pytest.raises(MetricError, match="positive and negative"):
        roc_auc([0, 0, 0], [0.1, 0.2, 0.3])


def test_bootstrap_ci_matches_a_direct_resampling() -> None:
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 60)
    s = rng.random(60) + 0.5 * y
    result = bootstrap_auc(y, s, resamples=1000, seed=7)
    # the same resamples drawn by hand, scored with scikit-learn
    gen = np.random.default_rng(7)
    values = []
    while len(values) < 1000:
        idx = gen.integers(0, 60, 60)
        if 0 < y[idx].sum() < 60:
            values.append(sklearn_metrics.roc_auc_score(y[idx], s[idx]))
    low, high = np.quantile(values, [0.025, 0.975])
    assert result.auc == pytest.approx(sklearn_metrics.roc_auc_score(y, s))
    assert (result.low, result.high) == pytest.approx((low, high))
    assert result.low < result.auc < result.high
    assert result.resamples == 1000


def test_dice_by_hand() -> None:
    saliency = np.array([[0.9, 0.6, 0.1], [0.2, 0.7, 0.0]])
    mask = np.array([[1, 0, 0], [0, 1, 1]])
    # predicted {00, 01, 11}, truth {00, 11, 12}: overlap 2 -> 2*2 / (3 + 3)
    assert dice(saliency, mask) == pytest.approx(4 / 6)
    assert dice(saliency, mask, threshold=0.8) == pytest.approx(2 * 1 / (1 + 3))
    assert dice(np.zeros((2, 2)), np.zeros((2, 2))) == 1.0


def test_pxap_by_hand_and_sklearn() -> None:
    saliency = np.array([[0.9, 0.8], [0.4, 0.1]])
    mask = np.array([[1, 0], [1, 0]])
    # ranked: 0.9 (tp) P=1 R=.5; 0.8 (fp) P=.5 R=.5; 0.4 (tp) P=2/3 R=1 -> .5*1 + .5*2/3
    assert pixel_average_precision(saliency, mask) == pytest.approx(0.5 + 1 / 3)
    rng = np.random.default_rng(3)
    s = np.round(rng.random((20, 30)), 1)
    m = rng.random((20, 30)) < 0.2
    assert pixel_average_precision(s, m) == pytest.approx(
        sklearn_metrics.average_precision_score(m.ravel(), s.ravel()))
    with pytest.raises(MetricError):
        pixel_average_precision(s, np.zeros_like(m))


def test_max_projection_of_saliency_and_mask() -> None:
    volume = np.zeros((3, 2, 2))
    volume[1, 0, 0] = 0.7
    volume[2, 1, 1] = 0.4
    np.testing.assert_array_equal(max_projection(volume), [[0.7, 0], [0, 0.4]])
    flat = np.ones((2, 2))
    assert max_projection(flat) is flat
