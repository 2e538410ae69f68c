"""What ``evaluate.py`` runs: build the scorer from a config, then evaluate or predict."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import Any

from inctrl_jax.evaluation.report import RunInfo, sha256_file
from inctrl_jax.evaluation.runner import EvalSettings, evaluate_dataset
from inctrl_jax.evaluation.scorer import FewShotScorer, load_checkpoint, tiny_clip_config

log = logging.getLogger("inctrl_jax.evaluation")


def setup_logging() -> None:
    """Plain one-line-per-stage messages on stderr."""
    logger = logging.getLogger("inctrl_jax")
    if not any(getattr(h, "_inctrl", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[inctrl] %(message)s"))
        handler._inctrl = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def ints(value: Any, flag: str) -> list[int]:
    """``"2,4,8"`` / ``(2, 4, 8)`` / ``2`` -> ``[2, 4, 8]``; errors name the flag."""
    if isinstance(value, int):
        return [value]
    parts = [p for p in value.replace(" ", "").split(",") if p] if isinstance(value, str) else list(value)
    try:
        return [int(p) for p in parts]
    except ValueError:
        raise ValueError(
            f"--config.{flag} must be comma-separated integers such as 2,4,8; got {value!r}"
        ) from None


@dataclasses.dataclass
class Built:
    scorer: FewShotScorer
    info: RunInfo


def _weights_hint(backbone: str, tag: str) -> str:
    from inctrl_jax.clip.registry import get_backbone

    b = get_backbone(backbone)
    repo, filename = b.weights[tag or b.default_tag]
    return (
        f"provide the {backbone} weights file ({filename} from the hub repo {repo}, or open_clip's "
        f"vit_b_16_plus_240-{tag or b.default_tag}-*.pt) and pass it with --config.weights=/path/to/file"
    )


def build_scorer(cfg) -> Built:
    """The scorer and the label of what it is (trained / training-free, real / pipeline check)."""
    from inctrl_jax.clip.model import init_params

    taps_override = ints(cfg.tap_layers, "tap_layers") if cfg.tap_layers else None
    if cfg.checkpoint:
        weights = load_checkpoint(cfg.checkpoint)
        taps = taps_override or list(weights.tap_layers)
        mode = "trained" if weights.head_variables is not None else "training-free"
        info = RunInfo(
            model=f"inctrl-{Path(cfg.checkpoint).stem}",
            mode=mode,
            backbone=cfg.backbone,
            weights=f"checkpoint {cfg.checkpoint}",
            checkpoint=str(Path(cfg.checkpoint).resolve()),
            checkpoint_sha256=sha256_file(cfg.checkpoint)
            if Path(cfg.checkpoint).is_file()
            else _dir_hash(cfg.checkpoint),
        )
        log.info("loaded checkpoint %s (%s score)", cfg.checkpoint, mode)
        return Built(
            FewShotScorer(weights.config, weights.clip_params, weights.head_variables, taps, cfg.batch_size),
            info,
        )

    if cfg.backbone == "tiny":
        t = cfg.tiny
        config = tiny_clip_config(t.image_size, t.patch_size, t.width, t.layers)
        taps = taps_override or list(range(max(1, t.layers - 2), t.layers + 1))
        notice = "tiny randomly initialised backbone (pipeline check)"
        log.warning("NOT A REAL RESULT: %s", notice)
        info = RunInfo(
            "inctrl-tiny-random",
            "training-free",
            "tiny",
            f"random seed {t.seed}",
            real_result=False,
            notice=notice,
        )
        return Built(FewShotScorer(config, init_params(config, t.seed), None, taps, cfg.batch_size), info)

    from inctrl_jax.clip.registry import get_backbone

    backbone = get_backbone(cfg.backbone)
    taps = taps_override or list(backbone.tap_layers)
    source = cfg.weights or cfg.backbone
    if not Path(source).expanduser().exists() and not hub_reachable():
        # Say it first, then use only the local cache (instead of minutes of retries).
        log.warning(
            "the Hugging Face hub (%s) cannot be reached: using only locally cached weights", hub_endpoint()
        )
        os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        log.info("loading %s weights from %s", cfg.backbone, source)
        config, params = load_clip_weights(source, cfg.backbone, cfg.tag or None)
        info = RunInfo(
            f"inctrl-{cfg.backbone}-training-free",
            "training-free",
            cfg.backbone,
            cfg.weights or f"hub {backbone.weights[cfg.tag or backbone.default_tag][0]}",
            checkpoint=str(Path(cfg.weights).resolve()) if cfg.weights else None,
            checkpoint_sha256=sha256_file(cfg.weights)
            if cfg.weights and Path(cfg.weights).is_file()
            else None,
        )
    except Exception as err:
        hint = _weights_hint(cfg.backbone, cfg.tag)
        if not cfg.allow_random_weights:
            raise RuntimeError(
                f"could not load the backbone weights from {source!r}: {err}\nTo fix: {hint}"
            ) from err
        notice = f"pipeline check with RANDOMLY INITIALISED weights ({cfg.backbone} weights not available)"
        details = f"{type(err).__name__}: {err}. To get real results, {hint}"
        for line in ("=" * 100, "NOT A REAL RESULT: " + notice, details, "=" * 100):
            log.warning("%s", line)
        config = backbone.config
        params = init_params(config, 0)
        info = RunInfo(
            f"inctrl-{cfg.backbone}-RANDOM-WEIGHTS",
            "training-free",
            cfg.backbone,
            "random (weights unavailable)",
            real_result=False,
            notice=notice,
            details=details,
        )
    return Built(FewShotScorer(config, params, None, taps, cfg.batch_size), info)


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub endpoint opens within ``timeout`` seconds."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(hub_endpoint())
    if not url.hostname:
        return False
    try:
        with socket.create_connection(
            (url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout
        ):
            return True
    except OSError:
        return False


def load_clip_weights(source: str, backbone: str, tag: str | None):
    from inctrl_jax.clip.loading import load_clip

    return load_clip(source, backbone=backbone, tag=tag)


def _dir_hash(directory: str) -> str:
    """sha256 over the sorted (name, sha256) of a checkpoint directory's files."""
    import hashlib

    h = hashlib.sha256()
    for p in sorted(Path(directory).rglob("*")):
        if p.is_file():
            h.update(f"{p.relative_to(directory)}:{sha256_file(p)}\n".encode())
    return h.hexdigest()


