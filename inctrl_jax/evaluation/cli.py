"""What ``evaluate.py`` runs: build the detector from a config, then evaluate or predict."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from inctrl_jax import commandline
from inctrl_jax.clip.model import CLIPConfig
from inctrl_jax.evaluation.report import RunInfo, sha256_file
from inctrl_jax.evaluation.runner import DataSpec, EvalSettings, evaluate_dataset
from inctrl_jax.evaluation.scorer import (
    TRAINING_FREE,
    ZERO_SHOT,
    is_real_result,
    score_mode,
    tiny_clip_config,
)
from inctrl_jax.model import checkpoint as ckpt
from inctrl_jax.model.detector import Detector

log = logging.getLogger("inctrl_jax.evaluation")

RANDOM_BACKBONE_NOTICE = "trained on a randomly initialised backbone"
EXIT_INCOMPLETE = 1
EXIT_USER_ERROR = commandline.EXIT_USER_ERROR


class UserError(ValueError):
    """A problem the user can fix (config value, flag, file); shown as one message, no traceback."""


# Exceptions that ``evaluate.py`` reports as one message (exit 2); anything else keeps its traceback.
# ValueError covers the project's own DataError, ImageDecodeError, ConversionError,
# CheckpointMismatchError and ReferenceSetError, whose messages name the file or setting.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
)


def user_message(err: BaseException) -> str:
    """One line (or a few) for a user error, without Python's exception chain."""
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    if isinstance(err, UserError):
        return text
    return f"{text} ({type(err).__name__}; run with --verbose for the traceback)"


def fail(message: str, status: int = EXIT_USER_ERROR) -> None:
    """Print ``evaluate.py: error: <message>`` on stderr and exit with ``status`` (2: user error)."""
    commandline.fail("evaluate.py", message, status)


def exit_status(outcome: Any) -> int:
    """0 when every requested run was done, 1 when a category or a (K, seed) run could not be."""
    reports = outcome if isinstance(outcome, list) else []
    incomplete = [r for r in reports if getattr(r, "complete", True) is False]
    for r in incomplete:
        missing = [f"{c} K={m['k']} seed={m['seed']}" for c, runs in r.missing_runs.items() for m in runs]
        print(
            "evaluate.py: NOT ALL REQUESTED RUNS WERE DONE (partial results in "
            f"{r.dir}): " + "; ".join([*(f"{c}: {p}" for c, p in r.problems.items()), *missing]),
            file=sys.stderr,
        )
    return EXIT_INCOMPLETE if incomplete else 0


def setup_logging() -> None:
    """Plain one-line-per-stage messages on stderr; start-up noise of jax/absl/transformers hidden."""
    for noisy in ("jax._src.xla_bridge", "absl", "transformers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)
    except ImportError:  # pragma: no cover - absl is a dependency
        pass
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
    except (TypeError, ValueError):
        raise UserError(
            f"--config.{flag} must be comma-separated integers such as 2,4,8; got {value!r}"
        ) from None


def _int(value: Any, flag: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"--config.{flag} must be an integer >= {minimum}; got {value!r}")
    return value


_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".pyth", ".safetensors", ".ckpt", ".npz")


def looks_like_hub_id(text: str) -> bool:
    """``owner/name`` (no leading ``/``, ``.`` or ``~``, no weights-file suffix)."""
    parts = text.split("/")
    return (
        len(parts) == 2
        and all(parts)
        and not text.startswith((".", "~"))
        and not text.lower().endswith(_WEIGHT_SUFFIXES)
    )


def _backbone_layers(cfg) -> int | None:
    """Vision layers of the configured backbone, when known without loading a checkpoint."""
    if cfg.checkpoint and Path(cfg.checkpoint).expanduser().is_dir():
        return None  # the saved model's own architecture; checked once it is loaded
    if cfg.backbone == "tiny":
        return int(cfg.tiny.layers)
    from inctrl_jax.clip.registry import BACKBONES

    if cfg.backbone not in BACKBONES:
        raise UserError(
            f"--config.backbone={cfg.backbone!r} is neither a registered backbone ({', '.join(BACKBONES)}) "
            "nor 'tiny'"
        )
    return BACKBONES[cfg.backbone].config.vision.layers


