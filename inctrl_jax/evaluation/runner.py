"""Few-shot evaluation of a dataset in any supported layout: categories x K x reference seeds.

The images come from the data layer (:mod:`inctrl_jax.data`: MVTec-like trees, VisA with its split
file, anomalib-style folders, official InCTRL JSON lists) and the scores from the model's
:class:`~inctrl_jax.model.detector.Detector`. For each category the test images are preprocessed
once; for each K and seed, K normal references are drawn from the training split with that seed
(:func:`inctrl_jax.data.select_references`), the detector's reference set is built once, and every
test image is scored against it. Image metrics come from the image scores; pixel metrics from the
residual maps projected back onto each image's original resolution, where ground-truth masks
exist. Results go to versioned folders (:mod:`inctrl_jax.evaluation.report`) as each run finishes.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from inctrl_jax.data import DataError, Dataset, Sample, Skipped, select_references
from inctrl_jax.evaluation import metrics as M
from inctrl_jax.evaluation.heatmaps import HeatmapWriter, select_panels
from inctrl_jax.evaluation.report import CategoryReport, DatasetReport, ImageScore, RunInfo, RunResult
from inctrl_jax.evaluation.scorer import score_mode

log = logging.getLogger("inctrl_jax.evaluation")

LAYOUTS = ("mvtec", "visa", "folder", "json")


@dataclasses.dataclass
class DataSpec:
    """Where a dataset is and in which layout (the arguments of the data layer's readers).

    Attributes:
        layout: ``mvtec`` (also the InCTRL conversions of ELPV, SDD, AITEX, BrainMRI, HeadCT),
            ``visa``, ``folder`` or ``json``.
        root: dataset root (``mvtec``: folder of categories or one category; ``visa``: VisA root;
            ``json``: folder that relative ``image_path`` values are relative to, optional).
        split_csv: ``visa`` split file (default ``<root>/split_csv/1cls.csv``).
        normal_dir, abnormal_dir, mask_dir, normal_test_dir, category, test_split_ratio, split_seed:
            ``folder`` layout (see :func:`inctrl_jax.data.scan_folder`).
        train_json, test_json: ``json`` layout: InCTRL JSON lists of the reference pool (training
            split) and of the test images.
        on_error: ``"skip"`` (leave unreadable files out; they are listed in the report) or ``"raise"``.
    """

    layout: str = "mvtec"
    root: str = ""
    split_csv: str = ""
    normal_dir: str = ""
    abnormal_dir: str = ""
    mask_dir: str = ""
    normal_test_dir: str = ""
    category: str = ""
    test_split_ratio: float = 0.25
    split_seed: int = 42
    train_json: Sequence[str] = ()
    test_json: Sequence[str] = ()
    on_error: str = "skip"

    @property
    def name(self) -> str:
        """A default dataset name for the results path."""
        if self.layout == "folder":
            return self.category or Path(self.normal_dir).resolve().parent.name
        if self.layout == "json" and not self.root:
            return Path(self.test_json[0]).stem if self.test_json else "json"
        return Path(self.root).resolve().name


@dataclasses.dataclass
class ScannedData:
    """A dataset read for evaluation: its samples, categories that could not be read, skipped files."""

    dataset: Dataset
    categories: list[str]
    problems: dict[str, str] = dataclasses.field(default_factory=dict)
    skipped: dict[str, list[Skipped]] = dataclasses.field(default_factory=dict)
    """Per category; key ``""`` for files that belong to no known category."""


def _logged_scan(fn: Callable[[], Dataset]) -> tuple[Dataset | None, list[str], DataError | None]:
    """Run a data-layer reader, logging its skip warnings; returns (dataset, warnings, error)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds, err = fn(), None
        except DataError as e:
            ds, err = None, e
    messages = [str(w.message) for w in caught]
    for m in messages:
        log.warning("%s", _reworded(m))
    return ds, messages, err


_NO_MASK = "anomalous image has no mask"


def _reworded(message: str) -> str:
    """The data layer says "skipping <image>: anomalous image has no mask"; the image is kept."""
    if _NO_MASK in message:
        body = message.removeprefix("skipping ")
        return f"{body}: it is scored and counts in the image metrics; only the pixel metrics leave it out"
    return message


def _attribute(skipped: Sequence[Skipped], categories: Sequence[str]) -> dict[str, list[Skipped]]:
    """Skipped files per category (a path component equal to the category name), ``""`` otherwise."""
    out: dict[str, list[Skipped]] = {}
    for s in skipped:
        parts = Path(s.path).parts
        owner = categories[0] if len(categories) == 1 else next((c for c in categories if c in parts), "")
        out.setdefault(owner, []).append(s)
    return out


def _mvtec_categories(root: Path) -> list[str] | None:
    """Category folders of an MVTec-like root, or None when ``root`` is itself a category."""
    if (root / "train").is_dir() or (root / "test").is_dir():
        return None
    return sorted(
        p.name for p in root.iterdir() if p.is_dir() and ((p / "train").is_dir() or (p / "test").is_dir())
    )


def scan_dataset(spec: DataSpec, categories: Sequence[str] = ()) -> ScannedData:
    """Read ``spec`` with the data layer; every category of an MVTec-like tree is read on its own,
    so one unreadable category is reported without losing the others.

    Raises:
        ValueError: unknown layout, missing settings, or requested categories that do not exist.
        DataError: the dataset as a whole cannot be read (missing root, no images at all).
    """
    from inctrl_jax.data import read_inctrl_json, scan_folder, scan_mvtec, scan_visa

    if spec.layout not in LAYOUTS:
        raise ValueError(f"--config.layout={spec.layout!r} is not supported; use one of {', '.join(LAYOUTS)}")
    on_error: Any = spec.on_error
    if on_error not in ("raise", "skip"):
        raise ValueError(f"--config.on_error={spec.on_error!r} is not supported; use 'raise' or 'skip'")
    wanted = list(categories)

    if spec.layout == "mvtec":
        if not spec.root:
            raise ValueError("set --config.dataset_root to a dataset folder in the MVTec layout")
        root = Path(spec.root)
        if not root.is_dir():
            raise DataError(f"{root}: dataset root does not exist; check --config.dataset_root")
        found = _mvtec_categories(root)
        whole_root = found is None  # the root is one category
        if found is None:
            found = [root.name]

        def read_category(category: str) -> Dataset:
            return scan_mvtec(root, None if whole_root else [category], on_error=on_error)

        if not found:
            raise DataError(
                f"{root} holds no category in the MVTec layout (<category>/test/good, <category>/test/<defect>, "
                "<category>/train/good); point --config.dataset_root at such a folder"
            )
        missing = [c for c in wanted if c not in found]
        if missing:
            raise ValueError(f"categories {missing} not found under {root}; available: {found}")
        out = ScannedData(Dataset([]), wanted or found)
        for cat in out.categories:
            ds, messages, err = _logged_scan(functools.partial(read_category, cat))
            if err is not None or ds is None:
                if messages:
                    out.problems[cat] = (
                        f"all of its images failed to load or were left out ({'; '.join(messages)}): {err}"
                    )
                else:
                    out.problems[cat] = f"{type(err).__name__}: {err}"
                continue
            out.dataset = out.dataset + ds
            if ds.skipped:
                out.skipped[cat] = list(ds.skipped)
        return out

    if spec.layout == "visa":
        if not spec.root:
            raise ValueError("set --config.dataset_root to the VisA root (with split_csv/1cls.csv)")
        read = lambda: scan_visa(  # noqa: E731
            spec.root, wanted or None, split_csv=spec.split_csv or None, on_error=on_error
        )
    elif spec.layout == "folder":
        if not spec.normal_dir:
            raise ValueError(
                "set --config.folder.normal_dir (and abnormal_dir, mask_dir, ...) for layout=folder"
            )
        read = lambda: scan_folder(  # noqa: E731
            spec.normal_dir,
            spec.abnormal_dir or None,
            mask_dir=spec.mask_dir or None,
            normal_test_dir=spec.normal_test_dir or None,
            category=spec.category or None,
            test_split_ratio=spec.test_split_ratio,
            seed=spec.split_seed,
            on_error=on_error,
        )
    else:
        if not spec.test_json or not spec.train_json:
            raise ValueError(
                "set --config.json.test (the test list) and --config.json.train (the list the normal "
                "references are drawn from) for layout=json"
            )
        json_root = spec.root or None
        read = lambda: (  # noqa: E731
            read_inctrl_json(list(spec.train_json), root=json_root, split="train", on_error=on_error)
            + read_inctrl_json(list(spec.test_json), root=json_root, split="test", on_error=on_error)
        )
    ds, _, err = _logged_scan(read)
    if err is not None or ds is None:
        raise err or DataError("the dataset could not be read")
    found = ds.categories
    missing = [c for c in wanted if c not in found]
    if missing:
        raise ValueError(f"categories {missing} not found in the {spec.layout} dataset; available: {found}")
    chosen = wanted or found
    dataset = Dataset([s for s in ds if s.category in chosen], list(ds.skipped))
    return ScannedData(dataset, chosen, {}, _attribute(ds.skipped, chosen))


def subsample(samples: Sequence[Sample], max_per_class: int, seed: int = 0) -> list[Sample]:
    """At most ``max_per_class`` normal and as many anomalous samples (seeded, sorted by path)."""
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
    """Decode one test image with the data layer's reference preprocessing, plus its mask at the
    original resolution (pixel metrics are computed there)."""
    from inctrl_jax.data.preprocess import binarise_mask, open_image, preprocess_with_geometry

    image = open_image(sample.path)
    pixels, geom = preprocess_with_geometry(image, image_size)
    mask = None
    if sample.mask_path:
        from PIL import ImageOps

        mask_img = ImageOps.exif_transpose(open_image(sample.mask_path))
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
    from inctrl_jax.data import project_to_original

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
    on_error: str = "skip"
    """Test images that fail to decode: ``"skip"`` (listed in failed_images.txt) or ``"raise"``."""


def _load_test_images(
    samples: Sequence[Sample], image_size: int, report: CategoryReport, settings: EvalSettings
) -> list[LoadedImage]:
    keep_original = settings.heatmap_limit != 0
    loaded: list[LoadedImage] = []
    for s in samples:
        try:
            loaded.append(load_sample(s, image_size, keep_original))
        except (OSError, ValueError) as err:
            if settings.on_error == "raise":
                raise
            report.add_failed(s.path, str(err))
            log.warning("skipping %s: %s", s.path, err)
    return loaded


def evaluate_category(
    detector,
    dataset: Dataset,
    category: str,
    report: CategoryReport,
    settings: EvalSettings,
    skipped: Sequence[Skipped] = (),
) -> CategoryReport:
    """Evaluate one category of ``dataset`` for every K and seed; results are written into ``report``.

    Args:
        detector: a :class:`~inctrl_jax.model.detector.Detector` (with or without trained heads).
        dataset: samples from the data layer; test images are the ``test`` split of ``category``,
            references are drawn from its ``train`` split.
        category: the category (also the object word of the text prior).
        report: where the results go.
        settings: K, seeds, subsampling, heat maps.
        skipped: files of this category the reader left out (listed in failed_images.txt).
    """
    sample_paths = {s.path for s in dataset.samples if s.category == category}
    # An anomalous image without a mask is kept (scored, image metrics); only pixel metrics leave it out.
    without_mask = [x for x in skipped if x.path in sample_paths]
    skipped = [x for x in skipped if x.path not in sample_paths]
    for left_out in skipped:
        report.add_failed(left_out.path, left_out.reason)
    if without_mask:
        report.add_note(
            f"{len(without_mask)} anomalous images have no mask: they are scored and count in the image "
            "metrics, and are excluded from the pixel metrics only"
        )
    samples = [s for s in dataset.samples if s.category == category and s.split == "test"]
    samples = subsample(samples, settings.max_test_per_class, settings.subsample_seed)
    n_norm = sum(s.label == 0 for s in samples)
    n_pool = sum(s.category == category and s.split == "train" and s.label == 0 for s in dataset.samples)
    log.info(
        "%s: %d test images (%d normal, %d anomalous, %d with masks), %d reference candidates",
        category, len(samples), n_norm, len(samples) - n_norm, sum(s.mask_path is not None for s in samples), n_pool,
    )  # fmt: skip
    if skipped:
        report.add_note(
            f"{len(skipped)} files were left out while reading the dataset; see failed_images.txt"
        )
    if not samples:
        report.add_note(f"no test images of {category!r} in the dataset")
        return report

    loaded = _load_test_images(samples, detector.image_size, report, settings)
    if not loaded:
        report.add_note(f"all {len(samples)} test images failed to load; see failed_images.txt")
        raise RuntimeError(
            f"{category}: all {len(samples)} test images failed to load (listed in {report.dir})"
        )
    if len(loaded) < len(samples):
        report.add_note(f"{len(samples) - len(loaded)} of {len(samples)} test images failed to load")

    labels = np.array([x.sample.label for x in loaded])
    has_masks = any(x.mask is not None for x in loaded)
    grid = detector.config.vision.grid_size
    for k in settings.k_shots:
        zero_shot = k == 0
        if zero_shot:
            report.add_note(
                "K=0 is zero-shot (mode zero_shot): the text prior alone scores each image, no references "
                "and no residual map, so no pixel metrics or heat maps; it is run once (the first seed)"
            )
        for seed in settings.seeds[:1] if zero_shot else settings.seeds:
            if zero_shot:
                reference_set = detector.zero_shot_reference_set(category)
                chosen_paths: list[str] = []
                reference_info: dict[str, Any] = {"source": "zero-shot: no references"}
            else:
                try:
                    chosen = select_references(dataset, category, k, seed)
                except DataError as err:
                    report.add_missing_run(k, seed, str(err))
                    log.error("%s K=%d seed=%d cannot be run: %s", category, k, seed, err)
                    continue
                reference_set = detector.build_reference_set(list(chosen.paths), category)
                chosen_paths = list(chosen.paths)
                reference_info = {"source": chosen.source}
            reference_info["backbone"] = reference_set.backbone
            mode = score_mode(detector, zero_shot)
            t0 = time.perf_counter()
            t_first: float | None = None  # the end of the first batch (it includes compilation)
            n_first = 0

            scores: list[ImageScore] = []
            maps: list[np.ndarray] = []
            bs = detector.batch_size
            batches = range(0, len(loaded), bs)
            bar = _progress(batches, len(batches), f"{category} K={k} seed={seed}", settings.progress)
            for start in bar:
                chunk = loaded[start : start + bs]
                out = detector.predict(np.stack([x.pixels for x in chunk]), reference_set)
                for j, x in enumerate(chunk):
                    if zero_shot:
                        maps.append(np.zeros((x.geometry.orig_h, x.geometry.orig_w), np.float32))
                    else:
                        maps.append(
                            map_at_original(np.asarray(out.residual_map[j]).reshape(grid, grid), x.geometry)
                        )
                    s = x.sample
                    scores.append(
                        ImageScore(
                            s.path,
                            s.label,
                            float(out.score[j]),
                            s.defect_type,
                            s.mask_path,
                            float(out.s_p[j]),
                            _float_or_none(out.s_i[j]),
                            float(out.s_a[j]),
                        )  # fmt: skip
                    )
                now = time.perf_counter()
                if t_first is None:
                    t_first, n_first = now, len(scores)
                elif hasattr(bar, "set_postfix"):
                    bar.set_postfix(img_s=f"{(len(scores) - n_first) / (now - t_first):.2f}")
            seconds = time.perf_counter() - t0
            # Throughput without the first batch, which includes compilation.
            steady = (
                (len(loaded) - n_first) / (time.perf_counter() - t_first)
                if t_first is not None and len(loaded) > n_first
                else math.nan
            )

            if not zero_shot:
                _write_heatmaps(report, loaded, scores, maps, has_masks, category, k, seed, settings)

            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", M.UndefinedMetricWarning)
                values = M.image_metrics(labels, [s.score for s in scores])
                if has_masks and not zero_shot:
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
                chosen_paths, seconds, run_warnings, reference_info=reference_info, mode=mode,
            )  # fmt: skip
            report.add_run(run, scores)
            speed = (
                "throughput: one batch only, which includes compilation"
                if math.isnan(steady)
                else f"throughput {steady:.1f} img/s after the first batch"
            )
            log.info(
                "%s K=%d seed=%d (%s): %s (%s)",
                category, k, seed, mode, ", ".join(f"{n}={v:.4f}" for n, v in values.items()), speed,
            )  # fmt: skip
    return report


