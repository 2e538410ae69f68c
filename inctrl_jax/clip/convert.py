"""Map PyTorch CLIP state dicts (transformers or open_clip/InCTRL layout) onto our Flax tree.

Conversion is strict: every parameter of the Flax tree must be filled with an array of the
right shape, and every source key must be used unless it is a documented ignorable buffer.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from inctrl_jax.clip.model import CLIPConfig

# Buffers that carry no learned parameter and are safe to drop.
IGNORABLE_PATTERNS: tuple[str, ...] = (
    r"(.*\.)?position_ids",  # transformers: embeddings.position_ids
    r"(.*\.)?attn_mask",  # open_clip: causal mask buffer
    r"(.*\.)?logit_scale",  # CLIP temperature; InCTRL uses a fixed 100
    r"(.*\.)?logit_bias",
)


class ConversionError(ValueError):
    """A checkpoint does not fit the chosen architecture."""


def _is_ignorable(key: str) -> bool:
    return any(re.fullmatch(p, key) for p in IGNORABLE_PATTERNS)


def detect_layout(keys: Iterable[str]) -> str:
    """Return ``"hf"`` for transformers ``CLIPModel`` keys, ``"open_clip"`` for open_clip/InCTRL."""
    keys = list(keys)
    if any(k.startswith(("vision_model.", "text_model.")) for k in keys):
        return "hf"
    if any(k.startswith("visual.") for k in keys):
        return "open_clip"
    sample = ", ".join(sorted(keys)[:5])
    raise ConversionError(
        "the checkpoint is neither a transformers CLIPModel state dict (keys 'vision_model.*', "
        f"'text_model.*') nor an open_clip/InCTRL one (keys 'visual.*'); first keys: {sample}"
    )


def _linear(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(w.T)


def _ln(get, prefix: str) -> dict:
    return {"scale": get(prefix + ".weight"), "bias": get(prefix + ".bias")}


def _dense(get, prefix: str) -> dict:
    return {"kernel": _linear(get(prefix + ".weight")), "bias": get(prefix + ".bias")}


def _open_clip_block(get, prefix: str) -> dict:
    w = get(prefix + ".attn.in_proj_weight")
    b = get(prefix + ".attn.in_proj_bias")
    wq, wk, wv = np.split(w, 3, axis=0)
    bq, bk, bv = np.split(b, 3, axis=0)
    return {
        "ln_1": _ln(get, prefix + ".ln_1"),
        "attn": {
            "q": {"kernel": _linear(wq), "bias": bq},
            "k": {"kernel": _linear(wk), "bias": bk},
            "v": {"kernel": _linear(wv), "bias": bv},
            "out": _dense(get, prefix + ".attn.out_proj"),
        },
        "ln_2": _ln(get, prefix + ".ln_2"),
        "mlp": {"fc1": _dense(get, prefix + ".mlp.c_fc"), "fc2": _dense(get, prefix + ".mlp.c_proj")},
    }


def _hf_block(get, prefix: str) -> dict:
    return {
        "ln_1": _ln(get, prefix + ".layer_norm1"),
        "attn": {
            "q": _dense(get, prefix + ".self_attn.q_proj"),
            "k": _dense(get, prefix + ".self_attn.k_proj"),
            "v": _dense(get, prefix + ".self_attn.v_proj"),
            "out": _dense(get, prefix + ".self_attn.out_proj"),
        },
        "ln_2": _ln(get, prefix + ".layer_norm2"),
        "mlp": {"fc1": _dense(get, prefix + ".mlp.fc1"), "fc2": _dense(get, prefix + ".mlp.fc2")},
    }


def _open_clip_tree(get, cfg: CLIPConfig, towers: tuple[str, ...]) -> dict:
    tree: dict = {}
    if "visual" in towers:
        v = {
            "patch_embed": {"kernel": get("visual.conv1.weight").transpose(2, 3, 1, 0)},
            "class_embedding": get("visual.class_embedding"),
            "position_embedding": get("visual.positional_embedding"),
            "ln_pre": _ln(get, "visual.ln_pre"),
            "ln_post": _ln(get, "visual.ln_post"),
            "proj": {"kernel": get("visual.proj")},
        }
        for i in range(cfg.vision.layers):
            v[f"block_{i}"] = _open_clip_block(get, f"visual.transformer.resblocks.{i}")
        tree["visual"] = v
    if "text" in towers:
        t = {
            "token_embedding": {"embedding": get("token_embedding.weight")},
            "position_embedding": get("positional_embedding"),
            "ln_final": _ln(get, "ln_final"),
            "proj": {"kernel": get("text_projection")},
        }
        for i in range(cfg.text.layers):
            t[f"block_{i}"] = _open_clip_block(get, f"transformer.resblocks.{i}")
        tree["text"] = t
    return tree


def _hf_tree(get, cfg: CLIPConfig, towers: tuple[str, ...]) -> dict:
    tree: dict = {}
    if "visual" in towers:
        p = "vision_model"
        v = {
            "patch_embed": {"kernel": get(f"{p}.embeddings.patch_embedding.weight").transpose(2, 3, 1, 0)},
            "class_embedding": get(f"{p}.embeddings.class_embedding"),
            "position_embedding": get(f"{p}.embeddings.position_embedding.weight"),
            "ln_pre": _ln(get, f"{p}.pre_layrnorm"),
            "ln_post": _ln(get, f"{p}.post_layernorm"),
            "proj": {"kernel": _linear(get("visual_projection.weight"))},
        }
        for i in range(cfg.vision.layers):
            v[f"block_{i}"] = _hf_block(get, f"{p}.encoder.layers.{i}")
        tree["visual"] = v
    if "text" in towers:
        p = "text_model"
        t = {
            "token_embedding": {"embedding": get(f"{p}.embeddings.token_embedding.weight")},
            "position_embedding": get(f"{p}.embeddings.position_embedding.weight"),
            "ln_final": _ln(get, f"{p}.final_layer_norm"),
            "proj": {"kernel": _linear(get("text_projection.weight"))},
        }
        for i in range(cfg.text.layers):
            t[f"block_{i}"] = _hf_block(get, f"{p}.encoder.layers.{i}")
        tree["text"] = t
    return tree


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        name = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(_flatten(v, name))
        else:
            out[name] = v
    return out


def convert_state_dict(
    state_dict: Mapping[str, np.ndarray],
    config: CLIPConfig,
    *,
    layout: str | None = None,
    towers: tuple[str, ...] = ("visual", "text"),
    extra_keys: Iterable[str] = (),
    source: str = "checkpoint",
) -> dict:
    """Convert a PyTorch CLIP state dict into the Flax parameter tree of :class:`CLIP`.

    Args:
      state_dict: name -> numpy array (``module.`` prefixes are removed).
      config: the architecture the weights must fit.
      layout: ``"hf"`` or ``"open_clip"``; detected from the keys when ``None``.
      towers: which towers to convert; keys of the other tower are then allowed.
      extra_keys: prefixes of keys the caller consumes itself (e.g. InCTRL heads).
      source: file name used in error messages.

    Raises:
      ConversionError: missing keys, unexpected keys or wrong shapes, all listed.
    """
    from inctrl_jax.clip.model import init_params  # local: avoids a jax trace at import

    sd = {strip_module_prefix(k): np.asarray(v) for k, v in state_dict.items()}
    layout = layout or detect_layout(sd)
    used: set[str] = set()
    missing: list[str] = []

    def get(key: str) -> np.ndarray:
        if key not in sd:
            missing.append(key)
            return np.zeros((0,), np.float32)
        used.add(key)
        return sd[key]

    build = _hf_tree if layout == "hf" else _open_clip_tree
    tree = build(get, config, towers)

    import jax

    expected = jax.eval_shape(lambda: init_params(config))
    exp_flat = {k: v for k, v in _flatten(expected).items() if k.split("/")[0] in towers}
    got_flat = _flatten(tree)
    problems: list[str] = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): " + ", ".join(missing[:20]))
    shape_err = [
        f"{name}: expected {tuple(exp_flat[name].shape)}, got {tuple(np.shape(arr))}"
        for name, arr in got_flat.items()
        if name in exp_flat and np.size(arr) and tuple(np.shape(arr)) != tuple(exp_flat[name].shape)
    ]
    if shape_err:
        problems.append(f"shape mismatches ({len(shape_err)}): " + "; ".join(shape_err[:10]))
    other_prefixes = _other_tower_prefixes(layout, towers) + tuple(extra_keys)
    unexpected = sorted(
        k for k in sd if k not in used and not _is_ignorable(k) and not k.startswith(other_prefixes)
    )
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): " + ", ".join(unexpected[:20]))
    if problems:
        raise ConversionError(
            f"{source} does not match the chosen architecture "
            f"(vision width {config.vision.width}, {config.vision.layers} layers, "
            f"text width {config.text.width}, {config.text.layers} layers; {layout} layout): "
            + " | ".join(problems)
            + ". Choose the backbone config that matches the checkpoint, or pass the right file."
        )
    return _cast_tree(tree)


def _other_tower_prefixes(layout: str, towers: tuple[str, ...]) -> tuple[str, ...]:
    vis: tuple[str, ...]
    txt: tuple[str, ...]
    if layout == "hf":
        vis, txt = ("vision_model.", "visual_projection."), ("text_model.", "text_projection.")
    else:
        vis = ("visual.",)
        txt = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")
    out: tuple[str, ...] = ()
    if "visual" not in towers:
        out += vis
    if "text" not in towers:
        out += txt
    return out


def strip_module_prefix(key: str) -> str:
    """Drop the ``module.`` prefixes that DataParallel/DDP checkpoints carry."""
    while key.startswith("module."):
        key = key[len("module.") :]
    return key


def _cast_tree(tree):
    if isinstance(tree, Mapping):
        return {k: _cast_tree(v) for k, v in tree.items()}
    arr = np.asarray(tree)
    if arr.dtype.kind == "f":
        return arr.astype(np.float32)
    return arr
