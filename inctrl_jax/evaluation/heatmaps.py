"""Per-image heat-map panels: image, ground-truth mask (if any), anomaly-map overlay, score.

Drawn with matplotlib's non-interactive Agg backend, so it works on headless machines.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def to_display(image: np.ndarray) -> np.ndarray:
    """An image as float RGB in [0, 1]: uint8 is divided by 255, gray is repeated to 3 channels."""
    img = np.asarray(image)
    if img.dtype == np.uint8:
        img = img.astype(np.float32) / 255.0
    elif img.dtype == np.uint16:
        img = img.astype(np.float32) / 65535.0
    img = np.asarray(img, dtype=np.float32)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    if img.shape[-1] == 4:
        img = img[..., :3]
    if img.shape[-1] == 1:
        img = np.repeat(img, 3, axis=-1)
    return np.clip(img, 0.0, 1.0)


def save_panel(
    path: str | os.PathLike,
    image: np.ndarray,
    anomaly_map: np.ndarray,
    score: float,
    *,
    mask: np.ndarray | None = None,
    label: int | None = None,
    title: str = "",
    note: str = "",
    value_range: tuple[float, float] | None = None,
    threshold: float | None = None,
) -> Path:
    """Write one PNG panel.

    Args:
        path: output PNG file (parent folders are created).
        image: the original image, ``[H, W]`` or ``[H, W, C]``, uint8 or float in [0, 1].
        anomaly_map: per-pixel anomaly scores at the image's resolution ``[H, W]``.
        score: the image-level anomaly score.
        mask: ground-truth mask ``[H, W]`` (nonzero = anomalous), shown when given.
        label: ground-truth label (0 normal, 1 anomalous), shown when given.
        title: first title line (e.g. the file name).
        note: a line printed in red under the title (e.g. "TRAINING-FREE" or "NOT A REAL RESULT").
        value_range: colour range of the map; shared across images of a run so colours compare.
            Default: this map's min and max.
        threshold: decision threshold, shown with the score when given.

    Returns:
        The written path.
    """
    plt = _pyplot()
    img = to_display(image)
    amap = np.asarray(anomaly_map, dtype=np.float32)
    if amap.shape != img.shape[:2]:
        raise ValueError(f"anomaly map {amap.shape} must have the image's size {img.shape[:2]}")
    lo, hi = value_range if value_range is not None else (float(np.nanmin(amap)), float(np.nanmax(amap)))
    if not hi > lo:
        hi = lo + 1e-6

    panels = 3 if mask is not None else 2
    fig, axes = plt.subplots(1, panels, figsize=(3.2 * panels, 3.7), squeeze=False)
    axes = axes[0]
    axes[0].imshow(img)
    axes[0].set_title("image")
    if mask is not None:
        axes[1].imshow(np.asarray(mask) > 0, cmap="gray", vmin=0, vmax=1)
        axes[1].set_title("ground truth")
    ax = axes[-1]
    ax.imshow(img)
    overlay = ax.imshow(amap, cmap="jet", alpha=0.5, vmin=lo, vmax=hi)
    ax.set_title("anomaly map")
    fig.colorbar(overlay, ax=ax, fraction=0.046, pad=0.04)
    for a in axes:
        a.axis("off")

    line = f"score {score:.4f}"
    if threshold is not None:
        line += f" (threshold {threshold:.4f}: {'ANOMALOUS' if score >= threshold else 'normal'})"
    if label is not None:
        line += f" | ground truth: {'anomalous' if label else 'normal'}"
    fig.suptitle("\n".join(t for t in (title, line) if t), fontsize=9)
    if note:
        fig.text(0.5, 0.01, note, ha="center", va="bottom", color="red", fontsize=8, wrap=True)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


class HeatmapWriter:
    """Writes at most ``limit`` panels into ``directory`` (``limit`` < 0: no limit, 0: none)."""

    def __init__(self, directory: str | os.PathLike, limit: int = 50, note: str = ""):
        self.directory = Path(directory)
        self.limit = limit
        self.note = note
        self.written: list[Path] = []

    @property
    def full(self) -> bool:
        return 0 <= self.limit <= len(self.written)

    def add(
        self, name: str, image: np.ndarray, anomaly_map: np.ndarray, score: float, **kwargs
    ) -> Path | None:
        if self.full:
            return None
        kwargs.setdefault("note", self.note)
        path = save_panel(self.directory / f"{name}.png", image, anomaly_map, score, **kwargs)
        self.written.append(path)
        return path


def select_panels(labels: Sequence[int], scores: Sequence[float], limit: int) -> list[int]:
    """Which images get a panel: anomalous and normal images alternately, each by descending score.

    So a small limit shows both classes: the most confident detections next to the normal images
    that look most anomalous (the likely false alarms). A class that runs out leaves the remaining
    places to the other. ``limit`` < 0 selects every image; ties keep file order.

    Returns:
        Indices into ``labels``/``scores`` in panel order.
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels)
    by_class = []
    for label in (1, 0):
        idx = np.flatnonzero(y == label)
        key = np.where(np.isnan(s[idx]), -np.inf, s[idx])
        by_class.append(idx[np.argsort(-key, kind="stable")].tolist())
    order: list[int] = []
    anomalous, normal = by_class
    for i in range(max(len(anomalous), len(normal))):
        order += anomalous[i : i + 1] + normal[i : i + 1]
    return order if limit < 0 else order[:limit]
