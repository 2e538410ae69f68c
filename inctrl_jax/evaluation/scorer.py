"""A few-shot scorer for evaluation and prediction: reference set in, scores and maps out.

Thin wiring of the frozen CLIP (``inctrl_jax.clip``) and InCTRL's pure scoring functions
(``inctrl_jax.model.scoring``): the K reference images of a category are encoded once, then every
query batch is scored against them. With head variables it gives the InCTRL score (h + s_p) / 2;
without, the training-free score (s_p + s_a) / 2 (patch residual and text prior only).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from inctrl_jax.clip.model import CLIP, CLIPConfig
from inctrl_jax.model import scoring
from inctrl_jax.model.prompts import prompt_ensembles


class FewShotScorer:
    """Scores query images against a reference set of K normal images of one category.

    Args:
        clip_config: backbone architecture.
        clip_params: ``{"visual": ..., "text": ...}`` CLIP parameters.
        head_variables: ``{"params", "batch_stats"}`` of the InCTRL heads, or ``None`` for the
            training-free score.
        tap_layers: 1-based blocks whose patch tokens are compared (paper: 7, 9, 11 of 12).
        batch_size: images per backbone call.
    """

    def __init__(
        self,
        clip_config: CLIPConfig,
        clip_params: dict,
        head_variables: dict | None = None,
        tap_layers: Sequence[int] = (7, 9, 11),
        batch_size: int = 8,
    ):
        self.config = clip_config
        self.params = jax.tree_util.tree_map(jnp.asarray, clip_params)
        self.head_variables = head_variables
        self.tap_layers = tuple(int(t) for t in tap_layers)
        self.batch_size = int(batch_size)
        self._model = CLIP(clip_config)
        self._prototypes: dict[str, jax.Array] = {}
        self._refs: tuple[jax.Array, jax.Array, jax.Array] | None = None
        taps = self.tap_layers

        @jax.jit
        def encode(params, pixels):
            out = self._model.apply({"params": params}, pixels, taps, method=CLIP.encode_image)
            return out.taps[:, :, 1:], out.embeds

        @jax.jit
        def encode_text(params, ids):
            return self._model.apply({"params": params}, ids, method=CLIP.encode_text)

        @jax.jit
        def score(heads, q_tok, q_emb, r_tok, r_emb, protos):
            return scoring.score_queries(heads, q_tok, q_emb, r_tok, r_emb, protos)

        self._encode, self._encode_text, self._score = encode, encode_text, score

    @property
    def image_size(self) -> int:
        return self.config.vision.image_size

    @property
    def grid_size(self) -> int:
        return self.config.vision.grid_size

    @property
    def mode(self) -> str:
        return "training-free" if self.head_variables is None else "trained"

    def text_prototypes(self, category: str) -> jax.Array:
        """``[g_n, g_a]`` for a category, cached."""
        if category not in self._prototypes:
            from inctrl_jax.clip.tokenizer import tokenize

            normal, abnormal = prompt_ensembles(category)
            ctx = self.config.text.context_length
            emb = self._encode_text(self.params, jnp.asarray(tokenize(normal + abnormal, ctx)))
            self._prototypes[category] = scoring.text_prototypes_from_embeds(
                emb[: len(normal)], emb[len(normal) :]
            )
        return self._prototypes[category]

    def encode(self, pixels: np.ndarray) -> tuple[jax.Array, jax.Array]:
        """Patch tokens ``[B, L, P, D]`` and class embeddings ``[B, E]`` of preprocessed images."""
        pixels = np.asarray(pixels, np.float32)
        toks, embs = [], []
        for i in range(0, len(pixels), self.batch_size):
            chunk = pixels[i : i + self.batch_size]
            n = len(chunk)
            if n < self.batch_size and len(pixels) > self.batch_size:
                # Pad the last chunk to the batch size to reuse the compiled shape.
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.batch_size - n, 0)])
            t, e = self._encode(self.params, jnp.asarray(chunk))
            toks.append(t[:n])
            embs.append(e[:n])
        return jnp.concatenate(toks), jnp.concatenate(embs)

    def set_references(self, pixels: np.ndarray, category: str) -> None:
        """Encode the K reference images (``[K, S, S, 3]`` preprocessed) of ``category``."""
        if len(pixels) == 0:
            raise ValueError("the reference set is empty; give at least one normal reference image")
        tok, emb = self.encode(pixels)
        k, n_layers, p, d = tok.shape
        ref_tokens = tok.transpose(1, 0, 2, 3).reshape(n_layers, k * p, d)  # reference-major per layer
        self._refs = (ref_tokens, emb, self.text_prototypes(category))

    def score(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """Scores preprocessed query images ``[B, S, S, 3]``.

        Returns:
            numpy arrays: ``score``, ``s_p``, ``s_i`` (NaN training-free), ``s_a`` ``[B]`` and
            ``residual_map`` ``[B, g, g]`` over the patch grid.
        """
        if self._refs is None:
            raise RuntimeError("call set_references(...) before score(...)")
        q_tok, q_emb = self.encode(pixels)
        out = self._score(self.head_variables, q_tok, q_emb, *self._refs)
        g = self.grid_size
        return {
            "score": np.asarray(out.score),
            "s_p": np.asarray(out.s_p),
            "s_i": np.asarray(out.s_i),
            "s_a": np.asarray(out.s_a),
            "residual_map": np.asarray(out.residual_map).reshape(-1, g, g),
        }


def tiny_clip_config(
    image_size: int = 64, patch_size: int = 16, width: int = 32, layers: int = 4
) -> CLIPConfig:
    """A small random CLIP for pipeline checks and CI (real tokenizer vocabulary)."""
    from inctrl_jax.clip.model import TextConfig, VisionConfig

    return CLIPConfig(
        vision=VisionConfig(image_size, patch_size, width, layers, 2, 2 * width, width, "gelu"),
        text=TextConfig(49408, 77, width, 2, 2, 2 * width, width, "gelu"),
    )


def load_checkpoint(path: str | os.PathLike):
    """Backbone and heads of a trained model: our directory format or an official InCTRL file.

    Returns:
        :class:`inctrl_jax.model.checkpoint.InCTRLWeights`.
    """
    from inctrl_jax.model import checkpoint as model_checkpoint

    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {p} does not exist; check --config.checkpoint")
    if p.is_dir():
        return model_checkpoint.load_model(p)
    return model_checkpoint.load_official_checkpoint(p)
