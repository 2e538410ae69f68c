"""Small helpers around :class:`inctrl_jax.model.detector.Detector` for evaluation and prediction.

All scoring (reference sets, batched scoring, text prototypes, checkpoints) lives in the model
package; this module only names what evaluation reports about a detector and builds the tiny
random backbone used for pipeline checks and CI.
"""

from __future__ import annotations

from inctrl_jax.clip.model import CLIPConfig, TextConfig, VisionConfig

# The Detector's mode names (``ScoreResult.mode``), used in every output.
TRAINED = "inctrl"
TRAINING_FREE = "training_free"
ZERO_SHOT = "zero_shot"


def score_mode(detector, zero_shot: bool = False) -> str:
    """``"inctrl"`` (trained heads: (h + s_p) / 2), ``"training_free"`` ((s_p + s_a) / 2, no heads) or,
    for a K = 0 reference set, ``"zero_shot"`` (the text prior s_a alone)."""
    if zero_shot:
        return ZERO_SHOT
    return TRAINED if detector.has_heads else TRAINING_FREE


def is_real_result(detector) -> bool:
    """False when the detector says its backbone was randomly initialised (its provenance)."""
    real = getattr(detector, "is_real_result", None)
    if real is not None:
        return bool(real)
    provenance = getattr(detector, "provenance", None) or getattr(
        getattr(detector, "weights", None), "provenance", None
    )
    return not (isinstance(provenance, dict) and provenance.get("real_result") is False)


def tiny_clip_config(
    image_size: int = 64,
    patch_size: int = 16,
    width: int = 32,
    layers: int = 4,
    heads: int = 2,
    mlp_dim: int = 0,
    embed_dim: int = 0,
    text_width: int = 0,
    text_layers: int = 2,
    text_heads: int = 2,
    text_mlp_dim: int = 0,
) -> CLIPConfig:
    """A small CLIP (real tokenizer vocabulary) for pipeline checks, CI and tiny checkpoints.

    A size of 0 means the default derived from ``width``: MLP ``2 * width``, embedding ``width``,
    text width ``width``, text MLP ``2 * text_width``.
    """
    text_width = text_width or width
    return CLIPConfig(
        vision=VisionConfig(
            image_size, patch_size, width, layers, heads, mlp_dim or 2 * width, embed_dim or width, "gelu"
        ),
        text=TextConfig(
            49408,
            77,
            text_width,
            text_layers,
            text_heads,
            text_mlp_dim or 2 * text_width,
            embed_dim or width,
            "gelu",
        ),  # fmt: skip
    )
