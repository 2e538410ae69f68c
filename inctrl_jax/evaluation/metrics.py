"""Image- and pixel-level anomaly-detection metrics, computed exactly on the host.

Image AUROC and AUPRC are scikit-learn's ``roc_auc_score`` and ``average_precision_score``, which
is what the InCTRL reference evaluation reports (AUPRC is average precision, not a trapezoidal
PR area). F1-max is the best F1 over all thresholds of ``precision_recall_curve``. Pixel AUROC
pools every pixel of every image. AUPRO follows the MVTec AD definition: the per-region overlap
(PRO) is averaged over the connected components of the ground truth of all images, traced as a
function of the false-positive rate on normal pixels, integrated up to FPR 0.3 and divided by
0.3 so that a perfect detector scores 1.

Every metric is undefined when the inputs hold only one class; it then returns NaN and emits an
``UndefinedMetricWarning`` naming the metric, never a silent 0 and never an exception.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import scipy.ndimage
from sklearn import metrics as skm

__all__ = [
    "UndefinedMetricWarning",
    "aupro",
    "f1_max",
    "image_auprc",
    "image_auroc",
    "image_metrics",
    "pixel_auroc",
    "pixel_metrics",
    "pro_curve",
]

DEFAULT_FPR_LIMIT = 0.3


class UndefinedMetricWarning(UserWarning):
    """A metric was asked for on inputs where it is not defined (one class only); it is NaN."""


def _labels_and_scores(labels, scores, what: str) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"{what}: {y.size} labels but {s.size} scores; pass one score per label")
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError(f"{what}: labels must be 0 (normal) or 1 (anomalous), got {np.unique(y)[:5]}")
    if not np.isfinite(s).all():
        raise ValueError(f"{what}: scores contain NaN or inf; check the model outputs")
    return y.astype(np.int64), s


def _single_class(y: np.ndarray, name: str) -> bool:
    """True (after warning) when ``y`` does not contain both classes."""
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        which = "no samples" if y.size == 0 else ("only normal" if n_pos == 0 else "only anomalous")
        warnings.warn(
            f"{name} is undefined with {which} samples ({y.size} in total); reporting NaN",
            UndefinedMetricWarning,
            stacklevel=3,
        )
        return True
    return False


def image_auroc(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """Area under the ROC curve, ``sklearn.metrics.roc_auc_score``; NaN for a single class."""
    y, s = _labels_and_scores(labels, scores, "image AUROC")
    if _single_class(y, "image AUROC"):
        return math.nan
    return float(skm.roc_auc_score(y, s))


def image_auprc(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """Average precision, ``sklearn.metrics.average_precision_score``; NaN for a single class."""
    y, s = _labels_and_scores(labels, scores, "image AUPRC")
    if _single_class(y, "image AUPRC"):
        return math.nan
    return float(skm.average_precision_score(y, s))


def f1_max(
    labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray, return_threshold: bool = False
):
    """Best F1 over the thresholds of ``sklearn.metrics.precision_recall_curve``.

    Points where precision and recall are both 0 count as F1 = 0. With ``return_threshold`` the
    score threshold reaching the maximum (predict anomalous when ``score >= threshold``) is
    returned as well. NaN (and threshold NaN) for a single class.
    """
    y, s = _labels_and_scores(labels, scores, "F1-max")
    if _single_class(y, "F1-max"):
        return (math.nan, math.nan) if return_threshold else math.nan
    precision, recall, thresholds = skm.precision_recall_curve(y, s)
    # The last point (precision 1, recall 0) has no threshold; it has F1 = 0 anyway.
    precision, recall = precision[:-1], recall[:-1]
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    best = int(np.argmax(f1))
    if return_threshold:
        return float(f1[best]), float(thresholds[best])
    return float(f1[best])


def image_metrics(labels, scores) -> dict[str, float]:
    """``{"image_auroc", "image_auprc", "image_f1_max"}`` for one set of images."""
    return {
        "image_auroc": image_auroc(labels, scores),
        "image_auprc": image_auprc(labels, scores),
        "image_f1_max": f1_max(labels, scores),
    }


def _masks_and_maps(masks, anomaly_maps, what: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Lists of binary masks and float maps with matching shapes (images may differ in size)."""
    if isinstance(masks, np.ndarray) and masks.ndim == 2:
        masks = [masks]
    if isinstance(anomaly_maps, np.ndarray) and anomaly_maps.ndim == 2:
        anomaly_maps = [anomaly_maps]
    masks = [np.asarray(m) for m in masks]
    maps = [np.asarray(a, dtype=np.float64) for a in anomaly_maps]
    if len(masks) != len(maps):
        raise ValueError(f"{what}: {len(masks)} masks but {len(maps)} anomaly maps")
    for i, (m, a) in enumerate(zip(masks, maps, strict=True)):
        if m.shape != a.shape or m.ndim != 2:
            raise ValueError(
                f"{what}: image {i} has mask shape {m.shape} but anomaly map shape {a.shape}; "
                "resize the anomaly map to the mask resolution (2-D, same H and W)"
            )
        if not np.isfinite(a).all():
            raise ValueError(f"{what}: anomaly map {i} contains NaN or inf")
    return [m > 0 for m in masks], maps


