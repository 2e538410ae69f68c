"""Dataset layouts users already have, read into one common list of samples.

Supported layouts:

* MVTec AD and any MVTec-like tree (the InCTRL conversions of ELPV, SDD, AITEX, BrainMRI, HeadCT):
  ``<root>/<category>/train/good``, ``<root>/<category>/test/<good|defect...>``,
  ``<root>/<category>/ground_truth/<defect>/<stem>_mask.png`` (:func:`scan_mvtec`).
* VisA with its split file ``split_csv/1cls.csv`` (:func:`scan_visa`).
* A Folder layout like anomalib's: normal dir, abnormal dir, optional mask dir, optional normal
  test dir (:func:`scan_folder`).
* The official InCTRL JSON lists ``[{"image_path", "target", "type"}]`` (:func:`read_inctrl_json`).

Bad input never passes silently. Every scanner takes ``on_error``: ``"raise"`` (default) stops at the
first problem with a message naming the file; ``"skip"`` leaves the offending file out, warns, and
lists it in :attr:`Dataset.skipped`. Problems that make the whole request meaningless (a missing
root, a layout with no images at all) always raise.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

OnError = Literal["raise", "skip"]

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm", ".pbm"}
)
# Files that operating systems and tools drop into folders; never images, never worth a warning.
_IGNORED_NAMES = frozenset({"thumbs.db", "desktop.ini", "readme.md", "readme.txt", "license.txt"})

NORMAL_DEFECT = "good"


class DataError(ValueError):
    """A problem with a dataset on disk; the message names the file or folder and what to do."""


@dataclasses.dataclass(frozen=True)
class Sample:
    """One image of a dataset.

    Attributes:
        path: image file.
        label: 0 normal, 1 anomalous.
        category: object/category name (also the text-prior object name, as the reference's ``type``).
        defect_type: ``"good"`` for normal images, else the defect folder/class name.
        mask_path: ground-truth mask file, or None (normal images, or datasets without masks).
        split: ``"train"`` or ``"test"``.
    """

    path: str
    label: int
    category: str
    defect_type: str
    mask_path: str | None
    split: str

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Skipped:
    """A file left out under ``on_error="skip"`` and why."""

    path: str
    reason: str

    @classmethod
    def from_error(cls, path: str | os.PathLike[str], error: BaseException) -> Skipped:
        """The reason is the error's message without the leading ``"<path>: "`` our errors carry."""
        path = os.fspath(path)
        reason = str(error)
        return cls(path, reason.removeprefix(f"{path}: "))


@dataclasses.dataclass
class Dataset:
    """Samples of one or more categories plus the files that were skipped while reading them."""

    samples: list[Sample]
    skipped: list[Skipped] = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self):
        return iter(self.samples)

    @property
    def categories(self) -> list[str]:
        return sorted({s.category for s in self.samples})

    def select(
        self,
        *,
        category: str | None = None,
        split: str | None = None,
        label: int | None = None,
    ) -> list[Sample]:
        """Samples matching every given field, in dataset order."""
        return [
            s
            for s in self.samples
            if (category is None or s.category == category)
            and (split is None or s.split == split)
            and (label is None or s.label == label)
        ]

    def counts(self) -> dict[str, dict[str, int]]:
        """``{category: {"train_normal", "test_normal", "test_anomalous", ...}}`` for logging."""
        out: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for s in self.samples:
            out[s.category][f"{s.split}_{'anomalous' if s.label else 'normal'}"] += 1
        return {c: dict(v) for c, v in out.items()}

    def __add__(self, other: Dataset) -> Dataset:
        return Dataset(self.samples + other.samples, self.skipped + other.skipped)


class _Problems:
    """Collects or raises problems according to ``on_error``."""

    def __init__(self, on_error: OnError):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error={on_error!r} is not supported; use 'raise' or 'skip'")
        self.on_error = on_error
        self.skipped: list[Skipped] = []

    def report(self, path: str | os.PathLike[str], reason: str) -> None:
        path = os.fspath(path)
        if self.on_error == "raise":
            raise DataError(f"{path}: {reason} (pass on_error='skip' to leave such files out with a warning)")
        warnings.warn(f"skipping {path}: {reason}", stacklevel=3)
        self.skipped.append(Skipped(path, reason))


