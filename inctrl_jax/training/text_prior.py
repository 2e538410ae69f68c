"""Text prior of every training category in one compiled text-tower program.

Each category's prototypes ``[g_n, g_a]`` are the means of its normal and abnormal prompt
ensembles (242 prompts) through the frozen CLIP text tower. Encoding them is the dominant
per-category start-up cost, so here all categories' prompts are concatenated and run in fixed
chunks of ``chunk`` rows through one jitted program (compiled once per run, and once per process
for a given backbone and length).

The text tower is causal and pools at the end-of-text token, so tokens after the longest prompt's
end-of-text token cannot change any pooled output: the token ids are cut to the longest prompt of
the run (~18 of 77 positions for the reference ensembles), which is the same function at a
quarter of the cost. Only the float rounding of the attention/matmul reductions can differ from a
full-length pass (see ``tests/test_train_text_prior.py`` for the tolerance).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from inctrl_jax.clip.model import CLIP, CLIPConfig
from inctrl_jax.model.prompts import prompt_ensembles
from inctrl_jax.model.scoring import text_prototypes_from_embeds

DEFAULT_CHUNK = 64
"""Prompts per text-tower call; the last chunk is padded so every call has the same shape."""


@functools.partial(jax.jit, static_argnames="config")
def _encode_prompts(params: Any, token_ids: jax.Array, config: CLIPConfig) -> jax.Array:
    """Pooled, projected text embeddings ``[chunk, E]`` (module-level: one compile per config and shape)."""
    return jnp.asarray(CLIP(config).apply({"params": params}, token_ids, method=CLIP.encode_text))


def ensemble_token_ids(
    categories: Sequence[str], context_length: int, eos_token_id: int
) -> tuple[np.ndarray, list[tuple[str, int, int]]]:
    """Token ids of every category's prompt ensemble, cut after the longest prompt's end-of-text token.

    Returns:
      ``(ids [R, T], rows)`` with ``rows[i] = (category, n_normal, n_abnormal)`` in row order
      (normal prompts of a category first, then its abnormal ones) and ``T <= context_length``.
    """
    from inctrl_jax.clip.tokenizer import tokenize

    texts: list[str] = []
    rows: list[tuple[str, int, int]] = []
    for category in categories:
        normal, abnormal = prompt_ensembles(category)
        texts += normal + abnormal
        rows.append((category, len(normal), len(abnormal)))
    ids = np.asarray(tokenize(texts, context_length), np.int32)
    eot = np.argmax(ids == eos_token_id, axis=1)  # the position the tower pools at
    return ids[:, : int(eot.max()) + 1], rows


def text_prototypes_for(
    categories: Sequence[str], config: CLIPConfig, clip_params: Any, *, chunk: int = DEFAULT_CHUNK
) -> dict[str, np.ndarray]:
    """``{category: [g_n, g_a] ([2, E])}`` for all ``categories`` with one compiled text-tower program.

    Args:
      categories: category names (``_`` becomes a space in the prompts).
      config: the backbone's config (its text tower is used).
      clip_params: the backbone's parameters (``{"visual": ..., "text": ...}``; only ``text`` is read).
      chunk: prompts per call; all calls share one shape.
    """
    if not categories:
        return {}
    ids, rows = ensemble_token_ids(categories, config.text.context_length, config.text.eos_token_id)
    n = len(ids)
    padded = -(-n // chunk) * chunk
    ids = np.concatenate([ids, np.repeat(ids[-1:], padded - n, axis=0)])
    params = {"text": clip_params["text"]}
    embeds = np.concatenate(
        [
            np.asarray(_encode_prompts(params, jnp.asarray(ids[lo : lo + chunk]), config))
            for lo in range(0, padded, chunk)
        ]
    )[:n]
    out: dict[str, np.ndarray] = {}
    start = 0
    for category, n_normal, n_abnormal in rows:
        normal = embeds[start : start + n_normal]
        abnormal = embeds[start + n_normal : start + n_normal + n_abnormal]
        out[category] = np.asarray(text_prototypes_from_embeds(normal, abnormal))
        start += n_normal + n_abnormal
    return out