def run_evaluation(cfg) -> list[Any]:
    """Evaluate ``cfg.dataset_root``; returns the dataset reports (one)."""
    if not cfg.dataset_root:
        raise ValueError("set --config.dataset_root to a dataset folder in the MVTec layout")
    built = build_scorer(cfg)
    if built.info.mode == "training-free":
        log.info("score: TRAINING-FREE (patch residual + text prior, no trained heads)")
    settings = EvalSettings(
        k_shots=ints(cfg.k_shots, "k_shots"),
        seeds=ints(cfg.seeds, "seeds"),
        max_test_per_class=cfg.max_test_per_class,
        subsample_seed=cfg.subsample_seed,
        heatmap_limit=cfg.heatmap_limit,
        fpr_limit=cfg.fpr_limit,
        progress=cfg.progress,
    )
    dataset = cfg.dataset or Path(cfg.dataset_root).resolve().name
    cats = [c for c in cfg.categories.split(",") if c] if cfg.categories else []
    log.info(
        "evaluating %s (%s) K=%s seeds=%s -> %s",
        dataset,
        cfg.dataset_root,
        settings.k_shots,
        settings.seeds,
        cfg.results_dir,
    )
    report = evaluate_dataset(
        built.scorer, cfg.dataset_root, dataset, built.info, cfg.results_dir, settings, cfg.to_dict(), cats
    )
    md = report.write()
    print(md)
    log.info("dataset summary: %s", report.dir)
    if not built.info.real_result:
        log.warning("NOT A REAL RESULT: %s", built.info.notice)
    if report.problems:
        log.error("categories with problems: %s", ", ".join(report.problems))
    return [report]


def run_predict(cfg) -> list[dict]:
    from inctrl_jax.evaluation.predict import predict

    p = cfg.predict
    missing = [k for k in ("references", "inputs", "category") if not p[k]]
    if missing:
        raise ValueError("set " + ", ".join(f"--config.predict.{k}" for k in missing))
    built = build_scorer(cfg)
    results = predict(
        built.scorer,
        p.references,
        p.inputs,
        p.category,
        threshold=p.threshold if p.threshold >= 0 else None,
        validation=p.validation_dir or None,
        quantile=p.quantile,
        output_dir=p.output_dir,
        heatmap_limit=cfg.heatmap_limit,
        note=built.info.label,
    )
    for r in results:
        decision = "" if r["anomalous"] is None else ("ANOMALOUS" if r["anomalous"] else "normal")
        print(f"{r['score']:.6f}\t{decision}\t{r['image']}")
    return results
