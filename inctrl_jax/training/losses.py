"""Training losses.

The reference trains with a binary focal loss (alpha 1, gamma 2) on the final score and on the
image-level score s_i, but both are already probabilities while the loss treats them as logits
("double sigmoid": the effective prediction is sigmoid(score) in [0.5, 0.731]). ``"reference"``
reproduces that; ``"probability"`` is the clean variant: the same focal loss with the binary
cross-entropy taken on the probabilities themselves (equivalently, on the logits logit(score) and
logit(s_i)), so a perfect score drives the loss to 0.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

LossKind = Literal["reference", "probability"]
LOSS_KINDS: tuple[str, ...] = ("reference", "probability")

# Probabilities are clipped this far from 0 and 1 before taking logs in the clean variant.
_PROB_EPS = 1e-7


def bce_with_logits(z: jax.Array, y: jax.Array) -> jax.Array:
    """Element-wise binary cross-entropy on logits: max(z, 0) - z*y + log(1 + exp(-|z|))."""
    return jnp.maximum(z, 0) - z * y + jnp.log1p(jnp.exp(-jnp.abs(z)))


def bce_on_probabilities(p: jax.Array, y: jax.Array) -> jax.Array:
    """Element-wise binary cross-entropy of probabilities ``p`` (clipped to [1e-7, 1 - 1e-7])."""
    p = jnp.clip(p, _PROB_EPS, 1 - _PROB_EPS)
    return -(y * jnp.log(p) + (1 - y) * jnp.log1p(-p))


def focal_loss(
    x: jax.Array, y: jax.Array, kind: LossKind = "reference", gamma: float = 2.0, alpha: float = 1.0
) -> jax.Array:
    """Mean binary focal loss ``alpha * (1 - exp(-l))**gamma * l`` over the batch.

    Args:
      x: scores in [0, 1], shape [B].
      y: labels (0 normal, 1 anomalous), shape [B].
      kind: ``"reference"`` takes ``l = BCEWithLogits(x, y)`` (x used as a logit, as the official
        code does); ``"probability"`` takes ``l = BCE(x, y)`` on the probabilities.
      gamma: focusing exponent.
      alpha: weight.
    """
    y = y.astype(x.dtype)
    if kind == "reference":
        bce = bce_with_logits(x, y)
    elif kind == "probability":
        bce = bce_on_probabilities(x, y)
    else:
        raise ValueError(f"unknown loss kind {kind!r}; config.train.loss must be one of {LOSS_KINDS}")
    return jnp.mean(alpha * (1.0 - jnp.exp(-bce)) ** gamma * bce)


def inctrl_loss(
    score: jax.Array, s_i: jax.Array, labels: jax.Array, kind: LossKind = "reference"
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Holistic loss plus image-level residual loss, weighted 1:1: FL(score) + FL(s_i)."""
    term_score = focal_loss(score, labels, kind)
    term_s_i = focal_loss(s_i, labels, kind)
    return term_score + term_s_i, {"loss_score": term_score, "loss_s_i": term_s_i}