def _require_dir(path: Path, what: str) -> None:
    if not path.exists():
        raise DataError(f"{path}: {what} does not exist; check the path")
    if not path.is_dir():
        raise DataError(f"{path}: {what} is not a folder")
    if not os.access(path, os.R_OK | os.X_OK):
        raise DataError(f"{path}: {what} is not readable; check its permissions")


def _check_file(path: Path, problems: _Problems) -> bool:
    """Cheap checks that need no decoding: exists (no broken link/loop), readable, non-empty."""
    try:
        st = path.stat()
    except OSError as e:  # broken symlink, symlink loop (ELOOP), vanished file
        problems.report(path, f"cannot be read ({e.strerror or e}); a broken link or symlink loop?")
        return False
    if st.st_size == 0:
        problems.report(path, "the file is empty (0 bytes)")
        return False
    if not os.access(path, os.R_OK):
        problems.report(path, "permission denied")
        return False
    return True


def list_images(folder: str | os.PathLike[str], problems: _Problems, recursive: bool = False) -> list[Path]:
    """Image files of ``folder`` in sorted order.

    Hidden files and common clutter (``Thumbs.db``, READMEs) are ignored silently; any other
    non-image file is a problem. Recursion follows symlinked folders but detects loops.
    """
    root = Path(folder)
    out: list[Path] = []
    seen_dirs: set[str] = set()

    def walk(d: Path) -> None:
        real = os.path.realpath(d)
        if real in seen_dirs:
            problems.report(d, "symlink loop (this folder was already visited)")
            return
        seen_dirs.add(real)
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as e:
            problems.report(d, f"folder cannot be listed ({e.strerror or e})")
            return
        for entry in entries:
            p = Path(entry.path)
            if entry.name.startswith(".") or entry.name.lower() in _IGNORED_NAMES:
                continue
            try:
                is_dir = entry.is_dir()
            except OSError as e:
                problems.report(p, f"cannot be read ({e.strerror or e}); a symlink loop?")
                continue
            if is_dir:
                if recursive:
                    walk(p)
                continue
            if p.suffix.lower() not in IMAGE_EXTENSIONS:
                if os.path.islink(p) and not os.path.exists(p):
                    problems.report(p, "broken symlink or symlink loop")
                else:
                    problems.report(
                        p, f"not an image file (extension {p.suffix or 'none'!r}) in an image folder"
                    )
                continue
            if _check_file(p, problems):
                out.append(p)

    walk(root)
    return out


def _dedupe_stems(paths: list[Path], problems: _Problems) -> list[Path]:
    """Keep one file per stem (``000.png`` + ``000.jpg`` would make the mask match ambiguous)."""
    by_stem: dict[str, list[Path]] = defaultdict(list)
    for p in paths:
        by_stem[p.stem].append(p)
    keep: list[Path] = []
    for p in paths:
        group = by_stem[p.stem]
        if len(group) > 1:
            if p is group[0]:
                keep.append(p)
            else:
                problems.report(
                    p, f"duplicate stem {p.stem!r}: {group[0].name} and {p.name} in the same folder"
                )
            continue
        keep.append(p)
    return keep


def _image_size(path: str | os.PathLike[str]) -> tuple[int, int] | None:
    """Size from the header only (no decoding); None when unreadable."""
    try:
        with Image.open(path) as im:
            return im.size
    except Exception:  # noqa: BLE001 - the decode error is reported when the image is loaded
        return None


def _match_masks(
    images: list[Path],
    mask_dir: Path | None,
    problems: _Problems,
    check_sizes: bool,
    suffixes: Sequence[str] = ("_mask", ""),
) -> dict[Path, Path | None]:
    """Pair every anomalous image with its mask (``<stem>_mask.*`` or ``<stem>.*``) and report orphans."""
    if mask_dir is None or not mask_dir.is_dir():
        return dict.fromkeys(images)
    masks = list_images(mask_dir, problems)
    by_stem: dict[str, Path] = {}
    for m in masks:
        by_stem.setdefault(m.stem, m)
    used: set[Path] = set()
    out: dict[Path, Path | None] = {}
    for img in images:
        found = None
        for suffix in suffixes:
            if img.stem + suffix in by_stem:
                found = by_stem[img.stem + suffix]
                break
        if found is None:
            problems.report(img, f"anomalous image has no mask in {mask_dir} (expected {img.stem}_mask.png)")
            if problems.on_error == "skip":
                out[img] = None  # keep the image: image-level metrics still use it
            continue
        used.add(found)
        if check_sizes:
            isz, msz = _image_size(img), _image_size(found)
            if isz is not None and msz is not None and isz != msz:
                problems.report(
                    found,
                    f"mask is {msz[0]}x{msz[1]} but its image {img} is {isz[0]}x{isz[1]}; "
                    "masks must have exactly the size of their image",
                )
                if problems.on_error == "skip":
                    out[img] = None
                continue
        out[img] = found
    for m in masks:
        if m not in used:
            problems.report(m, "mask without a matching image")
    return out


