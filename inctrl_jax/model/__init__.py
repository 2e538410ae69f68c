"""The InCTRL model: heads, pure scoring functions, text prompts, reference sets, checkpoints, API."""

from inctrl_jax.model.heads import Adapter, HeadOutputs, InCTRLHeads, ScoreHead, init_heads
from inctrl_jax.model.scoring import (
    ScoreOutputs,
    patch_residuals,
    patch_score,
    residual_map,
    score_queries,
    text_prior,
)

__all__ = [
    "Adapter",
    "HeadOutputs",
    "InCTRLHeads",
    "ScoreHead",
    "ScoreOutputs",
    "init_heads",
    "patch_residuals",
    "patch_score",
    "residual_map",
    "score_queries",
    "text_prior",
]
