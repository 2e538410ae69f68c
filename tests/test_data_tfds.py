"""The optional TF-free tensorflow-datasets builder (the ``tfds`` extra, part of ``dev``)."""

from pathlib import Path

import numpy as np
from PIL import Image

from inctrl_jax.data.tfds_builder import build_mvtec_data_source


def _tree(root: Path) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    pixels = {}
    for rel in (
        "toy/train/good/000.png",
        "toy/train/good/001.png",
        "toy/test/good/000.png",
        "toy/test/crack/000.png",
    ):
        arr = rng.integers(0, 256, (24, 32), dtype=np.uint8)  # grayscale sources become RGB
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr, mode="L").save(root / rel)
        pixels[str(root / rel)] = arr
    mask = np.zeros((24, 32), np.uint8)
    mask[5:9, 10:20] = 1  # a class id, as VisA stores it: binarised to 255
    (root / "toy/ground_truth/crack").mkdir(parents=True)
    Image.fromarray(mask, mode="L").save(root / "toy/ground_truth/crack/000_mask.png")
    return pixels


def test_builder_writes_array_records_without_tensorflow(tmp_path):
    pixels = _tree(tmp_path / "data")
    sources = build_mvtec_data_source(tmp_path / "data", data_dir=tmp_path / "tfds")

    assert {k: len(v) for k, v in sources.items()} == {"train": 2, "test": 2}
    records = {r["path"].decode(): r for split in ("train", "test") for r in sources[split]}
    assert set(records) == set(pixels)
    for path, arr in pixels.items():
        rec = records[path]
        np.testing.assert_array_equal(rec["image"], np.repeat(arr[..., None], 3, axis=-1))
        assert rec["label"] == (1 if "/crack/" in path else 0)
    crack = records[str(tmp_path / "data/toy/test/crack/000.png")]
    expected = np.zeros((24, 32, 1), np.uint8)
    expected[5:9, 10:20] = 255
    np.testing.assert_array_equal(crack["mask"], expected)
    assert crack["defect_type"].decode() == "crack"
    assert not records[str(tmp_path / "data/toy/test/good/000.png")]["mask"].any()
