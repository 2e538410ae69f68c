"""CLIP in Flax: towers, checkpoint loading, backbone registry and the offline tokenizer."""

from inctrl_jax.clip.convert import ConversionError, convert_state_dict
from inctrl_jax.clip.loading import (
    INCTRL_HEAD_PREFIXES,
    CheckpointError,
    infer_config,
    load_clip,
    load_inctrl_checkpoint,
    read_state_dict,
    split_inctrl_checkpoint,
    stored_config,
)
from inctrl_jax.clip.model import CLIP, CLIPConfig, TextConfig, VisionConfig, VisionOutput, init_params
from inctrl_jax.clip.registry import BACKBONES, Backbone, get_backbone
from inctrl_jax.clip.tokenizer import EOT_TOKEN_ID, SOT_TOKEN_ID, tokenize

__all__ = [
    "BACKBONES",
    "CLIP",
    "EOT_TOKEN_ID",
    "INCTRL_HEAD_PREFIXES",
    "SOT_TOKEN_ID",
    "Backbone",
    "CLIPConfig",
    "CheckpointError",
    "ConversionError",
    "TextConfig",
    "VisionConfig",
    "VisionOutput",
    "convert_state_dict",
    "get_backbone",
    "infer_config",
    "init_params",
    "load_clip",
    "load_inctrl_checkpoint",
    "read_state_dict",
    "split_inctrl_checkpoint",
    "stored_config",
    "tokenize",
]
