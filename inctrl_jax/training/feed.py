"""Per-step batches from the feature cache, on the mesh, in the layout the train step consumes.

Each step needs the cached features of its 16 queries and of their K references each (~115 MB
for the paper backbone in float32). Two ways to get them there:

- ``"device"``: the cache is copied once to every device (replicated) and each step sends only
  the image indices; a jitted gather (``jnp.take``) builds the batch where the step runs. No
  per-step host copy at all.
- ``"host"``: the cache stays in host memory (or memory-mapped on disk) and a background thread
  gathers the next step's batch straight into the step's layout while the current step runs.
  The buffers are 64-byte aligned, so on CPU devices ``jax.device_put`` adopts them without a copy.

``"auto"`` picks ``"host"`` on CPU devices (measured for the paper backbone on 2 cores: XLA's CPU
gather of a step's ~115 MB takes 60-85 ms, the aligned host gather ~20 ms on the read-ahead
thread and no copy into the device) and ``"device"`` on accelerators when a copy of the cache
fits comfortably (see :func:`choose_placement`). Both give bitwise the same batches (gathers and
exact float16 -> float32 casts), and batches depend only on the step number
(:meth:`BalancedEpisodeSampler.episode`), so the sampler's checkpointed state and exact resume
are unaffected by reading ahead.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from inctrl_jax.data import BalancedEpisodeSampler, Episode
from inctrl_jax.training.feature_cache import FeatureCache, format_bytes
from inctrl_jax.training.step import put_batch, shardings

log = logging.getLogger(__name__)

PLACEMENTS = ("auto", "device", "host")

DEVICE_MEMORY_SHARE = 0.5
"""Accelerators: the cache goes to the device when it takes at most this share of its memory."""

ALIGNMENT = 64
"""Bytes; host batches aligned like this are used in place by the CPU client (no copy)."""


def choose_placement(placement: str, cache_bytes: int, mesh: Mesh) -> str:
    """Resolves ``config.cache.placement`` (``"auto"``, ``"device"``, ``"host"``) to device or host.

    ``"auto"``: host on CPU devices; on accelerators, device when the cache takes at most
    :data:`DEVICE_MEMORY_SHARE` of a device's memory (or when the device does not report it).
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"config.cache.placement={placement!r}; use one of {PLACEMENTS}")
    if placement != "auto":
        return placement
    device = mesh.devices.flat[0]
    if device.platform == "cpu":
        return "host"
    stats = device.memory_stats() or {}
    if "bytes_limit" in stats:
        return "device" if cache_bytes <= DEVICE_MEMORY_SHARE * stats["bytes_limit"] else "host"
    return "device"


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """``np.empty`` whose data starts on an :data:`ALIGNMENT`-byte boundary."""
    size = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(size + ALIGNMENT, np.uint8)
    offset = -raw.ctypes.data % ALIGNMENT
    return raw[offset : offset + size].view(dtype).reshape(shape)


def _replicated(x: np.ndarray, mesh: Mesh) -> jax.Array:
    """``x`` (identical on every process) as one array replicated over the mesh; works multi-host."""
    replicated, _ = shardings(mesh)
    return jax.make_array_from_callback(x.shape, replicated, lambda index: np.asarray(x[index]))


