"""Load pretrained CLIP weights into the Flax towers.

Supported sources (all go through :func:`load_clip`):

* a registry name such as ``"ViT-B-16-plus-240"`` (see :mod:`inctrl_jax.clip.registry`), fetched
  from the Hugging Face hub with ``huggingface_hub`` (its cache; ``HF_HUB_OFFLINE=1`` honoured);
* a hub id of a transformers CLIP repository (``"openai/clip-vit-base-patch16"``) or of an
  open_clip repository (``open_clip_model.safetensors`` / ``open_clip_pytorch_model.bin``);
* a local directory written by transformers (``config.json`` + ``model.safetensors`` or
  ``pytorch_model.bin``) or a downloaded open_clip hub folder;
* a single checkpoint file: safetensors, or a PyTorch pickle (``.bin``, ``.pt``, ``.pth``,
  ``.pyth``), in transformers or open_clip/InCTRL key layout, including an official InCTRL
  ``checkpoint.pyth`` (backbone keys are loaded; the head keys are left to the model code, see
  :func:`load_inctrl_checkpoint`).

Pickles are read with ``torch.load(..., weights_only=True)``; torch is only needed for them.
``inctrl-convert`` turns any of these into a safetensors file once, after which torch is not needed.

When no configuration comes with the weights (a bare open_clip or InCTRL file), it is inferred
from the tensor shapes: widths, depths, MLP widths, patch size, image size, context length and
embedding size are read off exactly; the number of heads assumes a head width of 64 (true for all
OpenAI/open_clip ViT-B and ViT-L models). The activation cannot be seen in the weights: a shape
that equals a registered backbone takes that backbone's activation, otherwise the open_clip
layout defaults to exact GELU (open_clip's default; pass ``backbone=`` for QuickGELU models).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from inctrl_jax.clip.convert import ConversionError, convert_state_dict, detect_layout, strip_module_prefix
from inctrl_jax.clip.model import CLIPConfig, TextConfig, VisionConfig
from inctrl_jax.clip.registry import BACKBONES, Backbone, get_backbone

INCTRL_HEAD_PREFIXES: tuple[str, ...] = ("adapter.", "diff_head.", "diff_head_ref.")
"""Key prefixes of the trainable InCTRL heads inside an official ``checkpoint.pyth``."""

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pyth", ".ckpt")
# Buffers that OpenAI's TorchScript release files carry next to the weights.
_OPENAI_JIT_EXTRAS = ("input_resolution", "context_length", "vocab_size")
_WRAPPER_KEYS = ("model_state", "state_dict", "model")
_OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_HF_FILES = ("model.safetensors", "pytorch_model.bin")
_HEAD_WIDTH = 64
CONFIG_METADATA_KEY = "inctrl_jax.clip_config"
"""safetensors metadata key under which ``inctrl-convert`` stores the resolved :class:`CLIPConfig`."""


class CheckpointError(ConversionError):
    """A checkpoint file cannot be found, read or understood."""


TORCH_MISSING_HINT = (
    "Reading PyTorch pickles needs torch: install it with `pip install 'inctrl_jax[torch]'`, or convert "
    "the file once to safetensors on a machine that has torch (`inctrl-convert SRC OUT.safetensors`) "
    "and load the .safetensors file instead."
)


# --------------------------------------------------------------------------------------------
# Reading state dicts
# --------------------------------------------------------------------------------------------


def _sniff(path: Path) -> str:
    """``"safetensors"``, ``"torch"`` or ``"unknown"`` from the first bytes of the file."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:2] == b"PK" or head[:1] == b"\x80":  # zip archive (torch >= 1.6) or a legacy pickle
        return "torch"
    if len(head) >= 9 and head[8:9] == b"{":  # u64 header size, then the JSON header
        return "safetensors"
    return "unknown"


