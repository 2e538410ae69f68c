"""Auxiliary training data and the balanced query/reference sampler.

The reference protocol draws every step 8 normal then 8 anomalous queries from endless streams
of random permutations, and gives each query K normal reference images of its own category,
drawn without replacement from all normal images of that category (the query itself may be
among them). Here every random choice is a pure function of ``(seed, step)``, so the sampler
state is just the step number and a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

# Independent random streams derived from the run seed.
_NORMAL_STREAM, _ANOMALY_STREAM, _REFERENCE_STREAM = 0, 1, 2


class DataConfigError(ValueError):
    """The training data named in the config cannot be used; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class TrainingSet:
    """Every image of the auxiliary datasets: paths, labels (0 normal, 1 anomalous) and category."""

    paths: tuple[str, ...]
    labels: np.ndarray  # [N] int32
    categories: np.ndarray  # [N] int32, index into ``category_names``
    category_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def normal_indices(self) -> np.ndarray:
        return np.flatnonzero(self.labels == 0)

    @property
    def anomaly_indices(self) -> np.ndarray:
        return np.flatnonzero(self.labels == 1)

    def normals_of(self, category: int) -> np.ndarray:
        return np.flatnonzero((self.labels == 0) & (self.categories == category))

    def summary(self) -> str:
        parts = []
        for c, name in enumerate(self.category_names):
            sel = self.categories == c
            parts.append(
                f"{name}: {int((self.labels[sel] == 0).sum())} normal / {int(self.labels[sel].sum())} anomalous"
            )
        return f"{len(self)} images in {len(self.category_names)} categories ({'; '.join(parts)})"


def _images_in(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def scan_category(category_dir: Path) -> tuple[list[Path], list[Path]]:
    """Normal and anomalous images of one MVTec-layout category folder.

    Like the reference's training jsons, the whole category is auxiliary data: ``train/good`` and
    ``test/good`` are normal, every other ``test/<defect>`` folder is anomalous.
    """
    normals = _images_in(category_dir / "train" / "good") + _images_in(category_dir / "test" / "good")
    anomalies: list[Path] = []
    test_dir = category_dir / "test"
    if test_dir.is_dir():
        for defect in sorted(d for d in test_dir.iterdir() if d.is_dir() and d.name != "good"):
            anomalies += _images_in(defect)
    return normals, anomalies


def build_training_set(root: str | Path, categories: Sequence[str]) -> TrainingSet:
    """Scan ``root/<category>`` folders (MVTec layout) into one training set.

    Args:
      root: data root; category entries are relative to it (absolute paths are used as is).
      categories: category folders, e.g. ``("elpv/elpv", "headct/headct")``. The folder name
        (last path component) is the category name used for the text prior and for drawing
        references.

    Raises:
      DataConfigError: a folder is missing or holds no images, or two entries share a name.
    """
    if not categories:
        raise DataConfigError("config.data.categories is empty: list at least one auxiliary category folder")
    paths: list[str] = []
    labels: list[int] = []
    cats: list[int] = []
    names: list[str] = []
    for entry in categories:
        folder = Path(root) / entry
        if not folder.is_dir():
            raise DataConfigError(
                f"config.data.categories entry {entry!r}: folder {folder} does not exist "
                f"(check config.data.root={str(root)!r})"
            )
        name = folder.name
        if name in names:
            raise DataConfigError(f"config.data.categories names category {name!r} twice")
        normals, anomalies = scan_category(folder)
        if not normals and not anomalies:
            raise DataConfigError(
                f"config.data.categories entry {entry!r}: no images under {folder}/train/good or {folder}/test/*"
            )
        c = len(names)
        names.append(name)
        for p in normals:
            paths.append(str(p))
            labels.append(0)
            cats.append(c)
        for p in anomalies:
            paths.append(str(p))
            labels.append(1)
            cats.append(c)
    return TrainingSet(
        paths=tuple(paths),
        labels=np.asarray(labels, np.int32),
        categories=np.asarray(cats, np.int32),
        category_names=tuple(names),
    )


def check_training_set(data: TrainingSet, k: int) -> None:
    """Fail early when the protocol cannot be run on ``data`` with ``k`` references per query."""
    if len(data.normal_indices) == 0:
        raise DataConfigError("the training set has no normal images (train/good, test/good are empty)")
    if len(data.anomaly_indices) == 0:
        raise DataConfigError("the training set has no anomalous images (no test/<defect> folders)")
    for c, name in enumerate(data.category_names):
        n = len(data.normals_of(c))
        if n < k:
            raise DataConfigError(
                f"category {name!r} has {n} normal images but config.model.k={k} references are drawn per query "
                f"without replacement: lower config.model.k or remove the category"
            )


@dataclasses.dataclass(frozen=True)
class Batch:
    """Indices into the training set for one step."""

    query: np.ndarray  # [B] int32, normals first then anomalies
    references: np.ndarray  # [B, K] int32, normal images of the query's category
    labels: np.ndarray  # [B] int32


class BalancedSampler:
    """Deterministic balanced sampler; its whole state is the next step number.

    Args:
      data: the training set.
      k: references per query.
      normal_per_step: normal queries per step (reference: 8).
      anomalous_per_step: anomalous queries per step (reference: 8).
      seed: run seed (reference: 10).
    """

    def __init__(self, data: TrainingSet, k: int, normal_per_step: int, anomalous_per_step: int, seed: int):
        check_training_set(data, k)
        self.data = data
        self.k = k
        self.normal_per_step = normal_per_step
        self.anomalous_per_step = anomalous_per_step
        self.seed = seed
        self._normals = data.normal_indices
        self._anomalies = data.anomaly_indices
        self._normals_by_category = [data.normals_of(c) for c in range(len(data.category_names))]
        self.step = 0

    # Checkpointable state.
    def get_state(self) -> dict:
        return {"step": int(self.step), "seed": int(self.seed)}

    def set_state(self, state: dict) -> None:
        if int(state["seed"]) != self.seed:
            raise ValueError(
                f"sampler state was saved with seed {state['seed']}, this run uses seed {self.seed}"
            )
        self.step = int(state["step"])

    def _stream(self, pool: np.ndarray, stream: int, start: int, count: int) -> np.ndarray:
        """Items ``start .. start+count`` of an endless concatenation of permutations of ``pool``."""
        n = len(pool)
        out = np.empty(count, np.int64)
        for i in range(count):
            epoch, pos = divmod(start + i, n)
            if i == 0 or pos == 0:
                perm = np.random.default_rng([self.seed, stream, epoch]).permutation(n)
            out[i] = pool[perm[pos]]
        return out

    def batch_at(self, step: int) -> Batch:
        """The batch of a given step (pure function of seed and step)."""
        normals = self._stream(
            self._normals, _NORMAL_STREAM, step * self.normal_per_step, self.normal_per_step
        )
        anomalies = self._stream(
            self._anomalies, _ANOMALY_STREAM, step * self.anomalous_per_step, self.anomalous_per_step
        )
        query = np.concatenate([normals, anomalies])
        rng = np.random.default_rng([self.seed, _REFERENCE_STREAM, step])
        refs = np.stack(
            [
                rng.choice(self._normals_by_category[self.data.categories[q]], self.k, replace=False)
                for q in query
            ]
        )
        labels = np.concatenate([np.zeros(len(normals), np.int32), np.ones(len(anomalies), np.int32)])
        return Batch(query=query.astype(np.int32), references=refs.astype(np.int32), labels=labels)

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        batch = self.batch_at(self.step)
        self.step += 1
        return batch
