"""End-to-end training runs on real images with a random micro backbone (CPU).

The auxiliary data is linked into tmp_path from ``../shared/data`` in two layouts at once: elpv as an
MVTec-like tree and headct as official InCTRL JSON lists. The held-out category is
mvtec_ad/transistor. ``train.py`` runs are separate processes that share one feature cache and one
XLA compilation cache, so only the first pays for encoding and compiling.

Run as a script (``python tests/test_train_run.py multidevice <data_root> <out_dir>``, with 8 virtual
devices and ``JAX_ENABLE_X64=1``) it trains on 1 and on 8 devices in float32 and float64 and prints
the loss curves as JSON; the multi-device test uses that.
"""

from __future__ import annotations

import json
import os
import shutil
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
DATASETS = ("mvtec:aux", "json:json")
STEPS = 40
MULTIDEVICE_STEPS = 12


def _link_subset(src: Path, dst: Path, normals: int, anomalies: int) -> None:
    (dst / "train/good").mkdir(parents=True)
    for f in sorted((src / "train/good").iterdir())[:normals]:
        (dst / "train/good" / f.name).symlink_to(f)
    defect = sorted(d for d in (src / "test").iterdir() if d.is_dir() and d.name != "good")[0]
    (dst / "test" / defect.name).mkdir(parents=True)
    for f in sorted(defect.iterdir())[:anomalies]:
        (dst / "test" / defect.name / f.name).symlink_to(f)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    from inctrl_jax.data import scan_mvtec
    from inctrl_jax.data.convert import to_inctrl_json

    root = tmp_path_factory.mktemp("data")
    _link_subset(DATA / "elpv/elpv", root / "aux/elpv", 6, 6)
    _link_subset(DATA / "headct/headct", root / "trees/headct", 6, 6)
    to_inctrl_json(scan_mvtec(root / "trees/headct"), root / "json")
    return root


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    """Environment of the ``train.py`` processes: CPU, one shared persistent compilation cache."""
    return dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=1",
        JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("xla_cache")),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
    )


def _cmd(data_root: Path, workdir: Path, *extra: str) -> list[str]:
    return [
        sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs/train_inctrl.py:micro"),
        "--workdir", str(workdir), f"--config.data.root={data_root}",
        f"--config.data.datasets={DATASETS!r}", f"--config.train.steps={STEPS}", "--config.train.batch_size=8",
        "--config.checkpoint.every=5", "--config.checkpoint.keep=2", "--config.log.progress=False",
        "--config.cache.dtype=float16", "--config.export.official_state_dict=True",
        f"--config.cache.dir={workdir.parent / 'cache'}", *extra,
    ]  # fmt: skip


def _losses(workdir: Path) -> dict[int, float]:
    out = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec["loss"]
    return out


