"""The training recipe: validate, scan data, cache frozen features, train the heads, checkpoint, export.

Reads top to bottom as the protocol of the reference code (reference doc sections 4-5): K fixed per
run, 8 normal + 8 anomalous queries per step with references re-drawn per query from the query's
category, AdamW on the heads only, constant learning rate, focal loss, BatchNorm on batch
statistics. The backbone is frozen, so each unique image is encoded once (feature cache).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from inctrl_jax.clip.model import CLIPConfig, TextConfig, VisionConfig, init_params
from inctrl_jax.training import feature_cache as fc
from inctrl_jax.training.losses import LOSS_KINDS
from inctrl_jax.training.sampling import BalancedSampler, build_training_set, check_training_set
from inctrl_jax.training.step import (
    OptimizerConfig,
    init_train_state,
    jit_train_step,
    make_mesh,
    make_optimizer,
    make_train_step,
    put_batch,
    replicate,
)

log = logging.getLogger("inctrl_jax.train")

# Architectures usable with ``backbone.source = "random"`` besides the registry names.
TINY_CONFIG = CLIPConfig(
    VisionConfig(240, 16, 64, 12, 4, 256, 640, "gelu"), TextConfig(49408, 77, 32, 2, 2, 128, 640, "gelu")
)
"""The golden fixtures' tiny model (ViT width 64, 640-d embedding): CPU tests and smoke runs."""


class ConfigError(ValueError):
    """A training config value is invalid; the message names the key."""


def default_config() -> ml_collections.ConfigDict:
    """Every key a training config may set, with the reference protocol's values."""
    c = ml_collections.ConfigDict()
    c.data = ml_collections.ConfigDict({"root": "", "categories": ()})
    c.backbone = ml_collections.ConfigDict(
        {"source": "ViT-B-16-plus-240", "arch": "", "tag": "", "seed": 0, "tap_layers": (7, 9, 11)}
    )
    c.model = ml_collections.ConfigDict({"k": 2, "seed": 0})
    c.train = ml_collections.ConfigDict(
        {
            "steps": 1000,
            "normal_per_step": 8,
            "anomalous_per_step": 8,
            "seed": 10,
            "learning_rate": 1e-3,
            "b1": 0.9,
            "b2": 0.999,
            "eps": 1e-8,
            "weight_decay": 0.01,
            "loss": "reference",
            "legacy_batch_scramble": False,
        }
    )
    c.cache = ml_collections.ConfigDict({"dir": "", "dtype": "float32", "batch_size": 16})
    c.checkpoint = ml_collections.ConfigDict({"every": 100, "keep": 3})
    c.export = ml_collections.ConfigDict({"official_state_dict": False})
    c.mesh = ml_collections.ConfigDict({"num_devices": -1, "distributed": False})
    c.log = ml_collections.ConfigDict({"every": 1, "progress": True})
    return c


