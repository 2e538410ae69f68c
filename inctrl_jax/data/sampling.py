"""Training sampling as in the reference (inctrl-reference.md section 5).

Every step takes ``B/2`` normal queries then ``B/2`` anomalous queries, each read from an endless
stream of seeded permutations of the normal / anomalous index lists. Every query gets K references
drawn uniformly without replacement from the normal pool of its own category; as in the reference a
normal query may be among its own references unless ``exclude_query=True``.

The batch of step ``t`` is a pure function of ``(seed, t)``: permutation ``e`` of a stream comes from
``default_rng([seed, stream, e])`` and the references of query ``j`` from
``default_rng([seed, 2, t, j])``. So the iterator state is just ``{"step": t}`` (plus the seed, checked
on restore): it is checkpointable, resumes exactly, and any step can be computed directly, which
also makes the sampler a random-access grain source (:meth:`BalancedEpisodeSampler.__getitem__`).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from inctrl_jax.data.layouts import DataError, Dataset, Sample

_NORMAL_STREAM, _ANOMALOUS_STREAM, _REFERENCES = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class Episode:
    """Indices (into the sampler's sample list) of one training step.

    Attributes:
        step: the step number.
        query: ``[B]`` query indices, ``B/2`` normal then ``B/2`` anomalous.
        label: ``[B]`` int32 labels (0 then 1).
        references: ``[B, K]`` reference indices, each row from the query's category.
        category: the ``B`` category names.
    """

    step: int
    query: np.ndarray
    label: np.ndarray
    references: np.ndarray
    category: tuple[str, ...]


class BalancedEpisodeSampler:
    """Seeded, deterministic, checkpointable balanced sampler with per-query references.

    Args:
        samples: the training samples (normals and anomalies; typically all of an auxiliary dataset).
        k: references per query (fixed at training time, as in the reference).
        batch_size: even batch size (the reference uses 16: 8 normal + 8 anomalous).
        seed: seed of every random choice.
        exclude_query: never use a normal query as one of its own references.
        num_steps: length when used as a finite sequence (``len``); iteration itself is endless.

    Raises:
        DataError: no normal or no anomalous samples, a category with no normal images, or fewer
            normal images in a category than K (K + 1 with ``exclude_query``).
    """

    def __init__(
        self,
        samples: Dataset | Sequence[Sample],
        k: int,
        batch_size: int = 16,
        seed: int = 10,
        *,
        exclude_query: bool = False,
        num_steps: int = 1000,
    ):
        self.samples = list(samples)
        if batch_size < 2 or batch_size % 2:
            raise ValueError(f"batch_size={batch_size}: must be even (half normal, half anomalous)")
        if k < 1:
            raise ValueError(f"k={k}: the number of references must be at least 1")
        self.k, self.batch_size, self.seed = k, batch_size, seed
        self.exclude_query, self.num_steps = exclude_query, num_steps
        self.normal_idx = np.array([i for i, s in enumerate(self.samples) if s.label == 0], np.int64)
        self.anomalous_idx = np.array([i for i, s in enumerate(self.samples) if s.label == 1], np.int64)
        if not len(self.normal_idx):
            raise DataError("training samples contain no normal images; balanced batches need both classes")
        if not len(self.anomalous_idx):
            raise DataError(
                "training samples contain no anomalous images; balanced batches need both classes"
            )
        pools: dict[str, list[int]] = defaultdict(list)
        for i in self.normal_idx.tolist():
            pools[self.samples[i].category].append(i)
        self.pools = {c: np.array(v, np.int64) for c, v in pools.items()}
        need = k + 1 if exclude_query else k
        for c in sorted({s.category for s in self.samples}):
            n = len(self.pools.get(c, ()))
            if n == 0:
                raise DataError(f"category {c!r} has no normal images, so its queries cannot get references")
            if n < need:
                raise DataError(
                    f"category {c!r} has {n} normal images but each query needs K={k} distinct references"
                    + (" other than itself" if exclude_query else "")
                    + "; lower K or add normal images"
                )
        self._step = 0

    # -- pure, random-access part ------------------------------------------------------------
    def _stream(self, indices: np.ndarray, stream: int, start: int, count: int) -> np.ndarray:
        n = len(indices)
        out = np.empty(count, np.int64)
        pos = start
        filled = 0
        while filled < count:
            epoch, offset = divmod(pos, n)
            perm = np.random.default_rng([self.seed, stream, epoch]).permutation(n)
            take = min(count - filled, n - offset)
            out[filled : filled + take] = indices[perm[offset : offset + take]]
            filled += take
            pos += take
        return out

    def episode(self, step: int) -> Episode:
        """The batch of ``step`` (independent of the iterator position)."""
        half = self.batch_size // 2
        query = np.concatenate(
            [
                self._stream(self.normal_idx, _NORMAL_STREAM, step * half, half),
                self._stream(self.anomalous_idx, _ANOMALOUS_STREAM, step * half, half),
            ]
        )
        refs = np.empty((self.batch_size, self.k), np.int64)
        for j, q in enumerate(query.tolist()):
            pool = self.pools[self.samples[q].category]
            if self.exclude_query:
                pool = pool[pool != q]
            rng = np.random.default_rng([self.seed, _REFERENCES, step, j])
            refs[j] = pool[rng.choice(len(pool), size=self.k, replace=False)]
        label = np.array([0] * half + [1] * half, np.int32)
        return Episode(step, query, label, refs, tuple(self.samples[q].category for q in query.tolist()))

    def __len__(self) -> int:
        return self.num_steps

    def __getitem__(self, step: int) -> Episode:
        return self.episode(int(step))

    # -- iterator with checkpointable state --------------------------------------------------
    def __iter__(self) -> BalancedEpisodeSampler:
        return self

    def __next__(self) -> Episode:
        ep = self.episode(self._step)
        self._step += 1
        return ep

    def get_state(self) -> dict[str, int]:
        """Checkpointable iterator state (JSON-serialisable)."""
        return {"step": self._step, "seed": self.seed}

    def set_state(self, state: dict[str, int]) -> None:
        """Resume from :meth:`get_state`; the seed must match the one this sampler was built with."""
        if int(state.get("seed", self.seed)) != self.seed:
            raise ValueError(
                f"sampler state was saved with seed {state['seed']} but this sampler uses seed {self.seed}; "
                "build the sampler with the checkpoint's seed"
            )
        self._step = int(state["step"])