def _final_heads(workdir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return {
        k: v
        for k, v in load_file(str(workdir / "model" / "model.safetensors")).items()
        if k.startswith("heads")
    }


def _finished_checkpoints(workdir: Path) -> list[int]:
    """Steps of the committed Orbax checkpoints (in-progress saves live in temporary folders)."""
    folder = workdir / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


@pytest.fixture(scope="module")
def reference_run(data_root, env, tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("runs") / "uninterrupted"
    proc = subprocess.run(_cmd(data_root, workdir), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir


def test_sigkilled_run_resumes_to_bitwise_identical_parameters(data_root, env, reference_run):
    workdir = reference_run.parent / "killed"
    proc = subprocess.Popen(
        _cmd(data_root, workdir), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if _finished_checkpoints(workdir) and len(metrics.read_text().splitlines()) >= 6:
            proc.send_signal(signal.SIGKILL)  # not a clean exit: mid-step, maybe mid-checkpoint
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = len(metrics.read_text().splitlines())
    assert 6 <= killed_at < STEPS and not (workdir / "model").exists()

    resumed = subprocess.run(_cmd(data_root, workdir), env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr, "the killed run left no checkpoint to resume from"
    ours, ref = _final_heads(workdir), _final_heads(reference_run)
    assert ours.keys() == ref.keys() and len(ours) > 10
    for key in ref:
        assert np.array_equal(ours[key], ref[key]), (
            f"{key} differs after a SIGKILL at step {killed_at} + resume"
        )


def test_training_lowers_the_loss_and_the_exported_model_scores_a_held_out_category(reference_run):
    losses = _losses(reference_run)
    assert sorted(losses) == list(range(1, STEPS + 1))
    first, last = (
        np.mean([losses[s] for s in range(1, 6)]),
        np.mean([losses[s] for s in range(STEPS - 4, STEPS + 1)]),
    )
    assert last < first, f"loss did not go down: first 5 steps {first:.4f}, last 5 steps {last:.4f}"

    from inctrl_jax.model.detector import Detector

    detector = Detector.from_checkpoint(reference_run / "model")
    assert detector.has_heads and detector.weights.tap_layers == (1, 2, 3)
    cat = DATA / "mvtec_ad" / "transistor"
    refs = detector.build_reference_set(sorted((cat / "train/good").iterdir())[:2], category="transistor")
    queries = sorted((cat / "test/good").iterdir())[:2] + sorted((cat / "test/bent_lead").iterdir())[:2]
    scores = np.asarray([r.score for r in detector.score(queries, refs)])
    assert scores.shape == (4,) and np.all(np.isfinite(scores)) and np.all((scores >= 0) & (scores <= 1))


def test_a_model_trained_on_a_random_backbone_is_exported_as_not_a_real_result(reference_run):
    from inctrl_jax.model.checkpoint import load_model
    from inctrl_jax.model.detector import Detector

    assert load_model(reference_run / "model").provenance == {
        "backbone_weights": "random",
        "real_result": False,
    }
    assert Detector.from_checkpoint(reference_run / "model").is_real_result is False


def test_a_model_trained_on_loaded_backbone_weights_records_their_source():
    from configs.train_inctrl import get_config
    from inctrl_jax.training.trainer import export_provenance

    cfg = get_config()
    cfg.backbone.source = "/weights/open_clip_vit_b_16_plus_240.pt"
    assert export_provenance(cfg.backbone) == {
        "backbone_weights": "/weights/open_clip_vit_b_16_plus_240.pt",
        "real_result": True,
    }


def test_official_state_dict_export_holds_the_trained_heads(reference_run):
    from safetensors.numpy import load_file

    from inctrl_jax.model.checkpoint import from_official_state_dict, load_model

    saved = load_model(reference_run / "model")
    official = load_file(str(reference_run / "official_state_dict.safetensors"))
    assert "visual.conv1.weight" in official
    for head in ("adapter.", "diff_head.", "diff_head_ref."):
        assert any(k.startswith(head) for k in official), f"no {head}* keys in the official export"
    back = from_official_state_dict(official, config=saved.config, tap_layers=saved.tap_layers)
    import jax

    flat_saved = jax.tree_util.tree_leaves_with_path(saved.head_variables)
    flat_back = dict(jax.tree_util.tree_leaves_with_path(back.head_variables))
    assert len(flat_saved) == len(flat_back) > 10
    for path, value in flat_saved:
        assert np.array_equal(np.asarray(flat_back[path]), np.asarray(value)), (
            f"head {path} changed on export"
        )


def test_float16_feature_cache_on_disk_matches_its_size_estimate(reference_run):
    from inctrl_jax.training.feature_cache import estimate_cache_bytes

    cache = reference_run.parent / "cache"
    meta = json.loads((cache / "cache.json").read_text())
    tokens = np.load(cache / "patch_tokens.npy", mmap_mode="r")
    embeds = np.load(cache / "class_embeds.npy")
    assert meta["complete"] and meta["dtype"] == "float16" and tokens.dtype == np.float16
    assert tokens.shape == (24, 3, 16, 32) and embeds.shape == (24, 64)  # 12 elpv + 12 headct images
    # Stored tokens are L2-normalised before the float16 cast: norm 1 to float16 precision.
    np.testing.assert_allclose(np.linalg.norm(tokens.astype(np.float32), axis=-1), 1.0, atol=2e-3)
    assert tokens.nbytes + embeds.nbytes == estimate_cache_bytes(24, 3, 16, 32, 64, "float16")


def test_resuming_with_a_changed_config_is_refused(data_root, reference_run, tmp_path):
    from configs.train_inctrl import get_config
    from inctrl_jax.training.trainer import ConfigError, train

    workdir = tmp_path / "run"
    shutil.copytree(reference_run / "checkpoints", workdir / "checkpoints")
    cfg = get_config("micro")
    cfg.data.root, cfg.data.datasets = str(data_root), DATASETS
    cfg.train.steps, cfg.train.batch_size, cfg.checkpoint.every, cfg.checkpoint.keep = STEPS + 10, 8, 3, 2
    cfg.cache.dtype, cfg.export.official_state_dict = "float16", True
    cfg.train.learning_rate = 1e-2
    with pytest.raises(ConfigError, match=r"different config \(train.learning_rate: 0.001 -> 0.01\)"):
        train(cfg, workdir)


def test_config_errors_are_reported_before_any_compute(data_root, tmp_path):
    from inctrl_jax.data import DataError
    from inctrl_jax.training.trainer import ConfigError, default_config, train

    cfg = default_config()
    cfg.data.root = str(data_root)
    cfg.data.datasets = ("mvtec:aux",)
    cfg.model.k = 7  # the elpv subset has 6 normal images
    with pytest.raises(DataError, match="'elpv' has 6 normal images but each query needs K=7"):
        train(cfg, tmp_path / "w")
    cfg.model.k = 2
    cfg.data.datasets = ("mvtec:nope",)
    with pytest.raises(DataError, match="nope does not exist"):
        train(cfg, tmp_path / "w")
    cfg.data.datasets = ("mvtek:aux",)
    with pytest.raises(DataError, match="layout one of"):
        train(cfg, tmp_path / "w")
    cfg.data.datasets = ("mvtec:aux", "mvtec:aux/elpv")
    with pytest.raises(DataError, match="category 'elpv' comes from both"):
        train(cfg, tmp_path / "w")
    cfg.data.datasets = ("mvtec:aux",)
    cfg.train.batch_size = 7
    with pytest.raises(ConfigError, match="config.train.batch_size=7"):
        train(cfg, tmp_path / "w")
    cfg.train.batch_size = 16
    cfg.unknown_key = 1
    with pytest.raises(ConfigError, match="unknown config key"):
        train(cfg, tmp_path / "w")


def test_a_bad_backbone_source_with_the_micro_variant_names_the_source(tmp_path):
    from configs.train_inctrl import get_config
    from inctrl_jax.training.trainer import ConfigError, validate_config

    cfg = get_config("micro")
    cfg.data.datasets = ("mvtec:aux",)
    cfg.backbone.source = str(tmp_path / "missing.safetensors")
    with pytest.raises(
        ConfigError, match=r"config.backbone.source='.*missing.safetensors': no such file"
    ) as e:
        validate_config(cfg)
    assert "inctrl-micro" not in str(e.value)

    weights = tmp_path / "clip.safetensors"
    weights.write_bytes(b"")
    cfg.backbone.source = str(weights)
    with pytest.raises(
        ConfigError, match=r"source='.*clip.safetensors' loads real weights, but .*arch='inctrl-micro'"
    ):
        validate_config(cfg)


def test_loss_curve_on_8_devices_equals_1_device(data_root, env, reference_run, tmp_path):
    cache = reference_run.parent / "cache"
    proc = subprocess.run(
        [sys.executable, __file__, "multidevice", str(data_root), str(cache), str(tmp_path)],
        env=dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_ENABLE_X64="1"),
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on 8 device(s)" in proc.stderr and "on 1 device(s)" in proc.stderr
    curves = json.loads(proc.stdout.strip().splitlines()[-1])
    curves["float32/1"] = [_losses(reference_run)[s] for s in range(1, MULTIDEVICE_STEPS + 1)]
    assert all(len(c) == MULTIDEVICE_STEPS for c in curves.values())

    # float64: the same function on 1 and 8 devices; reduction order changes only ~1e-16 rounding
    # (measured max 2.3e-14 over 12 steps),
    # and AdamW's eps 1e-8 keeps that rounding on analytically-zero gradients from moving parameters.
    worst64 = np.max(np.abs(np.subtract(curves["float64/1"], curves["float64/8"])))
    assert worst64 < 1e-12, f"float64 loss curve, 8 vs 1 device: max |diff| {worst64:.3g} >= 1e-12"
    # float32: step 1 agrees to rounding (a loss of ~0.5 summed over 8 devices: measured 1.1e-6, i.e.
    # ~10 ulp). Later steps are not compared: AdamW turns float32 rounding noise on analytically-zero
    # gradients (train-mode BN) into +-lr updates whose sign depends on the reduction order.
    step1 = abs(curves["float32/1"][0] - curves["float32/8"][0])
    assert step1 < 5e-6, f"float32 step-1 loss, 8 vs 1 device: |diff| {step1:.3g} >= 5e-6"


def _multidevice_main(data_root: str, cache_dir: str, out_dir: str) -> None:
    import logging

    import jax

    sys.path.insert(0, str(REPO))
    from configs.train_inctrl import get_config
    from inctrl_jax.training.trainer import train

    logger = logging.getLogger("inctrl_jax")
    logger.addHandler(logging.StreamHandler())
    logger.setLevel(logging.INFO)
    logger.propagate = False
    assert jax.device_count() == 8 and jax.config.read("jax_enable_x64")
    curves = {}
    # float32 on 1 device is the reference run itself (same seed, data and batches).
    for dtype, devices in (("float64", 1), ("float64", 8), ("float32", 8)):
        cfg = get_config("micro")
        cfg.data.root, cfg.data.datasets = data_root, DATASETS
        cfg.train.steps, cfg.train.batch_size, cfg.train.dtype = MULTIDEVICE_STEPS, 8, dtype
        cfg.checkpoint.every, cfg.log.progress = MULTIDEVICE_STEPS, False
        cfg.cache.dir, cfg.cache.dtype, cfg.mesh.num_devices = cache_dir, "float16", devices
        workdir = Path(out_dir) / f"{dtype}_{devices}"
        train(cfg, workdir)
        losses = _losses(workdir)
        curves[f"{dtype}/{devices}"] = [losses[s] for s in range(1, MULTIDEVICE_STEPS + 1)]
    print(json.dumps(curves))


if __name__ == "__main__":
    _multidevice_main(*sys.argv[2:5])
