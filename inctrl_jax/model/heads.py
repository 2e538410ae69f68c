"""The trainable InCTRL heads: adapter psi, image-level head eta and holistic head phi.

Parameter tree of :class:`InCTRLHeads` (Flax names; official PyTorch names in brackets)::

    params:
      adapter/fc1/kernel        [E, E/4]   (adapter.fc.0.weight, transposed)
      adapter/fc2/kernel        [E/4, E]   (adapter.fc.2.weight, transposed)
      image_head/...            ScoreHead on the image residual r   (diff_head_ref.*)
      holistic_head/...         ScoreHead on M_plus, input = P      (diff_head.*)
    batch_stats:
      image_head/bn2/{mean,var}, image_head/bn3/{mean,var}, holistic_head/bn2/..., holistic_head/bn3/...

A :class:`ScoreHead` holds ``projection1`` (Dense 128), ``bn2``, ``projection2`` (Dense 64), ``bn3``
and ``projection3`` (Dense 1). The official heads also own a ``bn1`` that their forward pass never
uses; it has no counterpart here (checkpoint loading reports it as ignored).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp


class Adapter(nn.Module):
    """Image adapter psi: two bias-free Dense layers, ReLU after each (output is non-negative).

    Attributes:
      embed_dim: width of the projected class token (640 for ViT-B-16-plus-240).
      reduction: bottleneck factor; the hidden width is ``embed_dim // reduction``.
    """

    embed_dim: int
    reduction: int = 4

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(nn.Dense(self.embed_dim // self.reduction, use_bias=False, name="fc1")(x))
        return nn.relu(nn.Dense(self.embed_dim, use_bias=False, name="fc2")(x))


class BatchNorm(nn.Module):
    """BatchNorm1d with PyTorch's training semantics.

    Train mode normalises with the batch mean and the biased batch variance and updates the running
    statistics as ``0.9 * running + 0.1 * batch`` with the *unbiased* variance, as
    ``torch.nn.BatchNorm1d`` does (Flax's own BatchNorm uses the biased one). Eval mode uses the
    running statistics. Parameters ``scale``/``bias``; batch_stats ``mean``/``var``.
    """

    momentum: float = 0.9
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,))
        bias = self.param("bias", nn.initializers.zeros, (features,))
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))
        if train:
            n = x.shape[0]
            if n < 2:
                raise ValueError(
                    "BatchNorm in train mode needs at least 2 queries per batch (got 1); "
                    "use a larger batch or train=False"
                )
            mean = jnp.mean(x, axis=0)
            var = jnp.mean(jnp.square(x - mean), axis=0)
            if not self.is_initializing():
                m = self.momentum
                ra_mean.value = m * ra_mean.value + (1.0 - m) * mean
                ra_var.value = m * ra_var.value + (1.0 - m) * var * (n / (n - 1))
        else:
            mean, var = ra_mean.value, ra_var.value
        return (x - mean) / jnp.sqrt(var + self.epsilon) * scale + bias


class ScoreHead(nn.Module):
    """TransformerBasicHead: Dense(128)-ReLU-BN-Dense(64)-ReLU-BN-Dense(1)-sigmoid; returns ``[B]``.

    BatchNorm sees the whole batch: ``train=True`` uses batch statistics and updates
    ``batch_stats`` (apply with ``mutable=["batch_stats"]``); ``train=False`` uses running ones.
    """

    hidden: tuple[int, int] = (128, 64)
    momentum: float = 0.9
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = nn.relu(nn.Dense(self.hidden[0], name="projection1")(x))
        x = BatchNorm(self.momentum, self.epsilon, name="bn2")(x, train)
        x = nn.relu(nn.Dense(self.hidden[1], name="projection2")(x))
        x = BatchNorm(self.momentum, self.epsilon, name="bn3")(x, train)
        return jax.nn.sigmoid(nn.Dense(1, name="projection3")(x))[..., 0]


class HeadOutputs(NamedTuple):
    """What the heads compute for a batch of B queries with K references each."""

    psi_query: jax.Array
    """psi(t_q), ``[B, E]``."""
    psi_reference_mean: jax.Array
    """mean_k psi(t_k), ``[B, E]``."""
    image_residual: jax.Array
    """r = mean_k psi(t_k) - psi(t_q), ``[B, E]``."""
    s_i: jax.Array
    """image-level score eta(r), ``[B]``."""
    residual_map_plus: jax.Array
    """M_plus = M + s_i + s_a, ``[B, P]``."""
    h: jax.Array
    """holistic score phi(M_plus), ``[B]``."""


class InCTRLHeads(nn.Module):
    """Adapter psi, image head eta (``image_head``) and holistic head phi (``holistic_head``).

    Attributes:
      embed_dim: width of the projected class token (640 for the paper backbone).
      num_patches: input size of the holistic head = patches of the backbone grid (225 for a
        15 x 15 grid); ``None`` accepts whatever size it is initialised with.
      reduction: adapter bottleneck factor.
    """

    embed_dim: int = 640
    num_patches: int | None = 225
    reduction: int = 4

    def setup(self):
        self.adapter = Adapter(self.embed_dim, self.reduction)
        self.image_head = ScoreHead()
        self.holistic_head = ScoreHead()

    def __call__(
        self,
        query_embeds: jax.Array,
        reference_embeds: jax.Array,
        residual_map: jax.Array,
        s_a: jax.Array,
        train: bool = False,
    ) -> HeadOutputs:
        """Runs the heads on a batch.

        Args:
          query_embeds: t_q, projected class tokens of the queries, ``[B, E]`` (not normalised).
          reference_embeds: t_k of each query's references, ``[B, K, E]`` (not normalised).
          residual_map: M, ``[B, P]``.
          s_a: text prior, ``[B]``.
          train: BatchNorm mode (see :class:`ScoreHead`).
        """
        if query_embeds.shape[-1] != self.embed_dim:
            raise ValueError(
                f"class tokens have width {query_embeds.shape[-1]} but the heads expect "
                f"embed_dim={self.embed_dim}; build the heads for this backbone"
            )
        if self.num_patches is not None and residual_map.shape[-1] != self.num_patches:
            raise ValueError(
                f"the residual map has {residual_map.shape[-1]} patches but the holistic head expects "
                f"{self.num_patches}; the heads were built for a different backbone grid"
            )
        psi_query = self.adapter(query_embeds)
        psi_reference_mean = jnp.mean(self.adapter(reference_embeds), axis=-2)
        r = psi_reference_mean - psi_query
        s_i = self.image_head(r, train)
        m_plus = residual_map + s_i[:, None] + s_a[:, None]
        h = self.holistic_head(m_plus, train)
        return HeadOutputs(psi_query, psi_reference_mean, r, s_i, m_plus, h)


def init_heads(embed_dim: int = 640, num_patches: int = 225, seed: int = 0) -> dict[str, Any]:
    """Random head variables ``{"params": ..., "batch_stats": ...}`` (Flax default initialisers)."""
    model = InCTRLHeads(embed_dim=embed_dim, num_patches=num_patches)
    q = jnp.zeros((2, embed_dim), jnp.float32)
    refs = jnp.zeros((2, 1, embed_dim), jnp.float32)
    m = jnp.zeros((2, num_patches), jnp.float32)
    s = jnp.zeros((2,), jnp.float32)
    variables = model.init(jax.random.PRNGKey(seed), q, refs, m, s, False)
    return {"params": variables["params"], "batch_stats": variables["batch_stats"]}
