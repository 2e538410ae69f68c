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
from inctrl_jax.data import BalancedEpisodeSampler, Dataset
from inctrl_jax.training import feature_cache as fc
from inctrl_jax.training.data import load_training_set, summary
from inctrl_jax.training.feed import PLACEMENTS, BatchFeed, choose_placement
from inctrl_jax.training.losses import LOSS_KINDS
from inctrl_jax.training.step import (
    OptimizerConfig,
    init_train_state,
    jit_train_step,
    make_mesh,
    make_optimizer,
    make_train_step,
    replicate,
)
from inctrl_jax.training.text_prior import text_prototypes_for

log = logging.getLogger("inctrl_jax.train")

# Architectures usable with ``backbone.source = "random"`` besides the registry names.
TINY_CONFIG = CLIPConfig(
    VisionConfig(240, 16, 64, 12, 4, 256, 640, "gelu"), TextConfig(49408, 77, 32, 2, 2, 128, 640, "gelu")
)
"""The golden fixtures' tiny model (ViT width 64, 640-d embedding): CPU tests and smoke runs."""

MICRO_CONFIG = CLIPConfig(
    VisionConfig(64, 16, 32, 3, 2, 64, 64, "gelu"), TextConfig(49408, 77, 32, 1, 2, 64, 64, "gelu")
)
"""A 3-block, 64-px model (16 patches, taps (1, 2, 3)) for fast end-to-end tests; not a real backbone."""

RANDOM_ARCHS = {"inctrl-tiny": TINY_CONFIG, "inctrl-micro": MICRO_CONFIG}

# Keys a resumed run may change: they do not alter what is computed (or, for mesh.num_devices,
# only the order of float reductions). Any other difference to the checkpointed config is an error.
RESUMABLE_CHANGES = (
    "train.steps",
    "checkpoint.",
    "log.",
    "mesh.",
    "cache.dir",
    "cache.batch_size",
    "cache.placement",
    "export.",
)


class ConfigError(ValueError):
    """A training config value is invalid; the message names the key."""


def default_config() -> ml_collections.ConfigDict:
    """Every key a training config may set, with the reference protocol's values."""
    c = ml_collections.ConfigDict()
    c.data = ml_collections.ConfigDict({"root": "", "datasets": (), "on_error": "raise"})
    c.backbone = ml_collections.ConfigDict(
        {"source": "ViT-B-16-plus-240", "arch": "", "tag": "", "seed": 0, "tap_layers": (7, 9, 11)}
    )
    c.model = ml_collections.ConfigDict({"k": 2, "seed": 0})
    c.train = ml_collections.ConfigDict(
        {
            "steps": 1000,
            "batch_size": 16,
            "exclude_query": False,
            "seed": 10,
            "learning_rate": 1e-3,
            "b1": 0.9,
            "b2": 0.999,
            "eps": 1e-8,
            "weight_decay": 0.01,
            "loss": "reference",
            "legacy_batch_scramble": False,
            "dtype": "float32",
        }
    )
    # placement: "device" keeps a copy of the cache on every device and gathers batches there,
    # "host" gathers them on a read-ahead thread; "auto": host on CPU, device on accelerators
    # when the copy fits (inctrl_jax/training/feed.py).
    c.cache = ml_collections.ConfigDict(
        {"dir": "", "dtype": "float32", "batch_size": 16, "placement": "auto"}
    )
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
    if t.steps < 1:
        raise ConfigError(f"config.train.steps={t.steps}; must be >= 1")
    if t.batch_size < 2 or t.batch_size % 2:
        raise ConfigError(
            f"config.train.batch_size={t.batch_size}; must be even and >= 2 (half normal, half anomalous "
            "queries; the reference uses 16)"
        )
    if t.dtype not in ("float32", "float64"):
        raise ConfigError(f"config.train.dtype={t.dtype!r}; use 'float32' or 'float64'")
    if t.dtype == "float64" and not jax.config.read("jax_enable_x64"):
        raise ConfigError(
            "config.train.dtype='float64' needs 64-bit JAX: set JAX_ENABLE_X64=1 in the environment"
        )
    if config.data.on_error not in ("raise", "skip"):
        raise ConfigError(f"config.data.on_error={config.data.on_error!r}; use 'raise' or 'skip'")
    if config.cache.dtype not in fc.CACHE_DTYPES:
        raise ConfigError(f"config.cache.dtype={config.cache.dtype!r}; use one of {fc.CACHE_DTYPES}")
    if config.cache.placement not in PLACEMENTS:
        raise ConfigError(f"config.cache.placement={config.cache.placement!r}; use one of {PLACEMENTS}")
    if not config.data.datasets:
        raise ConfigError(
            "set config.data.datasets, e.g. --config.data.datasets='(\"mvtec:/data/mvtec_ad\",)' "
            "(layouts: see inctrl_jax/training/data.py)"
        )
    _validate_backbone(config.backbone)
    if config.checkpoint.every < 1 or config.checkpoint.keep < 1:
        raise ConfigError("config.checkpoint.every and config.checkpoint.keep must be >= 1")


