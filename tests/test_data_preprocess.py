"""Preprocessing: reference parity, every PIL mode, geometry of masks and maps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from inctrl_jax.data.preprocess import (
    CLIP_MEAN,
    CLIP_STD,
    Geometry,
    ImageDecodeError,
    load_image,
    load_mask,
    preprocess,
    preprocess_mask,
    preprocess_tiles,
    preprocess_with_geometry,
    project_to_original,
    stitch_tile_maps,
    to_8bit,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DATA = SHARED / "data"
GOLDEN = SHARED / "golden" / "inctrl_tiny"


def _u8(pixels: np.ndarray) -> np.ndarray:
    """Invert the normalisation back to uint8 RGB (exact for the reference path)."""
    return np.rint((pixels * CLIP_STD + CLIP_MEAN) * 255).astype(np.uint8)


def test_golden_pixels_match_reference_to_1e_6():
    golden = np.load(GOLDEN / "images.npz")
    assert len(golden["paths"]) == 20
    for rel, expected in zip(golden["paths"], golden["pixels"], strict=True):
        got = load_image(DATA / str(rel), 240)
        assert got.shape == (240, 240, 3) and got.dtype == np.float32
        diff = np.abs(got - expected.transpose(1, 2, 0)).max()
        assert diff <= 1e-6, f"{rel}: max abs diff {diff} > 1e-6"


def test_non_square_resize_truncates_long_side_and_centre_crops():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (201, 301, 3), dtype=np.uint8)  # w=301, h=201
    img = Image.fromarray(arr)
    pixels, geom = preprocess_with_geometry(img, 16)
    # long side int(16 * 301 / 201) = int(23.96) = 23; left = int(round((23 - 16) / 2.0)) = round(3.5) = 4
    assert (geom.resized_w, geom.resized_h, geom.origin_x, geom.origin_y) == (23, 16, 4, 0)
    expected = np.asarray(img.resize((23, 16), Image.Resampling.BICUBIC))[:, 4:20]
    np.testing.assert_array_equal(_u8(pixels), expected)


def test_image_already_at_target_size_is_not_resampled():
    arr = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    np.testing.assert_array_equal(_u8(preprocess(Image.fromarray(arr), 16)), arr)


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK"])
def test_eight_bit_modes_resize_in_native_mode_then_convert_to_rgb(mode):
    rng = np.random.default_rng(2)
    base = Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8))
    img = base.convert(mode)
    expected = np.asarray(img.resize((16, 21), Image.Resampling.BICUBIC).crop((0, 2, 16, 18)).convert("RGB"))
    got = _u8(preprocess(img, 16))
    assert got.shape == (16, 16, 3)
    np.testing.assert_array_equal(got, expected)


def test_grayscale_gives_three_equal_channels():
    arr = np.random.default_rng(3).integers(0, 256, (20, 20), dtype=np.uint8)
    u8 = _u8(preprocess(Image.fromarray(arr, "L"), 20))
    np.testing.assert_array_equal(u8[..., 0], arr)
    np.testing.assert_array_equal(u8[..., 1], arr)
    np.testing.assert_array_equal(u8[..., 2], arr)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_sixteen_bit_images_scale_by_bit_depth(tmp_path, suffix):
    values = np.array([[0, 257, 32896], [65535, 1285, 128]], dtype=np.uint16)
    path = tmp_path / f"img16{suffix}"
    Image.fromarray(values).save(path)
    opened = Image.open(path)
    assert opened.mode in ("I;16", "I")
    # v * 255 / 65535: 0 -> 0, 257 -> 1, 32896 -> 128, 65535 -> 255, 1285 -> 5, 128 -> 0.498 -> 0
    assert opened.size == (3, 2)
    np.testing.assert_array_equal(np.asarray(to_8bit(opened)), [[0, 1, 128], [255, 5, 0]])
    pixels, geom = preprocess_with_geometry(Image.open(path), 3, fit="pad")  # 3x2 fits: no resize, 1 pad row
    assert (geom.resized_w, geom.resized_h, geom.origin_y) == (3, 2, 0)
    np.testing.assert_array_equal(_u8(pixels)[:2, :, 1], [[0, 1, 128], [255, 5, 0]])
    assert (pixels[2] == 0).all()


def test_thirty_two_bit_integer_image_with_explicit_bit_depth():
    values = np.array([[0, 4095], [2048, 15]], dtype=np.int32)
    img = Image.fromarray(values, "I")
    np.testing.assert_array_equal(np.asarray(to_8bit(img, bit_depth=12)), [[0, 255], [128, 1]])
    np.testing.assert_array_equal(np.asarray(to_8bit(img)), [[0, 16], [8, 0]])  # default: 16-bit


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((10, 20, 3), np.uint8)
    arr[:, :10] = 255  # left half white, w=20, h=10
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW when displaying
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif, quality=100)
    pixels, geom = preprocess_with_geometry(Image.open(path), 10)
    assert (geom.orig_w, geom.orig_h) == (10, 20)  # portrait after orientation
    u8 = _u8(pixels)
    assert u8[0, 5, 0] > 200 and u8[9, 5, 0] < 50  # the white half is now on top


def test_pad_keeps_whole_image_and_pads_with_mean_colour():
    arr = np.full((10, 40, 3), 255, np.uint8)
    pixels, geom = preprocess_with_geometry(Image.fromarray(arr), 20, fit="pad")
    assert (geom.resized_w, geom.resized_h, geom.origin_x, geom.origin_y) == (20, 5, 0, -7)
    u8 = _u8(pixels)
    assert (u8[7:12] == 255).all()
    assert (pixels[:7] == 0).all() and (pixels[12:] == 0).all()
    assert geom.valid_region().sum() == 20 * 5


def test_tiles_cover_elongated_line_scan_image():
    arr = np.random.default_rng(4).integers(0, 256, (20, 500), dtype=np.uint8)  # 20 x 500, ratio 1:25
    tiles, geoms = preprocess_tiles(Image.fromarray(arr, "L"), 24)
    # resized to 600 x 24; ceil(600 / 24) = 25 tiles, first at 0, last ending at 600
    assert tiles.shape == (25, 24, 24, 3)
    assert geoms[0].origin_x == 0 and geoms[-1].origin_x == 600 - 24
    resized = np.asarray(Image.fromarray(arr, "L").resize((600, 24), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(
        _u8(tiles[3])[..., 0], resized[:, geoms[3].origin_x : geoms[3].origin_x + 24]
    )
    stitched, seen = stitch_tile_maps(np.ones((25, 3, 3)) * np.arange(25)[:, None, None], geoms)
    assert seen.all() and stitched.shape == (20, 500)
    assert stitched[:, 0].max() == 0 and stitched[:, -1].min() == 24


def test_mask_follows_image_geometry_nearest_and_binarised():
    mask = np.zeros((30, 60), np.uint8)
    mask[10:20, 0:5] = 255  # at the left border: cropped away by the reference
    mask[10:20, 28:32] = 200  # centre, non-binary value
    img = Image.new("RGB", (60, 30))
    _, geom = preprocess_with_geometry(img, 15)
    out = preprocess_mask(Image.fromarray(mask), geom)
    assert out.dtype == np.uint8 and set(np.unique(out)) <= {0, 1}
    expected = (np.asarray(Image.fromarray(mask).resize((30, 15), Image.Resampling.NEAREST)) >= 128)[:, 8:23]
    np.testing.assert_array_equal(out, expected.astype(np.uint8))
    with pytest.raises(ValueError, match="masks must have exactly the size"):
        preprocess_mask(Image.fromarray(mask[:, :50]), geom)


def test_real_mask_loads_with_its_image():
    img_path = DATA / "mvtec_ad/transistor/test/bent_lead/000.png"
    _, geom = preprocess_with_geometry(Image.open(img_path), 240)
    mask = load_mask(DATA / "mvtec_ad/transistor/ground_truth/bent_lead/000_mask.png", geom)
    assert mask.shape == (240, 240) and 0 < mask.sum() < 240 * 240


def test_projection_inverts_crop_and_marks_cropped_border():
    geom = Geometry(orig_w=60, orig_h=30, resized_w=30, resized_h=15, origin_x=8, origin_y=0, size=15)
    cmap = np.tile(np.arange(15, dtype=np.float32), (15, 1))  # value = model-input column
    out, seen = project_to_original(cmap, geom)
    assert out.shape == (30, 60)
    # original column x -> resized (x + .5) / 2 - .5 -> input column minus 8; seen iff inside [-.5, 14.5]
    cols = (np.arange(60) + 0.5) / 2 - 0.5 - 8
    expected_seen = (cols >= -0.5) & (cols <= 14.5)
    np.testing.assert_array_equal(seen[0], expected_seen)
    np.testing.assert_allclose(out[0, expected_seen], np.clip(cols[expected_seen], 0, 14), atol=1e-6)
    assert np.isnan(out[0, ~expected_seen]).all()


def test_patch_grid_map_projects_to_original_size():
    _, geom = preprocess_with_geometry(Image.new("L", (300, 300)), 240)
    out, seen = project_to_original(np.full((15, 15), 0.25), geom)
    assert out.shape == (300, 300) and seen.all()
    np.testing.assert_allclose(out, 0.25, atol=1e-7)


@pytest.mark.parametrize(
    "content, match",
    [(b"", "empty"), (b"this is not an image", "not a recognised image"), (None, "no such image")],
)
def test_bad_files_raise_naming_the_file(tmp_path, content, match):
    path = tmp_path / "bad.png"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ImageDecodeError, match=match) as info:
        load_image(path)
    assert "bad.png" in str(info.value)


def test_truncated_png_raises_naming_the_file(tmp_path):
    path = tmp_path / "trunc.png"
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageDecodeError, match="trunc.png"):
        load_image(path)