def _unwrap(obj: Any, path: Path) -> Mapping[str, Any]:
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path} holds a {type(obj).__name__}, not a state dict (a mapping from parameter names to "
            "tensors). Pass the file that torch.save wrote from model.state_dict()."
        )
    for key in _WRAPPER_KEYS:
        inner = obj.get(key)
        if isinstance(inner, Mapping) and inner:
            return _unwrap(inner, path)
    return obj


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        # bfloat16 tensors load because JAX's ml_dtypes registers the type with numpy; upcast them.
        return {
            k: v.astype(np.float32) if v.dtype.name == "bfloat16" else v
            for k, v in load_file(str(path)).items()
        }
    except Exception as e:  # SafetensorError, OSError, ...
        raise CheckpointError(
            f"cannot read {path} as safetensors ({type(e).__name__}: {e}). The file is truncated or not "
            "a safetensors file: download or convert it again (`inctrl-convert SRC OUT.safetensors`)."
        ) from e


def _torch_to_numpy(sd: Mapping[str, Any], path: Path) -> dict[str, np.ndarray]:
    import torch

    out: dict[str, np.ndarray] = {}
    bad: list[str] = []
    for k, v in sd.items():
        if isinstance(v, torch.Tensor):
            t = v.detach().cpu()
            if t.dtype in (torch.bfloat16, torch.float16):
                t = t.float()
            out[str(k)] = t.numpy()
        elif isinstance(v, np.ndarray):
            out[str(k)] = v
        else:
            bad.append(f"{k} ({type(v).__name__})")
    if bad:
        raise CheckpointError(
            f"{path} is not a plain state dict: entries {', '.join(bad[:10])} are not tensors. Save "
            "model.state_dict() (optionally wrapped as {'model_state': ...}) and load that file."
        )
    return out