def _flat(cfg: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        if isinstance(value, ml_collections.ConfigDict | dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Checks keys and values before any compute; raises :class:`ConfigError` naming the key."""
    known = _flat(default_config())
    given = _flat(config)
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ConfigError(f"unknown config key(s) {unknown}; known keys: {sorted(known)}")
    missing = sorted(set(known) - set(given))
    if missing:
        raise ConfigError(
            f"config misses key(s) {missing}; start from inctrl_jax.training.trainer.default_config()"
        )
    t = config.train
    if t.loss not in LOSS_KINDS:
        raise ConfigError(f"config.train.loss={t.loss!r}; use one of {LOSS_KINDS}")
    if config.model.k < 1:
        raise ConfigError(f"config.model.k={config.model.k}; K must be >= 1")
    if t.steps < 1 or t.normal_per_step < 1 or t.anomalous_per_step < 1:
        raise ConfigError("config.train.steps, normal_per_step and anomalous_per_step must be >= 1")
    if t.normal_per_step + t.anomalous_per_step < 2:
        raise ConfigError("train-mode BatchNorm needs at least 2 queries per step")
    if config.cache.dtype not in fc.CACHE_DTYPES:
        raise ConfigError(f"config.cache.dtype={config.cache.dtype!r}; use one of {fc.CACHE_DTYPES}")
    if not config.data.root or not config.data.categories:
        raise ConfigError(
            "set config.data.root and config.data.categories (category folders in MVTec layout)"
        )
    if config.checkpoint.every < 1 or config.checkpoint.keep < 1:
        raise ConfigError("config.checkpoint.every and config.checkpoint.keep must be >= 1")


def _load_backbone(cfg: ml_collections.ConfigDict) -> tuple[CLIPConfig, dict]:
    if cfg.source == "random":
        if cfg.arch in ("", "inctrl-tiny"):
            clip_config = TINY_CONFIG
        else:
            from inctrl_jax.clip.registry import get_backbone

            clip_config = get_backbone(cfg.arch).config
        # Jitted: eager Flax init of a 12-block ViT dispatches thousands of small ops.
        return clip_config, jax.jit(lambda: init_params(clip_config, cfg.seed))()
    from inctrl_jax.clip.loading import load_clip

    return load_clip(cfg.source, backbone=cfg.arch or None, tag=cfg.tag or None)


class MetricsWriter:
    """Per-step metrics as JSON lines in ``<workdir>/metrics.jsonl`` (appended across restarts)."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


@dataclasses.dataclass
class TrainResult:
    workdir: Path
    model_dir: Path
    steps: int
    final_loss: float
    seconds: dict[str, float]
    cache_bytes: int
    state: dict[str, Any]


def _host_batch(cache: fc.FeatureCache, protos: np.ndarray, data, batch) -> dict[str, np.ndarray]:
    b, k = batch.references.shape
    refs = np.asarray(cache.patch_tokens[batch.references.reshape(-1)], np.float32)
    refs = refs.reshape(b, k, *refs.shape[1:]).transpose(0, 2, 1, 3, 4)  # [B, L, K, P, D]
    return {
        "query_tokens": np.asarray(cache.patch_tokens[batch.query], np.float32),
        "query_embeds": cache.class_embeds[batch.query],
        "reference_tokens": refs.reshape(b, refs.shape[1], k * refs.shape[3], refs.shape[4]),
        "reference_embeds": cache.class_embeds[batch.references],
        "text_prototypes": protos[data.categories[batch.query]],
        "labels": batch.labels,
    }


def train(config: ml_collections.ConfigDict, workdir: str | Path) -> TrainResult:
    """Runs (or resumes) a training run in ``workdir``; returns the final state and the export path.

    Layout of ``workdir``: ``checkpoints/`` (Orbax), ``metrics.jsonl``, ``config.json``,
    ``model/`` (the trained detector, :func:`inctrl_jax.model.checkpoint.save_model` format) and,
    with ``config.export.official_state_dict``, ``official_state_dict.safetensors``.
    """
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    validate_config(config)
    if config.mesh.distributed:
        jax.distributed.initialize()
    workdir = Path(workdir).expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    k = int(config.model.k)

    data = build_training_set(config.data.root, tuple(config.data.categories))
    check_training_set(data, k)
    log.info("data: %s", data.summary())

    clip_config, clip_params = _load_backbone(config.backbone)
    taps = tuple(int(t) for t in config.backbone.tap_layers)
    v = clip_config.vision
    est = fc.estimate_cache_bytes(
        len(data), len(taps), v.num_patches, v.width, v.embed_dim, config.cache.dtype
    )
    log.info(
        "feature cache: %d images x %d layers x %d patches x %d (%s) = %s %s",
        len(data), len(taps), v.num_patches, v.width, config.cache.dtype, fc.format_bytes(est),
        f"on disk in {config.cache.dir}" if config.cache.dir else "in memory",
    )  # fmt: skip

    from inctrl_jax.model.checkpoint import InCTRLWeights
    from inctrl_jax.model.detector import Detector

    detector = Detector(
        InCTRLWeights(clip_config, clip_params, None, taps), batch_size=config.cache.batch_size
    )

    def encode(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        embeds, tokens = detector.encode_images(pixels)
        tokens = tokens / np.linalg.norm(tokens, axis=-1, keepdims=True)
        return tokens, embeds

    t = time.perf_counter()
    fp = fc.fingerprint(data.paths, detector.backbone_id, taps, config.cache.dtype)
    cache = fc.build_feature_cache(
        data.paths, encode, v.image_size, (len(taps), v.num_patches, v.width, v.embed_dim),
        dtype=config.cache.dtype, batch_size=config.cache.batch_size, directory=config.cache.dir or None,
        fingerprint_id=fp, progress=config.log.progress,
    )  # fmt: skip
    protos = np.stack([np.asarray(detector.text_prototypes(name)) for name in data.category_names])
    seconds["cache"] = time.perf_counter() - t
    log.info("feature cache built: %s in %.1f s", fc.format_bytes(cache.nbytes), seconds["cache"])

    from inctrl_jax.model.heads import init_heads

    t_cfg = config.train
    tx = make_optimizer(
        OptimizerConfig(t_cfg.learning_rate, t_cfg.b1, t_cfg.b2, t_cfg.eps, t_cfg.weight_decay)
    )
    state = init_train_state(init_heads(v.embed_dim, v.num_patches, config.model.seed), tx)
    sampler = BalancedSampler(data, k, t_cfg.normal_per_step, t_cfg.anomalous_per_step, t_cfg.seed)

    ckpt_dir = workdir / "checkpoints"
    manager = ocp.CheckpointManager(
        ckpt_dir,
        options=ocp.CheckpointManagerOptions(max_to_keep=config.checkpoint.keep, create=True),
    )
    latest = manager.latest_step()
    if latest is not None:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        restored = manager.restore(
            latest,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()),
        )
        state = restored["state"]
        sampler.set_state(restored["meta"]["sampler"])
        log.info("resumed from %s at step %d", ckpt_dir / str(latest), latest)
    log.info(
        "checkpoints: %s (every %d steps, keep %d)", ckpt_dir, config.checkpoint.every, config.checkpoint.keep
    )
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")

    mesh = make_mesh(config.mesh.num_devices)
    state = replicate(state, mesh)
    step_fn = jit_train_step(
        make_train_step(tx, loss_kind=t_cfg.loss, legacy_batch_scramble=t_cfg.legacy_batch_scramble),
        mesh,
        state,
    )
    metrics_writer = MetricsWriter(workdir / "metrics.jsonl")

    def save(step: int) -> None:
        meta = {"sampler": sampler.get_state(), "config": json.loads(config.to_json_best_effort())}
        manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        )

    from tqdm import tqdm

    start = int(sampler.step)
    log.info("training: steps %d..%d on %d device(s), K=%d", start, t_cfg.steps, mesh.devices.size, k)
    t = time.perf_counter()
    loss = float("nan")
    bar = tqdm(total=t_cfg.steps, initial=start, desc="train", unit="step", disable=not config.log.progress)
    while sampler.step < t_cfg.steps:
        step = sampler.step
        batch = put_batch(_host_batch(cache, protos, data, next(sampler)), mesh)
        state, metrics = step_fn(state, batch)
        if (step + 1) % config.log.every == 0 or step + 1 == t_cfg.steps:
            record = {"step": step + 1, **{name: float(val) for name, val in metrics.items()}}
            loss = record["loss"]
            metrics_writer.write(record)
            bar.set_postfix(loss=f"{loss:.4f}")
        if (step + 1) % config.checkpoint.every == 0 or step + 1 == t_cfg.steps:
            save(step + 1)
        bar.update(1)
    bar.close()
    manager.wait_until_finished()
    seconds["train"] = time.perf_counter() - t

    from inctrl_jax.model.checkpoint import save_model

    heads = jax.device_get({"params": state["params"], "batch_stats": state["batch_stats"]})
    weights = InCTRLWeights(clip_config, jax.device_get(clip_params), heads, taps)
    model_dir = save_model(workdir / "model", weights)
    if config.export.official_state_dict:
        from safetensors.numpy import save_file

        from inctrl_jax.model.checkpoint import to_official_state_dict

        save_file(to_official_state_dict(weights), str(workdir / "official_state_dict.safetensors"))
    seconds["total"] = time.perf_counter() - t0
    log.info(
        "done: %d steps, final loss %.4f, cache %.1f s, training %.1f s, model saved to %s",
        t_cfg.steps, loss, seconds["cache"], seconds["train"], model_dir,
    )  # fmt: skip
    return TrainResult(workdir, model_dir, t_cfg.steps, loss, seconds, cache.nbytes, jax.device_get(state))