def _is_mvtec_category(path: Path) -> bool:
    return (path / "train").is_dir() or (path / "test").is_dir()


def scan_mvtec(
    root: str | os.PathLike[str],
    categories: Sequence[str] | None = None,
    *,
    on_error: OnError = "raise",
    check_mask_sizes: bool = True,
) -> Dataset:
    """Read an MVTec AD root (or any MVTec-like tree) into samples.

    Args:
        root: folder holding category folders, or one category folder itself (it has ``train/`` or
            ``test/``).
        categories: the categories to read (default: every category folder of ``root``).
        on_error: ``"raise"`` or ``"skip"`` (see the module docstring).
        check_mask_sizes: compare each mask's size with its image's (header read, no decoding).

    Returns:
        The :class:`Dataset`, categories in sorted order, then train before test, files sorted.

    Raises:
        DataError: missing root/category, empty category, and (with ``on_error="raise"``) any bad file.
    """
    root_path = Path(root)
    _require_dir(root_path, "dataset root")
    problems = _Problems(on_error)
    if _is_mvtec_category(root_path) and not categories:
        cat_dirs = {root_path.name: root_path}
    else:
        available = sorted(p.name for p in root_path.iterdir() if p.is_dir() and _is_mvtec_category(p))
        if categories:
            missing = [c for c in categories if c not in available]
            if missing:
                raise DataError(
                    f"{root_path}: categories {missing} not found; available: {available or 'none'}"
                )
            available = list(categories)
        if not available:
            raise DataError(
                f"{root_path}: no category folders with train/ or test/ found; expected "
                "<root>/<category>/{train/good,test/<defect>}"
            )
        cat_dirs = {c: root_path / c for c in available}

    samples: list[Sample] = []
    for category, cat_dir in cat_dirs.items():
        cat_samples: list[Sample] = []
        for split in ("train", "test"):
            split_dir = cat_dir / split
            if not split_dir.is_dir():
                continue
            for defect_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
                defect = defect_dir.name
                images = _dedupe_stems(list_images(defect_dir, problems), problems)
                if not images:
                    problems.report(defect_dir, "folder contains no images")
                    continue
                label = 0 if defect == NORMAL_DEFECT else 1
                masks: dict[Path, Path | None] = dict.fromkeys(images)
                if label == 1:
                    gt = cat_dir / "ground_truth" / defect
                    has_gt = (cat_dir / "ground_truth").is_dir()
                    if has_gt and not gt.is_dir():
                        problems.report(gt, f"ground_truth folder for defect {defect!r} is missing")
                    masks = _match_masks(images, gt if gt.is_dir() else None, problems, check_mask_sizes)
                for img in images:
                    if img not in masks:
                        continue
                    m = masks[img]
                    cat_samples.append(
                        Sample(str(img), label, category, defect, str(m) if m else None, split)
                    )
        if not cat_samples:
            problems.report(cat_dir, "category has no images")
            continue
        if not any(s.label == 0 for s in cat_samples):
            problems.report(cat_dir, "category has no normal images (train/good and test/good are empty)")
            continue
        samples.extend(cat_samples)
    if not samples:
        raise DataError(f"{root_path}: no usable images found")
    ds = Dataset(samples, problems.skipped)
    log.info(
        "read %d images of %d categories from %s (%d skipped)", len(ds), len(cat_dirs), root, len(ds.skipped)
    )
    return ds


# The InCTRL conversions (ELPV, SDD, AITEX, BrainMRI, HeadCT) all produce MVTec-like trees.
scan_mvtec_like = scan_mvtec


