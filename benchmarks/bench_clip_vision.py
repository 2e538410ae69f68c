"""Vision-tower throughput at full size: JAX/Flax vs PyTorch transformers, same random weights.

Usage::

    .venv/bin/python benchmarks/bench_clip_vision.py [--batch 8] [--iters 4] [--rounds 2] [--threads 2]

For each backbone (ViT-B-16-plus-240, ViT-B/16) one random ``CLIPVisionModelWithProjection`` is made
with torch and saved as safetensors; every framework/variant then runs in its **own fresh
subprocess** (torch's and XLA's thread pools compete when they share a process), pinned to the same
CPUs with the same thread count, with warm-up batches before the timed ones. Rounds alternate the
order of the subprocesses. Results go to ``benchmarks/results/clip_vision.{json,md}``.

JAX variants tried: ``default`` (no XLA flags) and XLA CPU flag sets listed in ``JAX_VARIANTS``.
Everything is float32.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import machine  # benchmarks/machine.py: the script folder is on sys.path

RESULTS = Path(__file__).resolve().parent / "results"

JAX_VARIANTS: dict[str, str] = {
    "default": "",
    "onednn": "--xla_cpu_use_onednn=true",
    "fast_math": "--xla_cpu_enable_fast_math=true",
}

BACKBONES = ("ViT-B-16-plus-240", "ViT-B/16")


def _hf_vision_config(name: str):
    from transformers import CLIPVisionConfig

    from inctrl_jax.clip.registry import get_backbone

    v = get_backbone(name).config.vision
    return CLIPVisionConfig(
        hidden_size=v.width,
        intermediate_size=v.mlp_dim,
        num_hidden_layers=v.layers,
        num_attention_heads=v.heads,
        image_size=v.image_size,
        patch_size=v.patch_size,
        hidden_act=v.act,
        projection_dim=v.embed_dim,
        layer_norm_eps=v.ln_eps,
    )


def make_weights(name: str, out_dir: Path) -> Path:
    """Random HF vision tower saved with ``save_pretrained`` (config.json + model.safetensors)."""
    import torch
    from transformers import CLIPVisionModelWithProjection

    torch.manual_seed(0)
    model = CLIPVisionModelWithProjection(_hf_vision_config(name)).eval()
    model.save_pretrained(out_dir)
    return out_dir


def _pin(threads: int) -> None:
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setaffinity(0, set(range(threads)))


def worker_torch(args) -> dict:
    import numpy as np
    import torch
    from transformers import CLIPVisionModelWithProjection

    torch.set_num_threads(args.threads)
    model = CLIPVisionModelWithProjection.from_pretrained(args.weights, attn_implementation=args.attn).eval()
    size = model.config.image_size
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((args.batch, 3, size, size), np.float32))
    times = []
    with torch.inference_mode():
        for i in range(args.warmup + args.iters):
            t = time.perf_counter()
            out = model(pixel_values=x, output_hidden_states=True)
            _ = out.image_embeds.sum().item()
            if i >= args.warmup:
                times.append(time.perf_counter() - t)
    return {"times": times, "torch": torch.__version__, "threads": torch.get_num_threads()}


def worker_jax(args) -> dict:
    import jax
    import numpy as np
    from safetensors.numpy import load_file

    from inctrl_jax.clip.convert import convert_state_dict
    from inctrl_jax.clip.model import VisionTower
    from inctrl_jax.clip.registry import get_backbone

    b = get_backbone(args.backbone)
    sd = load_file(str(Path(args.weights) / "model.safetensors"))
    params = convert_state_dict(sd, b.config, layout="hf", towers=("visual",))["visual"]
    params = jax.device_put(params)
    size = b.config.vision.image_size
    x = jax.device_put(np.random.default_rng(0).standard_normal((args.batch, size, size, 3), np.float32))
    tower = VisionTower(b.config.vision)
    fwd = jax.jit(lambda p, x: tower.apply({"params": p}, x, b.tap_layers))
    t = time.perf_counter()
    compiled = fwd.lower(params, x).compile()
    compile_s = time.perf_counter() - t
    times = []
    for i in range(args.warmup + args.iters):
        t = time.perf_counter()
        jax.block_until_ready(compiled(params, x))
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    return {
        "times": times,
        "jax": jax.__version__,
        "compile_s": compile_s,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def run_worker(kind: str, variant: str, backbone: str, weights: Path, a) -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(a.threads)
    env["MKL_NUM_THREADS"] = str(a.threads)
    if kind == "jax":
        flags = [
            JAX_VARIANTS[variant],
            "--xla_cpu_multi_thread_eigen=true",
            f"intra_op_parallelism_threads={a.threads}",
        ]
        env["XLA_FLAGS"] = " ".join(f for f in flags if f)
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        kind,
        "--variant",
        variant,
        "--backbone",
        backbone,
        "--weights",
        str(weights),
        "--batch",
        str(a.batch),
        "--iters",
        str(a.iters),
        "--warmup",
        str(a.warmup),
        "--threads",
        str(a.threads),
        "--attn",
        variant if kind == "torch" else "sdpa",
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"worker {kind}/{variant} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_results(rows: list[dict], a, t0: float, done: list[str]) -> list[str]:
    """Write the JSON and Markdown results for the backbones finished so far."""
    import jax
    import torch
    import transformers

    meta = {
        "hardware": machine.describe(),
        "threads": a.threads,
        "batch": a.batch,
        "iters_per_round": a.iters,
        "warmup": a.warmup,
        "rounds": a.rounds,
        "versions": {
            "jax": jax.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "wall_s": time.time() - t0,
        "load_average_1_5_15_at_end": list(os.getloadavg()),
        "note": a.note,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "clip_vision.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [
        "# CLIP vision tower throughput (fp32, CPU)",
        "",
        f"CPU: {meta['hardware']['cpu']} ({meta['hardware']['logical_cpus']} logical CPUs), "
        f"{a.threads} threads per process, batch {a.batch}, {a.warmup} warm-up + {a.iters} timed batches "
        f"x {a.rounds} rounds, each framework in its own process. Versions: jax {jax.__version__}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}. {meta['note']}; "
        f"load average (1/5/15 min) at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())} "
        f"on {os.cpu_count()} CPUs (it includes this benchmark's own threads).",
        "",
        "| backbone | framework | variant | img/s (best) | img/s (median) | vs torch (median) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name in done:
        ref = [r for r in rows if r["backbone"] == name and r["framework"] == "torch"][0]["img_s_median"]
        for r in rows:
            if r["backbone"] == name:
                lines.append(
                    f"| {name} | {r['framework']} | {r['variant']} | {r['img_s_best']:.2f} | "
                    f"{r['img_s_median']:.2f} | {r['img_s_median'] / ref:.2f}x |"
                )
    (RESULTS / "clip_vision.md").write_text("\n".join(lines) + "\n")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", choices=["jax", "torch"])
    p.add_argument("--variant", default="default")
    p.add_argument("--backbone", default="ViT-B-16-plus-240")
    p.add_argument("--weights")
    p.add_argument("--attn", default="sdpa")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--iters", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--jax-variants", default=",".join(JAX_VARIANTS))
    p.add_argument("--torch-variants", default="sdpa")
    p.add_argument("--backbones", default=",".join(BACKBONES))
    p.add_argument("--note", default="no note on other load", help="what else ran on the machine")
    a = p.parse_args()
    _pin(a.threads)
    if a.worker:
        res = worker_jax(a) if a.worker == "jax" else worker_torch(a)
        print(json.dumps(res))
        return

    t0 = time.time()
    rows: list[dict] = []
    done: list[str] = []
    lines: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.backbones.split(","):
            weights = make_weights(name, Path(tmp) / name.replace("/", "_"))
            runs = [("torch", v) for v in a.torch_variants.split(",")] + [
                ("jax", v) for v in a.jax_variants.split(",")
            ]
            samples: dict[tuple[str, str], list[float]] = {r: [] for r in runs}
            extra: dict[tuple[str, str], dict] = {}
            for rnd in range(a.rounds):
                order = runs if rnd % 2 == 0 else runs[::-1]
                for kind, variant in order:
                    res = run_worker(kind, variant, name, weights, a)
                    samples[(kind, variant)] += res.pop("times")
                    extra[(kind, variant)] = res
                    print(
                        f"[{time.time() - t0:6.1f}s] {name} {kind}/{variant} round {rnd}: "
                        f"{a.batch / min(samples[(kind, variant)]):.2f} img/s best",
                        flush=True,
                    )
            for (kind, variant), ts in samples.items():
                rows.append(
                    {
                        "backbone": name,
                        "framework": kind,
                        "variant": variant,
                        "batch": a.batch,
                        "best_s": min(ts),
                        "median_s": statistics.median(ts),
                        "img_s_best": a.batch / min(ts),
                        "img_s_median": a.batch / statistics.median(ts),
                        **extra[(kind, variant)],
                    }
                )
            done.append(name)
            lines = write_results(rows, a, t0, done)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