def _validate_backbone(b: ml_collections.ConfigDict) -> None:
    """The weights source first (the usual mistake), then whether the architecture fits it."""
    from inctrl_jax.clip.registry import BACKBONES
    from inctrl_jax.evaluation.cli import looks_like_hub_id

    if b.source == "random":
        if b.arch not in ("", *RANDOM_ARCHS, *BACKBONES):
            raise ConfigError(
                f"config.backbone.arch={b.arch!r}; use one of {sorted(RANDOM_ARCHS)} "
                f"or a registry name {sorted(BACKBONES)}"
            )
        return
    source = str(b.source)
    if not (source in BACKBONES or Path(source).expanduser().exists() or looks_like_hub_id(source)):
        raise ConfigError(
            f"config.backbone.source={source!r}: no such file or directory, and not a registered backbone "
            f"({', '.join(BACKBONES)}) or a Hugging Face hub id (owner/name). Pass the CLIP weights file or "
            "directory with --config.backbone.source=/path, or 'random' for a pipeline check"
        )
    if b.arch in RANDOM_ARCHS:
        raise ConfigError(
            f"config.backbone.source={source!r} loads real weights, but config.backbone.arch={b.arch!r} "
            "(set by the :tiny/:micro variants) is a random-only test architecture. Use the default config "
            "(no variant), or set --config.backbone.arch='' (architecture read from the weights) or a "
            f"registry name ({', '.join(BACKBONES)}) and --config.backbone.tap_layers to fit it"
        )
    if b.arch and b.arch not in BACKBONES:
        raise ConfigError(
            f"config.backbone.arch={b.arch!r} is not a registered backbone; use '' (architecture read from "
            f"the weights of config.backbone.source) or one of {', '.join(BACKBONES)}"
        )


