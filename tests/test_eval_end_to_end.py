"""End-to-end evaluation on the real images of ../shared/data with a tiny random backbone."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn import metrics as skm

from configs import eval_tiny
from inctrl_jax.evaluation import cli
from inctrl_jax.evaluation.predict import choose_threshold, predict
from inctrl_jax.evaluation.report import RunInfo
from inctrl_jax.evaluation.runner import EvalSettings, evaluate_dataset
from inctrl_jax.evaluation.scorer import tiny_clip_config
from inctrl_jax.model.checkpoint import InCTRLWeights
from inctrl_jax.model.detector import Detector

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DATA = SHARED / "data"
REPO = Path(__file__).resolve().parents[1]

# (dataset folder, has pixel masks)
DATASETS = [("mvtec_ad", True), ("elpv", False), ("headct", False), ("glass", True)]


@pytest.fixture(scope="module")
def detector():
    from inctrl_jax.clip.model import init_params

    config = tiny_clip_config(64, 16, 32, 3)
    return Detector(InCTRLWeights(config, init_params(config, 0), None, (2, 3)), batch_size=8)


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize(("dataset", "has_masks"), DATASETS)
def test_evaluation_writes_every_report_and_metrics_match_sklearn(
    tmp_path, monkeypatch, detector, dataset, has_masks
):
    # One compiled tiny detector for all four datasets keeps this fast; the config path that builds
    # the detector is exercised by test_cli_builds_the_tiny_backbone_from_the_config.
    info = RunInfo("inctrl-tiny-random", "training_free", "tiny", "random", real_result=False, notice="tiny")
    monkeypatch.setattr(cli, "build_detector", lambda cfg: cli.Built(detector, info))
    cfg = eval_tiny.get_config()
    cfg.dataset_root = str(DATA / dataset)
    cfg.results_dir = str(tmp_path)
    cfg.tiny.layers = 3
    cfg.tap_layers = "2,3"
    cfg.max_test_per_class = 3
    cfg.seeds = "0,1"
    cfg.progress = False
    (report,) = cli.run_evaluation(cfg)
    assert not report.problems

    model_dir = tmp_path / "inctrl-tiny-random" / dataset
    (category,) = [p.name for p in model_dir.iterdir() if p.name != "_dataset"]
    cat_dir = model_dir / category / "latest"
    assert cat_dir.is_symlink() and cat_dir.resolve().name == "v1"
    for name in ("meta.json", "config.json", "references.json", "metrics.json", "metrics.csv", "metrics.md"):
        assert (cat_dir / name).is_file(), name
    for name in ("meta.json", "config.json", "metrics.json", "metrics.csv", "metrics.md"):
        assert (model_dir / "_dataset" / "latest" / name).is_file(), name

    meta = json.loads((cat_dir / "meta.json").read_text())
    assert meta["real_result"] is False and "NOT A REAL RESULT" in meta["label"]
    assert meta["mode"] == "training_free" and meta["package_version"]
    assert "TRAINING-FREE" in (cat_dir / "metrics.md").read_text()
    assert json.loads((cat_dir / "config.json").read_text())["k_shots"] == "2"

    refs = json.loads((cat_dir / "references.json").read_text())
    assert [(r["k"], r["seed"]) for r in refs] == [(2, 0), (2, 1)]
    assert all(len(r["references"]) == 2 and all("train/good" in p for p in r["references"]) for r in refs)

    metrics = json.loads((cat_dir / "metrics.json").read_text())
    per_seed = {}
    for run in metrics["runs"]:
        rows = _read_csv(cat_dir / f"scores_k{run['k']}_seed{run['seed']}.csv")
        jsonl = [
            json.loads(line) for line in (cat_dir / f"scores_k{run['k']}_seed{run['seed']}.jsonl").open()
        ]
        assert [r["path"] for r in jsonl] == [r["path"] for r in rows]
        y = np.array([int(r["label"]) for r in rows])
        s = np.array([float(r["score"]) for r in rows])
        assert y.sum() == 3 and (y == 0).sum() == 3
        assert run["image_auroc"] == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)
        assert run["image_auprc"] == pytest.approx(skm.average_precision_score(y, s), abs=1e-12)
        p, r, _ = skm.precision_recall_curve(y, s)
        f1 = np.max(np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-300), 0))
        assert run["image_f1_max"] == pytest.approx(f1, abs=1e-12)
        if has_masks:
            assert 0.0 <= run["pixel_auroc"] <= 1.0 and 0.0 <= run["pixel_aupro"] <= 1.0
        else:
            assert "pixel_auroc" not in run and "pixel_aupro" not in run
        per_seed[run["seed"]] = run["image_auroc"]
        heatmaps = sorted((cat_dir / "heatmaps" / f"k{run['k']}_seed{run['seed']}").glob("*.png"))
        assert len(heatmaps) == 2  # the config's limit
        # A small limit shows both classes: the top-scoring anomalous image, then the top normal one.
        by_score = sorted(zip(s, y, [Path(r["path"]).stem for r in rows], strict=True), reverse=True)
        top_anomalous = next(stem for _, label, stem in by_score if label == 1)
        top_normal = next(stem for _, label, stem in by_score if label == 0)
        assert heatmaps[0].name.startswith("000_") and heatmaps[0].name.endswith(f"_{top_anomalous}.png")
        assert heatmaps[1].name == f"001_good_{top_normal}.png"
    (summary,) = metrics["summary"]
    vals = list(per_seed.values())
    assert summary["image_auroc_mean"] == pytest.approx(np.mean(vals), abs=1e-12)
    assert summary["image_auroc_std"] == pytest.approx(np.std(vals), abs=1e-12)
    dataset_metrics = json.loads((model_dir / "_dataset" / "latest" / "metrics.json").read_text())
    assert dataset_metrics["dataset_mean"][0]["image_auroc_mean"] == pytest.approx(np.mean(vals), abs=1e-12)


def test_cli_builds_the_tiny_backbone_from_the_config(tmp_path):
    cfg = eval_tiny.get_config()
    cfg.dataset_root = str(REPO / "sample_data")
    cfg.results_dir = str(tmp_path)
    cfg.seeds = "0"
    cfg.tiny.layers = 2
    cfg.tap_layers = ""  # default: the last blocks
    cfg.heatmap_limit = 1
    cfg.progress = False
    (report,) = cli.run_evaluation(cfg)
    run = report.categories["transistor"].runs[0]
    assert run.n_normal == 2 and run.n_anomalous == 3
    assert all(0.0 <= v <= 1.0 for v in run.metrics.values())
    assert set(run.metrics) == {"image_auroc", "image_auprc", "image_f1_max", "pixel_auroc", "pixel_aupro"}
    meta = json.loads((report.categories["transistor"].dir / "meta.json").read_text())
    assert meta["model"] == "inctrl-tiny-random" and meta["real_result"] is False


def _mini_category(root: Path, n_ref: int = 2, normals: int = 2, anomalous: int = 0) -> Path:
    src = DATA / "glass" / "glass"
    cat = root / "glass"
    for sub, n, dst in (
        ("train/good", n_ref, "train/good"),
        ("test/good", normals, "test/good"),
        ("test/edge", anomalous, "test/edge"),
    ):
        files = sorted((src / sub).iterdir())[:n]
        (cat / dst).mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copy(f, cat / dst / f.name)
    return cat


def test_single_class_category_reports_nan_with_a_warning(tmp_path, detector):
    _mini_category(tmp_path / "data", normals=3, anomalous=0)
    info = RunInfo("m", "training_free", "tiny", "random", real_result=False, notice="test")
    settings = EvalSettings((2,), (0,), heatmap_limit=0, progress=False)
    report = evaluate_dataset(detector, tmp_path / "data", "mini", info, tmp_path / "out", settings, {})
    rep = report.categories["glass"]
    run = json.loads((rep.dir / "metrics.json").read_text())
    assert run["runs"][0]["image_auroc"] is None  # NaN is written as JSON null
    assert any("undefined" in w and "only normal" in w for w in run["warnings"])
    assert "NaN" in (rep.dir / "metrics.md").read_text()
    assert "nan" in (rep.dir / "metrics.csv").read_text()


def test_unreadable_images_are_reported_and_a_fully_broken_category_does_not_stop_the_dataset(
    tmp_path, detector
):
    data = tmp_path / "data"
    cat = _mini_category(data, normals=2, anomalous=2)
    (cat / "test" / "good" / "broken.png").write_bytes(b"not a png")
    broken = data / "broken"
    (broken / "train" / "good").mkdir(parents=True)
    (broken / "test" / "good").mkdir(parents=True)
    (broken / "test" / "good" / "x.png").write_bytes(b"")
    info = RunInfo("m", "training_free", "tiny", "random")
    settings = EvalSettings((2,), (0,), heatmap_limit=0, progress=False)
    report = evaluate_dataset(detector, data, "mini", info, tmp_path / "out", settings, {})
    assert "broken" in report.problems and "failed to load" in report.problems["broken"]
    rep = report.categories["glass"]
    assert "broken.png" in (rep.dir / "failed_images.txt").read_text()
    assert json.loads((rep.dir / "metrics.json").read_text())["runs"][0]["n_images"] == 4
    summary = json.loads((report.dir / "metrics.json").read_text())
    assert "broken" in summary["problems"]


def test_second_evaluation_gets_a_new_version_and_latest_moves(tmp_path, detector):
    _mini_category(tmp_path / "data", normals=1, anomalous=1)
    info = RunInfo("m", "training_free", "tiny", "random")
    settings = EvalSettings((2,), (0,), heatmap_limit=0, progress=False)
    for _ in range(2):
        evaluate_dataset(detector, tmp_path / "data", "mini", info, tmp_path / "out", settings, {})
    cat = tmp_path / "out" / "m" / "mini" / "glass"
    assert sorted(p.name for p in cat.iterdir()) == ["latest", "v1", "v2"]
    assert (cat / "latest").resolve().name == "v2"


def test_threshold_from_normal_only_validation_is_a_quantile_not_the_minimum():
    scores = np.linspace(0.0, 1.0, 101)
    thr, how = choose_threshold(scores, None, quantile=0.95)
    assert thr == pytest.approx(0.95, abs=1e-12) and "0.95 quantile" in how
    thr, how = choose_threshold([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1])
    assert thr == pytest.approx(0.8) and "F1-max" in how
    with pytest.raises(ValueError, match="only anomalous"):
        choose_threshold([0.5, 0.6], [1, 1])


def test_predict_on_numpy_arrays_and_folders(tmp_path, detector):
    glass = DATA / "glass" / "glass"
    refs = [np.asarray(Image.open(p)) for p in sorted((glass / "train" / "good").iterdir())[:2]]
    frames = [
        np.asarray(Image.open(p).convert("RGB")) for p in sorted((glass / "test" / "edge").iterdir())[:2]
    ]
    frames.append(np.random.default_rng(0).random((50, 70)).astype(np.float32))  # float gray, odd size
    val = tmp_path / "val" / "good"
    val.mkdir(parents=True)
    for p in sorted((glass / "test" / "good").iterdir())[:4]:
        shutil.copy(p, val / p.name)
    out = predict(
        detector,
        refs,
        frames,
        "glass",
        validation=tmp_path / "val",
        quantile=0.9,
        output_dir=tmp_path / "pred",
        heatmap_limit=1,
    )
    assert len(out) == 3 and out[2]["anomaly_map"].shape == (50, 70)
    assert all(r["anomalous"] == (r["score"] >= r["threshold"]) for r in out)
    lines = [json.loads(x) for x in (tmp_path / "pred" / "predictions.jsonl").read_text().splitlines()]
    assert [x["score"] for x in lines] == [r["score"] for r in out]
    assert (
        "0.9 quantile of the scores of 4 normal images" in (tmp_path / "pred" / "threshold.json").read_text()
    )
    assert len(list((tmp_path / "pred" / "heatmaps").glob("*.png"))) == 1
    # The saved reference set gives the same scores.
    again = predict(detector, str(tmp_path / "pred" / "reference_set"), frames, "glass", threshold=0.5)
    np.testing.assert_allclose([r["score"] for r in again], [r["score"] for r in out], rtol=0, atol=1e-6)
    assert not math.isnan(out[0]["s_a"])


def test_sample_data_is_small_and_licensed():
    sample = REPO / "sample_data"
    size = sum(p.stat().st_size for p in sample.rglob("*") if p.is_file())
    assert size < 3 * 2**20
    assert (sample / "license.txt").is_file() and "Bergmann" in (sample / "README.md").read_text()
    masks = list((sample / "transistor" / "ground_truth").rglob("*_mask.png"))
    assert len(masks) == len(
        [p for p in (sample / "transistor" / "test").rglob("*.png") if p.parent.name != "good"]
    )
