"""Metrics: hand-built cases with known values, and properties against brute force and sklearn."""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sklearn import metrics as skm

from inctrl_jax.evaluation import metrics as M

# --- hand-built image-level cases -----------------------------------------------------------------

LABELS = [0, 0, 1, 1]
SCORES = [0.1, 0.4, 0.35, 0.8]


def test_image_metrics_on_the_classic_four_sample_case():
    # 3 of the 4 (normal, anomalous) pairs are ordered correctly -> AUROC 3/4.
    assert M.image_auroc(LABELS, SCORES) == pytest.approx(0.75, abs=1e-12)
    # AP = sum over recall steps of precision: 0.5 * 1 + 0.5 * 2/3.
    assert M.image_auprc(LABELS, SCORES) == pytest.approx(0.5 + 1 / 3, abs=1e-12)
    # Best threshold 0.35: TP 2, FP 1, FN 0 -> P 2/3, R 1 -> F1 0.8.
    f1, thr = M.f1_max(LABELS, SCORES, return_threshold=True)
    assert f1 == pytest.approx(0.8, abs=1e-12)
    assert thr == pytest.approx(0.35)


def test_perfect_and_inverted_scores():
    assert M.image_auroc([0, 0, 1], [0.1, 0.2, 0.9]) == 1.0
    assert M.image_auroc([0, 0, 1], [0.9, 0.8, 0.1]) == 0.0
    assert M.image_auprc([0, 0, 1], [0.1, 0.2, 0.9]) == 1.0
    assert M.f1_max([0, 0, 1], [0.1, 0.2, 0.9]) == 1.0


def test_constant_scores_give_chance_values():
    labels = [0, 0, 0, 1]
    scores = [0.5] * 4
    assert M.image_auroc(labels, scores) == pytest.approx(0.5, abs=1e-12)
    # One threshold predicting everything anomalous: precision = prevalence 1/4.
    assert M.image_auprc(labels, scores) == pytest.approx(0.25, abs=1e-12)
    # P 1/4, R 1 -> F1 = 2 * 0.25 / 1.25 = 0.4.
    assert M.f1_max(labels, scores) == pytest.approx(0.4, abs=1e-12)


def test_ties_between_classes_count_half():
    # One normal tied with one anomalous; the other pairs are correct: (3 + 0.5) / 4.
    assert M.image_auroc([0, 0, 1, 1], [0.1, 0.5, 0.5, 0.9]) == pytest.approx(0.875, abs=1e-12)


