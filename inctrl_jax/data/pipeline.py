"""grain input pipelines: fixed-shape numpy batches, threaded decoding, deterministic order.

* :func:`eval_batches`: the samples in order, decoded by a thread pool, batched to a fixed
  ``batch_size``; the last batch is padded and ``batch["valid"]`` marks real rows, so a jitted
  function never sees a new shape.
* :func:`train_batches`: the :class:`~inctrl_jax.data.sampling.BalancedEpisodeSampler` episodes,
  decoded (queries ``[B, S, S, 3]`` and references ``[B, K, S, S, 3]``); the returned grain iterator
  has ``get_state()``/``set_state()`` for checkpoints.

Decode failures follow ``on_error``: ``"raise"`` stops with the file name; ``"skip"`` warns, returns
zeros for that row with ``valid`` False and records the file in ``source.failures``, so the rest of
the run continues and nothing computed is lost.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import numpy as np

from inctrl_jax.data.layouts import Dataset, OnError, Sample, Skipped
from inctrl_jax.data.preprocess import Fit, ImageDecodeError, load_mask, open_image, preprocess_with_geometry
from inctrl_jax.data.sampling import BalancedEpisodeSampler

log = logging.getLogger(__name__)


class SampleSource:
    """Random-access source of decoded samples (a grain data source: ``__len__``/``__getitem__``).

    Each record is ``{"image" [S,S,3] f32, "label" i32, "index" i32, "valid" bool}`` plus
    ``"mask" [S,S] u8`` with ``with_masks`` (zeros for normal images and images without masks).
    """

    def __init__(
        self,
        samples: Dataset | Sequence[Sample],
        image_size: int = 240,
        *,
        fit: Fit = "crop",
        with_masks: bool = False,
        on_error: OnError = "raise",
    ):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error={on_error!r} is not supported; use 'raise' or 'skip'")
        self.samples = list(samples)
        self.image_size, self.fit, self.with_masks, self.on_error = image_size, fit, with_masks, on_error
        self.failures: list[Skipped] = []
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.samples)

    def empty_record(self, index: int = -1) -> dict[str, Any]:
        s = self.image_size
        rec = {
            "image": np.zeros((s, s, 3), np.float32),
            "label": np.int32(0),
            "index": np.int32(index),
            "valid": np.bool_(False),
        }
        if self.with_masks:
            rec["mask"] = np.zeros((s, s), np.uint8)
        return rec

    def load_pixels(self, index: int) -> np.ndarray | None:
        """The preprocessed image of sample ``index`` (None when skipped under ``on_error="skip"``)."""
        return self._load(index)[0]

    def _load(self, index: int):
        sample = self.samples[index]
        try:
            image = open_image(sample.path)
            try:
                pixels, geom = preprocess_with_geometry(image, self.image_size, self.fit)
            except ValueError as e:
                raise ImageDecodeError(f"{sample.path}: {e}") from e
            mask = None
            if self.with_masks:
                mask = np.zeros((self.image_size, self.image_size), np.uint8)
                if sample.mask_path is not None:
                    mask = load_mask(sample.mask_path, geom)
            return pixels, mask
        except ImageDecodeError as e:
            if self.on_error == "raise":
                raise
            warnings.warn(f"skipping {sample.path}: {e}", stacklevel=2)
            with self._lock:
                self.failures.append(Skipped.from_error(sample.path, e))
            return None, None

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if index >= len(self.samples):  # padding rows of the last batch
            return self.empty_record(-1)
        pixels, mask = self._load(index)
        if pixels is None:
            return self.empty_record(index)
        rec = {
            "image": pixels,
            "label": np.int32(self.samples[index].label),
            "index": np.int32(index),
            "valid": np.bool_(True),
        }
        if self.with_masks:
            rec["mask"] = mask
        return rec


def _read_options(num_threads: int, prefetch: int) -> grain.ReadOptions:
    return grain.ReadOptions(num_threads=max(1, num_threads), prefetch_buffer_size=max(1, prefetch))


def eval_batches(
    samples: Dataset | Sequence[Sample] | SampleSource,
    batch_size: int,
    image_size: int = 240,
    *,
    fit: Fit = "crop",
    with_masks: bool = False,
    on_error: OnError = "raise",
    num_threads: int = 4,
    prefetch: int = 8,
) -> Iterator[dict[str, np.ndarray]]:
    """Fixed-shape batches of the samples, in order.

    Every batch has ``batch_size`` rows: ``image [B,S,S,3]``, ``label [B]``, ``index [B]`` (position in
    ``samples``, -1 for padding), ``valid [B]`` and optionally ``mask [B,S,S]``.
    """
    source = (
        samples
        if isinstance(samples, SampleSource)
        else SampleSource(samples, image_size, fit=fit, with_masks=with_masks, on_error=on_error)
    )
    n = len(source)
    n_padded = -(-n // batch_size) * batch_size
    ds = grain.MapDataset.range(n_padded).map(source.__getitem__).batch(batch_size, drop_remainder=True)
    return iter(ds.to_iter_dataset(_read_options(num_threads, prefetch)))


class _EpisodeLoader:
    """Decodes one episode (queries + per-query references) from a :class:`SampleSource`."""

    def __init__(self, sampler: BalancedEpisodeSampler, source: SampleSource):
        self.sampler, self.source = sampler, source

    def __call__(self, step: int) -> dict[str, Any]:
        ep = self.sampler.episode(int(step))
        s = self.source.image_size
        cache: dict[int, np.ndarray | None] = {}

        def get(i: int) -> np.ndarray | None:
            if i not in cache:
                cache[i] = self.source.load_pixels(i)
            return cache[i]

        b, k = ep.references.shape
        queries = np.zeros((b, s, s, 3), np.float32)
        refs = np.zeros((b, k, s, s, 3), np.float32)
        valid = np.ones(b, bool)
        for j in range(b):
            q = get(int(ep.query[j]))
            if q is None:
                valid[j] = False
            else:
                queries[j] = q
            for t in range(k):
                r = get(int(ep.references[j, t]))
                if r is None:
                    valid[j] = False
                else:
                    refs[j, t] = r
        return {
            "step": np.int64(ep.step),
            "query": queries,
            "references": refs,
            "label": ep.label,
            "valid": valid,
            "query_index": ep.query,
            "reference_index": ep.references,
            "category": np.array(ep.category),
        }


def train_batches(
    sampler: BalancedEpisodeSampler,
    image_size: int = 240,
    *,
    fit: Fit = "crop",
    on_error: OnError = "raise",
    num_steps: int | None = None,
    num_threads: int = 2,
    prefetch: int = 2,
) -> grain.DatasetIterator:
    """Decoded training episodes for steps ``0 .. num_steps-1`` (default ``len(sampler)``).

    Returns a grain iterator; save ``it.get_state()`` with the model checkpoint and call
    ``it.set_state(state)`` on a fresh iterator to resume with exactly the same batches.
    """
    source = SampleSource(sampler.samples, image_size, fit=fit, on_error=on_error)
    steps = len(sampler) if num_steps is None else num_steps
    ds = grain.MapDataset.range(steps).map(_EpisodeLoader(sampler, source))
    return iter(ds.to_iter_dataset(_read_options(num_threads, prefetch)))