def check_tap_layers(taps: Sequence[int], layers: int, source: str = "the backbone") -> None:
    bad = [t for t in taps if not 1 <= t <= layers]
    if bad:
        raise UserError(
            f"--config.tap_layers={','.join(map(str, taps))}: {bad} outside 1..{layers} "
            f"({source} has {layers} vision layers)"
        )


def validate_config(cfg, command: str = "test") -> None:
    """Check every setting before any model is built or image read; errors name the flag.

    Raises:
        UserError: a value out of range or of the wrong type, or a missing file.
    """
    from inctrl_jax.evaluation.runner import LAYOUTS

    if cfg.layout not in LAYOUTS:
        raise UserError(f"--config.layout={cfg.layout!r} is not supported; use one of {', '.join(LAYOUTS)}")
    if cfg.on_error not in ("raise", "skip"):
        raise UserError(f"--config.on_error={cfg.on_error!r} is not supported; use 'raise' or 'skip'")
    if command == "test":
        k_shots = ints(cfg.k_shots, "k_shots")
        if not k_shots or any(k < 0 for k in k_shots):
            raise UserError(
                f"--config.k_shots must be integers >= 0 (0 = zero-shot, text prior only); got {cfg.k_shots!r}"
            )
        seeds = ints(cfg.seeds, "seeds")
        if not seeds or any(s < 0 for s in seeds):
            raise UserError(f"--config.seeds must be non-negative integers such as 0,1,2; got {cfg.seeds!r}")
        _int(cfg.max_test_per_class, "max_test_per_class", 0)
        _int(cfg.subsample_seed, "subsample_seed", 0)
        if not 0.0 < float(cfg.fpr_limit) <= 1.0:
            raise UserError(f"--config.fpr_limit must be in (0, 1]; got {cfg.fpr_limit!r}")
    else:
        p = cfg.predict
        _int(p.k, "predict.k", -1)
        _int(p.seed, "predict.seed", 0)
        if not 0.0 < float(p.quantile) < 1.0:
            raise UserError(f"--config.predict.quantile must be in (0, 1); got {p.quantile!r}")
    _int(cfg.batch_size, "batch_size", 1)
    _int(cfg.heatmap_limit, "heatmap_limit", -1)
    if cfg.backbone == "tiny":
        t = cfg.tiny
        for key in ("image_size", "patch_size", "width", "layers", "heads", "text_layers", "text_heads"):
            _int(t[key], f"tiny.{key}", 1)
        for key in ("mlp_dim", "embed_dim", "text_width", "text_mlp_dim", "seed"):
            _int(t[key], f"tiny.{key}", 0)
        if t.width % t.heads:
            raise UserError(f"--config.tiny.heads={t.heads} must divide --config.tiny.width={t.width}")
        text_width = t.text_width or t.width
        if text_width % t.text_heads:
            raise UserError(
                f"--config.tiny.text_heads={t.text_heads} must divide the text width {text_width} "
                "(--config.tiny.text_width, default --config.tiny.width)"
            )
        if t.image_size % t.patch_size:
            raise UserError(
                f"--config.tiny.patch_size={t.patch_size} must divide --config.tiny.image_size={t.image_size}"
            )
    layers = _backbone_layers(cfg)
    if cfg.tap_layers and layers is not None:
        check_tap_layers(ints(cfg.tap_layers, "tap_layers"), layers, f"backbone {cfg.backbone!r}")
    if cfg.checkpoint and not Path(cfg.checkpoint).expanduser().exists():
        raise UserError(f"--config.checkpoint={cfg.checkpoint}: no such file or directory")
    if cfg.weights and not cfg.checkpoint:
        path = Path(cfg.weights).expanduser()
        if not path.exists() and not looks_like_hub_id(cfg.weights):
            raise UserError(
                f"--config.weights={cfg.weights}: no such file or directory (an explicitly given weights "
                "path is never replaced by random weights)"
            )


