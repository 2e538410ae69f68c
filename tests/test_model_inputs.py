"""Detector inputs a user meets first: recursive folders, globs, unreadable files, elongated images."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from inctrl_jax.clip.model import CLIPConfig, TextConfig, VisionConfig, init_params
from inctrl_jax.data import ImageDecodeError
from inctrl_jax.model.checkpoint import InCTRLWeights
from inctrl_jax.model.detector import Detector
from inctrl_jax.model.heads import init_heads

jax.config.update("jax_default_matmul_precision", "highest")

CFG = CLIPConfig(
    VisionConfig(
        image_size=32, patch_size=8, width=32, layers=3, heads=2, mlp_dim=64, embed_dim=16, act="gelu"
    ),
    TextConfig(width=16, layers=1, heads=2, mlp_dim=32, embed_dim=16, act="gelu"),
)
TOL = 1e-5


def _random_tree(shapes, rng: np.random.Generator):
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    leaves = []
    for path, leaf in flat:
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        if "scale" in str(path[-1]) or "var" in str(path[-1]):
            leaves.append(1.0 + 0.1 * np.abs(noise))
        else:
            leaves.append((noise / np.sqrt(leaf.shape[0] if len(leaf.shape) >= 2 else 16)).astype(np.float32))
    return jax.tree_util.tree_unflatten(treedef, leaves)


@pytest.fixture(scope="module")
def detector() -> Detector:
    rng = np.random.default_rng(0)
    clip = _random_tree(jax.eval_shape(lambda: init_params(CFG)), rng)
    heads = _random_tree(jax.eval_shape(lambda: init_heads(16, 16)), rng)
    return Detector(InCTRLWeights(CFG, clip, heads, (1, 2, 3)), batch_size=2)


def _png(path: Path, seed: int, size: tuple[int, int] = (40, 36)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope="module")
def mvtec(tmp_path_factory) -> Path:
    """``bottle/`` with ``train/good`` and ``test/{good,broken}`` plus a non-image and a symlink loop."""
    root = tmp_path_factory.mktemp("mvtec") / "bottle"
    for i in range(3):
        _png(root / "train" / "good" / f"{i:03d}.png", i)
    _png(root / "test" / "good" / "000.png", 10)
    _png(root / "test" / "good" / "001.png", 11)
    _png(root / "test" / "good" / "100.png", 12)
    _png(root / "test" / "broken" / "000.png", 13)
    (root / "test" / "readme.txt").write_text("not an image")
    os.symlink(root / "test", root / "test" / "broken" / "loop")  # a directory symlink loop
    return root


@pytest.fixture(scope="module")
def refs(detector, mvtec):
    return detector.build_reference_set(mvtec / "train", "bottle")


def test_a_standard_mvtec_test_folder_is_read_recursively_and_sorted(detector, mvtec, refs):
    results = detector.score(str(mvtec / "test") + "/", refs, return_maps=False)
    expected = ["broken/000.png", "good/000.png", "good/001.png", "good/100.png"]
    assert [Path(r.source).relative_to(mvtec / "test").as_posix() for r in results] == expected
    explicit = detector.score([mvtec / "test" / e for e in expected], refs, return_maps=False)
    assert np.allclose([r.score for r in results], [r.score for r in explicit], atol=TOL)
    # build_reference_set also walks subfolders: the whole category folder gives its 3 + 4 images
    whole = detector.build_reference_set(mvtec, "bottle")
    assert len(whole.reference_files) == 7


def test_glob_patterns_are_expanded_sorted_and_an_empty_match_names_the_pattern(detector, mvtec, refs):
    results = detector.score(str(mvtec / "test" / "good" / "00*.png"), refs, return_maps=False)
    assert [Path(r.source).name for r in results] == ["000.png", "001.png"]
    recursive = detector.score([str(mvtec / "test" / "**" / "000.png")], refs, return_maps=False)
    assert [Path(r.source).parent.name for r in recursive] == ["broken", "good"]
    k2 = detector.build_reference_set(str(mvtec / "train" / "good" / "00[01].png"), "bottle")
    assert [Path(f).name for f in k2.reference_files] == ["000.png", "001.png"]
    pattern = str(mvtec / "test" / "good" / "9*.png")
    with pytest.raises(FileNotFoundError, match=r"9\*\.png"):
        detector.score(pattern, refs)


@pytest.fixture(scope="module")
def damaged(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("damaged")
    good = [_png(folder / f"{i}_good.png", 20 + i) for i in range(3)]
    data = good[0].read_bytes()
    (folder / "1_truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "1_corrupt.png").write_bytes(np.random.default_rng(1).bytes(500))
    (folder / "2_text.jpg").write_text("this is not a jpeg")
    (folder / "3_empty.png").write_bytes(b"")
    return folder


BAD = ["1_corrupt.png", "1_truncated.png", "2_text.jpg", "3_empty.png"]


def test_on_error_raise_is_the_default_and_names_the_file(detector, damaged, refs):
    with pytest.raises(ImageDecodeError, match="1_corrupt.png"):
        detector.score(damaged, refs)


def test_on_error_skip_leaves_out_undecodable_files_warns_and_lists_them(detector, damaged, refs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = detector.score(damaged, refs, on_error="skip")
    messages = " ".join(str(w.message) for w in caught)
    assert all(name in messages for name in BAD), messages
    assert sorted(Path(s.path).name for s in detector.last_skipped) == BAD
    assert all(s.reason for s in detector.last_skipped)
    assert [Path(r.source).name for r in results] == ["0_good.png", "1_good.png", "2_good.png"]
    alone = detector.score(sorted(damaged.glob("*_good.png")), refs)
    assert np.allclose([r.score for r in results], [r.score for r in alone], atol=TOL)
    # a clean call resets the list; a stream of only bad files is an error, not an empty result
    detector.score(damaged / "0_good.png", refs, on_error="skip")
    assert detector.last_skipped == []
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="skipped"):
        detector.score([damaged / b for b in BAD], refs, on_error="skip")
    with pytest.raises(ValueError, match="on_error"):
        detector.score(damaged, refs, on_error="ignore")


def test_fit_pad_keeps_the_whole_elongated_image_and_maps_project_back(detector, refs, tmp_path):
    wide = _png(tmp_path / "wide.png", 30, size=(128, 32))  # 4:1 -> pad: 32 x 8 inside a 32 x 32 input
    cropped = detector.score(wide, refs)[0]
    assert cropped.anomaly_map.shape == (32, 128)
    assert np.isnan(cropped.anomaly_map).any()  # the centre crop lost the left and right
    padded = detector.score(wide, refs, fit="pad")[0]
    assert padded.anomaly_map.shape == (32, 128)
    assert np.isfinite(padded.anomaly_map).all()
    # the image sits in input rows 12..19, i.e. patch rows 1 and 2 of the 4 x 4 grid: the map is
    # interpolated from those rows only
    rows = padded.residual_map[1:3]
    assert padded.anomaly_map.min() >= rows.min() - TOL and padded.anomaly_map.max() <= rows.max() + TOL
    assert not np.isclose(cropped.score, padded.score, atol=TOL)
    pad_det = Detector(detector.weights, batch_size=2, fit="pad")
    again = pad_det.score(wide, refs)[0]
    assert abs(again.score - padded.score) < TOL
    pixels = pad_det.load_images(wide)[0][0]
    assert np.abs(pixels[:12]).max() == 0.0 and np.abs(pixels[20:]).max() == 0.0  # mean-colour padding
    with pytest.raises(ValueError, match="fit"):
        Detector(detector.weights, fit="stretch")
    with pytest.raises(ValueError, match="fit"):
        detector.score(wide, refs, fit="tile")
