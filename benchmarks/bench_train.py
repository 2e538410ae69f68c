"""Training cost relative to one backbone forward per unique image, at the paper's settings.

Usage::

    .venv/bin/python benchmarks/bench_train.py [--images 64] [--steps 1000] [--arch ViT-B-16-plus-240]

The issue's budget: total training time / (unique images x one backbone forward) <= 1.2. This runs
``inctrl_jax.training.trainer.train`` with the paper's protocol (K=2, 8 normal + 8 anomalous queries
per step, 1,000 steps, AdamW, checkpoints every 100 steps, float32 cache) on a random-weight paper
backbone (ViT-B-16-plus-240) and ``--images`` real elpv images linked from ``../shared/data`` (half
normal, half anomalous, one category). Before training, one backbone forward is timed on its own
(compiled, warm, batch 16, preprocessing excluded) to give the unit.

Because the head steps and start-up are a fixed cost while the cache grows with the images, the
ratio depends on the number of unique images N:
``ratio(N, C) = (N * c + C * t + F) / (N * f)`` with c the measured cache cost per image (decode +
forward), t the text prior per category (a full text-tower pass over its prompt ensemble), C the
categories, f the bare forward per image and F everything else (backbone load, head steps,
checkpoints, export). The results give the measured ratio at N = ``--images`` and this formula at the sizes of
the paper's auxiliary training sets. Peak RSS is reported against the cache size.

Results go to ``benchmarks/results/train.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DATA = REPO.parent / "shared" / "data"

# Unique images of the paper's auxiliary training sets (all splits; reference doc section 5).
# (unique images, categories): the text prior costs once per category.
PAPER_TRAINING_SETS = {"MVTec AD (to test on VisA)": (5354, 15), "VisA (to test on MVTec AD)": (10821, 12)}


def _rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _hardware() -> dict:
    model = "unknown"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {
        "cpu": model,
        "logical_cpus": os.cpu_count(),
        "platform": platform.platform(),
        "load_average": os.getloadavg(),
    }


def _link_images(root: Path, n: int) -> None:
    """``n`` images of one category (elpv) in an MVTec-like tree, half normal, half anomalous."""
    per_class = n // 2
    for src in (DATA / "elpv" / "elpv",):
        dst = root / src.name
        normals = sorted((src / "train" / "good").iterdir())[:per_class]
        defect = sorted(d for d in (src / "test").iterdir() if d.is_dir() and d.name != "good")[0]
        anomalies = sorted(defect.iterdir())[:per_class]
        if len(normals) < per_class or len(anomalies) < per_class:
            raise SystemExit(f"--images {n}: {src} has too few images; use a smaller --images")
        for folder, files in ((dst / "train" / "good", normals), (dst / "test" / defect.name, anomalies)):
            folder.mkdir(parents=True)
            for f in files:
                (folder / f.name).symlink_to(f)


def _time_forward(clip_config, clip_params, taps: tuple[int, ...], image_size: int, batch: int) -> float:
    """Seconds per image of one compiled, warm backbone forward (the trainer's encoder, batch ``batch``)."""
    from inctrl_jax.model.checkpoint import InCTRLWeights
    from inctrl_jax.model.detector import Detector

    detector = Detector(InCTRLWeights(clip_config, clip_params, None, taps), batch_size=batch)
    pixels = np.random.default_rng(0).standard_normal((batch, image_size, image_size, 3)).astype(np.float32)
    detector.encode_images(pixels)  # compile
    times = []
    for _ in range(2):
        t = time.perf_counter()
        detector.encode_images(pixels)
        times.append((time.perf_counter() - t) / batch)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="unique training images (even, <= 128)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--arch", default="ViT-B-16-plus-240", help="registry backbone, random weights")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    for name in ("absl", "jax", "orbax"):
        logging.getLogger(name).setLevel(logging.WARNING)

    import jax

    from inctrl_jax.clip.registry import get_backbone
    from inctrl_jax.training.feature_cache import estimate_cache_bytes
    from inctrl_jax.training.trainer import default_config, random_backbone_params, train

    backbone = get_backbone(args.arch)
    v = backbone.config.vision
    taps = tuple(backbone.tap_layers)
    rss_start = _rss_mib()

    cfg = default_config()
    cfg.backbone.source, cfg.backbone.arch = "random", args.arch
    cfg.train.steps = args.steps
    cfg.log.progress = False

    with tempfile.TemporaryDirectory() as tmp:
        _link_images(Path(tmp) / "data", args.images)
        cfg.data.datasets = (f"mvtec:{Path(tmp) / 'data'}",)

        t = time.perf_counter()
        params = random_backbone_params(backbone.config, 0)
        backbone_init_s = time.perf_counter() - t
        forward_s = _time_forward(backbone.config, params, taps, v.image_size, cfg.cache.batch_size)
        del params
        rss_after_forward = _rss_mib()

        result = train(cfg, Path(tmp) / "run")
    rss_peak = _rss_mib()

    n = args.images
    cache_bytes = estimate_cache_bytes(n, len(taps), v.num_patches, v.width, v.embed_dim, "float32")
    total = result.seconds["total"]
    cache_per_image = result.seconds["cache"] / n
    text_prior_per_category = result.seconds["text_prior"]  # one category here
    fixed = total - result.seconds["cache"] - text_prior_per_category
    ratio = total / (n * forward_s)
    extrapolated = {
        name: round((size * cache_per_image + cats * text_prior_per_category + fixed) / (size * forward_s), 3)
        for name, (size, cats) in PAPER_TRAINING_SETS.items()
    }
    record = {
        "what": "total training time / (unique images x one backbone forward), paper settings",
        "backbone": f"{args.arch} (random weights)",
        "unique_images": n,
        "steps": args.steps,
        "queries_per_step": "8 normal + 8 anomalous",
        "k": cfg.model.k,
        "forward_s_per_image": forward_s,
        "backbone_random_init_s": backbone_init_s,
        "train_seconds": result.seconds,
        "cache_s_per_image": cache_per_image,
        "text_prior_s_per_category": text_prior_per_category,
        "fixed_s": fixed,
        "ratio_measured": ratio,
        "ratio_formula": "(N * cache_s_per_image + C * text_prior_s_per_category + fixed_s) / (N * forward_s_per_image)",
        "ratio_extrapolated": extrapolated,
        "cache_bytes": cache_bytes,
        "cache_mib": cache_bytes / 2**20,
        "rss_mib": {"start": rss_start, "after_forward_timing": rss_after_forward, "peak": rss_peak},
        "final_loss": result.final_loss,
        "hardware": _hardware(),
        "versions": {"jax": jax.__version__, "python": platform.python_version()},
        "shared_machine": "other developers' jobs ran on the same 2 cores; timings are noisy",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train.json").write_text(json.dumps(record, indent=2) + "\n")
    hw = record["hardware"]
    lines = [
        "# Training cost vs one backbone forward per unique image",
        "",
        f"`{' '.join(['benchmarks/bench_train.py', *sys.argv[1:]])}` on {hw['cpu']} ({hw['logical_cpus']} "
        f"logical CPUs, shared with other developers' jobs: load average at the end "
        f"{', '.join(f'{x:.1f}' for x in hw['load_average'])}; numbers are noisy). jax {jax.__version__}, float32.",
        "",
        f"Setting: {args.arch} with random weights, K={cfg.model.k}, {args.steps} steps of 8 normal + 8 anomalous "
        f"queries, checkpoints every {cfg.checkpoint.every} steps, **{n} unique images** (a reduced count; real "
        "elpv images from ../shared/data, one category).",
        "",
        "| quantity | value |",
        "| --- | --- |",
        f"| one backbone forward (compiled, warm, batch 16) | {forward_s:.3f} s/image |",
        f"| feature cache (decode + forward, incl. compile) | {result.seconds['cache']:.1f} s "
        f"({cache_per_image:.3f} s/image) |",
        f"| text prior (prompt ensemble through the text tower, incl. compile) | "
        f"{text_prior_per_category:.1f} s per category |",
        f"| head steps incl. compile and checkpoints | {result.seconds['train']:.1f} s "
        f"({1000 * result.seconds['train'] / args.steps:.1f} ms/step) |",
        f"| total `train()` | {total:.1f} s |",
        f"| **ratio total / ({n} x forward)** | **{ratio:.2f}** |",
        *(
            f"| ratio extrapolated to {name}, N={size}, C={cats} | {extrapolated[name]:.2f} |"
            for name, (size, cats) in PAPER_TRAINING_SETS.items()
        ),
        f"| feature cache size (float32; float16 halves the patch tokens) | {cache_bytes / 2**20:.1f} MiB |",
        f"| peak RSS (start / after forward timing / peak) | {rss_start:.0f} / {rss_after_forward:.0f} / "
        f"{rss_peak:.0f} MiB |",
        "",
        "The extrapolation assumes the measured per-image cache cost, per-category text-prior cost and "
        "fixed cost (backbone load, compiles, head steps, checkpoints, export) stay as measured; "
        "ratio(N, C) = (N x cache_s_per_image + C x text_prior_s + fixed_s) / (N x forward_s_per_image). "
        "At small N the fixed head-step cost dominates; the <= 1.2 budget is about the paper-scale N. "
        "Peak RSS is dominated by the backbone (208 M float32 parameters, ~0.8 GiB; the copy used to time "
        "the forward is freed but stays in the peak) and XLA, not by the cache.",
        "",
    ]
    (RESULTS / "train.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