def _read_torch(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise CheckpointError(f"{path} is a PyTorch pickle. {TORCH_MISSING_HINT}") from e
    is_jit = False
    try:
        with zipfile.ZipFile(path) as zf:
            is_jit = any(n.endswith("constants.pkl") for n in zf.namelist())
    except (zipfile.BadZipFile, OSError):
        pass
    try:
        if is_jit:  # OpenAI's original release files are TorchScript archives
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                obj: Any = torch.jit.load(str(path), map_location="cpu").state_dict()
        else:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else ""
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            hint = (
                "It stores Python objects besides tensors, which are not loaded for safety. If you trust "
                "the file, re-save only its tensors: in Python with torch, "
                "`sd = torch.load(path, weights_only=False)['model_state']; torch.save(sd, 'clean.pth')`."
            )
        else:
            hint = (
                "The file is truncated, damaged or not a PyTorch checkpoint: download it again, or pass a "
                "transformers directory, a .safetensors file or a torch.save'd state dict."
            )
        raise CheckpointError(
            f"cannot load {path} with torch.load ({type(e).__name__}: {msg}). {hint}"
        ) from e
    return _torch_to_numpy(_unwrap(obj, path), path)


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a checkpoint file into ``{name: numpy array}``.

    safetensors files are read with ``safetensors.numpy`` (no torch). ``.bin``/``.pt``/``.pth``/
    ``.pyth`` pickles are read with ``torch.load(map_location="cpu", weights_only=True)``; OpenAI's
    TorchScript release files with ``torch.jit.load``. A wrapper dict ``{"model_state"|"state_dict"|
    "model": ...}`` is unwrapped and ``module.`` prefixes are removed.

    Raises:
      CheckpointError: missing, truncated or foreign files, pickles without torch installed.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint file {path} does not exist; check the path.")
    if path.is_dir():
        raise CheckpointError(
            f"{path} is a directory; pass a checkpoint file, or call load_clip() on a transformers directory."
        )
    kind = _sniff(path)
    if path.suffix == ".safetensors" or (kind == "safetensors" and path.suffix not in PICKLE_SUFFIXES):
        sd = _read_safetensors(path)
    elif path.suffix in PICKLE_SUFFIXES or kind == "torch":
        sd = _read_torch(path)
    else:
        raise CheckpointError(
            f"{path} is not a checkpoint this loader knows: expected a .safetensors file or a PyTorch "
            f"pickle ({', '.join(PICKLE_SUFFIXES)}), or a transformers directory."
        )
    sd = {strip_module_prefix(k): v for k, v in sd.items()}
    if not sd:
        raise CheckpointError(f"{path} contains no tensors; pass the file that holds the model weights.")
    return sd


def split_inctrl_checkpoint(
    state_dict: Mapping[str, np.ndarray],
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Split an InCTRL state dict into ``(backbone, heads)``.

    ``heads`` holds the keys under :data:`INCTRL_HEAD_PREFIXES` (``adapter.``, ``diff_head.``,
    ``diff_head_ref.``) with their names unchanged; ``backbone`` holds everything else.
    """
    heads = {k: v for k, v in state_dict.items() if k.startswith(INCTRL_HEAD_PREFIXES)}
    backbone = {k: v for k, v in state_dict.items() if k not in heads}
    return backbone, heads


# --------------------------------------------------------------------------------------------
# Configurations
# --------------------------------------------------------------------------------------------


def config_from_transformers(config: Mapping[str, Any] | str | os.PathLike) -> CLIPConfig:
    """A :class:`CLIPConfig` from a transformers CLIP ``config.json`` (path or parsed dict).

    Missing fields take the transformers defaults. ``hidden_act`` gives the activation
    (``quick_gelu`` or ``gelu``). Old configs carry ``eos_token_id == 2``, which meant "pool at the
    largest token id"; that is mapped to ``vocab_size - 1`` (the end-of-text id).
    """
    from transformers import CLIPConfig as HFConfig
    from transformers import CLIPVisionConfig

    source = "config.json"
    if not isinstance(config, Mapping):
        source = str(config)
        try:
            config = json.loads(Path(config).read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot read the transformers config {source}: {e}") from e
    assert isinstance(config, Mapping)
    vc: Any
    tc: Any
    if config.get("model_type") == "clip_vision_model":
        vc = CLIPVisionConfig(**{k: v for k, v in config.items() if k != "model_type"})
        tc = HFConfig().text_config
        projection_dim = int(config.get("projection_dim", getattr(vc, "projection_dim", 512)))
    else:
        if config.get("model_type", "clip") != "clip":
            raise CheckpointError(
                f"{source} describes a {config.get('model_type')!r} model, not CLIP; pass a CLIP checkpoint."
            )
        hf = HFConfig(**{k: v for k, v in config.items() if k != "model_type"})
        vc, tc, projection_dim = hf.vision_config, hf.text_config, int(hf.projection_dim or 512)

    def act(name: str, tower: str) -> Any:
        if name in ("quick_gelu", "gelu"):
            return name
        raise CheckpointError(
            f"{source}: {tower} hidden_act {name!r} is not supported; CLIP towers use 'quick_gelu' or 'gelu'."
        )

    eos = tc.eos_token_id
    if eos is None or eos == 2:
        eos = tc.vocab_size - 1
    vision = VisionConfig(
        image_size=vc.image_size,
        patch_size=vc.patch_size,
        width=vc.hidden_size,
        layers=vc.num_hidden_layers,
        heads=vc.num_attention_heads,
        mlp_dim=vc.intermediate_size,
        embed_dim=projection_dim,
        act=act(vc.hidden_act, "vision"),
        ln_eps=float(vc.layer_norm_eps),
    )
    text = TextConfig(
        vocab_size=tc.vocab_size,
        context_length=tc.max_position_embeddings,
        width=tc.hidden_size,
        layers=tc.num_hidden_layers,
        heads=tc.num_attention_heads,
        mlp_dim=tc.intermediate_size,
        embed_dim=projection_dim,
        act=act(tc.hidden_act, "text"),
        ln_eps=float(tc.layer_norm_eps),
        eos_token_id=int(eos),
    )
    return CLIPConfig(vision=vision, text=text)


def config_from_open_clip_json(path: str | os.PathLike) -> CLIPConfig:
    """A :class:`CLIPConfig` from an ``open_clip_config.json`` (hub) or a model-config json."""
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read the open_clip config {path}: {e}") from e
    d = d.get("model_cfg", d)
    try:
        vcfg, tcfg, embed = d["vision_cfg"], d["text_cfg"], int(d["embed_dim"])
        act: Any = "quick_gelu" if d.get("quick_gelu", False) else "gelu"
        vw, tw = int(vcfg.get("width", 768)), int(tcfg.get("width", 512))
        vision = VisionConfig(
            image_size=int(vcfg["image_size"]),
            patch_size=int(vcfg["patch_size"]),
            width=vw,
            layers=int(vcfg["layers"]),
            heads=vw // int(vcfg.get("head_width", _HEAD_WIDTH)),
            mlp_dim=int(vw * float(vcfg.get("mlp_ratio", 4.0))),
            embed_dim=embed,
            act=act,
        )
        text = TextConfig(
            vocab_size=int(tcfg.get("vocab_size", 49408)),
            context_length=int(tcfg.get("context_length", 77)),
            width=tw,
            layers=int(tcfg["layers"]),
            heads=int(tcfg.get("heads", tw // _HEAD_WIDTH)),
            mlp_dim=int(tw * float(tcfg.get("mlp_ratio", 4.0))),
            embed_dim=embed,
            act=act,
            eos_token_id=int(tcfg.get("vocab_size", 49408)) - 1,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(
            f"{path} is not an open_clip model config with vision_cfg/text_cfg/embed_dim ({e!r}); "
            "pass backbone= with a registered name instead."
        ) from e
    return CLIPConfig(vision=vision, text=text)


def _count_layers(keys: Sequence[str], pattern: str) -> int:
    rx = re.compile(pattern)
    idx = {int(m.group(1)) for k in keys if (m := rx.match(k))}
    return max(idx) + 1 if idx else 0


def infer_config(state_dict: Mapping[str, np.ndarray], layout: str | None = None) -> CLIPConfig:
    """Infer a :class:`CLIPConfig` from tensor shapes (see the module docstring for the rules).

    A tower whose keys are absent keeps the default (OpenAI ViT-B/16) shape. If the inferred
    shapes equal a registered backbone, that backbone's config (with its activation) is returned.
    """
    sd = state_dict
    keys = list(sd)
    layout = layout or detect_layout(keys)
    names = (
        {
            "conv": "visual.conv1.weight",
            "vpos": "visual.positional_embedding",
            "vproj": "visual.proj",
            "vfc1": r"visual\.transformer\.resblocks\.(\d+)\.",
            "vfc1w": "visual.transformer.resblocks.0.mlp.c_fc.weight",
            "tok": "token_embedding.weight",
            "tpos": "positional_embedding",
            "tproj": "text_projection",
            "tblk": r"transformer\.resblocks\.(\d+)\.",
            "tfc1w": "transformer.resblocks.0.mlp.c_fc.weight",
        }
        if layout == "open_clip"
        else {
            "conv": "vision_model.embeddings.patch_embedding.weight",
            "vpos": "vision_model.embeddings.position_embedding.weight",
            "vproj": "visual_projection.weight",
            "vfc1": r"vision_model\.encoder\.layers\.(\d+)\.",
            "vfc1w": "vision_model.encoder.layers.0.mlp.fc1.weight",
            "tok": "text_model.embeddings.token_embedding.weight",
            "tpos": "text_model.embeddings.position_embedding.weight",
            "tproj": "text_projection.weight",
            "tblk": r"text_model\.encoder\.layers\.(\d+)\.",
            "tfc1w": "text_model.encoder.layers.0.mlp.fc1.weight",
        }
    )

    def proj_dims(key: str) -> tuple[int, int]:  # (in, out)
        p = np.shape(sd[key])
        return (p[0], p[1]) if layout == "open_clip" else (p[1], p[0])

    vision, text = VisionConfig(), TextConfig()
    try:
        if names["conv"] in sd:
            width, _, patch, _ = np.shape(sd[names["conv"]])
            grid = int(round((np.shape(sd[names["vpos"]])[0] - 1) ** 0.5))
            embed = proj_dims(names["vproj"])[1] if names["vproj"] in sd else vision.embed_dim
            vision = VisionConfig(
                image_size=grid * patch,
                patch_size=patch,
                width=width,
                layers=_count_layers(keys, names["vfc1"]),
                heads=max(1, width // _HEAD_WIDTH),
                mlp_dim=np.shape(sd[names["vfc1w"]])[0],
                embed_dim=embed,
                act="gelu" if layout == "open_clip" else "quick_gelu",
            )
        if names["tok"] in sd:
            vocab, twidth = np.shape(sd[names["tok"]])
            tlayers = _count_layers(
                [k for k in keys if not k.startswith(("visual.", "vision_model."))], names["tblk"]
            )
            text = TextConfig(
                vocab_size=vocab,
                context_length=np.shape(sd[names["tpos"]])[0],
                width=twidth,
                layers=tlayers,
                heads=max(1, twidth // _HEAD_WIDTH),
                mlp_dim=np.shape(sd[names["tfc1w"]])[0],
                embed_dim=proj_dims(names["tproj"])[1] if names["tproj"] in sd else vision.embed_dim,
                act=vision.act if names["conv"] in sd else "gelu",
                eos_token_id=vocab - 1,
            )
    except (KeyError, ValueError, IndexError) as e:
        raise CheckpointError(
            f"cannot infer the CLIP architecture from the checkpoint's tensor shapes ({e!r}); pass "
            f"backbone= (one of {', '.join(BACKBONES)}) or a CLIPConfig."
        ) from e
    inferred = CLIPConfig(vision=vision, text=text)
    for b in BACKBONES.values():
        if _same_shapes(b.config, inferred):
            return b.config
    return inferred


def _same_shapes(a: CLIPConfig, b: CLIPConfig) -> bool:
    def strip(c: Any) -> dict:
        d = dataclasses.asdict(c)
        d.pop("act")
        return d

    return strip(a.vision) == strip(b.vision) and strip(a.text) == strip(b.text)


# --------------------------------------------------------------------------------------------
# Hub
# --------------------------------------------------------------------------------------------


def _offline() -> bool:
    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return any(f.strip().lower() in ("1", "true", "yes", "on") for f in flags)


HUB_PROBE_TIMEOUT_S = 3.0
_hub_probe: dict[str, str | None] = {}  # endpoint -> None (reachable) or why it is not; one probe per process


def _hub_endpoint() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.ENDPOINT).rstrip("/")
    except Exception:  # pragma: no cover - very old huggingface_hub
        return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hub_unreachable_reason() -> str | None:
    """``None`` when the Hugging Face hub endpoint answers, else why not (probed once per process).

    One ``HEAD`` request to ``huggingface_hub``'s configured endpoint (``HF_ENDPOINT``) with a
    :data:`HUB_PROBE_TIMEOUT_S` timeout; any HTTP answer, even an error status, counts as reachable.
    Without it an unreachable hub costs a minute of retries per file before failing.
    """
    import urllib.error
    import urllib.request

    endpoint = _hub_endpoint()
    if endpoint not in _hub_probe:
        reason: str | None = None
        try:
            request = urllib.request.Request(endpoint, method="HEAD")
            with urllib.request.urlopen(request, timeout=HUB_PROBE_TIMEOUT_S):
                pass
        except urllib.error.HTTPError:
            pass  # it answered
        except (urllib.error.URLError, OSError, ValueError) as e:
            detail = getattr(e, "reason", e)
            reason = f"the hub endpoint {endpoint} is unreachable ({detail})"
        _hub_probe[endpoint] = reason
    return _hub_probe[endpoint]


def _hub_error(repo_id: str, filename: str, why: str) -> CheckpointError:
    why = why.strip().rstrip(".")
    advice = (
        " (or unset HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE if this machine can reach the hub)"
        if _offline()
        else ""
    )
    return CheckpointError(
        f"cannot get {filename} of the Hugging Face hub repository {repo_id!r}: {why}. Download it on a "
        f"machine with network access (`hf download {repo_id} {filename}`) and pass the local file or "
        f"directory to load_clip(){advice}."
    )


def _hub_file(repo_id: str, filename: str, revision: str | None = None) -> Path:
    """Find one file of a hub repository in the cache, or download it when the hub is reachable."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as e:  # pragma: no cover - a core dependency
        raise CheckpointError("huggingface_hub is not installed: `pip install huggingface_hub`.") from e
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, local_files_only=True))
    except Exception as e:
        if _offline():
            raise _hub_error(
                repo_id, filename, "offline mode (HF_HUB_OFFLINE) is on and the file is not in the cache"
            ) from e
    unreachable = hub_unreachable_reason()
    if unreachable is not None:
        raise _hub_error(repo_id, filename, f"it is not in the local cache and {unreachable}")
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision))
    except Exception as e:
        text = str(e).strip()
        raise _hub_error(repo_id, filename, text.splitlines()[0] if text else type(e).__name__) from e