@pytest.mark.parametrize("labels", [[0, 0, 0], [1, 1], []])
def test_single_class_gives_nan_with_a_warning(labels):
    scores = [0.3] * len(labels)
    for fn in (M.image_auroc, M.image_auprc, M.f1_max):
        with pytest.warns(M.UndefinedMetricWarning, match="undefined"):
            assert math.isnan(fn(labels, scores))
    with pytest.warns(M.UndefinedMetricWarning):
        f1, thr = M.f1_max(labels, scores, return_threshold=True)
    assert math.isnan(f1) and math.isnan(thr)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="3 labels but 2 scores"):
        M.image_auroc([0, 1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="labels must be 0"):
        M.image_auroc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        M.image_auroc([0, 1], [0.1, float("nan")])


# --- hand-built pixel-level cases -----------------------------------------------------------------


def test_aupro_perfect_inverted_and_constant_maps():
    mask = np.array([[0, 0, 1, 1], [0, 0, 1, 1]])
    good = np.where(mask > 0, 0.9, 0.1)
    assert M.aupro(mask, good) == pytest.approx(1.0, abs=1e-12)
    assert M.aupro(mask, 1.0 - good) == pytest.approx(0.0, abs=1e-12)
    # A constant map is one threshold: the curve is the straight line (0,0)-(1,1);
    # area under it up to 0.3 is 0.045, divided by 0.3 -> 0.15.
    assert M.aupro(mask, np.full(mask.shape, 0.7)) == pytest.approx(0.15, abs=1e-12)
    assert M.pixel_auroc(mask, good) == 1.0


def test_aupro_averages_regions_not_pixels():
    # Two separate regions: a large one (3 pixels) found at once, a 1-pixel one scored below
    # every normal pixel. PRO = (1 + 0) / 2 = 0.5 over FPR [0, 0.3] -> AUPRO 0.5.
    # A pixel-weighted overlap would give 3/4 instead.
    mask = np.array([[1, 1, 1, 0, 0, 0, 0, 0, 1]])
    amap = np.array([[0.9, 0.9, 0.9, 0.5, 0.4, 0.3, 0.45, 0.35, 0.0]])
    assert M.aupro(mask, amap) == pytest.approx(0.5, abs=1e-12)


def test_aupro_regions_are_eight_connected():
    # Diagonal neighbours form one region (MVTec: full 3x3 structuring element).
    mask = np.array([[1, 0, 0, 0], [0, 1, 0, 1]])
    # Found: the diagonal pair fully; missed: the far pixel (scored below all normals).
    amap = np.array([[0.9, 0.5, 0.4, 0.3], [0.6, 0.9, 0.35, 0.0]])
    # 8-connected: regions {diag pair, far} -> PRO 0.5 until FPR 1. 4-connected would be 2/3.
    assert M.aupro(mask, amap) == pytest.approx(0.5, abs=1e-12)


def test_aupro_interpolates_at_the_fpr_limit():
    # 10 normal pixels with distinct scores, one region of 2 pixels: one pixel above all normals,
    # one pixel between the 4th and 5th normal -> PRO 0.5 for FPR < 0.4, 1 from FPR 0.4.
    normals = np.linspace(0.9, 0.0, 10)
    amap = np.r_[1.0, 0.55, normals][None, :]
    mask = np.r_[1, 1, np.zeros(10)][None, :]
    assert M.aupro(mask, amap, fpr_limit=0.3) == pytest.approx(0.5, abs=1e-12)
    # Up to 0.5: 0.4 * 0.5 + 0.1 * 1 (vertical jump at 0.4) -> 0.3 / 0.5 = 0.6.
    assert M.aupro(mask, amap, fpr_limit=0.5) == pytest.approx(0.6, abs=1e-12)
    # Limit between two curve points (0.3, 0.5) and (0.4, 0.5): still 0.5.
    assert M.aupro(mask, amap, fpr_limit=0.35) == pytest.approx(0.5, abs=1e-12)
    # A sloped segment: the constant map is the line (0,0)-(1,1), cut at 0.45 -> 0.45 / 2.
    assert M.aupro(mask, np.full(mask.shape, 0.3), fpr_limit=0.45) == pytest.approx(0.225, abs=1e-12)


def test_pixel_metrics_nan_without_anomalous_pixels():
    mask = np.zeros((4, 4))
    with pytest.warns(M.UndefinedMetricWarning):
        assert math.isnan(M.aupro(mask, np.random.default_rng(0).random((4, 4))))
    with pytest.warns(M.UndefinedMetricWarning):
        assert math.isnan(M.pixel_auroc(mask, np.zeros((4, 4))))


def test_pixel_metrics_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="resize the anomaly map"):
        M.aupro(np.zeros((4, 4)), np.zeros((2, 2)))


def test_images_of_different_sizes_are_pooled():
    masks = [np.array([[0, 1]]), np.array([[1, 0, 0], [0, 0, 0]])]
    maps = [np.array([[0.1, 0.9]]), np.array([[0.8, 0.2, 0.3], [0.1, 0.0, 0.05]])]
    assert M.aupro(masks, maps) == pytest.approx(1.0)
    assert M.pixel_auroc(masks, maps) == pytest.approx(1.0)


# --- property tests --------------------------------------------------------------------------------

label_score_lists = st.integers(2, 30).flatmap(
    lambda n: st.tuples(
        st.lists(st.integers(0, 1), min_size=n, max_size=n),
        # Few distinct values so that ties are common.
        st.lists(
            st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0]) | st.floats(0, 1), min_size=n, max_size=n
        ),
    )
)


def _both_classes(y):
    return 0 < sum(y) < len(y)