class BatchFeed:
    """Yields ``(step, batch)`` for ``range(start, stop)``; ``batch`` is on the mesh, ready for the step.

    Args:
      cache: the feature cache (row i = image i of the sampler's dataset).
      prototypes: ``{category: [g_n, g_a]}`` of every category of the dataset.
      sampler: batches are :meth:`BalancedEpisodeSampler.episode` of the step (its state is not read
        or changed here).
      mesh: the data-parallel mesh of the step.
      dtype: compute dtype of the step (``"float32"`` or ``"float64"``).
      placement: ``"device"`` or ``"host"`` (see the module docstring; resolve ``"auto"`` with
        :func:`choose_placement` first).
    """

    def __init__(
        self,
        cache: FeatureCache,
        prototypes: dict[str, np.ndarray],
        sampler: BalancedEpisodeSampler,
        mesh: Mesh,
        dtype: str,
        placement: str,
    ) -> None:
        if placement not in ("device", "host"):
            raise ValueError(f"placement={placement!r}; resolve 'auto' with choose_placement() first")
        self.sampler, self.mesh, self.dtype, self.placement = sampler, mesh, np.dtype(dtype), placement
        self.categories = {c: i for i, c in enumerate(prototypes)}
        self._protos = np.stack([np.asarray(v) for v in prototypes.values()])  # [C, 2, E]
        self._cache = cache
        if placement == "device":
            log.info(
                "feature cache: %s copied to each device; batches gathered there", format_bytes(cache.nbytes)
            )
            self._device_cache = (
                _replicated(cache.patch_tokens, mesh),
                _replicated(cache.class_embeds, mesh),
                _replicated(self._protos, mesh),
            )
            self._gather = self._jit_gather()

    # ------------------------------------------------------------------ one step's batch

    def _indices(self, episode: Episode) -> dict[str, np.ndarray]:
        return {
            "query": np.asarray(episode.query, np.int32),
            "references": np.asarray(episode.references, np.int32),
            "category": np.asarray([self.categories[c] for c in episode.category], np.int32),
            "labels": np.asarray(episode.label),
        }

    def _jit_gather(self):
        replicated, batch_sharding = shardings(self.mesh)
        dtype = self.dtype

        def gather(tokens, embeds, protos, idx):
            b, k = idx["references"].shape
            refs = jnp.take(tokens, idx["references"].reshape(-1), axis=0)  # [B*K, L, P, D]
            _, num_layers, num_patches, width = refs.shape
            refs = refs.reshape(b, k, num_layers, num_patches, width).transpose(0, 2, 1, 3, 4)
            return {
                "query_tokens": jnp.take(tokens, idx["query"], axis=0).astype(dtype),
                "query_embeds": jnp.take(embeds, idx["query"], axis=0).astype(dtype),
                "reference_tokens": refs.reshape(b, num_layers, k * num_patches, width).astype(dtype),
                "reference_embeds": jnp.take(embeds, idx["references"], axis=0).astype(dtype),
                "text_prototypes": jnp.take(protos, idx["category"], axis=0).astype(dtype),
                "labels": idx["labels"],
            }

        return jax.jit(
            gather,
            in_shardings=(replicated, replicated, replicated, batch_sharding),
            out_shardings=batch_sharding,
        )

    def host_batch(self, episode: Episode) -> dict[str, np.ndarray]:
        """One episode's batch gathered on the host, written once, straight into the step's layout."""
        tokens, embeds = self._cache.patch_tokens, self._cache.class_embeds
        b, k = episode.references.shape
        _, num_layers, num_patches, width = tokens.shape
        # Fresh buffers each step: on CPU the device array adopts them (see put_batch).
        query_tokens = aligned_empty((b, num_layers, num_patches, width), self.dtype)
        reference_tokens = aligned_empty((b, num_layers, k * num_patches, width), self.dtype)
        for j in range(b):
            query_tokens[j] = tokens[episode.query[j]]
            for r in range(k):
                reference_tokens[j, :, r * num_patches : (r + 1) * num_patches] = tokens[
                    episode.references[j, r]
                ]
        idx = self._indices(episode)
        return {
            "query_tokens": query_tokens,
            "query_embeds": embeds[idx["query"]].astype(self.dtype),
            "reference_tokens": reference_tokens,
            "reference_embeds": embeds[idx["references"]].astype(self.dtype),
            "text_prototypes": self._protos[idx["category"]].astype(self.dtype),
            "labels": idx["labels"],
        }

    def batch(self, step: int) -> dict[str, jax.Array]:
        """The batch of ``step`` on the mesh (synchronously; :meth:`iterate` reads ahead)."""
        episode = self.sampler.episode(step)
        if self.placement == "device":
            return self._gather(*self._device_cache, put_batch(self._indices(episode), self.mesh))
        return put_batch(self.host_batch(episode), self.mesh)

    # ------------------------------------------------------------------ the stream

    def iterate(self, start: int, stop: int) -> Iterator[tuple[int, dict[str, Any]]]:
        """``(step, batch)`` for ``start <= step < stop``; the next batch is prepared while a step runs.

        On the device the gather is dispatched asynchronously anyway; on the host it runs on one
        background thread, one step ahead (numpy copies release the GIL).
        """
        if self.placement == "device":
            for step in range(start, stop):
                yield step, self.batch(step)
            return
        with ThreadPoolExecutor(1, thread_name_prefix="batch-gather") as pool:
            ahead: Future | None = (
                pool.submit(self.host_batch, self.sampler.episode(start)) if start < stop else None
            )
            for step in range(start, stop):
                assert ahead is not None
                host = ahead.result()
                ahead = (
                    pool.submit(self.host_batch, self.sampler.episode(step + 1)) if step + 1 < stop else None
                )
                yield step, put_batch(host, self.mesh)
