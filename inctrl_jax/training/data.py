"""Auxiliary training data: one or several datasets in any layout :mod:`inctrl_jax.data` reads.

Like the reference's training jsons, a whole dataset is auxiliary data: every normal image
(``train/good`` and ``test/good``) is a normal sample and every test anomaly an outlier. The data
layer's scanners already return exactly that (all splits of the requested categories), so this
module only turns the config's dataset entries into scanner calls and merges the results; the
balanced per-query sampling is :class:`inctrl_jax.data.BalancedEpisodeSampler`.

A dataset entry is a string ``"<layout>:<path>[:<names>]"``:

* ``mvtec:<root or category folder>[:bottle,cable]``: MVTec AD or any MVTec-like tree
  (:func:`inctrl_jax.data.scan_mvtec`); default: every category folder.
* ``visa:<VisA root>[:candle,pcb1]``: VisA with ``split_csv/1cls.csv`` (:func:`inctrl_jax.data.scan_visa`).
* ``json:<file or folder>[:types]``: official InCTRL JSON lists (:func:`inctrl_jax.data.read_inctrl_json`);
  a folder means its ``*_normal.json`` and ``*_outlier.json`` (the ``*_val_*`` lists are not training data).
* ``folder:<normal dir>,<abnormal dir>[:<category>]``: an anomalib-style Folder layout
  (:func:`inctrl_jax.data.scan_folder`); all its normal images are used.

Relative paths are taken relative to ``config.data.root``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

from inctrl_jax.data import DataError, Dataset, read_inctrl_json, scan_folder, scan_mvtec, scan_visa
from inctrl_jax.data.layouts import OnError

log = logging.getLogger(__name__)

LAYOUTS = ("mvtec", "visa", "json", "folder")


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """One ``config.data.datasets`` entry, parsed."""

    layout: str
    paths: tuple[Path, ...]
    names: tuple[str, ...]
    """Categories to read (``mvtec``, ``visa``, ``json``) or the category name (``folder``)."""


def parse_dataset_spec(entry: str, root: str | Path = "") -> DatasetSpec:
    """Parses ``"<layout>:<path>[:<names>]"`` (see the module docstring).

    Raises:
      DataError: unknown layout, missing path, or a ``folder`` entry without two directories.
    """
    layout, sep, rest = entry.partition(":")
    if not sep or layout not in LAYOUTS or not rest:
        raise DataError(
            f"config.data.datasets entry {entry!r}: write '<layout>:<path>[:<categories>]' with layout one of "
            f"{LAYOUTS}, e.g. 'mvtec:/data/mvtec_ad' or 'visa:/data/VisA:candle,pcb1'"
        )
    path_part, _, names_part = rest.partition(":")
    names = tuple(n.strip() for n in names_part.split(",") if n.strip())
    raw = [p for p in path_part.split(",")] if layout == "folder" else [path_part]
    paths = tuple(Path(root) / p if root and not Path(p).is_absolute() else Path(p) for p in raw)
    if layout == "folder" and len(paths) != 2:
        raise DataError(
            f"config.data.datasets entry {entry!r}: a folder dataset needs '<normal dir>,<abnormal dir>' "
            "(training needs anomalous images)"
        )
    if layout == "folder" and len(names) > 1:
        raise DataError(f"config.data.datasets entry {entry!r}: a folder dataset takes one category name")
    for p in paths:
        if not p.exists():
            raise DataError(
                f"config.data.datasets entry {entry!r}: {p} does not exist"
                + (f" (relative paths are taken from config.data.root={str(root)!r})" if root else "")
            )
    return DatasetSpec(layout, paths, names)


def _json_training_lists(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(
        f
        for f in path.glob("*.json")
        if (f.stem.endswith("_normal") or f.stem.endswith("_outlier")) and "_val_" not in f.stem
    )
    if not files:
        raise DataError(f"{path}: no InCTRL training lists (*_normal.json, *_outlier.json) in this folder")
    return files


def read_dataset(spec: DatasetSpec, on_error: OnError = "raise") -> Dataset:
    """All samples of one dataset entry (every split: the reference trains on whole datasets)."""
    names = list(spec.names) or None
    if spec.layout == "mvtec":
        return scan_mvtec(spec.paths[0], names, on_error=on_error)
    if spec.layout == "visa":
        return scan_visa(spec.paths[0], names, on_error=on_error)
    if spec.layout == "json":
        ds = read_inctrl_json(_json_training_lists(spec.paths[0]), on_error=on_error)
        if names:
            missing = sorted(set(names) - set(ds.categories))
            if missing:
                raise DataError(
                    f"{spec.paths[0]}: types {missing} not in the lists; present: {ds.categories}"
                )
            ds = Dataset([s for s in ds if s.category in names], ds.skipped)
        return ds
    normal_dir, abnormal_dir = spec.paths
    return scan_folder(normal_dir, abnormal_dir, category=names[0] if names else None, on_error=on_error)


def load_training_set(entries: Sequence[str], root: str | Path = "", on_error: OnError = "raise") -> Dataset:
    """Reads and merges every ``config.data.datasets`` entry.

    Raises:
      DataError: no entries, an unreadable entry, an image listed twice, or one category name in two
        entries (their references and text prior would silently mix).
    """
    if not entries:
        raise DataError(
            "config.data.datasets is empty: list at least one auxiliary dataset, e.g. "
            "--config.data.datasets='(\"mvtec:/data/mvtec_ad\",)'"
        )
    merged = Dataset([])
    owner: dict[str, str] = {}
    for entry in entries:
        ds = read_dataset(parse_dataset_spec(entry, root), on_error)
        for category in ds.categories:
            if category in owner:
                raise DataError(
                    f"category {category!r} comes from both {owner[category]!r} and {entry!r} in "
                    "config.data.datasets; list it once"
                )
            owner[category] = entry
        merged = merged + ds
    seen: set[str] = set()
    for s in merged:
        if s.path in seen:
            raise DataError(f"{s.path} is listed twice in the training data; remove the duplicate entry")
        seen.add(s.path)
    return merged


def summary(data: Dataset) -> str:
    """``N images in C categories (name: n normal / m anomalous; ...)`` for the log."""
    parts = []
    for category in data.categories:
        n_normal = sum(1 for s in data if s.category == category and s.label == 0)
        n_anomalous = sum(1 for s in data if s.category == category and s.label == 1)
        parts.append(f"{category}: {n_normal} normal / {n_anomalous} anomalous")
    return f"{len(data)} images in {len(data.categories)} categories ({'; '.join(parts)})"
