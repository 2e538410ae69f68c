"""Pure scoring functions of InCTRL (in-context residuals, text prior, holistic score).

Everything here is a pure, jit-able function of arrays; parameters enter only through the head
variables of :func:`score_queries`. Shapes: B queries, L tapped layers, P patches of the backbone
grid, D ViT width, E joint embedding width, K references per query, N = K * P reference patches.

Typical use (inference, a shared reference set)::

    out = score_queries(head_variables, query_tokens, query_embeds,
                        reference_tokens, reference_embeds, text_prototypes)
    out.score, out.s_p, out.s_i, out.s_a, out.residual_map

Typical use (training, per-query references, BatchNorm on batch statistics)::

    out = score_queries(variables, q_tok, q_emb, ref_tok, ref_emb, protos, train=True)
    loss = focal(out.score, y) + focal(out.s_i, y)      # out.batch_stats -> next variables
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from inctrl_jax.model.heads import InCTRLHeads

Tensor = jax.Array | np.ndarray
"""A JAX array, or a numpy array once outputs have been fetched to the host."""

TEXT_TEMPERATURE = 100.0
"""Fixed text-prior temperature of the reference code (CLIP's logit_scale is not used)."""

DEFAULT_CHUNK = 2048
"""Reference patches compared per step in :func:`patch_residuals`."""


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
    """x / ||x||_2 along ``axis`` (no epsilon, like the reference code)."""
    return x / jnp.linalg.norm(x, axis=axis, keepdims=True)


def patch_residuals(
    query_tokens: jax.Array,
    reference_tokens: jax.Array,
    chunk: int | None = DEFAULT_CHUNK,
    references_normalized: bool = False,
) -> jax.Array:
    """m^l[j] = 0.5 * (1 - max_i cos(Q^l[j], R^l[i])): per-layer patch residuals, ``[L, P]``.

    Args:
      query_tokens: the query's patch tokens per tapped layer, ``[L, P, D]`` (class token excluded).
      reference_tokens: all K references' patch tokens per layer, ``[L, N, D]`` (same layers).
      chunk: reference patches per step. The maximum is kept as a running max over chunks, so
        memory is ``O(P * chunk)`` per layer whatever K is. ``None`` compares all N at once.
      references_normalized: skip the L2 normalisation of ``reference_tokens`` (a
        :class:`~inctrl_jax.model.reference.ReferenceSet` stores them normalised).

    Returns:
      ``[L, P]`` residuals in [0, 1]; the nearest reference patch is searched over all patches of
      all references of the same layer.
    """
    q = l2_normalize(query_tokens)
    r = reference_tokens if references_normalized else l2_normalize(reference_tokens)
    n = r.shape[-2]
    if chunk is None or chunk >= n:
        best = jnp.max(jnp.einsum("lpd,lnd->lpn", q, r), axis=-1)
    else:
        n_chunks = -(-n // chunk)
        pad = n_chunks * chunk - n
        if pad:
            # Pad by repeating real reference patches, which cannot change the maximum.
            r = r[:, jnp.arange(n_chunks * chunk) % n]
        blocks = r.reshape(r.shape[0], n_chunks, chunk, r.shape[-1]).swapaxes(0, 1)

        def step(running, block):
            return jnp.maximum(running, jnp.max(jnp.einsum("lpd,lnd->lpn", q, block), axis=-1)), None

        init = jnp.full(q.shape[:-1], -jnp.inf, q.dtype)
        best, _ = jax.lax.scan(step, init, blocks)
    return 0.5 * (1.0 - best)


def residual_map(layer_residuals: jax.Array) -> jax.Array:
    """M = mean_l m^l: the residual map over the patch grid (raster order), ``[..., L, P] -> [..., P]``."""
    return jnp.mean(layer_residuals, axis=-2)


def patch_score(residual_map_: jax.Array) -> jax.Array:
    """s_p = max_j M[j] (max of the layer-averaged map), ``[..., P] -> [...]``."""
    return jnp.max(residual_map_, axis=-1)


def text_prior(query_embed: jax.Array, text_prototypes: jax.Array) -> jax.Array:
    """s_a = softmax(100 * [u.g_n, u.g_a])[1] with u = t_q / ||t_q||; ``[E], [2, E] -> []``."""
    logits = TEXT_TEMPERATURE * (text_prototypes @ l2_normalize(query_embed))
    return jax.nn.softmax(logits, axis=-1)[1]


def text_prototypes_from_embeds(normal_embeds: Tensor, abnormal_embeds: Tensor) -> jax.Array:
    """[g_n, g_a] with g = normalize(mean_i normalize(e_i)): ``[n, E], [m, E] -> [2, E]``."""
    g_n = l2_normalize(jnp.mean(l2_normalize(jnp.asarray(normal_embeds)), axis=0))
    g_a = l2_normalize(jnp.mean(l2_normalize(jnp.asarray(abnormal_embeds)), axis=0))
    return jnp.stack([g_n, g_a])


def final_score(h: jax.Array, s_p: jax.Array) -> jax.Array:
    """score = (phi(M_plus) + s_p) / 2."""
    return 0.5 * (h + s_p)


def training_free_score(s_p: jax.Array, s_a: jax.Array) -> jax.Array:
    """score = (s_p + s_a) / 2: patch residual and text prior only, for a backbone without heads."""
    return 0.5 * (s_p + s_a)


def legacy_scramble(
    query_tokens: jax.Array, reference_tokens: jax.Array, reference_embeds: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Re-pairs a batch the way the reference code does for B > 1 (reference doc section 12.1).

    The reference code stacks the layers in front of the batch axis and then *reshapes* instead of
    transposing. Reproducing that reshape gives its index maps exactly: query j, layer slot l reads
    layer (3j+l) // B of item (3j+l) % B; its k-th block of reference patches is flat block
    g = (3j+l)*K + k of the ``[L, K*B]`` prompt stack (prompt f = shot*B + item); its image
    prototype averages flat prompts f = j*K + t.

    Args:
      query_tokens: ``[B, L, P, D]`` per query, in the true pairing.
      reference_tokens: ``[B, L, K*P, D]`` per query (reference-major within each layer).
      reference_embeds: ``[B, K, E]`` per query.

    Returns:
      The three arrays with the same shapes, scrambled.
    """
    b, n_layers, p, d = query_tokens.shape
    k = reference_embeds.shape[1]
    q = query_tokens.swapaxes(0, 1).reshape(b, n_layers, p, d)
    # [B, L, K, P, D] -> official stack [L, K, B, P, D] (prompt f = shot * B + item) -> reshape.
    r = reference_tokens.reshape(b, n_layers, k, p, d).transpose(1, 2, 0, 3, 4)
    r = r.reshape(b, n_layers, k * p, d)
    e = reference_embeds.swapaxes(0, 1).reshape(b, k, -1)
    return q, r, e


class ScoreOutputs(NamedTuple):
    """Per-query outputs of :func:`score_queries` (leading axis B)."""

    score: Tensor
    """final anomaly score (h + s_p) / 2, or (s_p + s_a) / 2 without heads, ``[B]``."""
    s_p: Tensor
    """patch score max_j M[j], ``[B]``."""
    s_i: Tensor
    """image-level score eta(r), ``[B]`` (NaN without heads)."""
    s_a: Tensor
    """text prior, ``[B]``."""
    residual_map: Tensor
    """M, ``[B, P]`` in raster order of the patch grid."""
    layer_residuals: Tensor
    """m^l per tapped layer, ``[B, L, P]``."""
    residual_map_plus: Tensor
    """M_plus = M + s_i + s_a, ``[B, P]`` (NaN without heads)."""
    h: Tensor
    """holistic head output phi(M_plus), ``[B]`` (NaN without heads)."""
    psi_query: Tensor
    """psi(t_q), ``[B, E]`` (NaN without heads)."""
    image_residual: Tensor
    """r = mean_k psi(t_k) - psi(t_q), ``[B, E]`` (NaN without heads)."""
    batch_stats: Any
    """updated BatchNorm statistics when ``train=True``, else ``None``."""


def score_queries(
    head_variables: Mapping[str, Any] | None,
    query_tokens: jax.Array,
    query_embeds: jax.Array,
    reference_tokens: jax.Array,
    reference_embeds: jax.Array,
    text_prototypes: jax.Array,
    *,
    train: bool = False,
    chunk: int | None = DEFAULT_CHUNK,
    references_normalized: bool = False,
    legacy_batch_scramble: bool = False,
) -> ScoreOutputs:
    """Scores a batch of queries: residual map, s_p, s_i, s_a, M_plus, h and the final score.

    The per-query parts (patch residuals, text prior) are vmapped over the batch; the heads see the
    whole batch (their BatchNorm uses batch statistics when ``train=True``). Jit it with
    ``static_argnames=("train", "chunk", "references_normalized", "legacy_batch_scramble")``.

    Args:
      head_variables: ``{"params": ..., "batch_stats": ...}`` of
        :class:`~inctrl_jax.model.heads.InCTRLHeads`, or ``None`` for the training-free score
        (s_i, h, M_plus, psi, r are then NaN).
      query_tokens: patch tokens of the tapped layers, ``[B, L, P, D]`` (class token excluded:
        ``VisionOutput.taps[:, :, 1:]``).
      query_embeds: projected class tokens t_q, ``[B, E]`` (``VisionOutput.embeds``).
      reference_tokens: patch tokens of the references, either shared by all queries ``[L, N, D]``
        or per query ``[B, L, N, D]``, with N = K * P (reference-major: all P patches of the first
        reference, then the second, ...).
      reference_embeds: class tokens t_k of the references, shared ``[K, E]`` or per query
        ``[B, K, E]``.
      text_prototypes: ``[g_n, g_a]``, shared ``[2, E]`` or per query ``[B, 2, E]`` (a training
        batch may mix categories).
      train: BatchNorm on batch statistics and return the updated ``batch_stats``.
      chunk: reference patches per step of the nearest-neighbour search (see
        :func:`patch_residuals`).
      references_normalized: the reference tokens are already L2-normalised.
      legacy_batch_scramble: reproduce the reference code's batch > 1 pairing bug
        (:func:`legacy_scramble`). Only for reproducing the official training; needs per-query
        references or broadcasts shared ones.

    Returns:
      :class:`ScoreOutputs`.
    """
    b = query_tokens.shape[0]
    shared_refs = reference_tokens.ndim == 3
    if legacy_batch_scramble:
        # Batch-scrambled like the reference code; only for reproducing its training.
        if shared_refs:
            reference_tokens = jnp.broadcast_to(reference_tokens, (b,) + reference_tokens.shape)
            shared_refs = False
        if reference_embeds.ndim == 2:
            reference_embeds = jnp.broadcast_to(reference_embeds, (b,) + reference_embeds.shape)
        query_tokens, reference_tokens, reference_embeds = legacy_scramble(
            query_tokens, reference_tokens, reference_embeds
        )

    def residuals(q, r):
        return patch_residuals(q, r, chunk, references_normalized)

    ref_axis = None if shared_refs else 0
    layer_res = jax.vmap(residuals, in_axes=(0, ref_axis))(query_tokens, reference_tokens)
    m = residual_map(layer_res)
    s_p = patch_score(m)
    proto_axis = None if text_prototypes.ndim == 2 else 0
    s_a = jax.vmap(text_prior, in_axes=(0, proto_axis))(query_embeds, text_prototypes)

    if head_variables is None:
        nan_b = jnp.full((b,), jnp.nan, m.dtype)
        nan_e = jnp.full(query_embeds.shape, jnp.nan, m.dtype)
        return ScoreOutputs(
            training_free_score(s_p, s_a), s_p, nan_b, s_a, m, layer_res,
            jnp.full(m.shape, jnp.nan, m.dtype), nan_b, nan_e, nan_e, None,
        )  # fmt: skip

    if reference_embeds.ndim == 2:
        reference_embeds = jnp.broadcast_to(reference_embeds, (b,) + reference_embeds.shape)
    heads = InCTRLHeads(embed_dim=query_embeds.shape[-1], num_patches=m.shape[-1])
    variables = {"params": head_variables["params"], "batch_stats": head_variables["batch_stats"]}
    new_stats = None
    if train:
        out, mutated = heads.apply(
            variables, query_embeds, reference_embeds, m, s_a, True, mutable=["batch_stats"]
        )
        new_stats = mutated["batch_stats"]
    else:
        out = heads.apply(variables, query_embeds, reference_embeds, m, s_a, False)
    return ScoreOutputs(
        final_score(out.h, s_p), s_p, out.s_i, s_a, m, layer_res, out.residual_map_plus, out.h,
        out.psi_query, out.image_residual, new_stats,
    )  # fmt: skip