@dataclasses.dataclass
class Built:
    detector: Detector
    info: RunInfo


def _weights_hint(backbone: str, tag: str) -> str:
    from inctrl_jax.clip.registry import get_backbone

    b = get_backbone(backbone)
    repo, filename = b.weights[tag or b.default_tag]
    return (
        f"provide the {backbone} weights file ({filename} from the hub repo {repo}, or open_clip's "
        f"vit_b_16_plus_240-{tag or b.default_tag}-*.pt) and pass it with --config.weights=/path/to/file"
    )


def tiny_config_from(cfg) -> CLIPConfig:
    """The architecture of ``--config.tiny`` (sizes of 0 take their defaults)."""
    t = cfg.tiny
    return tiny_clip_config(
        t.image_size, t.patch_size, t.width, t.layers, t.heads, t.mlp_dim, t.embed_dim,
        t.text_width, t.text_layers, t.text_heads, t.text_mlp_dim,
    )  # fmt: skip


def _info(detector: Detector, **kwargs: Any) -> RunInfo:
    return RunInfo(mode=score_mode(detector), backbone_id=detector.backbone_id, **kwargs)


def build_detector(cfg) -> Built:
    """The detector and the label of what it is (trained / training-free, real / pipeline check).

    ``--config.checkpoint``: a model directory saved by ``Detector.save`` / training, or an official
    InCTRL ``checkpoint.pyth`` (or a safetensors copy) whose backbone architecture is
    ``--config.backbone`` (``tiny``: the one of ``--config.tiny``). Otherwise the plain backbone,
    scored training-free.
    """
    from inctrl_jax.clip.model import init_params

    taps_override = tuple(ints(cfg.tap_layers, "tap_layers")) if cfg.tap_layers else None
    kwargs = {"batch_size": cfg.batch_size}
    if cfg.checkpoint:
        path = Path(cfg.checkpoint).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"checkpoint {path} does not exist; check --config.checkpoint")
        if path.is_dir():
            weights = ckpt.load_model(path)
            if taps_override:
                check_tap_layers(taps_override, weights.config.vision.layers, f"the model in {path}")
                weights = dataclasses.replace(weights, tap_layers=taps_override)
            detector = Detector(weights, **kwargs)
        else:
            arch = tiny_config_from(cfg) if cfg.backbone == "tiny" else _registry_config(cfg.backbone)
            detector = Detector.from_checkpoint(
                path, config=arch, tap_layers=taps_override or ckpt.DEFAULT_TAP_LAYERS, **kwargs
            )
        real = is_real_result(detector)
        info = _info(
            detector,
            model=f"inctrl-{path.stem}",
            backbone=cfg.backbone if path.is_file() else detector.backbone_id.split("@")[0],
            weights=f"checkpoint {cfg.checkpoint}",
            checkpoint=str(path.resolve()),
            checkpoint_sha256=sha256_file(path) if path.is_file() else _dir_hash(path),
            real_result=real,
            notice="" if real else RANDOM_BACKBONE_NOTICE,
            details=""
            if real
            else f"the checkpoint's provenance says its backbone was random: {_provenance(detector)}",
        )
        log.info("loaded checkpoint %s (%s score, backbone %s)", path, info.mode, detector.backbone_id)
        if not real:
            log.warning("NOT A REAL RESULT: %s (%s)", RANDOM_BACKBONE_NOTICE, path)
        if not detector.has_heads:
            log.warning("the checkpoint has no trained heads: the score is TRAINING-FREE")
        return Built(detector, info)

    if cfg.backbone == "tiny":
        config = tiny_config_from(cfg)
        layers = config.vision.layers
        taps = taps_override or tuple(range(max(1, layers - 2), layers + 1))
        weights = ckpt.InCTRLWeights(config, init_params(config, cfg.tiny.seed), None, taps)
        detector = Detector(weights, **kwargs)
        notice = "tiny randomly initialised backbone (pipeline check)"
        log.warning("NOT A REAL RESULT: %s", notice)
        info = _info(
            detector, model="inctrl-tiny-random", backbone="tiny", weights=f"random seed {cfg.tiny.seed}",
            real_result=False, notice=notice,
        )  # fmt: skip
        return Built(detector, info)

    from inctrl_jax.clip.registry import get_backbone

    backbone = get_backbone(cfg.backbone)
    taps = taps_override or tuple(backbone.tap_layers)
    source = cfg.weights or cfg.backbone
    if not Path(source).expanduser().exists() and not hub_reachable():
        # Say it first, then use only the local cache (instead of minutes of retries).
        log.warning(
            "the Hugging Face hub (%s) cannot be reached: using only locally cached weights", hub_endpoint()
        )
        os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        log.info("loading %s weights from %s", cfg.backbone, source)
        detector = Detector.from_backbone(
            source, None, backbone=cfg.backbone, tag=cfg.tag or None, tap_layers=taps, **kwargs
        )
        info = _info(
            detector,
            model=f"inctrl-{cfg.backbone}-{TRAINING_FREE}",
            backbone=cfg.backbone,
            weights=cfg.weights or f"hub {backbone.weights[cfg.tag or backbone.default_tag][0]}",
            checkpoint=str(Path(cfg.weights).resolve()) if cfg.weights else None,
            checkpoint_sha256=sha256_file(cfg.weights)
            if cfg.weights and Path(cfg.weights).is_file()
            else None,
        )
    except Exception as err:
        hint = _weights_hint(cfg.backbone, cfg.tag)
        if cfg.weights:
            raise UserError(
                f"--config.weights={cfg.weights}: could not load the backbone weights ({type(err).__name__}: "
                f"{err}); an explicitly given weights file is never replaced by random weights"
            ) from err
        if not cfg.allow_random_weights:
            raise UserError(
                f"could not load the backbone weights from {source!r}: {err}\nTo fix: {hint}"
            ) from err
        notice = f"pipeline check with RANDOMLY INITIALISED weights ({cfg.backbone} weights not available)"
        details = f"{type(err).__name__}: {str(err).rstrip('.')}. To get real results, {hint}"
        for line in ("=" * 100, "NOT A REAL RESULT: " + notice, details, "=" * 100):
            log.warning("%s", line)
        weights = ckpt.InCTRLWeights(backbone.config, init_params(backbone.config, 0), None, taps)
        detector = Detector(weights, **kwargs)
        info = _info(
            detector, model=f"inctrl-{cfg.backbone}-RANDOM-WEIGHTS", backbone=cfg.backbone,
            weights="random (weights unavailable)", real_result=False, notice=notice, details=details,
        )  # fmt: skip
    return Built(detector, info)


