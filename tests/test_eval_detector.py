"""Evaluation through the model's Detector (trained heads) and the data layer's layouts."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from sklearn import metrics as skm

from configs import eval_tiny
from inctrl_jax.evaluation import cli
from inctrl_jax.evaluation.heatmaps import select_panels
from inctrl_jax.evaluation.report import RunInfo
from inctrl_jax.evaluation.runner import DataSpec, EvalSettings, evaluate_dataset
from inctrl_jax.evaluation.scorer import tiny_clip_config
from inctrl_jax.model.checkpoint import InCTRLWeights
from inctrl_jax.model.detector import Detector

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DATA = SHARED / "data"
GOLDEN = SHARED / "golden" / "inctrl_tiny"


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def _copy(rel: str, dst_root: Path) -> Path:
    """Copy ``<data>/<rel>`` to ``dst_root/<rel without the dataset folder>``."""
    src = DATA / rel
    dst = dst_root / Path(*Path(rel).parts[1:])
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, dst)
    return dst


def test_official_checkpoint_with_heads_evaluates_like_the_official_code(tmp_path):
    """The golden tiny InCTRL (backbone + trained-format heads, official key names) through
    evaluate.py's config path: per-image scores equal the official PyTorch outputs."""
    gold = np.load(GOLDEN / "infer_transistor_k2.npz")
    data = tmp_path / "data"
    for rel in [*gold["prompt_paths"], *gold["query_paths"]]:
        _copy(str(rel), data)
    for rel in gold["query_paths"][gold["labels"] == 1]:
        p = Path(rel)
        _copy(f"mvtec_ad/transistor/ground_truth/{p.parent.name}/{p.stem}_mask.png", data)

    cfg = eval_tiny.get_config()
    cfg.checkpoint = str(GOLDEN / "weights.safetensors")
    cfg.backbone = "tiny"  # the architecture of the golden model (README "Model configuration")
    cfg.tiny.update(
        image_size=240, patch_size=16, width=64, layers=12, heads=4, mlp_dim=256, embed_dim=640,
        text_width=32, text_layers=2, text_heads=2, text_mlp_dim=128,
    )  # fmt: skip
    cfg.tap_layers = ""  # official default 7, 9, 11
    cfg.dataset_root = str(data)
    cfg.results_dir = str(tmp_path / "out")
    cfg.k_shots, cfg.seeds = "2", "0"
    cfg.max_test_per_class = 0
    cfg.heatmap_limit = 2
    cfg.progress = False
    with jax.default_matmul_precision("highest"):
        (report,) = cli.run_evaluation(cfg)
    assert not report.problems

    cat_dir = report.categories["transistor"].dir
    meta = json.loads((cat_dir / "meta.json").read_text())
    assert meta["mode"] == "inctrl" and meta["real_result"] is True
    assert (
        "TRAINING-FREE" not in meta["label"] and "TRAINING-FREE" not in (cat_dir / "metrics.md").read_text()
    )
    assert meta["checkpoint_sha256"] and meta["backbone_id"].startswith("vit64x12h4")

    (refs,) = json.loads((cat_dir / "references.json").read_text())
    assert sorted(Path(p).name for p in refs["references"]) == sorted(
        Path(p).name for p in gold["prompt_paths"]
    )
    assert refs["seed"] == 0 and refs["source"] == "seeded" and refs["backbone"] == meta["backbone_id"]

    rows = {str(Path(r["path"]).relative_to(data)): r for r in _read_csv(cat_dir / "scores_k2_seed0.csv")}
    keys = [str(Path(p).relative_to("mvtec_ad")) for p in gold["query_paths"]]
    score = np.array([float(rows[k]["score"]) for k in keys])
    s_i = np.array([float(rows[k]["s_i"]) for k in keys])
    s_a = np.array([float(rows[k]["s_a"]) for k in keys])
    tol = 1e-5  # float32 end to end from the PNG files (README: ~1e-5; observed 5e-7)
    assert np.max(np.abs(score - gold["score"])) <= tol
    assert np.max(np.abs(s_i - gold["s_i"])) <= tol
    assert np.max(np.abs(s_a - gold["s_a"])) <= tol

    (run,) = json.loads((cat_dir / "metrics.json").read_text())["runs"]
    labels = gold["labels"]
    # The official scores are > 1e-3 apart, so their ranking (and these metrics) is exact.
    assert run["image_auroc"] == pytest.approx(skm.roc_auc_score(labels, gold["score"]), abs=1e-12)
    assert run["image_auprc"] == pytest.approx(skm.average_precision_score(labels, gold["score"]), abs=1e-12)
    assert 0.0 <= run["pixel_auroc"] <= 1.0 and 0.0 <= run["pixel_aupro"] <= 1.0
    assert len(list((cat_dir / "heatmaps" / "k2_seed0").glob("*.png"))) == 2


def test_panels_alternate_top_anomalous_and_normal_images():
    labels = [0, 0, 1, 0, 1, 1]
    scores = [0.9, 0.1, 0.5, 0.4, 0.8, float("nan")]
    assert select_panels(labels, scores, 2) == [4, 0]
    assert select_panels(labels, scores, 4) == [4, 0, 2, 3]
    assert select_panels(labels, scores, -1) == [4, 0, 2, 3, 5, 1]
    # One class runs out: the rest of the places go to the other.
    assert select_panels([1, 0, 0, 0], [0.2, 0.3, 0.1, 0.5], 3) == [0, 3, 1]
    assert select_panels([0, 0], [0.1, 0.2], 0) == []