def _first_hub_file(repo_id: str, candidates: Sequence[str], revision: str | None = None) -> Path:
    errors: list[CheckpointError] = []
    for name in candidates:
        try:
            return _hub_file(repo_id, name, revision)
        except CheckpointError as e:
            errors.append(e)
    raise CheckpointError(
        f"none of {', '.join(candidates)} could be fetched from the hub repository {repo_id!r}. "
        + str(errors[-1])
    ) from errors[-1]


# --------------------------------------------------------------------------------------------
# load_clip
# --------------------------------------------------------------------------------------------


def _resolve_backbone(backbone: str | CLIPConfig | Backbone | None) -> CLIPConfig | None:
    if backbone is None:
        return None
    if isinstance(backbone, CLIPConfig):
        return backbone
    if isinstance(backbone, Backbone):
        return backbone.config
    try:
        return get_backbone(backbone).config
    except KeyError as e:
        raise CheckpointError(str(e.args[0])) from None


def _convert(
    sd: Mapping[str, np.ndarray],
    config: CLIPConfig | None,
    towers: tuple[str, ...],
    source: str,
) -> tuple[CLIPConfig, dict]:
    try:
        layout = detect_layout(sd)
    except ConversionError as e:
        raise CheckpointError(f"{source}: {e}. Pass a CLIP checkpoint.") from e
    if config is None:
        config = infer_config(sd, layout)
    sd = {k: v for k, v in sd.items() if k not in _OPENAI_JIT_EXTRAS}
    params = convert_state_dict(
        sd, config, layout=layout, towers=towers, extra_keys=INCTRL_HEAD_PREFIXES, source=source
    )
    return config, params


