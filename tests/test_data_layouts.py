"""Dataset layouts, converters and bad input, on synthetic trees and the shared real data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from inctrl_jax.data.convert import main as convert_main
from inctrl_jax.data.convert import to_inctrl_json, to_mvtec_tree
from inctrl_jax.data.layouts import DataError, read_inctrl_json, scan_folder, scan_mvtec, scan_visa

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _img(path: Path, size=(12, 10), value=100, mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode != "RGB" else (value, value, value)).save(path)
    return path


def _mask(path: Path, size=(12, 10)) -> Path:
    arr = np.zeros(size[::-1], np.uint8)
    arr[2:5, 3:7] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def _mvtec_tree(root: Path, category="widget") -> Path:
    c = root / category
    for i in range(3):
        _img(c / "train/good" / f"{i:03d}.png")
    _img(c / "test/good/000.png")
    for i in range(2):
        _img(c / "test/crack" / f"{i:03d}.png")
        _mask(c / "ground_truth/crack" / f"{i:03d}_mask.png")
    return root


def test_mvtec_layout_reads_labels_splits_and_masks(tmp_path):
    _mvtec_tree(tmp_path, "widget")
    _mvtec_tree(tmp_path, "gadget")
    ds = scan_mvtec(tmp_path)
    assert ds.categories == ["gadget", "widget"]
    assert ds.counts()["widget"] == {"train_normal": 3, "test_normal": 1, "test_anomalous": 2}
    crack = [s for s in ds if s.defect_type == "crack" and s.category == "widget"]
    assert [Path(s.mask_path).name for s in crack] == ["000_mask.png", "001_mask.png"]
    assert all(s.label == 1 and s.split == "test" for s in crack)
    assert all(s.mask_path is None for s in ds if s.label == 0)
    assert scan_mvtec(tmp_path, ["gadget"]).categories == ["gadget"]
    assert scan_mvtec(tmp_path / "widget").categories == ["widget"]  # a category folder itself
    with pytest.raises(DataError, match=r"categories \['nope'\] not found"):
        scan_mvtec(tmp_path, ["nope"])


def test_visa_split_csv(tmp_path):
    _img(tmp_path / "candle/Data/Images/Normal/0000.JPG")
    _img(tmp_path / "candle/Data/Images/Normal/0001.JPG")
    _img(tmp_path / "candle/Data/Images/Anomaly/000.JPG")
    m = np.zeros((10, 12), np.uint8)
    m[1:3, 1:3] = 2  # VisA masks hold class ids
    (tmp_path / "candle/Data/Masks/Anomaly").mkdir(parents=True)
    Image.fromarray(m).save(tmp_path / "candle/Data/Masks/Anomaly/000.png")
    (tmp_path / "split_csv").mkdir()
    (tmp_path / "split_csv/1cls.csv").write_text(
        "object,split,label,image,mask\n"
        "candle,train,normal,candle/Data/Images/Normal/0000.JPG,\n"
        "candle,test,normal,candle/Data/Images/Normal/0001.JPG,\n"
        "candle,test,anomaly,candle/Data/Images/Anomaly/000.JPG,candle/Data/Masks/Anomaly/000.png\n"
    )
    ds = scan_visa(tmp_path)
    assert [(s.split, s.label, s.defect_type) for s in ds] == [
        ("train", 0, "good"),
        ("test", 0, "good"),
        ("test", 1, "defect"),
    ]
    assert ds.samples[2].mask_path.endswith("000.png")


def test_folder_layout_with_masks_and_seeded_normal_split(tmp_path):
    for i in range(8):
        _img(tmp_path / "normal" / f"n{i}.png")
    for i in range(2):
        _img(tmp_path / "bad" / f"a{i}.png")
        _mask(tmp_path / "masks" / f"a{i}.png")
    ds = scan_folder(tmp_path / "normal", tmp_path / "bad", mask_dir=tmp_path / "masks", category="pcb")
    assert ds.counts() == {"pcb": {"train_normal": 6, "test_normal": 2, "test_anomalous": 2}}
    assert all(s.mask_path for s in ds if s.label == 1)
    again = scan_folder(tmp_path / "normal", tmp_path / "bad", mask_dir=tmp_path / "masks", category="pcb")
    assert again.samples == ds.samples
    _img(tmp_path / "normal_test/t0.png")
    ds2 = scan_folder(tmp_path / "normal", normal_test_dir=tmp_path / "normal_test")
    assert ds2.counts()[ds2.categories[0]] == {"train_normal": 8, "test_normal": 1}


def test_inctrl_json_round_trip_through_converters(tmp_path):
    ds = scan_mvtec(_mvtec_tree(tmp_path / "src"))
    files = to_inctrl_json(ds, tmp_path / "json")
    names = sorted(f.name for f in files)
    assert names == [f"widget_{k}.json" for k in ("normal", "outlier", "val_normal", "val_outlier")]
    normal = json.loads((tmp_path / "json/widget_normal.json").read_text())
    assert len(normal) == 4 and normal[0].keys() == {"image_path", "target", "type"}
    assert {e["target"] for e in normal} == {0} and normal[0]["type"] == "widget"
    val = read_inctrl_json(
        [tmp_path / "json/widget_val_normal.json", tmp_path / "json/widget_val_outlier.json"]
    )
    assert [(s.split, s.label, s.defect_type) for s in val] == [("test", 0, "good")] + [
        ("test", 1, "crack")
    ] * 2
    assert all(s.mask_path and s.mask_path.endswith("_mask.png") for s in val if s.label)
    tree = to_mvtec_tree(val, tmp_path / "tree", mode="copy")
    assert tree.counts() == {"widget": {"test_normal": 1, "test_anomalous": 2}}
    assert (tmp_path / "tree/widget/ground_truth/crack/000_mask.png").is_file()


def test_cli_converts_folder_to_mvtec_tree(tmp_path, capsys):
    for i in range(4):
        _img(tmp_path / "ok" / f"{i}.png")
    _img(tmp_path / "ng/x.png")
    rc = convert_main(
        [
            "--layout",
            "folder",
            "--normal-dir",
            str(tmp_path / "ok"),
            "--abnormal-dir",
            str(tmp_path / "ng"),
            "--category",
            "pcb",
            "--to",
            "mvtec",
            "--out",
            str(tmp_path / "tree"),
        ]
    )
    assert rc == 0
    assert scan_mvtec(tmp_path / "tree").counts() == {
        "pcb": {"train_normal": 3, "test_normal": 1, "test_anomalous": 1}
    }
    assert (
        convert_main(["--layout", "mvtec", "--root", str(tmp_path / "missing"), "--to", "json", "--out", "o"])
        == 2
    )
    assert "missing" in capsys.readouterr().err


# ---- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make_bad, match",
    [
        (lambda c: (c / "test/good/zero.png").write_bytes(b""), "empty"),
        (lambda c: (c / "test/good/notes.csv").write_text("x"), "not an image file"),
        (lambda c: _img(c / "test/good/000.jpg"), "duplicate stem"),
        (lambda c: _mask(c / "ground_truth/crack/009_mask.png"), "mask without a matching image"),
        (lambda c: (c / "ground_truth/crack/001_mask.png").unlink(), "has no mask"),
        (
            lambda c: _mask(c / "ground_truth/crack/001_mask.png", size=(5, 5)),
            "masks must have exactly the size",
        ),
        (lambda c: os.symlink("loop.png", c / "test/good/loop.png"), "symlink loop"),
    ],
)
def test_bad_files_raise_or_skip_with_report(tmp_path, make_bad, match):
    _mvtec_tree(tmp_path)
    make_bad(tmp_path / "widget")
    with pytest.raises(DataError, match=match) as info:
        scan_mvtec(tmp_path)
    assert "on_error='skip'" in str(info.value)
    with pytest.warns(UserWarning, match="skipping"):
        ds = scan_mvtec(tmp_path, on_error="skip")
    assert len(ds.skipped) == 1 and match.split()[0] in ds.skipped[0].reason
    assert ds.counts()["widget"]["train_normal"] == 3  # the rest is still read


def test_missing_or_empty_folders_and_categories_without_normals(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        scan_mvtec(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no category folders"):
        scan_mvtec(tmp_path / "empty")
    c = tmp_path / "root/widget"
    _img(c / "test/crack/000.png")
    with pytest.raises(DataError, match="no normal images"):
        scan_mvtec(tmp_path / "root")
    (tmp_path / "root/widget/train/good").mkdir(parents=True)
    with pytest.raises(DataError, match="contains no images"):
        scan_mvtec(tmp_path / "root")
    with pytest.raises(DataError, match="contains no images"):
        scan_folder(tmp_path / "root/widget/train/good")


def test_unreadable_file_is_reported(tmp_path, monkeypatch):
    _mvtec_tree(tmp_path)
    bad = str(tmp_path / "widget/test/good/000.png")
    real_access = os.access
    # Simulate a file without read permission (chmod does not stop root, which runs CI here).
    monkeypatch.setattr(os, "access", lambda p, mode: False if os.fspath(p) == bad else real_access(p, mode))
    with pytest.raises(DataError, match="000.png: permission denied"):
        scan_mvtec(tmp_path)


# ---- the shared real data ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "source, category, counts, n_masks",
    [
        ("mvtec_ad", "transistor", {"train_normal": 32, "test_normal": 60, "test_anomalous": 40}, 40),
        ("elpv", "elpv", {"train_normal": 64, "test_normal": 200, "test_anomalous": 200}, 0),
        ("headct", "headct", {"train_normal": 75, "test_normal": 25, "test_anomalous": 100}, 0),
        ("glass", "glass", {"train_normal": 8, "test_normal": 10, "test_anomalous": 80}, 80),
    ],
)
def test_shared_real_datasets_read_completely(source, category, counts, n_masks):
    ds = scan_mvtec(DATA / source)
    assert ds.categories == [category] and not ds.skipped
    assert ds.counts()[category] == counts
    assert sum(s.mask_path is not None for s in ds) == n_masks


def test_tree_with_every_image_mode_scans_and_decodes(tmp_path):
    from inctrl_jax.data.pipeline import eval_batches

    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
    good = tmp_path / "widget/train/good"
    good.mkdir(parents=True)
    files = {
        "1": ("m1.png", rgb.convert("1")),
        "L": ("mL.png", rgb.convert("L")),
        "LA": ("mLA.png", rgb.convert("LA")),
        "P": ("mP.png", rgb.convert("P")),
        "RGB": ("mRGB.jpg", rgb),
        "RGBA": ("mRGBA.png", rgb.convert("RGBA")),
        "CMYK": ("mCMYK.tif", rgb.convert("CMYK")),
        "I;16": ("mI16.png", Image.fromarray(rng.integers(0, 65536, (20, 30), dtype=np.uint16))),
        "I": ("mI.tif", Image.fromarray(rng.integers(0, 65536, (20, 30)).astype(np.int32), "I")),
    }
    for name, im in files.values():
        im.save(good / name)
    _img(tmp_path / "widget/test/bad/x.png")
    ds = scan_mvtec(tmp_path)
    assert ds.counts()["widget"]["train_normal"] == len(files)
    opened = set()
    for s in ds.select(split="train"):
        with Image.open(s.path) as im:
            opened.add("I;16" if im.mode.startswith("I;16") else im.mode)
    assert opened == set(files)
    (batch,) = list(eval_batches(ds.select(split="train"), 16, 16))
    assert batch["valid"][: len(files)].all() and batch["image"].shape == (16, 16, 16, 3)
    assert np.isfinite(batch["image"]).all()
