"""evaluate.py as a fresh user meets it: clear user errors, validation first, honest labels."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from configs import eval_default, eval_tiny
from inctrl_jax.evaluation import cli
from inctrl_jax.evaluation.predict import predict
from inctrl_jax.evaluation.report import RunInfo
from inctrl_jax.evaluation.scorer import tiny_clip_config
from inctrl_jax.model.checkpoint import InCTRLWeights
from inctrl_jax.model.detector import Detector

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DATA = SHARED / "data"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def detector():
    from inctrl_jax.clip.model import init_params

    config = tiny_clip_config(64, 16, 32, 2)
    return Detector(InCTRLWeights(config, init_params(config, 0), None, (1, 2)), batch_size=4)


@pytest.mark.parametrize(
    ("config_args", "config_file"),
    [(["--config", "configs/eval_tiny.py"], "configs/eval_tiny.py"), ([], "configs/eval_default.py")],
)
def test_unknown_config_key_is_one_line_and_exit_2(config_args, config_file):
    proc = subprocess.run(
        [sys.executable, "evaluate.py", *config_args, "--config.nonexistent=1"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"unknown config key 'nonexistent' (see {config_file}" in proc.stderr


@pytest.mark.parametrize(
    ("key", "value", "names"),
    [
        ("seeds", "-1", "--config.seeds"),
        ("k_shots", "2,-4", "--config.k_shots"),
        ("batch_size", 0, "--config.batch_size"),
        ("tap_layers", "2,9", "--config.tap_layers"),
        ("tiny.heads", 3, "--config.tiny.heads=3 must divide --config.tiny.width=32"),
        ("weights", "/does/not/exist.bin", "--config.weights=/does/not/exist.bin"),
        ("checkpoint", "/does/not/exist", "--config.checkpoint=/does/not/exist"),
    ],
)
def test_config_is_validated_before_the_model_is_built(monkeypatch, key, value, names):
    def never(cfg):
        raise AssertionError("the detector was built before the config was validated")

    monkeypatch.setattr(cli, "build_detector", never)
    cfg = eval_tiny.get_config()
    if key == "weights":
        cfg = eval_default.get_config()
    cfg.dataset_root = str(DATA / "mvtec_ad")
    node, _, leaf = key.rpartition(".")
    (cfg[node] if node else cfg)[leaf] = value
    with pytest.raises(cli.UserError, match=names.replace(".", r"\.")):
        cli.run_evaluation(cfg)


def test_model_trained_on_a_random_backbone_is_not_a_real_result(tmp_path, monkeypatch, detector):
    detector.save(tmp_path / "model")
    monkeypatch.setattr(Detector, "is_real_result", False, raising=False)
    cfg = eval_default.get_config()
    cfg.checkpoint = str(tmp_path / "model")
    built = cli.build_detector(cfg)
    assert built.info.real_result is False
    assert built.info.notice == "trained on a randomly initialised backbone"
    assert "NOT A REAL RESULT: trained on a randomly initialised backbone" in built.info.label


def _evaluate_transistor(tmp_path, monkeypatch, detector, k_shots: str):
    """Evaluate two images per class of the shared transistor set with the tiny random detector."""
    info = RunInfo("m", "training_free", "tiny", "random", real_result=False, notice="test")
    monkeypatch.setattr(cli, "build_detector", lambda cfg: cli.Built(detector, info))
    cfg = eval_tiny.get_config()
    cfg.dataset_root = str(DATA / "mvtec_ad")
    cfg.results_dir = str(tmp_path)
    cfg.tap_layers = "1,2"
    cfg.tiny.layers = 2
    cfg.k_shots, cfg.seeds, cfg.max_test_per_class, cfg.heatmap_limit, cfg.progress = (
        k_shots,
        "0",
        2,
        0,
        False,
    )
    (report,) = cli.run_evaluation(cfg)
    return report


def test_missing_runs_give_partial_results_and_a_nonzero_exit(tmp_path, monkeypatch, detector):
    report = _evaluate_transistor(tmp_path, monkeypatch, detector, "0,1,500")
    assert not report.complete and cli.exit_status([report]) == 1
    (cat,) = report.categories.values()
    assert [(r.k, r.mode) for r in cat.runs] == [(0, "zero_shot"), (1, "training_free")]
    assert [m["k"] for m in cat.missing_runs] == [500]
    head = (cat.dir / "scores_k0_seed0.csv").read_text().splitlines()[1].split(",")
    assert head[3:5] == ["zero_shot", "False"]


def test_predict_skips_a_truncated_png_and_draws_k_seeded_references(tmp_path, detector):
    good = sorted((DATA / "mvtec_ad" / "transistor" / "train" / "good").iterdir())[:5]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for p in good[:2]:
        Image.open(p).save(inputs / p.name)
    data = (inputs / good[0].name).read_bytes()
    (inputs / "broken.png").write_bytes(data[: len(data) // 3])
    refs = [str(p) for p in good]
    out = predict(
        detector, refs, str(inputs), "transistor", threshold=0.5, output_dir=tmp_path / "out", k=2, seed=3,
        on_error="skip", real_result=False,
    )  # fmt: skip
    assert len(out) == 2 and all(r["mode"] == "training_free" and r["real_result"] is False for r in out)
    assert "broken.png" in (tmp_path / "out" / "failed_images.txt").read_text()
    meta = json.loads((tmp_path / "out" / "predict_meta.json").read_text())
    expected = [refs[i] for i in np.random.default_rng(3).permutation(5)[:2]]
    assert meta["k"] == 2 and meta["seed"] == 3 and meta["references"] == expected
    line = json.loads((tmp_path / "out" / "predictions.jsonl").read_text().splitlines()[0])
    assert line["real_result"] is False and line["mode"] == "training_free"
    with pytest.raises(ValueError, match=r"broken\.png.*on_error"):
        predict(detector, refs, str(inputs), "transistor", threshold=0.5, k=2, on_error="raise")


def test_an_evaluation_of_only_k0_is_labelled_zero_shot(tmp_path, monkeypatch, detector):
    report = _evaluate_transistor(tmp_path, monkeypatch, detector, "0")
    (cat,) = report.categories.values()
    meta = json.loads((cat.dir / "meta.json").read_text())
    assert meta["mode"] == "zero_shot"
    assert "ZERO-SHOT score: text prior only" in meta["label"]
    assert "TRAINING-FREE" not in meta["label"]