def random_backbone_params(config: CLIPConfig, seed: int) -> dict[str, Any]:
    """Random CLIP weights for tests and benchmarks: N(0, 0.02) everywhere, LayerNorm scale 1 / bias 0.

    Drawn with numpy into the parameter shapes of :func:`init_params` (traced, not run): compiling
    Flax's own initialisers costs ~10 s on CPU even for a 3-block model.
    """
    shapes = jax.eval_shape(lambda: init_params(config, seed))
    rng = np.random.default_rng(seed)

    def draw(path: tuple[Any, ...], leaf: jax.ShapeDtypeStruct) -> np.ndarray:
        name = getattr(path[-1], "key", "")
        if name == "scale":
            return np.ones(leaf.shape, np.float32)
        if name == "bias":
            return np.zeros(leaf.shape, np.float32)
        return (0.02 * rng.standard_normal(leaf.shape, np.float32)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def export_provenance(backbone: ml_collections.ConfigDict) -> dict[str, Any]:
    """What the exported model records about its backbone (``InCTRLWeights.provenance``).

    A randomly initialised backbone makes the run a pipeline check: its scores are not a result.
    """
    if backbone.source == "random":
        return {"backbone_weights": "random", "real_result": False}
    return {"backbone_weights": str(backbone.source), "real_result": True}


def _load_backbone(cfg: ml_collections.ConfigDict) -> tuple[CLIPConfig, dict]:
    if cfg.source == "random":
        if cfg.arch in ("", *RANDOM_ARCHS):
            clip_config = RANDOM_ARCHS[cfg.arch or "inctrl-tiny"]
        else:
            from inctrl_jax.clip.registry import get_backbone

            clip_config = get_backbone(cfg.arch).config
        return clip_config, random_backbone_params(clip_config, cfg.seed)
    from inctrl_jax.clip.convert import ConversionError
    from inctrl_jax.clip.loading import load_clip

    try:
        return load_clip(cfg.source, backbone=cfg.arch or None, tag=cfg.tag or None)
    except ConversionError as err:  # incl. CheckpointError: missing, unreadable or mis-shaped weights
        raise ConfigError(f"config.backbone.source={cfg.source!r}: {err}") from err


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
    cpu_seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    """The stages of ``seconds`` in process CPU time (all threads)."""


def check_resume_config(saved: dict[str, Any], config: ml_collections.ConfigDict, checkpoint: Path) -> None:
    """Refuses to continue a run whose checkpointed config differs in anything but :data:`RESUMABLE_CHANGES`."""
    old, new = _flat(saved), _flat(json.loads(config.to_json_best_effort()))
    changed = sorted(
        key
        for key in set(old) | set(new)
        if old.get(key) != new.get(key) and not key.startswith(RESUMABLE_CHANGES)
    )
    if changed:
        diffs = "; ".join(f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in changed)
        raise ConfigError(
            f"the checkpoint in {checkpoint} was trained with a different config ({diffs}); resuming would "
            "mix two runs. Use a new --workdir, or restore the old values"
        )


def train(config: ml_collections.ConfigDict, workdir: str | Path) -> TrainResult:
    """Runs (or resumes) a training run in ``workdir``; returns the final state and the export path.

    Layout of ``workdir``: ``checkpoints/`` (Orbax), ``metrics.jsonl``, ``config.json``,
    ``model/`` (the trained detector, :func:`inctrl_jax.model.checkpoint.save_model` format) and,
    with ``config.export.official_state_dict``, ``official_state_dict.safetensors``.
    """
    seconds: dict[str, float] = {}
    cpu_seconds: dict[str, float] = {}  # process CPU time, all threads: robust to other jobs on the machine
    t0, c0 = time.perf_counter(), time.process_time()
    validate_config(config)
    provenance = export_provenance(config.backbone)
    if not provenance["real_result"]:
        log.warning("random backbone: pipeline check, the exported model is NOT a real result")
    if config.mesh.distributed:
        jax.distributed.initialize()
    workdir = Path(workdir).expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    k = int(config.model.k)

    t_cfg = config.train
    data: Dataset = load_training_set(tuple(config.data.datasets), config.data.root, config.data.on_error)
    # Fails fast (no normal / anomalous images, a category with fewer than K normal images).
    sampler = BalancedEpisodeSampler(
        data, k, t_cfg.batch_size, t_cfg.seed, exclude_query=t_cfg.exclude_query, num_steps=t_cfg.steps
    )
    log.info("data: %s", summary(data))
    paths = [s.path for s in data]

    # A changed config is refused here, before any compute, rather than mixed into the old run.
    ckpt_dir = workdir / "checkpoints"
    manager = ocp.CheckpointManager(
        ckpt_dir,
        options=ocp.CheckpointManagerOptions(max_to_keep=config.checkpoint.keep, create=True),
    )
    latest = manager.latest_step()
    if latest is not None:
        saved = manager.restore(latest, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        check_resume_config(saved["config"], config, ckpt_dir / str(latest))

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
        t_batch, c_batch = time.perf_counter(), time.process_time()
        embeds, tokens = detector.encode_images(pixels)
        tokens = tokens / np.linalg.norm(tokens, axis=-1, keepdims=True)
        seconds.setdefault("cache_first_batch", time.perf_counter() - t_batch)  # incl. the compile
        cpu_seconds.setdefault("cache_first_batch", time.process_time() - c_batch)
        return tokens, embeds

    t, c = time.perf_counter(), time.process_time()
    fp = fc.fingerprint(paths, detector.backbone_id, taps, config.cache.dtype)
    cache = fc.build_feature_cache(
        paths, encode, v.image_size, (len(taps), v.num_patches, v.width, v.embed_dim),
        dtype=config.cache.dtype, batch_size=config.cache.batch_size, directory=config.cache.dir or None,
        fingerprint_id=fp, progress=config.log.progress,
    )  # fmt: skip
    seconds["cache"], cpu_seconds["cache"] = time.perf_counter() - t, time.process_time() - c
    t, c = time.perf_counter(), time.process_time()
    protos = fc.cached_text_prototypes(
        data.categories,
        lambda categories: text_prototypes_for(categories, clip_config, clip_params),
        config.cache.dir or None,
        detector.backbone_id,
    )
    seconds["text_prior"], cpu_seconds["text_prior"] = time.perf_counter() - t, time.process_time() - c
    log.info(
        "feature cache built: %s in %.1f s; text prior of %d categories in %.1f s",
        fc.format_bytes(cache.nbytes), seconds["cache"], len(protos), seconds["text_prior"],
    )  # fmt: skip

    from inctrl_jax.model.heads import init_heads

    tx = make_optimizer(
        OptimizerConfig(t_cfg.learning_rate, t_cfg.b1, t_cfg.b2, t_cfg.eps, t_cfg.weight_decay)
    )
    # Jitted: eager init compiles every primitive separately (seconds on CPU).
    heads = jax.jit(lambda: init_heads(v.embed_dim, v.num_patches, config.model.seed))()
    heads = jax.tree.map(lambda a: a.astype(t_cfg.dtype), heads)
    state = init_train_state(heads, tx)

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

    start = int(sampler.get_state()["step"])
    placement = choose_placement(config.cache.placement, cache.nbytes, mesh)
    feed = BatchFeed(cache, protos, sampler, mesh, t_cfg.dtype, placement)
    log.info(
        "training: steps %d..%d on %d device(s), K=%d, batches gathered on the %s",
        start, t_cfg.steps, mesh.devices.size, k, placement,
    )  # fmt: skip
    t, c = time.perf_counter(), time.process_time()
    loss = float("nan")
    bar = tqdm(total=t_cfg.steps, initial=start, desc="train", unit="step", disable=not config.log.progress)
    for step, batch in feed.iterate(start, t_cfg.steps):
        state, metrics = step_fn(state, batch)
        sampler.set_state({"step": step + 1, "seed": sampler.seed})  # the feed reads ahead by step number
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
    seconds["train"], cpu_seconds["train"] = time.perf_counter() - t, time.process_time() - c

    from inctrl_jax.model.checkpoint import save_model

    heads = jax.device_get({"params": state["params"], "batch_stats": state["batch_stats"]})
    weights = InCTRLWeights(clip_config, jax.device_get(clip_params), heads, taps, provenance=provenance)
    model_dir = save_model(workdir / "model", weights)
    if config.export.official_state_dict:
        from safetensors.numpy import save_file

        from inctrl_jax.model.checkpoint import to_official_state_dict

        save_file(to_official_state_dict(weights), str(workdir / "official_state_dict.safetensors"))
    seconds["total"], cpu_seconds["total"] = time.perf_counter() - t0, time.process_time() - c0
    log.info(
        "done: %d steps, final loss %.4f, cache %.1f s, training %.1f s, model saved to %s",
        t_cfg.steps, loss, seconds["cache"], seconds["train"], model_dir,
    )  # fmt: skip
    return TrainResult(
        workdir, model_dir, t_cfg.steps, loss, seconds, cache.nbytes, jax.device_get(state), cpu_seconds
    )
