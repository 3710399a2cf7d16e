"""Ranking metrics against scikit-learn and brute force."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from ccnf.metrics import auroc, average_precision, f1_max, precision_recall_f1_at, roc_curve


def _cases() -> list[tuple[str, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    cases = []
    for n, pos_rate, decimals in [(200, 0.5, None), (500, 0.05, 1), (1000, 0.3, 0), (37, 0.9, 2)]:
        y = rng.random(n) < pos_rate
        y[:2] = [True, False]
        s = rng.normal(size=n) + 1.2 * y
        if decimals is not None:
            s = np.round(s, decimals)  # many ties, also across classes
        cases.append((f"n{n}_p{pos_rate}_r{decimals}", y, s))
    # 2-D inputs with int labels are flattened.
    y2 = (rng.random((6, 7)) < 0.4).astype(int)
    y2[0, :2] = [0, 1]
    cases.append(("2d", y2, np.round(rng.random((6, 7)), 1).astype(np.float32)))
    return cases


CASES = _cases()
IDS = [c[0] for c in CASES]


@pytest.mark.parametrize(("name", "y", "s"), CASES, ids=IDS)
def test_auroc_matches_sklearn(name: str, y: np.ndarray, s: np.ndarray) -> None:
    assert auroc(y, s) == pytest.approx(skm.roc_auc_score(y.ravel(), s.ravel()), abs=1e-12)


@pytest.mark.parametrize(("name", "y", "s"), CASES, ids=IDS)
def test_average_precision_matches_sklearn(name: str, y: np.ndarray, s: np.ndarray) -> None:
    expected = skm.average_precision_score(y.ravel(), s.ravel())
    assert average_precision(y, s) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(("name", "y", "s"), CASES, ids=IDS)
def test_roc_curve_matches_sklearn(name: str, y: np.ndarray, s: np.ndarray) -> None:
    fpr, tpr, thr = roc_curve(y, s)
    efpr, etpr, ethr = skm.roc_curve(y.ravel(), s.ravel(), drop_intermediate=False)
    np.testing.assert_allclose(fpr, efpr, atol=1e-15)
    np.testing.assert_allclose(tpr, etpr, atol=1e-15)
    assert thr[0] == np.inf
    np.testing.assert_allclose(thr[1:], ethr[1:], rtol=1e-7)
    assert np.trapezoid(tpr, fpr) == pytest.approx(auroc(y, s), abs=1e-12)


def test_auroc_known_values() -> None:
    assert auroc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert auroc([0, 0, 1, 1], [0.4, 0.3, 0.2, 0.1]) == 0.0
    assert auroc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5
    # pairs: (pos .5 vs neg .5) tie -> 0.5, (pos .5 vs neg .1) -> 1
    assert auroc([1, 0, 0], [0.5, 0.5, 0.1]) == 0.75


def _brute_f1_max(y: np.ndarray, s: np.ndarray) -> float:
    y, s = y.ravel().astype(bool), s.ravel()
    best = 0.0
    for t in np.unique(s):
        pred = s >= t
        tp = np.sum(pred & y)
        fp = np.sum(pred & ~y)
        fn = np.sum(~pred & y)
        best = max(best, 2 * tp / (2 * tp + fp + fn))
    return best


@pytest.mark.parametrize(("name", "y", "s"), CASES, ids=IDS)
def test_f1_max_matches_brute_force(name: str, y: np.ndarray, s: np.ndarray) -> None:
    f1, thr = f1_max(y, s)
    assert f1 == pytest.approx(_brute_f1_max(y, s), abs=1e-12)
    # The returned threshold achieves it, under the documented rule score >= threshold.
    assert precision_recall_f1_at(y, s, thr)[2] == pytest.approx(f1, abs=1e-12)
    assert skm.f1_score(y.ravel(), s.ravel() >= thr) == pytest.approx(f1, abs=1e-12)


def test_precision_recall_f1_at() -> None:
    y = np.array([1, 1, 0, 0, 1])
    s = np.array([0.9, 0.4, 0.8, 0.1, 0.5])
    p, r, f = precision_recall_f1_at(y, s, 0.5)  # predicted: 0.9, 0.8, 0.5 -> tp 2, fp 1, fn 1
    assert (p, r, f) == pytest.approx((2 / 3, 2 / 3, 2 / 3))
    # Nothing predicted and nothing positive: every 0/0 is 0.
    assert precision_recall_f1_at([0, 0], [0.1, 0.2], 1.0) == (0.0, 0.0, 0.0)
    assert precision_recall_f1_at([1, 0], [0.1, 0.2], 1.0) == (0.0, 0.0, 0.0)


@pytest.mark.parametrize("fn", [auroc, roc_curve])
@pytest.mark.parametrize("labels", [[0, 0, 0], [1, 1, 1], [True, True]])
def test_single_class_raises(fn, labels) -> None:
    with pytest.raises(ValueError, match="only one class"):
        fn(labels, np.arange(len(labels), dtype=float))


def test_no_positives_raises_for_ap_and_f1() -> None:
    with pytest.raises(ValueError, match="no label is anomalous"):
        average_precision([0, 0], [0.1, 0.2])
    with pytest.raises(ValueError, match="no label is anomalous"):
        f1_max([0, 0], [0.1, 0.2])
    assert average_precision([1, 1], [0.1, 0.2]) == 1.0


def test_invalid_inputs_raise() -> None:
    with pytest.raises(ValueError, match="same number"):
        auroc([0, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="binary"):
        auroc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        auroc([0, 1], [0.1, np.nan])


def test_large_pixel_level_input() -> None:
    """2M float32 scores with heavy ties run quickly and still match sklearn."""
    rng = np.random.default_rng(1)
    n = 2_000_000
    y = rng.random(n) < 0.02
    s = (rng.random(n) + 0.3 * y).astype(np.float32)
    s = np.round(s, 3)
    assert auroc(y, s) == pytest.approx(skm.roc_auc_score(y, s), abs=1e-10)
    assert average_precision(y, s) == pytest.approx(skm.average_precision_score(y, s), abs=1e-10)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_auroc_is_the_exact_pairwise_count(dtype: type) -> None:
    """2U = sum over (pos, neg) pairs of 2 [s_pos > s_neg] + [s_pos == s_neg], exactly."""
    rng = np.random.default_rng(3)
    s = np.round(rng.standard_normal(400), 1).astype(dtype)  # rounding makes many ties
    y = rng.random(400) < 0.2
    pos, neg = s[y][:, None], s[~y][None, :]
    twice_u = int(2 * np.count_nonzero(pos > neg) + np.count_nonzero(pos == neg))
    assert auroc(y, s) == twice_u / (2.0 * y.sum() * (~y).sum())
