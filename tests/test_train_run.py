"""End-to-end training runs on real images with the random tiny backbone (CPU).

A small auxiliary set is linked into tmp_path from ``../shared/data`` (elpv + headct); the held-out
category is mvtec_ad/transistor. Each run is a separate ``train.py`` process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DATA = SHARED / "data"


def _link_subset(root: Path, entry: str, normals: int, anomalies: int) -> None:
    src = DATA / entry
    for split in ("train/good",):
        files = sorted((src / split).iterdir())[:normals]
        (root / entry / split).mkdir(parents=True)
        for f in files:
            (root / entry / split / f.name).symlink_to(f)
    defects = sorted(d for d in (src / "test").iterdir() if d.is_dir() and d.name != "good")
    files = sorted(defects[0].iterdir())[:anomalies]
    (root / entry / "test" / defects[0].name).mkdir(parents=True)
    for f in files:
        (root / entry / "test" / defects[0].name / f.name).symlink_to(f)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    _link_subset(root, "elpv/elpv", 6, 6)
    _link_subset(root, "headct/headct", 6, 6)
    return root


def _cmd(data_root: Path, workdir: Path, *extra: str) -> list[str]:
    return [
        sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs/train_inctrl.py:tiny"),
        "--workdir", str(workdir), f"--config.data.root={data_root}",
        "--config.data.categories=('elpv/elpv', 'headct/headct')", "--config.train.steps=12",
        "--config.checkpoint.every=2", "--config.checkpoint.keep=2", "--config.log.progress=False",
        "--config.train.normal_per_step=4", "--config.train.anomalous_per_step=4",
        f"--config.cache.dir={workdir.parent / 'cache'}", *extra,
    ]  # fmt: skip


def _env(devices: int = 1) -> dict[str, str]:
    return dict(
        os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}"
    )


def _losses(workdir: Path) -> dict[int, float]:
    out = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec["loss"]
    return out


def _final_params(workdir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return {
        k: v
        for k, v in load_file(str(workdir / "model" / "model.safetensors")).items()
        if k.startswith("heads")
    }


@pytest.fixture(scope="module")
def reference_run(data_root, tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("runs") / "uninterrupted"
    proc = subprocess.run(_cmd(data_root, workdir), env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir


def test_sigkilled_run_resumes_to_bitwise_identical_parameters(data_root, reference_run):
    workdir = reference_run.parent / "killed"
    proc = subprocess.Popen(
        _cmd(data_root, workdir), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 5:
            proc.send_signal(signal.SIGKILL)  # not a clean exit: mid-step, maybe mid-checkpoint
            break
        time.sleep(0.05)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (workdir / "model").exists()

    resumed = subprocess.run(
        _cmd(data_root, workdir), env=_env(), capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    ours, ref = _final_params(workdir), _final_params(reference_run)
    assert ours.keys() == ref.keys() and len(ours) > 10
    for key in ref:
        assert np.array_equal(ours[key], ref[key]), f"{key} differs after resume"


def test_loss_curve_on_8_devices_equals_1_device(data_root, reference_run):
    workdir = reference_run.parent / "eight_devices"
    proc = subprocess.run(_cmd(data_root, workdir), env=_env(8), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on 8 device(s)" in proc.stderr
    one, eight = _losses(reference_run), _losses(workdir)
    assert one.keys() == eight.keys() == set(range(1, 13))
    # Same function; only the order of cross-device float32 reductions differs. Step 1 agrees to
    # rounding. Later steps drift: AdamW moves every entry by about lr * sign(g), so gradient
    # entries that are analytically zero (train-mode BN, see the golden README) and come out as
    # +-1e-8 noise move by +-lr in an order-dependent direction; measured drift <= 0.03 over 12 steps.
    assert abs(one[1] - eight[1]) < 1e-6, (
        f"step 1 loss: {one[1]} (1 device) vs {eight[1]} (8 devices), atol 1e-6"
    )
    worst = max(abs(one[s] - eight[s]) for s in one)
    assert worst < 0.05, f"8-device loss curve deviates from 1-device by {worst:.3g} >= 0.05"


def test_training_lowers_the_loss_and_the_exported_model_scores_a_held_out_category(data_root, reference_run):
    losses = _losses(reference_run)
    first, last = np.mean([losses[s] for s in (1, 2, 3)]), np.mean([losses[s] for s in (10, 11, 12)])
    assert last < first, f"loss did not go down: first steps {first:.4f}, last steps {last:.4f}"

    from inctrl_jax.model.detector import Detector

    detector = Detector.from_checkpoint(reference_run / "model")
    assert detector.has_heads
    cat = DATA / "mvtec_ad" / "transistor"
    refs = detector.build_reference_set(sorted((cat / "train/good").iterdir())[:2], category="transistor")
    queries = sorted((cat / "test/good").iterdir())[:2] + sorted((cat / "test/bent_lead").iterdir())[:2]
    scores = np.asarray([r.score for r in detector.score(queries, refs)])
    assert scores.shape == (4,) and np.all(np.isfinite(scores)) and np.all((scores >= 0) & (scores <= 1))


def test_config_errors_are_reported_before_any_compute(data_root, tmp_path):
    from inctrl_jax.training.sampling import DataConfigError
    from inctrl_jax.training.trainer import ConfigError, default_config, train

    cfg = default_config()
    cfg.data.root = str(data_root)
    cfg.data.categories = ("elpv/elpv",)
    cfg.model.k = 7  # elpv subset has 6 normal images
    with pytest.raises(DataConfigError, match="'elpv' has 6 normal images but config.model.k=7"):
        train(cfg, tmp_path / "w")
    cfg.model.k = 2
    cfg.data.categories = ("nope/nope",)
    with pytest.raises(DataConfigError, match="does not exist"):
        train(cfg, tmp_path / "w")
    cfg.unknown_key = 1
    with pytest.raises(ConfigError, match="unknown config key"):
        train(cfg, tmp_path / "w")