def _provenance(detector) -> Any:
    return getattr(detector, "provenance", None) or getattr(detector.weights, "provenance", None)


def _registry_config(name: str) -> CLIPConfig:
    from inctrl_jax.clip.registry import get_backbone

    try:
        return get_backbone(name).config
    except KeyError as err:
        raise UserError(
            f"--config.backbone={name!r} is neither a registered backbone nor 'tiny'; it names the "
            f"architecture of the official checkpoint ({err.args[0]})"
        ) from None


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


def _dir_hash(directory: str | os.PathLike) -> str:
    """sha256 over the sorted (name, sha256) of a checkpoint directory's files."""
    import hashlib

    h = hashlib.sha256()
    for p in sorted(Path(directory).rglob("*")):
        if p.is_file():
            h.update(f"{p.relative_to(directory)}:{sha256_file(p)}\n".encode())
    return h.hexdigest()


def _list(value: Any) -> list[str]:
    """``"a,b"`` / ``("a", "b")`` -> ``["a", "b"]``."""
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [str(v) for v in value]


def data_spec_from(cfg) -> DataSpec:
    """The dataset of ``--config.layout`` and its arguments (see ``configs/eval_default.py``)."""
    layout = cfg.layout
    spec = DataSpec(layout=layout, root=cfg.dataset_root, on_error=cfg.on_error)
    if layout == "visa":
        spec.split_csv = cfg.visa.split_csv
    elif layout == "folder":
        f = cfg.folder
        spec = dataclasses.replace(
            spec, normal_dir=f.normal_dir, abnormal_dir=f.abnormal_dir, mask_dir=f.mask_dir,
            normal_test_dir=f.normal_test_dir, category=f.category, test_split_ratio=f.test_split_ratio,
            split_seed=f.split_seed,
        )  # fmt: skip
    elif layout == "json":
        spec.train_json, spec.test_json = _list(cfg.json.train), _list(cfg.json.test)
    elif layout == "mvtec" and not cfg.dataset_root:
        raise UserError("set --config.dataset_root to a dataset folder in the MVTec layout")
    return spec