def _write_heatmaps(
    report: CategoryReport,
    loaded: Sequence[LoadedImage],
    scores: Sequence[ImageScore],
    maps: Sequence[np.ndarray],
    has_masks: bool,
    category: str,
    k: int,
    seed: int,
    settings: EvalSettings,
) -> None:
    """Panels of the highest-scoring anomalous and normal images, alternating, up to the limit."""
    if settings.heatmap_limit == 0:
        return
    heat = HeatmapWriter(
        report.dir / "heatmaps" / f"k{k}_seed{seed}", settings.heatmap_limit, note=report.info.label
    )
    # One colour range per run so that panels can be compared.
    lo = float(min(m.min() for m in maps))
    hi = float(max(m.max() for m in maps))
    order = select_panels([x.sample.label for x in loaded], [s.score for s in scores], settings.heatmap_limit)
    for rank, i in enumerate(order):
        x, sc = loaded[i], scores[i]
        if x.original is None:
            continue
        name = Path(x.sample.path).name
        heat.add(
            f"{rank:03d}_{x.sample.defect_type}_{Path(x.sample.path).stem}", x.original, maps[i], sc.score,
            mask=x.mask if has_masks else None, label=x.sample.label,
            title=f"{category}/{x.sample.defect_type}/{name}  K={k} seed={seed}", value_range=(lo, hi),
        )  # fmt: skip