def scan_visa(
    root: str | os.PathLike[str],
    categories: Sequence[str] | None = None,
    *,
    split_csv: str | os.PathLike[str] | None = None,
    on_error: OnError = "raise",
    check_mask_sizes: bool = False,
) -> Dataset:
    """Read VisA with its official split file (``<root>/split_csv/1cls.csv``).

    The CSV has columns ``object, split, label, image, mask``; ``label`` is ``normal`` or ``anomaly``;
    paths are relative to ``root``. Anomalies get defect type ``"defect"`` (VisA has no per-image
    defect classes in the split file) and VisA masks hold class ids, binarised as non-zero.
    """
    root_path = Path(root)
    _require_dir(root_path, "VisA root")
    csv_path = Path(split_csv) if split_csv else root_path / "split_csv" / "1cls.csv"
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: VisA split file not found; pass split_csv= or use the official layout")
    problems = _Problems(on_error)
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    need = {"object", "split", "label", "image"}
    if not rows or not need <= set(rows[0]):
        raise DataError(
            f"{csv_path}: expected columns {sorted(need | {'mask'})}, got {sorted(rows[0]) if rows else []}"
        )
    wanted = set(categories) if categories else None
    if wanted:
        present = {r["object"] for r in rows}
        missing = sorted(wanted - present)
        if missing:
            raise DataError(
                f"{csv_path}: categories {missing} not in the split file; available: {sorted(present)}"
            )
    samples: list[Sample] = []
    for row in rows:
        if wanted and row["object"] not in wanted:
            continue
        img = root_path / row["image"]
        if not _check_file(img, problems):
            continue
        label = 1 if row["label"].strip().lower() in ("anomaly", "abnormal", "1") else 0
        mask_rel = (row.get("mask") or "").strip()
        mask: Path | None = None
        if label == 1:
            if not mask_rel:
                problems.report(img, "anomalous image has no mask in the split file")
            else:
                mask = root_path / mask_rel
                if not _check_file(mask, problems):
                    mask = None
                elif check_mask_sizes and _image_size(img) != _image_size(mask):
                    problems.report(mask, f"mask size differs from its image {img}")
                    mask = None
        split = "train" if row["split"].strip().lower() == "train" else "test"
        samples.append(
            Sample(
                str(img),
                label,
                row["object"],
                "defect" if label else NORMAL_DEFECT,
                str(mask) if mask else None,
                split,
            )
        )
    _check_normals(samples, problems, str(csv_path))
    return Dataset([s for s in samples if s.category not in _bad_categories(samples)], problems.skipped)


def _bad_categories(samples: Iterable[Sample]) -> set[str]:
    normals = Counter(s.category for s in samples if s.label == 0)
    return {s.category for s in samples if normals[s.category] == 0}


def _check_normals(samples: list[Sample], problems: _Problems, where: str) -> None:
    for c in sorted(_bad_categories(samples)):
        problems.report(where, f"category {c!r} has no normal images")


def scan_folder(
    normal_dir: str | os.PathLike[str],
    abnormal_dir: str | os.PathLike[str] | None = None,
    *,
    mask_dir: str | os.PathLike[str] | None = None,
    normal_test_dir: str | os.PathLike[str] | None = None,
    category: str | None = None,
    test_split_ratio: float = 0.25,
    seed: int = 42,
    on_error: OnError = "raise",
    check_mask_sizes: bool = True,
) -> Dataset:
    """Read an anomalib-style Folder layout.

    Args:
        normal_dir: normal images.
        abnormal_dir: anomalous images (test split), optional.
        mask_dir: masks of the anomalous images, matched by ``<stem>_mask.*`` or ``<stem>.*``.
        normal_test_dir: separate normal test images. Without it, a seeded ``test_split_ratio`` share of
            ``normal_dir`` becomes the normal test split (0.25 as in the InCTRL conversion scripts).
        category: category name (default: the parent folder name of ``normal_dir``).
        test_split_ratio: share of ``normal_dir`` for testing when ``normal_test_dir`` is not given.
        seed: seed of that split.
        on_error: ``"raise"`` or ``"skip"``.
        check_mask_sizes: compare mask and image sizes from the file headers.
    """
    problems = _Problems(on_error)
    ndir = Path(normal_dir)
    _require_dir(ndir, "normal folder")
    category = category or ndir.resolve().parent.name or ndir.name
    normals = _dedupe_stems(list_images(ndir, problems), problems)
    if not normals:
        raise DataError(f"{ndir}: normal folder contains no images; the few-shot references come from it")
    samples: list[Sample] = []
    if normal_test_dir is not None:
        tdir = Path(normal_test_dir)
        _require_dir(tdir, "normal test folder")
        train, test = normals, _dedupe_stems(list_images(tdir, problems), problems)
    else:
        order = np.random.default_rng(seed).permutation(len(normals))
        n_test = int(round(len(normals) * test_split_ratio))
        test_idx = set(order[:n_test].tolist())
        train = [p for i, p in enumerate(normals) if i not in test_idx]
        test = [p for i, p in enumerate(normals) if i in test_idx]
    samples += [Sample(str(p), 0, category, NORMAL_DEFECT, None, "train") for p in train]
    samples += [Sample(str(p), 0, category, NORMAL_DEFECT, None, "test") for p in test]
    if abnormal_dir is not None:
        adir = Path(abnormal_dir)
        _require_dir(adir, "abnormal folder")
        abnormal = _dedupe_stems(list_images(adir, problems), problems)
        if not abnormal:
            problems.report(adir, "abnormal folder contains no images")
        mdir = Path(mask_dir) if mask_dir is not None else None
        if mdir is not None:
            _require_dir(mdir, "mask folder")
        masks = _match_masks(abnormal, mdir, problems, check_mask_sizes, suffixes=("_mask", ""))
        for p in abnormal:
            if p in masks:
                m = masks[p]
                samples.append(Sample(str(p), 1, category, adir.name, str(m) if m else None, "test"))
    return Dataset(samples, problems.skipped)