@pytest.fixture(scope="module")
def detector():
    from inctrl_jax.clip.model import init_params

    config = tiny_clip_config(64, 16, 32, 2)
    return Detector(InCTRLWeights(config, init_params(config, 0), None, (1, 2)), batch_size=4)


def _glass_subset(root: Path) -> dict[str, list[Path]]:
    """3 normal training images, 2 normal and 2 anomalous test images (with masks) of glass."""
    glass = DATA / "glass" / "glass"
    pick = {
        "train": sorted((glass / "train" / "good").iterdir())[:3],
        "good": sorted((glass / "test" / "good").iterdir())[:2],
        "edge": sorted((glass / "test" / "edge").iterdir())[:2],
    }
    out: dict[str, list[Path]] = {}
    for name, files in pick.items():
        (root / name).mkdir(parents=True)
        out[name] = [Path(shutil.copy(f, root / name / f.name)) for f in files]
    (root / "masks").mkdir()
    for f in pick["edge"]:
        shutil.copy(
            glass / "ground_truth" / "edge" / f"{f.stem}_mask.png", root / "masks" / f"{f.stem}_mask.png"
        )
    return out


def _check_report(report, category: str, train: list[Path], n_images: int, masks: bool) -> None:
    assert not report.problems
    rep = report.categories[category]
    refs = json.loads((rep.dir / "references.json").read_text())
    assert [(r["k"], r["seed"]) for r in refs] == [(2, 0), (2, 1)]
    pool = {str(p) for p in train}
    assert all(len(r["references"]) == 2 and set(r["references"]) <= pool for r in refs)
    for run in rep.runs:
        assert run.n_images == n_images
        assert ("pixel_auroc" in run.metrics) == masks
    assert json.loads((rep.dir / "meta.json").read_text())["mode"] == "training_free"


def test_folder_layout_through_the_config(tmp_path, monkeypatch, detector):
    files = _glass_subset(tmp_path / "d")
    info = RunInfo("m", "training_free", "tiny", "random")
    monkeypatch.setattr(cli, "build_detector", lambda cfg: cli.Built(detector, info))
    cfg = eval_tiny.get_config()
    cfg.layout = "folder"
    cfg.folder.update(
        normal_dir=str(tmp_path / "d" / "train"), abnormal_dir=str(tmp_path / "d" / "edge"),
        mask_dir=str(tmp_path / "d" / "masks"), normal_test_dir=str(tmp_path / "d" / "good"), category="glass",
    )  # fmt: skip
    cfg.results_dir = str(tmp_path / "out")
    cfg.heatmap_limit = 0
    cfg.progress = False
    (report,) = cli.run_evaluation(cfg)
    _check_report(report, "glass", files["train"], 4, masks=True)
    assert report.dir.parent.parent.name == "glass"  # dataset name defaults to the category


def test_json_and_visa_layouts(tmp_path, detector):
    files = _glass_subset(tmp_path / "d")
    train = [{"image_path": str(p), "target": 0, "type": "glass"} for p in files["train"]]
    test = [{"image_path": str(p), "target": 0, "type": "glass"} for p in files["good"]]
    test += [{"image_path": str(p), "target": 1, "type": "glass"} for p in files["edge"]]
    (tmp_path / "train.json").write_text(json.dumps(train))
    (tmp_path / "test_val.json").write_text(json.dumps(test))
    settings = EvalSettings((2,), (0, 1), heatmap_limit=1, progress=False)
    info = RunInfo("m", "training_free", "tiny", "random")
    spec = DataSpec(
        "json", train_json=[str(tmp_path / "train.json")], test_json=[str(tmp_path / "test_val.json")]
    )
    report = evaluate_dataset(detector, spec, "j", info, tmp_path / "out", settings, {})
    _check_report(report, "glass", files["train"], 4, masks=False)

    # VisA: paths in the split file are relative to the root.
    root = tmp_path / "d"
    rows = [("train", "normal", p, "") for p in files["train"]] + [
        ("test", "normal", p, "") for p in files["good"]
    ]
    rows += [("test", "anomaly", p, root / "masks" / f"{p.stem}_mask.png") for p in files["edge"]]
    (root / "split_csv").mkdir()
    with open(root / "split_csv" / "1cls.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["object", "split", "label", "image", "mask"])
        for split, label, p, m in rows:
            w.writerow(
                ["glass", split, label, Path(p).relative_to(root), Path(m).relative_to(root) if m else ""]
            )
    report = evaluate_dataset(
        detector, DataSpec("visa", root=str(root)), "v", info, tmp_path / "out", settings, {}
    )
    _check_report(report, "glass", files["train"], 4, masks=True)


def test_unknown_layout_and_missing_settings_name_the_flag(tmp_path, detector):
    info = RunInfo("m", "training_free", "tiny", "random")
    settings = EvalSettings((2,), (0,), heatmap_limit=0, progress=False)
    with pytest.raises(ValueError, match="--config.layout='coco'"):
        evaluate_dataset(detector, DataSpec("coco", root=str(tmp_path)), "x", info, tmp_path, settings)
    with pytest.raises(ValueError, match="--config.json.test"):
        evaluate_dataset(detector, DataSpec("json"), "x", info, tmp_path, settings)
    with pytest.raises(ValueError, match=r"categories \['nope'\] not found"):
        evaluate_dataset(detector, str(DATA / "glass"), "x", info, tmp_path, settings, categories=["nope"])