def _brute_auroc(y, s):
    pos = [b for a, b in zip(y, s, strict=True) if a == 1]
    neg = [b for a, b in zip(y, s, strict=True) if a == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def _brute_ap_and_f1(y, s):
    y, s = np.asarray(y), np.asarray(s)
    ap, prev_recall, best_f1 = 0.0, 0.0, 0.0
    for t in sorted(set(s.tolist()), reverse=True):
        pred = s >= t
        tp = float((pred & (y == 1)).sum())
        precision, recall = tp / pred.sum(), tp / (y == 1).sum()
        ap += (recall - prev_recall) * precision
        prev_recall = recall
        if precision + recall > 0:
            best_f1 = max(best_f1, 2 * precision * recall / (precision + recall))
    return ap, best_f1


@settings(max_examples=150, deadline=None)
@given(label_score_lists)
def test_image_metrics_match_brute_force_and_sklearn(data):
    y, s = data
    if not _both_classes(y):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", M.UndefinedMetricWarning)
            assert all(math.isnan(v) for v in M.image_metrics(y, s).values())
        return
    ap, f1 = _brute_ap_and_f1(y, s)
    assert M.image_auroc(y, s) == pytest.approx(_brute_auroc(y, s), abs=1e-12)
    assert M.image_auroc(y, s) == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)
    assert M.image_auprc(y, s) == pytest.approx(ap, abs=1e-12)
    assert M.image_auprc(y, s) == pytest.approx(skm.average_precision_score(y, s), abs=1e-12)
    assert M.f1_max(y, s) == pytest.approx(f1, abs=1e-12)


def _brute_aupro(masks, maps, limit):
    """Per-threshold loop over explicit regions, then trapezoid with interpolation at ``limit``."""
    import scipy.ndimage

    regions = []
    for i, m in enumerate(masks):
        lab, n = scipy.ndimage.label(m, structure=np.ones((3, 3)))
        regions += [(i, lab == r) for r in range(1, n + 1)]
    normal = np.concatenate([(m == 0).ravel() for m in masks])
    allscores = np.concatenate([a.ravel() for a in maps])
    pts = [(0.0, 0.0)]
    for t in sorted(set(allscores.tolist()), reverse=True):
        fpr = (allscores[normal] >= t).mean()
        pro = np.mean([(maps[i][r] >= t).mean() for i, r in regions])
        pts.append((fpr, pro))
    area = 0.0
    for (x0, y0), (x1, y1) in itertools.pairwise(pts):
        if x0 >= limit:
            break
        if x1 > limit:
            y1 = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            x1 = limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / limit


mask_and_map = st.integers(1, 3).flatmap(
    lambda n: st.tuples(
        st.lists(
            st.lists(st.lists(st.integers(0, 1), min_size=5, max_size=5), min_size=4, max_size=4),
            min_size=n,
            max_size=n,
        ),
        st.lists(
            st.lists(
                st.lists(st.sampled_from([0.0, 0.2, 0.5, 0.7, 1.0]), min_size=5, max_size=5),
                min_size=4,
                max_size=4,
            ),
            min_size=n,
            max_size=n,
        ),
        st.sampled_from([0.05, 0.3, 0.5, 1.0]),
    )
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mask_and_map)
def test_aupro_matches_a_per_threshold_loop(data):
    masks, maps, limit = (np.array(data[0]), np.array(data[1], dtype=np.float64), data[2])
    if masks.sum() == 0 or masks.sum() == masks.size:
        with pytest.warns(M.UndefinedMetricWarning):
            assert math.isnan(M.aupro(masks, maps, limit))
        return
    assert M.aupro(masks, maps, limit) == pytest.approx(
        _brute_aupro(list(masks), list(maps), limit), abs=1e-9
    )
    assert M.pixel_auroc(masks, maps) == pytest.approx(
        skm.roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12
    )


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=12, max_size=12), st.integers(1, 11))
def test_aupro_over_full_range_equals_pixel_auroc_for_one_region(values, n_anomalous):
    # One region holding every anomalous pixel: PRO equals the TPR, so the whole-range AUPRO is
    # the pixel ROC AUC.
    mask = np.zeros((1, 12), dtype=int)
    mask[0, :n_anomalous] = 1
    amap = np.array(values)[None, :]
    assert M.aupro(mask, amap, fpr_limit=1.0) == pytest.approx(M.pixel_auroc(mask, amap), abs=1e-9)