def _float_or_none(x) -> float | None:
    v = float(x)
    return None if math.isnan(v) else v


def evaluate_dataset(
    detector,
    data: DataSpec | ScannedData | str | os.PathLike,
    dataset: str,
    info: RunInfo,
    results_root: str | os.PathLike,
    settings: EvalSettings,
    config: Any = None,
    categories: Sequence[str] = (),
) -> DatasetReport:
    """Evaluate every category (or the given ones) of a dataset.

    Args:
        detector: a :class:`~inctrl_jax.model.detector.Detector`.
        data: a :class:`DataSpec`, an already read :class:`ScannedData`, or an MVTec-like root folder.
        dataset: dataset name in the results path.
        info: what identifies the detector (written to every report).
        results_root: results folder.
        settings: K, seeds, heat maps, ...
        config: the full config, saved with the results.
        categories: a subset of categories (default: all).

    A category that cannot be read or evaluated is reported in the dataset summary and the next one
    is evaluated.
    """
    if isinstance(data, str | os.PathLike):
        data = DataSpec("mvtec", root=os.fspath(data), on_error=settings.on_error)
    scanned = data if isinstance(data, ScannedData) else scan_dataset(data, categories)
    ds_report = DatasetReport(results_root, info, dataset, config)
    for path_reason in scanned.skipped.get("", []):
        ds_report.add_failed(path_reason.path, path_reason.reason)
    for cat in scanned.categories:
        if cat in scanned.problems:
            log.error("%s cannot be evaluated: %s", cat, scanned.problems[cat])
            ds_report.add_problem(cat, scanned.problems[cat])
            continue
        rep = CategoryReport(results_root, info, dataset, cat, config)
        try:
            evaluate_category(detector, scanned.dataset, cat, rep, settings, scanned.skipped.get(cat, ()))
        except Exception as err:  # keep going: one broken category must not lose the others
            log.error("%s failed: %s", cat, err)
            ds_report.add_problem(cat, f"{type(err).__name__}: {err}")
            continue
        ds_report.add_category(rep)
        log.info("%s: results in %s", cat, rep.dir)
    return ds_report
