"""InCTRL checkpoints: official PyTorch state dicts in and out, and our own one-directory format.

Official ``checkpoint.pyth`` = the raw ``state_dict()`` of the reference ``InCTRL`` module: the
open_clip CLIP weights plus ``adapter.*``, ``diff_head_ref.*`` (image head) and ``diff_head.*``
(holistic head); 345 keys for ViT-B-16-plus-240. Loading is strict: every key must be used except
the heads' unused ``bn1.*`` (reported as ignored) and ``num_batches_tracked`` (dropped).

Our format is a directory with ``config.json`` (backbone config, tap layers, format version) and
``model.safetensors`` holding the flattened tree ``clip/visual/...``, ``clip/text/...``,
``heads/params/...``, ``heads/batch_stats/...``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from inctrl_jax.clip.convert import ConversionError, convert_state_dict, strip_module_prefix
from inctrl_jax.clip.loading import INCTRL_HEAD_PREFIXES, split_inctrl_checkpoint
from inctrl_jax.clip.model import CLIPConfig

FORMAT_NAME = "inctrl_jax.model"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
DEFAULT_TAP_LAYERS = (7, 9, 11)
ASSUMED_HEAD_WIDTH = 64
"""Attention head width assumed when a checkpoint's architecture is inferred from tensor shapes
(the head count is not visible in the weights); true for every registered backbone."""

# Official head module name -> our head name.
_HEAD_NAMES = {"diff_head_ref": "image_head", "diff_head": "holistic_head"}
HEAD_PREFIXES = INCTRL_HEAD_PREFIXES


class CheckpointMismatchError(ConversionError):
    """A checkpoint does not fit the InCTRL model (missing, unexpected or mis-shaped keys)."""


@dataclasses.dataclass
class InCTRLWeights:
    """Everything a trained InCTRL model consists of."""

    config: CLIPConfig
    clip_params: dict[str, Any]
    """``{"visual": ..., "text": ...}`` for :class:`inctrl_jax.clip.model.CLIP`."""
    head_variables: dict[str, Any] | None
    """``{"params": ..., "batch_stats": ...}`` of :class:`InCTRLHeads`, or ``None`` (no heads)."""
    tap_layers: tuple[int, ...] = DEFAULT_TAP_LAYERS
    ignored_keys: tuple[str, ...] = ()
    """Checkpoint keys that were read but not used (the heads' ``bn1.*``)."""
    provenance: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Where the weights came from, saved in ``config.json`` under ``"provenance"``: at least
    ``{"backbone_weights": "<source id or 'random'>", "real_result": bool}`` (``real_result`` is
    False for a model on a randomly initialised backbone, whose scores mean nothing). ``{}`` when
    unknown (directories saved before provenance was recorded)."""


# --------------------------------------------------------------------------------------------
# Heads <-> official state dict
# --------------------------------------------------------------------------------------------


def _expected_head_shapes(embed_dim: int, num_patches: int, reduction: int = 4) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {
        "adapter.fc.0.weight": (embed_dim // reduction, embed_dim),
        "adapter.fc.2.weight": (embed_dim, embed_dim // reduction),
    }
    for name, dim_in in (("diff_head_ref", embed_dim), ("diff_head", num_patches)):
        for i, (o, n) in enumerate(((128, dim_in), (64, 128), (1, 64)), start=1):
            shapes[f"{name}.projection{i}.weight"] = (o, n)
            shapes[f"{name}.projection{i}.bias"] = (o,)
        for i, n in ((1, dim_in), (2, 128), (3, 64)):
            for buf in ("weight", "bias", "running_mean", "running_var"):
                shapes[f"{name}.bn{i}.{buf}"] = (n,)
            shapes[f"{name}.bn{i}.num_batches_tracked"] = ()
    return shapes


def heads_from_state_dict(
    state_dict: Mapping[str, np.ndarray],
    *,
    embed_dim: int,
    num_patches: int,
    source: str = "checkpoint",
) -> tuple[dict[str, Any], tuple[str, ...]]:
    """Convert official head tensors (``adapter.*``, ``diff_head_ref.*``, ``diff_head.*``) strictly.

    Args:
      state_dict: the head keys with their official names (other keys are an error).
      embed_dim: joint embedding width of the backbone (640 for ViT-B-16-plus-240).
      num_patches: patches of the backbone grid = holistic head input size (225).
      source: file name for error messages.

    Returns:
      ``(head_variables, ignored_keys)``; ``ignored_keys`` are the unused ``bn1.*`` tensors.

    Raises:
      CheckpointMismatchError: missing, unexpected or mis-shaped keys, all listed.
    """
    expected = _expected_head_shapes(embed_dim, num_patches)
    sd = {k: np.asarray(v) for k, v in state_dict.items()}
    missing = sorted(k for k in expected if k not in sd)
    unexpected = sorted(k for k in sd if k not in expected)
    bad = sorted(
        f"{k}: expected {expected[k]}, got {sd[k].shape}"
        for k in expected
        if k in sd and sd[k].shape != expected[k]
    )
    problems = []
    if missing:
        problems.append(f"missing head keys ({len(missing)}): {', '.join(missing[:20])}")
    if unexpected:
        problems.append(f"unexpected head keys ({len(unexpected)}): {', '.join(unexpected[:20])}")
    if bad:
        problems.append(f"shape mismatches ({len(bad)}): {'; '.join(bad[:10])}")
    if problems:
        raise CheckpointMismatchError(
            f"{source}: the InCTRL heads do not fit a backbone with embed_dim={embed_dim} and "
            f"{num_patches} patches: "
            + " | ".join(problems)
            + ". Pass the checkpoint trained for this backbone."
        )

    def f32(k: str) -> np.ndarray:
        return sd[k].astype(np.float32)

    params: dict[str, Any] = {
        "adapter": {
            "fc1": {"kernel": f32("adapter.fc.0.weight").T.copy()},
            "fc2": {"kernel": f32("adapter.fc.2.weight").T.copy()},
        }
    }
    stats: dict[str, Any] = {}
    for official, ours in _HEAD_NAMES.items():
        p: dict[str, Any] = {}
        for i in (1, 2, 3):
            p[f"projection{i}"] = {
                "kernel": f32(f"{official}.projection{i}.weight").T.copy(),
                "bias": f32(f"{official}.projection{i}.bias"),
            }
        s: dict[str, Any] = {}
        for bn in ("bn2", "bn3"):
            p[bn] = {"scale": f32(f"{official}.{bn}.weight"), "bias": f32(f"{official}.{bn}.bias")}
            s[bn] = {"mean": f32(f"{official}.{bn}.running_mean"), "var": f32(f"{official}.{bn}.running_var")}
        params[ours], stats[ours] = p, s
    ignored = tuple(sorted(k for k in sd if ".bn1." in k))
    return {"params": params, "batch_stats": stats}, ignored


def heads_to_state_dict(head_variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Official-layout head tensors from our head variables (inverse of :func:`heads_from_state_dict`).

    The unused ``bn1`` of each head is written with PyTorch's initial values (weight 1, bias 0,
    running mean 0, running var 1) and ``num_batches_tracked`` as 0, so the result loads strictly
    into the reference ``InCTRL`` module.
    """
    params, stats = head_variables["params"], head_variables["batch_stats"]
    out: dict[str, np.ndarray] = {
        "adapter.fc.0.weight": np.asarray(params["adapter"]["fc1"]["kernel"], np.float32).T.copy(),
        "adapter.fc.2.weight": np.asarray(params["adapter"]["fc2"]["kernel"], np.float32).T.copy(),
    }
    for official, ours in _HEAD_NAMES.items():
        p, s = params[ours], stats[ours]
        for i in (1, 2, 3):
            out[f"{official}.projection{i}.weight"] = np.asarray(
                p[f"projection{i}"]["kernel"], np.float32
            ).T.copy()
            out[f"{official}.projection{i}.bias"] = np.asarray(p[f"projection{i}"]["bias"], np.float32)
        dim_in = out[f"{official}.projection1.weight"].shape[1]
        bn1 = {
            "weight": np.ones(dim_in, np.float32),
            "bias": np.zeros(dim_in, np.float32),
            "running_mean": np.zeros(dim_in, np.float32),
            "running_var": np.ones(dim_in, np.float32),
        }
        for buf, arr in bn1.items():
            out[f"{official}.bn1.{buf}"] = arr
        out[f"{official}.bn1.num_batches_tracked"] = np.array(0, np.int64)
        for bn in ("bn2", "bn3"):
            out[f"{official}.{bn}.weight"] = np.asarray(p[bn]["scale"], np.float32)
            out[f"{official}.{bn}.bias"] = np.asarray(p[bn]["bias"], np.float32)
            out[f"{official}.{bn}.running_mean"] = np.asarray(s[bn]["mean"], np.float32)
            out[f"{official}.{bn}.running_var"] = np.asarray(s[bn]["var"], np.float32)
            out[f"{official}.{bn}.num_batches_tracked"] = np.array(0, np.int64)
    return out


# --------------------------------------------------------------------------------------------
# CLIP params -> open_clip layout (for exporting a whole official checkpoint)
# --------------------------------------------------------------------------------------------


def _np(x: Any) -> np.ndarray:
    return np.asarray(x, np.float32)


def _block_to_open_clip(block: Mapping[str, Any], prefix: str) -> dict[str, np.ndarray]:
    a = block["attn"]
    out = {
        f"{prefix}.ln_1.weight": _np(block["ln_1"]["scale"]),
        f"{prefix}.ln_1.bias": _np(block["ln_1"]["bias"]),
        f"{prefix}.attn.in_proj_weight": np.concatenate([_np(a[n]["kernel"]).T for n in "qkv"], axis=0),
        f"{prefix}.attn.in_proj_bias": np.concatenate([_np(a[n]["bias"]) for n in "qkv"], axis=0),
        f"{prefix}.attn.out_proj.weight": _np(a["out"]["kernel"]).T.copy(),
        f"{prefix}.attn.out_proj.bias": _np(a["out"]["bias"]),
        f"{prefix}.ln_2.weight": _np(block["ln_2"]["scale"]),
        f"{prefix}.ln_2.bias": _np(block["ln_2"]["bias"]),
        f"{prefix}.mlp.c_fc.weight": _np(block["mlp"]["fc1"]["kernel"]).T.copy(),
        f"{prefix}.mlp.c_fc.bias": _np(block["mlp"]["fc1"]["bias"]),
        f"{prefix}.mlp.c_proj.weight": _np(block["mlp"]["fc2"]["kernel"]).T.copy(),
        f"{prefix}.mlp.c_proj.bias": _np(block["mlp"]["fc2"]["bias"]),
    }
    return out


def clip_to_open_clip_state_dict(config: CLIPConfig, clip_params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """open_clip/InCTRL-layout tensors of our CLIP params (inverse of ``convert_state_dict``)."""
    v, t = clip_params["visual"], clip_params["text"]
    out = {
        "visual.class_embedding": _np(v["class_embedding"]),
        "visual.positional_embedding": _np(v["position_embedding"]),
        "visual.conv1.weight": _np(v["patch_embed"]["kernel"]).transpose(3, 2, 0, 1).copy(),
        "visual.ln_pre.weight": _np(v["ln_pre"]["scale"]),
        "visual.ln_pre.bias": _np(v["ln_pre"]["bias"]),
        "visual.ln_post.weight": _np(v["ln_post"]["scale"]),
        "visual.ln_post.bias": _np(v["ln_post"]["bias"]),
        "visual.proj": _np(v["proj"]["kernel"]),
        "token_embedding.weight": _np(t["token_embedding"]["embedding"]),
        "positional_embedding": _np(t["position_embedding"]),
        "ln_final.weight": _np(t["ln_final"]["scale"]),
        "ln_final.bias": _np(t["ln_final"]["bias"]),
        "text_projection": _np(t["proj"]["kernel"]),
    }
    for i in range(config.vision.layers):
        out.update(_block_to_open_clip(v[f"block_{i}"], f"visual.transformer.resblocks.{i}"))
    for i in range(config.text.layers):
        out.update(_block_to_open_clip(t[f"block_{i}"], f"transformer.resblocks.{i}"))
    return out


def to_official_state_dict(weights: InCTRLWeights) -> dict[str, np.ndarray]:
    """The whole model as an official ``InCTRL`` state dict (CLIP + heads; 345 keys for the paper backbone).

    Raises:
      ValueError: the model has no heads.
    """
    if weights.head_variables is None:
        raise ValueError("this model has no trained heads; an official InCTRL checkpoint needs them")
    out = clip_to_open_clip_state_dict(weights.config, weights.clip_params)
    out.update(heads_to_state_dict(weights.head_variables))
    return out


# --------------------------------------------------------------------------------------------
# Official checkpoint in
# --------------------------------------------------------------------------------------------


def from_official_state_dict(
    state_dict: Mapping[str, np.ndarray],
    *,
    config: CLIPConfig | None = None,
    tap_layers: tuple[int, ...] = DEFAULT_TAP_LAYERS,
    source: str = "checkpoint",
) -> InCTRLWeights:
    """Convert an official InCTRL state dict strictly into backbone + heads.

    Args:
      state_dict: official key names (``module.`` prefixes are removed).
      config: the backbone architecture; inferred from the tensor shapes when ``None``. The number
        of attention heads is not visible in the weights: a registered backbone (ViT-B-16-plus-240)
        is recognised exactly; any other shape assumes head width 64 and warns (or raises when a
        tower's width is not a multiple of 64). Pass ``config`` for such checkpoints.
      tap_layers: 1-based blocks whose patch tokens are compared.
      source: file name for error messages.

    Raises:
      CheckpointMismatchError: the heads are missing or do not fit, or ``config`` is needed.
      ConversionError: the backbone keys do not fit ``config``.
    """
    sd = {strip_module_prefix(k): np.asarray(v) for k, v in state_dict.items()}
    backbone_sd, head_sd = split_inctrl_checkpoint(sd)
    if not head_sd:
        raise CheckpointMismatchError(
            f"{source} has no InCTRL head keys ({', '.join(HEAD_PREFIXES)}): it is not an InCTRL checkpoint. "
            "Use Detector.from_backbone() for a plain CLIP checkpoint."
        )
    if config is None:
        config = _infer_official_config(backbone_sd, source)
    clip_params = convert_state_dict(backbone_sd, config, layout="open_clip", source=source)
    heads, ignored = heads_from_state_dict(
        head_sd, embed_dim=config.vision.embed_dim, num_patches=config.vision.num_patches, source=source
    )
    return InCTRLWeights(config, clip_params, heads, tuple(tap_layers), ignored)


def _infer_official_config(backbone_sd: Mapping[str, np.ndarray], source: str) -> CLIPConfig:
    """The backbone config from tensor shapes, loud about the head-width assumption off the registry."""
    from inctrl_jax.clip.loading import infer_config
    from inctrl_jax.clip.registry import BACKBONES

    config = infer_config(backbone_sd, "open_clip")
    if any(b.config == config for b in BACKBONES.values()):
        return config
    v, t = config.vision, config.text
    hint = (
        "Pass the architecture explicitly: Detector.from_checkpoint(path, config=CLIPConfig("
        "VisionConfig(..., heads=...), TextConfig(..., heads=...))) or load_official_checkpoint(path, config=...)."
    )
    odd = [
        f"{name} width {w}" for name, w in (("vision", v.width), ("text", t.width)) if w % ASSUMED_HEAD_WIDTH
    ]
    if odd:
        raise CheckpointMismatchError(
            f"{source}: the backbone is not a registered architecture and its number of attention heads "
            f"cannot be read from the weights; the usual assumption of head width {ASSUMED_HEAD_WIDTH} "
            f"cannot hold ({', '.join(odd)} is not a multiple of {ASSUMED_HEAD_WIDTH}). {hint}"
        )
    warnings.warn(
        f"{source}: the backbone is not a registered architecture; its number of attention heads cannot "
        f"be read from the weights, so head width {ASSUMED_HEAD_WIDTH} is assumed (vision: {v.width} wide -> "
        f"{v.heads} heads, text: {t.width} wide -> {t.heads} heads). If the model was trained with other "
        f"head counts its scores are silently wrong. {hint}",
        UserWarning,
        stacklevel=3,
    )
    return config


def load_official_checkpoint(
    path: str | os.PathLike,
    *,
    config: CLIPConfig | None = None,
    tap_layers: tuple[int, ...] = DEFAULT_TAP_LAYERS,
) -> InCTRLWeights:
    """Read an official InCTRL ``checkpoint.pyth`` (torch pickle) or a safetensors copy of it.

    See :func:`from_official_state_dict`; pickles need torch (``pip install 'inctrl_jax[torch]'``).
    """
    from inctrl_jax.clip.loading import read_state_dict, stored_config

    return from_official_state_dict(
        read_state_dict(path),
        config=config or stored_config(path),  # inctrl-convert keeps the architecture in the header
        tap_layers=tap_layers,
        source=str(path),
    )


# --------------------------------------------------------------------------------------------
# Our format
# --------------------------------------------------------------------------------------------


def _flatten(tree: Mapping[str, Any], prefix: str) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for k, v in tree.items():
        name = f"{prefix}/{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, name))
        else:
            out[name] = np.ascontiguousarray(np.asarray(v))
    return out


def _unflatten(flat: Mapping[str, np.ndarray], prefix: str) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for name, arr in flat.items():
        if not name.startswith(prefix + "/"):
            continue
        node = tree
        parts = name[len(prefix) + 1 :].split("/")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = arr
    return tree


def save_model(directory: str | os.PathLike, weights: InCTRLWeights) -> Path:
    """Write ``config.json`` + ``model.safetensors`` into ``directory`` (created if needed).

    ``config.json`` records ``weights.provenance`` under ``"provenance"``.
    """
    from safetensors.numpy import save_file

    try:
        json.dumps(weights.provenance)
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"InCTRLWeights.provenance must hold JSON values (str, number, bool, list, dict): {e}"
        ) from e
    d = Path(directory).expanduser()
    d.mkdir(parents=True, exist_ok=True)
    flat = _flatten(weights.clip_params, "clip")
    if weights.head_variables is not None:
        flat.update(_flatten(weights.head_variables, "heads"))
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "clip_config": weights.config.to_dict(),
        "tap_layers": list(weights.tap_layers),
        "has_heads": weights.head_variables is not None,
        "provenance": dict(weights.provenance),
    }
    save_file(flat, str(d / WEIGHTS_FILE), metadata={"format": FORMAT_NAME})
    (d / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return d


def load_model(directory: str | os.PathLike) -> InCTRLWeights:
    """Read a directory written by :func:`save_model`.

    Raises:
      FileNotFoundError: ``config.json`` or ``model.safetensors`` is missing.
      CheckpointMismatchError: the files do not describe an inctrl_jax model, or the tensors do not
        fit the stored config.
    """
    from safetensors.numpy import load_file

    d = Path(directory).expanduser()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (d / name).is_file():
            raise FileNotFoundError(
                f"{d / name} not found: a saved inctrl_jax model is a directory with {CONFIG_FILE} and {WEIGHTS_FILE}"
            )
    meta = json.loads((d / CONFIG_FILE).read_text())
    if meta.get("format") != FORMAT_NAME:
        raise CheckpointMismatchError(
            f"{d / CONFIG_FILE} has format {meta.get('format')!r}, expected {FORMAT_NAME!r}; "
            "for an official InCTRL checkpoint use Detector.from_checkpoint(path_to_file)"
        )
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointMismatchError(
            f"{d / CONFIG_FILE} was written by a newer inctrl_jax (format_version {meta['format_version']}); upgrade"
        )
    config = CLIPConfig.from_dict(meta["clip_config"])
    flat = load_file(str(d / WEIGHTS_FILE))
    clip_params = _unflatten(flat, "clip")
    heads = _unflatten(flat, "heads") if meta.get("has_heads") else None
    _check_tree(config, clip_params, heads, d / WEIGHTS_FILE)
    provenance = meta.get("provenance") or {}
    if not isinstance(provenance, dict):
        raise CheckpointMismatchError(
            f'{d / CONFIG_FILE}: "provenance" must be a JSON object, got {type(provenance).__name__}; '
            "fix or remove the key"
        )
    return InCTRLWeights(config, clip_params, heads, tuple(meta["tap_layers"]), provenance=provenance)


def _check_tree(config: CLIPConfig, clip_params: Any, heads: Any, source: Path) -> None:
    import jax

    from inctrl_jax.clip.model import init_params
    from inctrl_jax.model.heads import init_heads

    expected = {"clip": jax.eval_shape(lambda: init_params(config))}
    got = {"clip": clip_params}
    if heads is not None:
        expected["heads"] = jax.eval_shape(
            lambda: init_heads(config.vision.embed_dim, config.vision.num_patches)
        )
        got["heads"] = heads
    exp_flat = _shapes(expected, "m")
    got_flat = _shapes(got, "m")
    missing = sorted(set(exp_flat) - set(got_flat))
    unexpected = sorted(set(got_flat) - set(exp_flat))
    bad = sorted(
        f"{k}: {got_flat[k]} != {exp_flat[k]}"
        for k in exp_flat
        if k in got_flat and got_flat[k] != exp_flat[k]
    )
    if missing or unexpected or bad:
        raise CheckpointMismatchError(
            f"{source} does not match its {CONFIG_FILE}: missing {missing[:10]}, unexpected {unexpected[:10]}, "
            f"shape mismatches {bad[:10]}. The directory is damaged or was edited; save the model again."
        )


def _shapes(tree: Mapping[str, Any], prefix: str) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    for k, v in tree.items():
        name = f"{prefix}/{k}"
        if isinstance(v, Mapping):
            out.update(_shapes(v, name))
        else:
            out[name] = tuple(v.shape)
    return out
