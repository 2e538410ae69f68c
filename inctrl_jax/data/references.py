"""Few-shot reference sets: the K normal images a query is compared with.

A :class:`ReferenceSet` always carries the list of files it was made of, so every result can record
exactly which references produced it (:meth:`ReferenceSet.to_dict`). Sources:

* :func:`select_references`: K normal training images of a category chosen with a seed;
* :func:`references_from_paths` / :func:`references_from_folder`: the user's own choice;
* :func:`load_prompt_file`: the official InCTRL ``.pt`` prompt files (lists of preprocessed
  ``[3, S, S]`` tensors), read through the ``torch`` extra.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from inctrl_jax.data.layouts import DataError, Dataset, Sample, _Problems, list_images
from inctrl_jax.data.preprocess import Fit, load_image


@dataclasses.dataclass(frozen=True)
class ReferenceSet:
    """K normal reference images of one category, by file.

    Attributes:
        category: the category the references belong to.
        paths: the reference image files, in order.
        seed: the seed they were drawn with (None when chosen by the user).
        source: how they were chosen (``"seeded"``, ``"paths"``, ``"folder:<dir>"``, ``"prompt_file:<f>"``).
    """

    category: str
    paths: tuple[str, ...]
    seed: int | None = None
    source: str = "paths"

    @property
    def k(self) -> int:
        return len(self.paths)

    def load(self, image_size: int = 240, fit: Fit = "crop") -> np.ndarray:
        """The preprocessed references, ``[K, S, S, 3]`` float32."""
        return np.stack([load_image(p, image_size, fit) for p in self.paths])

    def to_dict(self) -> dict[str, object]:
        """JSON-ready record for results files."""
        return {
            "category": self.category,
            "k": self.k,
            "seed": self.seed,
            "source": self.source,
            "paths": list(self.paths),
        }

    @classmethod
    def from_dict(cls, d: dict) -> ReferenceSet:
        return cls(
            str(d["category"]), tuple(map(str, d["paths"])), d.get("seed"), str(d.get("source", "paths"))
        )


def normal_pool(
    samples: Dataset | Sequence[Sample], category: str, splits: Sequence[str] = ("train",)
) -> list[str]:
    """Sorted paths of the normal images of ``category`` in ``splits``."""
    return sorted(s.path for s in samples if s.category == category and s.label == 0 and s.split in splits)


def select_references(
    samples: Dataset | Sequence[Sample],
    category: str,
    k: int,
    seed: int = 0,
    *,
    splits: Sequence[str] = ("train",),
    exclude: Sequence[str] = (),
) -> ReferenceSet:
    """Choose K normal reference images of ``category`` with a seed.

    The pool is the sorted list of normal images of ``splits`` (default: the training split, so the
    references never overlap the test set) minus ``exclude``; ``K`` distinct images are drawn with
    ``numpy.random.default_rng(seed)``. The same (pool, K, seed) always gives the same files.

    Raises:
        DataError: the category has no normal images, or fewer than K.
    """
    if k < 1:
        raise ValueError(f"k={k}: the number of reference images must be at least 1")
    excluded = set(map(str, exclude))
    pool = [p for p in normal_pool(samples, category, splits) if p not in excluded]
    if not pool:
        cats = sorted({s.category for s in samples})
        raise DataError(
            f"category {category!r} has no normal images in split(s) {list(splits)} to draw references from "
            f"(categories present: {cats}); add images to <category>/train/good or pass references explicitly"
        )
    if k > len(pool):
        raise DataError(
            f"category {category!r}: K={k} references requested but only {len(pool)} normal images in "
            f"split(s) {list(splits)}; lower K or add normal images"
        )
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(pool), size=k, replace=False).tolist())
    return ReferenceSet(category, tuple(pool[i] for i in chosen), seed, "seeded")


def references_from_paths(paths: Sequence[str | os.PathLike[str]], category: str) -> ReferenceSet:
    """A reference set from an explicit list of files (each must exist)."""
    out = []
    for p in paths:
        if not Path(p).is_file():
            raise DataError(f"{p}: reference image not found")
        out.append(os.fspath(p))
    if not out:
        raise DataError("the list of reference images is empty; give at least one file")
    return ReferenceSet(category, tuple(out), None, "paths")


def references_from_folder(
    folder: str | os.PathLike[str], category: str, k: int | None = None
) -> ReferenceSet:
    """All images of ``folder`` (sorted), or the first ``k`` of them."""
    if not Path(folder).is_dir():
        raise DataError(f"{folder}: reference folder does not exist")
    paths = [str(p) for p in list_images(folder, _Problems("raise"))]
    if not paths:
        raise DataError(f"{folder}: reference folder contains no images")
    if k is not None:
        if k > len(paths):
            raise DataError(
                f"{folder}: K={k} references requested but the folder has only {len(paths)} images"
            )
        paths = paths[:k]
    return ReferenceSet(category, tuple(paths), None, f"folder:{os.fspath(folder)}")


def load_prompt_file(path: str | os.PathLike[str]) -> np.ndarray:
    """Load an official InCTRL few-shot prompt file (``{few_shot_dir}/{category}.pt``).

    The file is a ``torch.save``-d list of K preprocessed ``[3, S, S]`` float tensors (a stacked
    ``[K, 3, S, S]`` tensor is accepted too). Loaded with ``weights_only=True``.

    Returns:
        ``[K, S, S, 3]`` float32 (NHWC), ready to use as references without further preprocessing.

    Raises:
        ImportError: torch is not installed (``pip install 'inctrl_jax[torch]'``).
        DataError: the file is missing or does not hold such tensors.
    """
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            "reading official .pt prompt files needs torch: pip install 'inctrl_jax[torch]'"
        ) from e
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: prompt file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for bad pickles
        raise DataError(f"{path}: cannot be read as a torch prompt file ({e})") from e
    tensors = (
        list(obj)
        if isinstance(obj, (list, tuple))
        else ([*obj] if torch.is_tensor(obj) and obj.ndim == 4 else None)
    )
    if not tensors or not all(torch.is_tensor(t) and t.ndim == 3 and t.shape[0] == 3 for t in tensors):
        raise DataError(
            f"{path}: expected a list of K preprocessed [3, S, S] tensors (official InCTRL prompt file)"
        )
    arr = np.stack([t.detach().to(torch.float32).numpy() for t in tensors])
    return np.ascontiguousarray(arr.transpose(0, 2, 3, 1))