def _infer_mvtec_mask(image_path: Path) -> Path | None:
    """``<cat>/test/<defect>/<stem>.ext`` -> ``<cat>/ground_truth/<defect>/<stem>_mask.png`` if it exists."""
    parts = image_path.parts
    if len(parts) >= 3 and parts[-3] == "test":
        cand = image_path.parents[2] / "ground_truth" / image_path.parent.name / f"{image_path.stem}_mask.png"
        if cand.is_file():
            return cand
    return None


def read_inctrl_json(
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    root: str | os.PathLike[str] | None = None,
    split: str | None = None,
    on_error: OnError = "raise",
) -> Dataset:
    """Read official InCTRL JSON lists (``[{"image_path", "target", "type"}]``), several may be given.

    Args:
        paths: one JSON file or several (concatenated, as the official training does).
        root: folder that relative ``image_path`` values are relative to (default: the current
            directory, as the official code, then the JSON file's folder).
        split: ``"train"`` or ``"test"`` for every entry (default: ``"test"`` for files whose name
            contains ``val``, else ``"train"``).
        on_error: ``"raise"`` or ``"skip"``.

    The defect type is the image's parent folder name when it looks MVTec-like, and masks are
    found at the MVTec location when present.
    """
    files = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    problems = _Problems(on_error)
    samples: list[Sample] = []
    for jf in map(Path, files):
        if not jf.is_file():
            raise DataError(f"{jf}: InCTRL JSON list not found")
        try:
            entries = json.loads(jf.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{jf}: not valid JSON ({e})") from e
        if not isinstance(entries, list):
            raise DataError(f"{jf}: expected a JSON list of {{image_path, target, type}} objects")
        file_split = split or ("test" if "val" in jf.stem.lower() else "train")
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or not {"image_path", "target", "type"} <= set(entry):
                raise DataError(f"{jf}: entry {i} lacks one of the keys image_path, target, type: {entry!r}")
            raw = Path(entry["image_path"])
            candidates = (
                [raw] if raw.is_absolute() else [Path(root) / raw] if root else [raw, jf.parent / raw]
            )
            img = next((c for c in candidates if c.exists()), candidates[0])
            if not _check_file(img, problems):
                continue
            label = int(entry["target"])
            if label not in (0, 1):
                raise DataError(
                    f"{jf}: entry {i} has target {entry['target']!r}; use 0 (normal) or 1 (anomalous)"
                )
            defect = (
                NORMAL_DEFECT
                if label == 0
                else (img.parent.name if img.parent.name != NORMAL_DEFECT else "defect")
            )
            mask = _infer_mvtec_mask(img) if label == 1 else None
            samples.append(
                Sample(str(img), label, str(entry["type"]), defect, str(mask) if mask else None, file_split)
            )
    return Dataset(samples, problems.skipped)