def run_evaluation(cfg) -> list[Any]:
    """Evaluate the dataset of ``cfg`` (any supported layout); returns the dataset reports (one).

    The config is validated before the model is built or any image read.
    """
    validate_config(cfg, "test")
    spec = data_spec_from(cfg)
    settings = EvalSettings(
        k_shots=ints(cfg.k_shots, "k_shots"),
        seeds=ints(cfg.seeds, "seeds"),
        max_test_per_class=cfg.max_test_per_class,
        subsample_seed=cfg.subsample_seed,
        heatmap_limit=cfg.heatmap_limit,
        fpr_limit=cfg.fpr_limit,
        progress=cfg.progress,
        on_error=cfg.on_error,
    )
    built = build_detector(cfg)
    if set(settings.k_shots) == {0}:  # only zero-shot runs: that is the mode of the whole evaluation
        built = dataclasses.replace(built, info=dataclasses.replace(built.info, mode=ZERO_SHOT))
    if built.info.mode == TRAINING_FREE:
        log.info("score: %s (patch residual + text prior, no trained heads)", TRAINING_FREE)
    elif built.info.mode != ZERO_SHOT:
        log.info("score: %s with trained heads, (h + s_p) / 2", built.info.mode)
    if 0 in settings.k_shots:
        log.info("K=0: %s (text prior alone, no references)", ZERO_SHOT)
    dataset = cfg.dataset or spec.name
    log.info(
        "evaluating %s (%s layout) K=%s seeds=%s -> %s",
        dataset, spec.layout, settings.k_shots, settings.seeds, cfg.results_dir,
    )  # fmt: skip
    report = evaluate_dataset(
        built.detector,
        spec,
        dataset,
        built.info,
        cfg.results_dir,
        settings,
        cfg.to_dict(),
        _list(cfg.categories),
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
    """``evaluate.py predict``: score new images against ``predict.k`` seeded normal references."""
    from inctrl_jax.evaluation.predict import predict

    p = cfg.predict
    missing = [k for k in ("references", "inputs", "category") if not p[k]]
    if missing:
        raise UserError("set " + ", ".join(f"--config.predict.{k}" for k in missing))
    validate_config(cfg, "predict")
    built = build_detector(cfg)
    results = predict(
        built.detector,
        p.references,
        p.inputs,
        p.category,
        k=p.k,
        seed=p.seed,
        on_error=cfg.on_error,
        real_result=built.info.real_result,
        threshold=p.threshold if p.threshold >= 0 else None,
        validation=p.validation_dir or None,
        quantile=p.quantile,
        output_dir=p.output_dir,
        heatmap_limit=cfg.heatmap_limit,
        note=built.info.label,
    )
    for r in results:
        decision = "" if r["anomalous"] is None else ("ANOMALOUS" if r["anomalous"] else "normal")
        print(f"{r['score']:.6f}\t{decision}\t{r['mode']}\t{r['image']}")
    if not built.info.real_result:
        log.warning("NOT A REAL RESULT: %s", built.info.notice)
    return results