def pixel_auroc(masks, anomaly_maps) -> float:
    """ROC AUC over all pixels of all images (``roc_auc_score``); NaN for a single class.

    Args:
        masks: ground-truth masks, ``[N, H, W]`` or a list of ``[H_i, W_i]``; nonzero = anomalous.
        anomaly_maps: per-pixel scores of the same shapes.
    """
    mask_list, map_list = _masks_and_maps(masks, anomaly_maps, "pixel AUROC")
    y = np.concatenate([m.reshape(-1) for m in mask_list]).astype(np.int64) if mask_list else np.zeros(0)
    s = np.concatenate([a.reshape(-1) for a in map_list]) if map_list else np.zeros(0)
    if _single_class(y, "pixel AUROC"):
        return math.nan
    return float(skm.roc_auc_score(y, s))


# MVTec AD's evaluation labels regions with 8-connectivity (a full 3x3 structuring element).
_REGION_STRUCTURE = np.ones((3, 3), dtype=np.int64)


def pro_curve(masks, anomaly_maps) -> tuple[np.ndarray, np.ndarray]:
    """The exact PRO curve: false-positive rate on normal pixels vs mean per-region overlap.

    Every distinct score value is a threshold (``anomalous if score >= t``), so tied scores move
    together. Regions are the 8-connected components of each image's mask; the overlap of a
    region is the fraction of its pixels at or above the threshold, and the PRO is the unweighted
    mean over all regions of all images.

    Returns:
        ``(fpr, pro)``, both increasing, starting at ``(0, 0)`` and ending at ``(1, 1)``.

    Raises:
        ValueError: when there are no normal pixels or no anomalous region (the caller decides
            whether that is NaN; ``aupro`` does).
    """
    mask_list, map_list = _masks_and_maps(masks, anomaly_maps, "PRO curve")
    fp_step, pro_step, scores = [], [], []
    n_normal, n_regions = 0, 0
    for mask, amap in zip(mask_list, map_list, strict=True):
        regions, count = scipy.ndimage.label(mask, structure=_REGION_STRUCTURE)
        n_normal += int((~mask).sum())
        n_regions += int(count)
        sizes = np.bincount(regions.reshape(-1), minlength=count + 1).astype(np.float64)
        # Each anomalous pixel adds 1 / (its region's size) to the summed overlap; each normal
        # pixel adds one false positive.
        per_pixel = np.where(mask, 1.0 / np.maximum(sizes[regions], 1.0), 0.0)
        fp_step.append((~mask).reshape(-1).astype(np.float64))
        pro_step.append(per_pixel.reshape(-1))
        scores.append(amap.reshape(-1))
    if n_normal == 0 or n_regions == 0:
        raise ValueError(
            f"PRO curve needs normal pixels and anomalous regions; got {n_normal} normal pixels "
            f"and {n_regions} regions"
        )
    s = np.concatenate(scores)
    order = np.argsort(-s, kind="stable")
    s = s[order]
    fpr = np.cumsum(np.concatenate(fp_step)[order]) / n_normal
    pro = np.cumsum(np.concatenate(pro_step)[order]) / n_regions
    # One point per distinct score: the last pixel of each run of equal scores.
    last_of_run = np.r_[s[1:] != s[:-1], True]
    fpr = np.r_[0.0, np.minimum(fpr[last_of_run], 1.0)]
    pro = np.r_[0.0, np.minimum(pro[last_of_run], 1.0)]
    return fpr, pro


def aupro(masks, anomaly_maps, fpr_limit: float = DEFAULT_FPR_LIMIT) -> float:
    """Area under the PRO curve up to ``fpr_limit``, divided by ``fpr_limit`` (MVTec AD AUPRO).

    The curve of ``pro_curve`` is integrated with the trapezoidal rule; the point at exactly
    ``fpr_limit`` is linearly interpolated. A perfect map scores 1, a constant map scores
    ``fpr_limit / 2``. NaN with a warning when there is no anomalous region or no normal pixel.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    try:
        fpr, pro = pro_curve(masks, anomaly_maps)
    except ValueError as err:
        if "needs normal pixels" not in str(err):
            raise
        warnings.warn(f"AUPRO is undefined: {err}; reporting NaN", UndefinedMetricWarning, stacklevel=2)
        return math.nan
    # Several points can share one FPR (anomalous pixels only raise the PRO); interpolation at the
    # limit takes the highest PRO reached at or before it along the curve.
    inside = fpr <= fpr_limit
    x, y = fpr[inside], pro[inside]
    if x[-1] < fpr_limit:
        nxt = int(np.argmax(~inside))  # first point beyond the limit
        x0, y0, x1, y1 = fpr[nxt - 1], pro[nxt - 1], fpr[nxt], pro[nxt]
        y_lim = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
        x, y = np.r_[x, fpr_limit], np.r_[y, y_lim]
    area = float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0))
    return area / fpr_limit


def pixel_metrics(masks, anomaly_maps, fpr_limit: float = DEFAULT_FPR_LIMIT) -> dict[str, float]:
    """``{"pixel_auroc", "pixel_aupro"}`` over a set of images with ground-truth masks."""
    return {
        "pixel_auroc": pixel_auroc(masks, anomaly_maps),
        "pixel_aupro": aupro(masks, anomaly_maps, fpr_limit),
    }
