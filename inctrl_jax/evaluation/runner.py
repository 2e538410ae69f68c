"""Few-shot evaluation of a dataset in the MVTec layout: categories x K x reference seeds.

For each category: the test images are preprocessed once; for each K and seed, K normal references
are drawn from ``train/good`` with that seed, encoded once, and every test image is scored against
them. Image metrics come from the image scores; pixel metrics from the anomaly maps projected back
onto each image's original resolution, where ground-truth masks exist. Results go to versioned
folders (:mod:`inctrl_jax.evaluation.report`) as each run finishes.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from inctrl_jax.evaluation import metrics as M
from inctrl_jax.evaluation.heatmaps import HeatmapWriter
from inctrl_jax.evaluation.report import CategoryReport, DatasetReport, ImageScore, RunInfo, RunResult

log = logging.getLogger("inctrl_jax.evaluation")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".npy")


@dataclasses.dataclass(frozen=True)
class Sample:
    """One test image: path, label (0 normal, 1 anomalous), defect folder, mask path if any."""

    path: str
    label: int
    defect: str
    mask_path: str | None = None


def _images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def find_categories(dataset_root: str | os.PathLike) -> list[str]:
    """Sub-folders of ``dataset_root`` that hold ``test/`` (or ``""`` if the root is a category)."""
    root = Path(dataset_root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root {root} does not exist; check --config.dataset_root")
    if (root / "test").is_dir():
        return [""]
    cats = sorted(p.name for p in root.iterdir() if (p / "test").is_dir())
    if not cats:
        raise FileNotFoundError(
            f"{root} holds no category in the MVTec layout (<category>/test/good, <category>/test/<defect>, "
            "<category>/train/good); point --config.dataset_root at such a folder"
        )
    return cats


def scan_category(category_root: str | os.PathLike) -> tuple[list[Path], list[Sample]]:
    """``(train/good reference candidates, test samples)`` of one MVTec-layout category.

    ``test/good`` is normal, any other ``test/<defect>`` folder anomalous; the mask of
    ``test/<defect>/<stem>.*`` is ``ground_truth/<defect>/<stem>_mask.png`` (or ``<stem>.png``) when present.
    """
    root = Path(category_root)
    refs = _images(root / "train" / "good")
    samples: list[Sample] = []
    test = root / "test"
    for defect_dir in sorted(p for p in test.iterdir() if p.is_dir()) if test.is_dir() else []:
        defect = defect_dir.name
        for img in _images(defect_dir):
            mask = None
            if defect != "good":
                for cand in (f"{img.stem}_mask.png", f"{img.stem}.png"):
                    if (root / "ground_truth" / defect / cand).is_file():
                        mask = str(root / "ground_truth" / defect / cand)
                        break
            samples.append(Sample(str(img), int(defect != "good"), defect, mask))
    return refs, samples


def select_references(candidates: Sequence[Path], k: int, seed: int) -> list[Path]:
    """K references drawn without replacement by ``numpy.random.default_rng(seed)``, in file order."""
    if k > len(candidates):
        raise ValueError(
            f"K={k} references requested but only {len(candidates)} normal training images exist"
        )
    idx = np.random.default_rng(seed).choice(len(candidates), size=k, replace=False)
    return [candidates[i] for i in sorted(idx.tolist())]


def subsample(samples: Sequence[Sample], max_per_class: int, seed: int = 0) -> list[Sample]:
    """At most ``max_per_class`` normal and as many anomalous samples (seeded, file order kept)."""
    if max_per_class <= 0:
        return list(samples)
    rng = np.random.default_rng(seed)
    out: list[Sample] = []
    for label in (0, 1):
        of = [s for s in samples if s.label == label]
        if len(of) > max_per_class:
            keep = sorted(rng.choice(len(of), size=max_per_class, replace=False).tolist())
            of = [of[i] for i in keep]
        out += of
    return sorted(out, key=lambda s: s.path)


@dataclasses.dataclass
class LoadedImage:
    sample: Sample
    pixels: np.ndarray  # [S, S, 3] model input
    geometry: Any
    original: np.ndarray | None  # uint8 RGB for heat maps (None when heat maps are off)
    mask: np.ndarray | None  # bool [H, W] at the original resolution


def load_sample(sample: Sample, image_size: int, keep_original: bool) -> LoadedImage:
    from inctrl_jax.data.preprocess import binarise_mask, open_image, preprocess_with_geometry

    image = open_image(sample.path)
    pixels, geom = preprocess_with_geometry(image, image_size)
    mask = None
    if sample.mask_path:
        mask_img = open_image(sample.mask_path)
        if mask_img.size != (geom.orig_w, geom.orig_h):
            raise ValueError(
                f"{sample.mask_path} is {mask_img.width}x{mask_img.height} but its image is "
                f"{geom.orig_w}x{geom.orig_h}; masks must have their image's size"
            )
        mask = binarise_mask(mask_img)
    original = None
    if keep_original:
        from PIL import ImageOps

        from inctrl_jax.data.preprocess import to_8bit

        rgb = to_8bit(ImageOps.exif_transpose(image))
        original = np.asarray(rgb.convert("RGB") if rgb.mode != "RGB" else rgb, dtype=np.uint8)
    return LoadedImage(sample, pixels, geom, original, mask)


def map_at_original(residual_map: np.ndarray, geometry: Any) -> np.ndarray:
    """The patch-grid residual map projected onto the original image; unseen border -> map minimum."""
    from inctrl_jax.data.preprocess import project_to_original

    amap, seen = project_to_original(residual_map, geometry)
    if not seen.all():
        amap = np.where(seen, amap, float(np.min(residual_map)))
    return amap.astype(np.float32)


def _progress(iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="batch", leave=False, dynamic_ncols=True)


@dataclasses.dataclass
class EvalSettings:
    k_shots: Sequence[int] = (2, 4, 8)
    seeds: Sequence[int] = (0, 1, 2)
    max_test_per_class: int = 0
    subsample_seed: int = 0
    heatmap_limit: int = 20
    fpr_limit: float = M.DEFAULT_FPR_LIMIT
    progress: bool = True


def evaluate_category(
    scorer,
    category_root: str | os.PathLike,
    category: str,
    report: CategoryReport,
    settings: EvalSettings,
) -> CategoryReport:
    """Evaluate one category for every K and seed; results are written into ``report``."""
    refs, samples = scan_category(category_root)
    samples = subsample(samples, settings.max_test_per_class, settings.subsample_seed)
    n_norm = sum(s.label == 0 for s in samples)
    log.info(
        "%s: %d test images (%d normal, %d anomalous, %d with masks), %d reference candidates",
        category, len(samples), n_norm, len(samples) - n_norm, sum(s.mask_path is not None for s in samples), len(refs),
    )  # fmt: skip
    if not samples:
        report.add_note(f"no test images found under {Path(category_root) / 'test'}")
        return report

    keep_original = settings.heatmap_limit != 0
    loaded: list[LoadedImage] = []
    for s in samples:
        try:
            loaded.append(load_sample(s, scorer.image_size, keep_original))
        except (OSError, ValueError) as err:
            report.add_failed(s.path, str(err))
            log.warning("skipping %s: %s", s.path, err)
    if not loaded:
        report.add_note(f"all {len(samples)} test images failed to load; see failed_images.txt")
        raise RuntimeError(
            f"{category}: all {len(samples)} test images failed to load (listed in {report.dir})"
        )
    if len(loaded) < len(samples):
        report.add_note(f"{len(samples) - len(loaded)} of {len(samples)} test images failed to load")

    labels = np.array([x.sample.label for x in loaded])
    has_masks = any(x.mask is not None for x in loaded)
    for k in settings.k_shots:
        for seed in settings.seeds:
            if k > len(refs):
                note = f"K={k} skipped: only {len(refs)} normal images in train/good"
                if note not in report.notes:
                    report.add_note(note)
                    log.warning("%s: %s", category, note)
                continue
            chosen = select_references(refs, k, seed)
            ref_pixels = []
            for p in chosen:
                ref_pixels.append(load_sample(Sample(str(p), 0, "good"), scorer.image_size, False).pixels)
            t0 = time.perf_counter()
            scorer.set_references(np.stack(ref_pixels), category)

            scores: list[ImageScore] = []
            maps: list[np.ndarray] = []
            heat = HeatmapWriter(
                report.dir / "heatmaps" / f"k{k}_seed{seed}", settings.heatmap_limit, note=report.info.label
            )
            bs = scorer.batch_size
            batches = range(0, len(loaded), bs)
            bar = _progress(batches, len(batches), f"{category} K={k} seed={seed}", settings.progress)
            for start in bar:
                chunk = loaded[start : start + bs]
                out = scorer.score(np.stack([x.pixels for x in chunk]))
                for j, x in enumerate(chunk):
                    amap = map_at_original(out["residual_map"][j], x.geometry)
                    maps.append(amap)
                    s = x.sample
                    scores.append(
                        ImageScore(
                            s.path,
                            s.label,
                            float(out["score"][j]),
                            s.defect,
                            s.mask_path,
                            float(out["s_p"][j]),
                            _float_or_none(out["s_i"][j]),
                            float(out["s_a"][j]),
                        )  # fmt: skip
                    )
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(img_s=f"{len(scores) / (time.perf_counter() - t0):.2f}")
            seconds = time.perf_counter() - t0

            # Heat maps share one colour range per run so that panels can be compared.
            lo = float(min(m.min() for m in maps))
            hi = float(max(m.max() for m in maps))
            for x, sc, amap in zip(loaded, scores, maps, strict=True):
                if heat.full:
                    break
                if x.original is not None:
                    heat.add(
                        f"{x.sample.defect}_{Path(x.sample.path).stem}", x.original, amap, sc.score,
                        mask=x.mask if has_masks else None, label=x.sample.label,
                        title=f"{category}/{x.sample.defect}/{Path(x.sample.path).name}  K={k} seed={seed}",
                        value_range=(lo, hi),
                    )  # fmt: skip

            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", M.UndefinedMetricWarning)
                values = M.image_metrics(labels, [s.score for s in scores])
                if has_masks:
                    # Normal images have an all-zero mask; anomalous ones without a mask file are left out.
                    idx = [i for i, x in enumerate(loaded) if x.mask is not None or x.sample.label == 0]
                    masks = [
                        loaded[i].mask if loaded[i].mask is not None else np.zeros(maps[i].shape, bool)
                        for i in idx
                    ]
                    values.update(M.pixel_metrics(masks, [maps[i] for i in idx], settings.fpr_limit))
            run_warnings = [
                f"K={k} seed={seed}: {w.message}"
                for w in caught
                if issubclass(w.category, M.UndefinedMetricWarning)
            ]
            for w in run_warnings:
                log.warning("%s: %s", category, w)
            run = RunResult(
                k, seed, values, len(loaded), int((labels == 0).sum()), int((labels == 1).sum()),
                [str(p) for p in chosen], seconds, run_warnings,
            )  # fmt: skip
            report.add_run(run, scores)
            log.info(
                "%s K=%d seed=%d: %s (%.1f img/s)",
                category, k, seed, ", ".join(f"{n}={v:.4f}" for n, v in values.items()), len(loaded) / seconds,
            )  # fmt: skip
    return report


def _float_or_none(x) -> float | None:
    v = float(x)
    return None if math.isnan(v) else v


def evaluate_dataset(
    scorer,
    dataset_root: str | os.PathLike,
    dataset: str,
    info: RunInfo,
    results_root: str | os.PathLike,
    settings: EvalSettings,
    config: Any = None,
    categories: Sequence[str] = (),
) -> DatasetReport:
    """Evaluate every category (or the given ones) of a dataset; a failing category is reported
    in the dataset summary and the next one is evaluated."""
    found = find_categories(dataset_root)
    chosen = list(categories) or found
    missing = [c for c in chosen if c not in found]
    if missing:
        raise ValueError(f"categories {missing} not found under {dataset_root}; available: {found}")
    ds_report = DatasetReport(results_root, info, dataset, config)
    for cat in chosen:
        name = cat or Path(dataset_root).name
        rep = CategoryReport(results_root, info, dataset, name, config)
        try:
            evaluate_category(scorer, Path(dataset_root) / cat, name, rep, settings)
        except Exception as err:  # keep going: one broken category must not lose the others
            log.error("%s failed: %s", name, err)
            ds_report.add_problem(name, f"{type(err).__name__}: {err}")
            continue
        ds_report.add_category(rep)
        log.info("%s: results in %s", name, rep.dir)
    return ds_report