def _read_sharded(index: Path) -> list[Path]:
    try:
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"cannot read the shard index {index}: {e!r}; download it again.") from e
    return [index.parent / f for f in files]


def stored_config(path: str | os.PathLike) -> CLIPConfig | None:
    """The architecture that ``inctrl-convert`` stored in a safetensors header, or ``None``."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
        text = meta.get(CONFIG_METADATA_KEY)
        return CLIPConfig.from_dict(json.loads(text)) if text else None
    except Exception:  # unreadable files are reported by read_state_dict
        return None


_Located = tuple[list[Path], CLIPConfig | None, str]


def _locate_dir(path: Path) -> _Located:
    for name in _HF_FILES:
        if (path / name).exists():
            cfg_json = path / "config.json"
            cfg = config_from_transformers(cfg_json) if cfg_json.exists() else None
            return [path / name], cfg, str(path / name)
    index = path / (_HF_FILES[0] + ".index.json")
    if index.exists():
        cfg_json = path / "config.json"
        cfg = config_from_transformers(cfg_json) if cfg_json.exists() else None
        return _read_sharded(index), cfg, str(index)
    for name in _OPEN_CLIP_FILES:
        if (path / name).exists():
            oc_json = path / "open_clip_config.json"
            return (
                [path / name],
                (config_from_open_clip_json(oc_json) if oc_json.exists() else None),
                str(path / name),
            )
    raise CheckpointError(
        f"{path} has no CLIP weights: expected {' or '.join(_HF_FILES)} (with config.json) from transformers, "
        f"or {' or '.join(_OPEN_CLIP_FILES)} from open_clip. Pass the weights file itself if it is named "
        "differently."
    )


def _locate_registry(b: Backbone, tag: str | None) -> _Located:
    tag = tag or b.default_tag
    if tag not in b.weights:
        raise CheckpointError(
            f"backbone {b.name!r} has no pretrained tag {tag!r}; available: {', '.join(b.weights)}."
        )
    repo_id, filename = b.weights[tag]
    if filename is None:  # a transformers repository
        path = _first_hub_file(repo_id, _HF_FILES)
    else:
        path = _first_hub_file(repo_id, [filename] + [f for f in _OPEN_CLIP_FILES if f != filename])
    return [path], b.config, f"{repo_id}/{path.name}"


def _looks_like_hub_id(source: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", source))


def _locate_hub_repo(repo_id: str) -> _Located:
    try:
        cfg_path: Path | None = _hub_file(repo_id, "config.json")
    except CheckpointError:
        cfg_path = None
    if cfg_path is not None:
        path = _first_hub_file(repo_id, _HF_FILES)
        return [path], config_from_transformers(cfg_path), f"{repo_id}/{path.name}"
    path = _first_hub_file(repo_id, _OPEN_CLIP_FILES)
    try:
        cfg: CLIPConfig | None = config_from_open_clip_json(_hub_file(repo_id, "open_clip_config.json"))
    except CheckpointError:
        cfg = None
    return [path], cfg, f"{repo_id}/{path.name}"


def _locate(source: str | os.PathLike, tag: str | None) -> _Located:
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_dir():
        return _locate_dir(path)
    if path.exists():
        cfg = stored_config(path)
        if cfg is None and path.name in _HF_FILES and (path.parent / "config.json").exists():
            cfg = config_from_transformers(path.parent / "config.json")
        return [path], cfg, str(path)
    if text in BACKBONES:
        return _locate_registry(BACKBONES[text], tag)
    if path.suffix in PICKLE_SUFFIXES + (".safetensors",) or not _looks_like_hub_id(text):
        raise CheckpointError(
            f"{text!r} is neither an existing file or directory, nor a registered backbone "
            f"({', '.join(BACKBONES)}), nor a Hugging Face hub id (owner/name); check the path."
        )
    return _locate_hub_repo(text)


def resolve_source(source: str | os.PathLike, *, tag: str | None = None) -> list[Path]:
    """The local weight file(s) behind ``source`` (downloading them if needed)."""
    return _locate(source, tag)[0]


def load_clip(
    source: str | os.PathLike,
    *,
    backbone: str | CLIPConfig | Backbone | None = None,
    tag: str | None = None,
    towers: Sequence[str] = ("visual", "text"),
) -> tuple[CLIPConfig, dict]:
    """Load CLIP weights from a registry name, hub id, directory or file.

    Args:
      source: a registered backbone name (``"ViT-B-16-plus-240"``), a Hugging Face hub id, a local
        transformers/open_clip directory, or a checkpoint file (safetensors or PyTorch pickle, in
        transformers or open_clip/InCTRL layout).
      backbone: the architecture, as a registry name or a :class:`CLIPConfig`; it overrides any
        config found with the weights. Needed only when the source carries no config and the shapes
        are ambiguous (head width other than 64, QuickGELU in an open_clip file).
      tag: pretrained tag of a registry name (default: the backbone's default tag).
      towers: ``("visual", "text")``, or one of them to load a single tower.

    Returns:
      ``(config, params)``; ``params`` is ``{"visual": ..., "text": ...}`` (only the requested
      towers) of float32 numpy arrays, ready for ``CLIP(config).apply({"params": params}, ...)``.

    Raises:
      CheckpointError: the source cannot be found, fetched or read.
      ConversionError: the weights do not fit the architecture (missing/unexpected keys, shapes).
    """
    towers = tuple(towers)
    if not towers or any(t not in ("visual", "text") for t in towers):
        raise ValueError(f"towers must be a non-empty subset of ('visual', 'text'), got {towers!r}")
    config = _resolve_backbone(backbone)
    files, found, name = _locate(source, tag)
    sd: dict[str, np.ndarray] = {}
    for f in files:
        sd.update(read_state_dict(f))
    return _convert(sd, config or found, towers, name)


def load_inctrl_checkpoint(
    path: str | os.PathLike,
    *,
    backbone: str | CLIPConfig | Backbone | None = None,
    towers: Sequence[str] = ("visual", "text"),
) -> tuple[CLIPConfig, dict, dict[str, np.ndarray]]:
    """Load an official InCTRL ``checkpoint.pyth`` (or a safetensors copy of it).

    Returns:
      ``(config, clip_params, head_state_dict)``: the CLIP backbone as in :func:`load_clip`, and
      the remaining head tensors (``adapter.*``, ``diff_head.*``, ``diff_head_ref.*``, PyTorch
      names and layouts) for the model code to convert.
    """
    path = Path(path)
    sd = read_state_dict(path)
    backbone_sd, heads = split_inctrl_checkpoint(sd)
    if not heads:
        raise CheckpointError(
            f"{path} has no InCTRL head keys ({', '.join(INCTRL_HEAD_PREFIXES)}); it is not an InCTRL "
            "checkpoint. Use load_clip() for a plain CLIP checkpoint."
        )
    config = _resolve_backbone(backbone) or stored_config(path)
    config, params = _convert(backbone_sd, config, tuple(towers), str(path))
    return config, params, heads
