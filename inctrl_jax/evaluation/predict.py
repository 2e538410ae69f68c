"""Prediction for practitioners: score new images against a few normal references.

API::

    from inctrl_jax.evaluation.predict import predict
    results = predict(scorer, references="refs/", inputs="new/*.png", category="transistor",
                      validation="val/", output_dir="out/")
    results[0]["score"], results[0]["anomalous"]

``references`` and ``inputs`` may be folders, globs, file lists, or in-memory numpy images
(``[H, W]`` / ``[H, W, 3]``, uint8 or float in [0, 1], e.g. camera frames). The decision threshold
is the user's, or chosen on a validation folder: with normal and anomalous images (``good/`` plus
defect sub-folders) it is the F1-max threshold; with normal images only it is a stated quantile of
their scores (default 0.99), never their minimum.
"""

from __future__ import annotations

import glob as globlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from inctrl_jax.evaluation import metrics as M
from inctrl_jax.evaluation.heatmaps import HeatmapWriter
from inctrl_jax.evaluation.runner import IMAGE_SUFFIXES, map_at_original

log = logging.getLogger("inctrl_jax.evaluation")

ImageLike = str | os.PathLike | np.ndarray


def expand_inputs(spec: ImageLike | Sequence[ImageLike]) -> list[ImageLike]:
    """A folder (its images, recursively), a glob, a file, an array, or a list of these."""
    if isinstance(spec, np.ndarray):
        return [spec] if spec.ndim in (2, 3) else list(spec)
    if isinstance(spec, (list, tuple)):
        return [x for s in spec for x in expand_inputs(s)]
    text = os.fspath(spec)  # type: ignore[arg-type]
    path = Path(text).expanduser()
    if path.is_dir():
        found: list[ImageLike] = [p for p in sorted(path.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES]
    elif path.is_file():
        found = [path]
    else:
        found = [Path(p) for p in sorted(globlib.glob(text, recursive=True)) if Path(p).is_file()]
    if not found:
        raise FileNotFoundError(f"no images found for {text!r}; give an image file, a folder or a glob")
    return found


def _prepare(item: ImageLike, image_size: int):
    """(name, pixels, geometry, display image) of a path or an in-memory image."""
    from PIL import Image

    from inctrl_jax.data.preprocess import open_image, preprocess_with_geometry, to_8bit

    if isinstance(item, np.ndarray):
        arr = item
        if arr.dtype != np.uint8:
            arr = (np.clip(np.asarray(arr, np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        image = Image.fromarray(arr)
        name = None
    else:
        image = open_image(item)
        name = os.fspath(item)
    pixels, geom = preprocess_with_geometry(image, image_size)
    shown = to_8bit(image)
    display = np.asarray(shown.convert("RGB") if shown.mode != "RGB" else shown)
    return name, pixels, geom, display


def load_references(
    references: ImageLike | Sequence[ImageLike], image_size: int
) -> tuple[np.ndarray, list[str]]:
    """Preprocessed reference pixels ``[K, S, S, 3]`` and their names.

    A ``.npy`` file is taken as an already preprocessed reference set (as saved by :func:`predict`).
    """
    if isinstance(references, (str, os.PathLike)) and os.fspath(references).endswith(".npy"):
        pixels = np.load(os.fspath(references))
        if pixels.ndim != 4 or pixels.shape[1:] != (image_size, image_size, 3):
            raise ValueError(
                f"{references}: a saved reference set must be [K, {image_size}, {image_size}, 3]; got {pixels.shape}"
            )
        return pixels.astype(np.float32), [f"{references}[{i}]" for i in range(len(pixels))]
    items = expand_inputs(references)
    prepared = [_prepare(x, image_size) for x in items]
    names = [n if n is not None else f"array[{i}]" for i, (n, *_) in enumerate(prepared)]
    return np.stack([p[1] for p in prepared]), names


def score_images(scorer, inputs: Sequence[ImageLike], keep_maps: bool = True) -> list[dict[str, Any]]:
    """Score images against the scorer's current reference set, in batches."""
    out: list[dict[str, Any]] = []
    bs = scorer.batch_size
    for start in range(0, len(inputs), bs):
        prepared = [_prepare(x, scorer.image_size) for x in inputs[start : start + bs]]
        res = scorer.score(np.stack([p[1] for p in prepared]))
        for j, (name, _, geom, display) in enumerate(prepared):
            rec: dict[str, Any] = {
                "image": name if name is not None else f"array[{start + j}]",
                "score": float(res["score"][j]),
                "s_p": float(res["s_p"][j]),
                "s_i": None if np.isnan(res["s_i"][j]) else float(res["s_i"][j]),
                "s_a": float(res["s_a"][j]),
            }
            if keep_maps:
                rec["anomaly_map"] = map_at_original(res["residual_map"][j], geom)
                rec["_display"] = display
            out.append(rec)
    return out


def choose_threshold(
    scores: Sequence[float], labels: Sequence[int] | None = None, quantile: float = 0.99
) -> tuple[float, str]:
    """A decision threshold and how it was chosen.

    With both classes: the F1-max threshold. With normal images only: the ``quantile`` of their
    scores (linear interpolation), so roughly ``1 - quantile`` of normal images are flagged.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.size == 0:
        raise ValueError("the validation set is empty; give images or pass a threshold")
    y = np.zeros(s.size, int) if labels is None else np.asarray(labels)
    if 0 < y.sum() < y.size:
        _, thr = M.f1_max(y, s, return_threshold=True)
        return float(
            thr
        ), f"F1-max threshold on {int((y == 0).sum())} normal and {int(y.sum())} anomalous images"
    if y.sum() == y.size:
        raise ValueError("the validation set holds only anomalous images; add normal images (a good/ folder)")
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    return float(np.quantile(s, quantile)), f"{quantile:g} quantile of the scores of {s.size} normal images"


def _validation_set(folder: str | os.PathLike) -> tuple[list[Path], list[int]]:
    """Images of a validation folder: ``good/`` (or ``test/good``) normal, other sub-folders anomalous;
    a folder without sub-folders is all normal."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"validation folder {root} does not exist")
    if (root / "test").is_dir():
        root = root / "test"
    subdirs = [p for p in sorted(root.iterdir()) if p.is_dir()]
    if not subdirs:
        imgs = [p for p in sorted(root.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
        return imgs, [0] * len(imgs)
    paths, labels = [], []
    for d in subdirs:
        for p in sorted(d.rglob("*")):
            if p.suffix.lower() in IMAGE_SUFFIXES:
                paths.append(p)
                labels.append(int(d.name != "good"))
    return paths, labels


def predict(
    scorer,
    references: ImageLike | Sequence[ImageLike],
    inputs: ImageLike | Sequence[ImageLike],
    category: str,
    *,
    threshold: float | None = None,
    validation: str | os.PathLike | None = None,
    quantile: float = 0.99,
    output_dir: str | os.PathLike | None = None,
    heatmap_limit: int = 50,
    note: str = "",
) -> list[dict[str, Any]]:
    """Score ``inputs`` against ``references`` and decide anomalous/normal.

    Args:
        scorer: a :class:`~inctrl_jax.evaluation.scorer.FewShotScorer`.
        references: normal reference images (folder, glob, files, arrays) or a saved ``.npy`` set.
        inputs: images to score (folder, glob, file, arrays).
        category: object name for the text prior (e.g. ``"transistor"``).
        threshold: decision threshold; if ``None`` it is chosen on ``validation``.
        validation: labelled validation folder (see :func:`choose_threshold`).
        quantile: quantile used when the validation folder holds only normal images.
        output_dir: if given, writes ``predictions.jsonl``, ``threshold.json``,
            ``references.npy`` + ``references.json`` and heat maps there.
        heatmap_limit: at most this many heat-map panels (-1: all).
        note: a line written on every heat map (e.g. that the weights are random).

    Returns:
        One dict per input: ``image``, ``score``, ``s_p``, ``s_i``, ``s_a``, ``threshold``,
        ``anomalous`` (None without a threshold) and ``anomaly_map`` (at the input's resolution).
    """
    ref_pixels, ref_names = load_references(references, scorer.image_size)
    scorer.set_references(ref_pixels, category)
    log.info("reference set: %d images of %r (%s)", len(ref_names), category, scorer.mode)

    how = "given by the user" if threshold is not None else "none (no threshold and no validation folder)"
    if threshold is None and validation is not None:
        val_paths, val_labels = _validation_set(validation)
        val_scores = [r["score"] for r in score_images(scorer, list(val_paths), keep_maps=False)]
        threshold, how = choose_threshold(val_scores, val_labels, quantile)
        log.info("threshold %.6f: %s", threshold, how)

    results = score_images(scorer, expand_inputs(inputs))
    for r in results:
        r["threshold"] = threshold
        r["anomalous"] = None if threshold is None else bool(r["score"] >= threshold)
    log.info("scored %d images", len(results))

    if output_dir is not None:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        np.save(out / "references.npy", ref_pixels)
        (out / "references.json").write_text(
            json.dumps({"category": category, "references": ref_names}, indent=2)
        )
        (out / "threshold.json").write_text(
            json.dumps({"threshold": threshold, "how": how, "note": note}, indent=2)
        )
        with open(out / "predictions.jsonl", "w") as f:
            for r in results:
                f.write(
                    json.dumps({k: v for k, v in r.items() if k not in ("anomaly_map", "_display")}) + "\n"
                )
        heat = HeatmapWriter(out / "heatmaps", heatmap_limit, note=note)
        for i, r in enumerate(results):
            if heat.full:
                break
            stem = Path(r["image"]).stem if not r["image"].startswith("array[") else f"array_{i}"
            heat.add(
                f"{i:04d}_{stem}",
                r["_display"],
                r["anomaly_map"],
                r["score"],
                title=r["image"],
                threshold=threshold,
            )
        log.info("predictions written to %s", out)
    for r in results:
        r.pop("_display", None)
    return results
