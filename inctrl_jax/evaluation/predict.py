"""Prediction for practitioners: score new images against a few normal references.

API::

    from inctrl_jax.model.detector import Detector
    from inctrl_jax.evaluation.predict import predict
    detector = Detector.from_checkpoint("checkpoints/8/checkpoint.pyth")
    results = predict(detector, references="refs/", inputs="new/*.png", category="transistor",
                      validation="val/", output_dir="out/")
    results[0]["score"], results[0]["anomalous"]

``references`` may be folders, globs, file lists, in-memory numpy images (``[H, W]`` / ``[H, W, 3]``,
uint8 or float in [0, 1], e.g. camera frames), or a reference set saved by an earlier prediction
(``<output_dir>/reference_set``, see :class:`inctrl_jax.model.reference.ReferenceSet`); ``inputs``
the same except saved sets. The decision threshold is the user's, or chosen on a validation
folder: with normal and anomalous images (``good/`` plus defect sub-folders) it is the F1-max
threshold; with normal images only it is a stated quantile of their scores (default 0.99), never
their minimum.
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

from inctrl_jax.data.layouts import IMAGE_EXTENSIONS
from inctrl_jax.evaluation import metrics as M
from inctrl_jax.evaluation.heatmaps import HeatmapWriter
from inctrl_jax.evaluation.scorer import score_mode

log = logging.getLogger("inctrl_jax.evaluation")

ImageLike = str | os.PathLike | np.ndarray
REFERENCE_SET_DIR = "reference_set"


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS


def expand_inputs(spec: ImageLike | Sequence[ImageLike]) -> list[ImageLike]:
    """A folder (its images, recursively), a glob, a file, an array, or a list of these."""
    if isinstance(spec, np.ndarray):
        return [spec] if spec.ndim in (2, 3) else list(spec)
    if isinstance(spec, (list, tuple)):
        return [x for s in spec for x in expand_inputs(s)]
    text = os.fspath(spec)  # type: ignore[arg-type]
    path = Path(text).expanduser()
    if path.is_dir():
        found: list[ImageLike] = [p for p in sorted(path.rglob("*")) if _is_image(p)]
    elif path.is_file():
        found = [path]
    else:
        found = [Path(p) for p in sorted(globlib.glob(text, recursive=True)) if Path(p).is_file()]
    if not found:
        raise FileNotFoundError(f"no images found for {text!r}; give an image file, a folder or a glob")
    return found


def _open(item: ImageLike):
    """(name or None, PIL image) of a path or an in-memory image."""
    from PIL import Image

    from inctrl_jax.data.preprocess import open_image

    if isinstance(item, np.ndarray):
        arr = item
        if arr.dtype != np.uint8:
            arr = (np.clip(np.asarray(arr, np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        return None, Image.fromarray(arr)
    return os.fspath(item), open_image(item)


def _display(image) -> np.ndarray:
    from PIL import ImageOps

    from inctrl_jax.data.preprocess import to_8bit

    shown = to_8bit(ImageOps.exif_transpose(image))
    return np.asarray(shown.convert("RGB") if shown.mode != "RGB" else shown)


def is_saved_reference_set(path: ImageLike | Sequence[ImageLike]) -> bool:
    """True for a directory written by :meth:`ReferenceSet.save` (or a folder holding one)."""
    from inctrl_jax.model.reference import META_FILE

    if not isinstance(path, (str, os.PathLike)):
        return False
    p = Path(path).expanduser()
    return (p / META_FILE).is_file() or (p / REFERENCE_SET_DIR / META_FILE).is_file()


_DECODE_ERRORS = (OSError, ValueError, SyntaxError)  # PIL raises all three for broken files


class Failures(list):
    """``(file, reason)`` of images left out under ``on_error="skip"``."""

    def skip_or_raise(self, name: str, err: BaseException, on_error: str) -> None:
        if on_error == "raise":
            raise ValueError(
                f"{name}: cannot be read ({err}); remove or replace it, or set on_error='skip' "
                "(--config.on_error=skip) to leave unreadable images out"
            ) from err
        log.warning("skipping %s: %s", name, err)
        self.append((name, str(err)))


def reference_set_for(
    detector,
    references: ImageLike | Sequence[ImageLike],
    category: str,
    *,
    k: int | None = None,
    seed: int = 0,
    on_error: str = "raise",
    failures: Failures | None = None,
):
    """The detector's reference set from images (paths, folders, globs, arrays) or a saved set.

    Args:
        k: draw this many references (seeded by ``seed``) from the images given; ``None`` or -1 = all
            of them; 0 = a zero-shot set (the text prior alone).
        on_error: ``"skip"`` an unreadable reference (the next one of the seeded order takes its
            place; listed in ``failures``) or ``"raise"``.

    A saved set must come from the same backbone; the detector refuses it otherwise (``k`` does not
    apply to it).
    """
    from inctrl_jax.model.reference import META_FILE, ReferenceSet

    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error={on_error!r} is not supported; use 'raise' or 'skip'")
    failures = Failures() if failures is None else failures
    if k == 0:
        return detector.zero_shot_reference_set(category)
    if is_saved_reference_set(references):
        p = Path(references).expanduser()  # type: ignore[arg-type]
        ref_set = ReferenceSet.load(p if (p / META_FILE).is_file() else p / REFERENCE_SET_DIR)
        if ref_set.category != category:
            log.warning("saved reference set is of category %r, scoring as %r", ref_set.category, category)
            ref_set.category = category
            ref_set.text_prototypes = detector.text_prototypes(category)
        return ref_set
    items = expand_inputs(references)
    want = len(items) if k is None or k < 0 else k
    if want > len(items):
        raise ValueError(
            f"K={want} references requested (--config.predict.k) but only {len(items)} images were "
            f"given in {references if isinstance(references, (str, os.PathLike)) else 'references'}; "
            "lower K or add normal images"
        )
    order = range(len(items)) if want == len(items) else np.random.default_rng(seed).permutation(len(items))
    opened: list[tuple[str | None, Any]] = []
    for i in order:
        if len(opened) == want:
            break
        try:
            opened.append(_open(items[int(i)]))
        except _DECODE_ERRORS as err:
            failures.skip_or_raise(_name(items[int(i)], int(i)), err, on_error)
    if len(opened) < want:
        raise ValueError(
            f"only {len(opened)} of the {len(items)} reference images could be read, K={want} needed; "
            "see the skipped files above"
        )
    ref_set = detector.build_reference_set([im for _, im in opened], category)
    ref_set.reference_files = [n if n is not None else f"array[{i}]" for i, (n, _) in enumerate(opened)]
    return ref_set


def _name(item: ImageLike, index: int) -> str:
    return f"array[{index}]" if isinstance(item, np.ndarray) else os.fspath(item)


def score_images(
    detector,
    reference_set,
    inputs: Sequence[ImageLike],
    keep_maps: bool = True,
    *,
    on_error: str = "raise",
    failures: Failures | None = None,
    real_result: bool = True,
) -> list[dict[str, Any]]:
    """Score images against a reference set, one batch of the detector's size at a time.

    ``anomaly_map`` is at each input's own resolution (NaN on the border the centre crop removed).
    Unreadable images are skipped (and appended to ``failures``) with ``on_error="skip"``.
    """
    out: list[dict[str, Any]] = []
    failures = Failures() if failures is None else failures
    bs = detector.batch_size
    for start in range(0, len(inputs), bs):
        opened = []
        for j, x in enumerate(inputs[start : start + bs]):
            try:
                name, image = _open(x)
            except _DECODE_ERRORS as err:
                failures.skip_or_raise(_name(x, start + j), err, on_error)
                continue
            opened.append((name if name is not None else f"array[{start + j}]", image))
        if not opened:
            continue
        results = detector.score([im for _, im in opened], reference_set)
        for (name, image), res in zip(opened, results, strict=True):
            rec: dict[str, Any] = {
                "image": name,
                "score": res.score,
                "s_p": res.s_p,
                "s_i": None if np.isnan(res.s_i) else res.s_i,
                "s_a": res.s_a,
                "mode": getattr(res, "mode", None) or score_mode(detector, reference_set.zero_shot),
                "real_result": real_result,
            }
            if keep_maps:
                rec["anomaly_map"] = res.anomaly_map
                rec["_display"] = _display(image)
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
        imgs = [p for p in sorted(root.iterdir()) if _is_image(p)]
        return imgs, [0] * len(imgs)
    paths, labels = [], []
    for d in subdirs:
        for p in sorted(d.rglob("*")):
            if _is_image(p):
                paths.append(p)
                labels.append(int(d.name != "good"))
    return paths, labels


def predict(
    detector,
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
    k: int | None = None,
    seed: int = 0,
    on_error: str = "raise",
    real_result: bool = True,
) -> list[dict[str, Any]]:
    """Score ``inputs`` against ``references`` and decide anomalous/normal.

    Args:
        detector: a :class:`~inctrl_jax.model.detector.Detector` (trained heads or training-free).
        references: normal reference images (folder, glob, files, arrays) or a saved reference set.
        inputs: images to score (folder, glob, file, arrays).
        category: object name for the text prior (e.g. ``"transistor"``).
        threshold: decision threshold; if ``None`` it is chosen on ``validation``.
        validation: labelled validation folder (see :func:`choose_threshold`).
        quantile: quantile used when the validation folder holds only normal images.
        output_dir: if given, writes ``predictions.jsonl``, ``threshold.json``, the reference set
            (``reference_set/``, reusable as ``references``) and heat maps there.
        heatmap_limit: at most this many heat-map panels (-1: all).
        note: a line written on every heat map (e.g. that the weights are random).
        k: number of references drawn (seeded by ``seed``) from ``references``; ``None``/-1 = all,
            0 = zero-shot (text prior alone).
        seed: seed of the reference draw (recorded in ``predict_meta.json``).
        on_error: unreadable images: ``"skip"`` (warned, listed in ``failed_images.txt``) or ``"raise"``.
        real_result: False marks every output NOT A REAL RESULT (e.g. random backbone weights).

    Returns:
        One dict per input: ``image``, ``score``, ``s_p``, ``s_i``, ``s_a``, ``mode``, ``real_result``,
        ``threshold``, ``anomalous`` (None without a threshold) and ``anomaly_map`` (at the input's
        resolution; NaN everywhere for zero-shot).
    """
    failures = Failures()
    reference_set = reference_set_for(
        detector, references, category, k=k, seed=seed, on_error=on_error, failures=failures
    )
    mode = score_mode(detector, reference_set.zero_shot)
    log.info("reference set: %d images of %r (%s score)", reference_set.k, category, mode)
    scoring: dict[str, Any] = {"on_error": on_error, "failures": failures, "real_result": real_result}

    how = "given by the user" if threshold is not None else "none (no threshold and no validation folder)"
    if threshold is None and validation is not None:
        val_paths, val_labels = _validation_set(validation)
        val_scores = [
            r["score"]
            for r in score_images(detector, reference_set, list(val_paths), keep_maps=False, **scoring)
        ]
        threshold, how = choose_threshold(val_scores, val_labels, quantile)
        log.info("threshold %.6f: %s", threshold, how)

    results = score_images(detector, reference_set, expand_inputs(inputs), **scoring)
    if not results:
        raise ValueError(f"none of the input images could be read ({len(failures)} skipped)")
    for r in results:
        r["threshold"] = threshold
        r["anomalous"] = None if threshold is None else bool(r["score"] >= threshold)
    log.info("scored %d images", len(results))

    if output_dir is not None:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        reference_set.save(out / REFERENCE_SET_DIR)
        (out / "threshold.json").write_text(
            json.dumps(
                {"threshold": threshold, "how": how, "mode": mode, "real_result": real_result, "note": note},
                indent=2,
            )
        )
        meta = {
            "category": category,
            "mode": mode,
            "real_result": real_result,
            "note": note,
            "k": reference_set.k,
            "k_requested": k,
            "seed": seed,
            "references": list(reference_set.reference_files),
            "failed_images": len(failures),
        }
        (out / "predict_meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        if failures:
            (out / "failed_images.txt").write_text("".join(f"{p}\t{r}\n" for p, r in failures))
        with open(out / "predictions.jsonl", "w") as f:
            for r in results:
                f.write(
                    json.dumps({k: v for k, v in r.items() if k not in ("anomaly_map", "_display")}) + "\n"
                )
        heat = HeatmapWriter(out / "heatmaps", 0 if reference_set.zero_shot else heatmap_limit, note=note)
        for i, r in enumerate(results):
            if heat.full or reference_set.zero_shot:  # zero-shot: no residual map to show
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
    if failures:
        log.warning(
            "%d images could not be read and were left out%s",
            len(failures),
            f"; listed in {Path(output_dir) / 'failed_images.txt'}" if output_dir is not None else "",
        )
    return results
