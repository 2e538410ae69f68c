"""Properties of the InCTRL model API on a tiny random backbone (fast)."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from inctrl_jax.clip.model import CLIPConfig, TextConfig, VisionConfig, init_params
from inctrl_jax.model.checkpoint import (
    CheckpointMismatchError,
    InCTRLWeights,
    from_official_state_dict,
    load_model,
    to_official_state_dict,
)
from inctrl_jax.model.detector import Detector
from inctrl_jax.model.heads import init_heads
from inctrl_jax.model.reference import ReferenceSet, ReferenceSetError
from inctrl_jax.model.scoring import patch_residuals

jax.config.update("jax_default_matmul_precision", "highest")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
GOLDEN = SHARED / "golden" / "inctrl_tiny"
# 32 px, patch 8 -> a 4 x 4 grid of 16 patches; three tapped blocks.
CFG = CLIPConfig(
    VisionConfig(
        image_size=32, patch_size=8, width=32, layers=3, heads=2, mlp_dim=64, embed_dim=16, act="gelu"
    ),
    TextConfig(width=16, layers=1, heads=2, mlp_dim=32, embed_dim=16, act="gelu"),
)
TAPS = (1, 2, 3)
BATCH_TOL = 1e-5


def _random_tree(shapes, rng: np.random.Generator):
    """Random values for a tree of shapes (fast: no XLA compile of an init function)."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    leaves = []
    for path, leaf in flat:
        name = str(path[-1])
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        if "scale" in name or "var" in name:
            leaves.append(1.0 + 0.1 * np.abs(noise))
        else:
            fan_in = leaf.shape[0] if len(leaf.shape) >= 2 else 16
            leaves.append((noise / np.sqrt(fan_in)).astype(np.float32))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _weights(heads: bool = True, seed: int = 0) -> InCTRLWeights:
    rng = np.random.default_rng(seed)
    clip = _random_tree(jax.eval_shape(lambda: init_params(CFG)), rng)
    head_vars = _random_tree(jax.eval_shape(lambda: init_heads(16, 16)), rng) if heads else None
    return InCTRLWeights(CFG, clip, head_vars, TAPS)


@pytest.fixture(scope="module")
def weights() -> InCTRLWeights:
    return _weights()


@pytest.fixture(scope="module")
def detector(weights) -> Detector:
    return Detector(weights, batch_size=4)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((32, 32, 32, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def refs(detector, images) -> ReferenceSet:
    return detector.build_reference_set(images[:3], "metal_nut")


def _scores(results) -> np.ndarray:
    return np.array([r.score for r in results])


def test_scores_do_not_depend_on_batch_size(weights, detector, images, refs):
    big = Detector(weights, batch_size=32).predict(images, refs)
    single = Detector(weights, batch_size=1).predict(images, refs)
    padded = detector.predict(images[:30], refs)  # batch 4: the last batch of 2 is padded
    for other, n in ((single, 32), (padded, 30)):
        for field in ("score", "s_p", "s_i", "s_a", "h"):
            diff = np.abs(getattr(big, field)[:n] - getattr(other, field)).max()
            assert diff <= BATCH_TOL, f"{field} differs by {diff:.2e} > {BATCH_TOL} between batch sizes"
        assert np.abs(big.residual_map[:n] - other.residual_map).max() <= BATCH_TOL


@pytest.mark.parametrize("chunk", [1, 7, 64, 2048])
def test_chunked_residuals_equal_unchunked(chunk):
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((3, 16, 8)), jnp.float32)
    r = jnp.asarray(rng.standard_normal((3, 50, 8)), jnp.float32)
    full = patch_residuals(q, r, chunk=None)
    chunked = patch_residuals(q, r, chunk=chunk)
    assert np.abs(np.asarray(full) - np.asarray(chunked)).max() <= 1e-6
    # Definition check with an independent float64 computation.
    qn = np.asarray(q, np.float64) / np.linalg.norm(np.asarray(q, np.float64), axis=-1, keepdims=True)
    rn = np.asarray(r, np.float64) / np.linalg.norm(np.asarray(r, np.float64), axis=-1, keepdims=True)
    expected = (0.5 * (1 - np.einsum("lpd,lnd->lpn", qn, rn))).min(-1)
    assert np.abs(np.asarray(chunked) - expected).max() <= 1e-6


def test_scores_do_not_depend_on_reference_order(detector, images):
    a = detector.build_reference_set(images[:4], "screw")
    b = detector.build_reference_set(images[[2, 0, 3, 1]], "screw")
    out_a, out_b = detector.predict(images[8:16], a), detector.predict(images[8:16], b)
    assert np.abs(out_a.score - out_b.score).max() <= 1e-6
    assert np.abs(out_a.residual_map - out_b.residual_map).max() <= 1e-6


def test_reference_set_save_load_round_trip(detector, images, refs, tmp_path):
    refs.save(tmp_path / "refs")
    loaded = ReferenceSet.load(tmp_path / "refs")
    assert loaded.category == "metal_nut" and loaded.k == 3 and loaded.backbone == refs.backbone
    assert loaded.reference_files == refs.reference_files
    np.testing.assert_array_equal(loaded.patch_tokens, refs.patch_tokens)
    np.testing.assert_array_equal(loaded.class_embeds, refs.class_embeds)
    np.testing.assert_array_equal(loaded.text_prototypes, refs.text_prototypes)
    np.testing.assert_array_equal(
        detector.predict(images[5:9], loaded).score, detector.predict(images[5:9], refs).score
    )


def test_detector_save_load_round_trip(detector, images, refs, tmp_path):
    detector.save(tmp_path / "model")
    again = Detector.from_checkpoint(tmp_path / "model", batch_size=4)
    assert again.weights.tap_layers == TAPS
    np.testing.assert_array_equal(
        again.predict(images[5:9], refs).score, detector.predict(images[5:9], refs).score
    )


def test_official_state_dict_round_trip(weights):
    sd = to_official_state_dict(weights)
    # CLIP (vision 4 + 12 per block + 4 ... ) is checked by the strict converter; heads have 44 keys.
    assert sum(k.startswith(("adapter.", "diff_head")) for k in sd) == 44
    back = from_official_state_dict(sd, config=CFG, tap_layers=TAPS)
    same = jax.tree.map(
        lambda x, y: bool(np.array_equal(np.asarray(x), np.asarray(y))),
        (weights.clip_params, weights.head_variables),
        (back.clip_params, back.head_variables),
    )
    assert all(jax.tree.leaves(same))
    assert len(back.ignored_keys) == 10 and all(".bn1." in k for k in back.ignored_keys)


def test_golden_official_checkpoint_round_trips_key_for_key():
    from safetensors.numpy import load_file

    sd = load_file(str(GOLDEN / "weights.safetensors"))
    assert len(sd) == 225
    tiny = CLIPConfig(
        VisionConfig(240, 16, 64, 12, 4, 256, 640, "gelu"), TextConfig(49408, 77, 32, 2, 2, 128, 640, "gelu")
    )
    back = to_official_state_dict(from_official_state_dict(sd, config=tiny))
    assert set(back) == set(sd)
    for k, v in sd.items():
        if ".bn1." not in k and not k.endswith("num_batches_tracked"):
            np.testing.assert_array_equal(back[k], v, err_msg=k)


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda sd: sd.pop("diff_head.projection2.bias"), "diff_head.projection2.bias"),
        (
            lambda sd: sd.__setitem__("diff_head.extra.weight", np.zeros(3, np.float32)),
            "diff_head.extra.weight",
        ),
        (
            lambda sd: sd.__setitem__("adapter.fc.0.weight", np.zeros((5, 16), np.float32)),
            "adapter.fc.0.weight",
        ),
        (lambda sd: sd.pop("visual.ln_post.weight"), "visual.ln_post.weight"),
    ],
)
def test_checkpoint_loading_is_strict(weights, edit, needle):
    sd = to_official_state_dict(weights)
    edit(sd)
    with pytest.raises(ValueError, match=needle.replace(".", r"\.")):
        from_official_state_dict(sd, config=CFG, source="ckpt.pyth")


def test_checkpoint_without_heads_is_refused(weights):
    sd = {
        k: v
        for k, v in to_official_state_dict(weights).items()
        if not k.startswith(("adapter.", "diff_head"))
    }
    with pytest.raises(CheckpointMismatchError, match="no InCTRL head keys"):
        from_official_state_dict(sd, config=CFG)


def test_damaged_saved_model_is_refused(detector, tmp_path):
    detector.save(tmp_path / "m")
    cfg = (tmp_path / "m" / "config.json").read_text().replace('"width": 32', '"width": 48', 1)
    (tmp_path / "m" / "config.json").write_text(cfg)
    with pytest.raises(CheckpointMismatchError, match="does not match"):
        load_model(tmp_path / "m")


def test_head_parameter_count_matches_the_paper_backbone():
    variables = jax.eval_shape(lambda: init_heads(640, 225))
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))
    # Reference doc section 3: adapter 204,800 + diff_head 38,083 + diff_head_ref 92,033, minus the
    # unused bn1 affine parameters (2 * 225 + 2 * 640) that have no counterpart here.
    assert n == 204_800 + 38_083 + 92_033 - 2 * 225 - 2 * 640


def test_zero_shot_scores_with_the_text_prior_alone(detector, images):
    zs = detector.zero_shot_reference_set("metal_nut")
    assert zs.zero_shot and zs.k == 0
    results = detector.score(images[:3], zs)
    assert all(r.zero_shot and r.mode == "zero_shot" for r in results)
    assert all(r.score == r.s_a and np.isnan(r.s_p) and np.isnan(r.s_i) for r in results)
    full = detector.predict(images[:3], detector.build_reference_set(images[3:5], "metal_nut"))
    np.testing.assert_allclose([r.s_a for r in results], full.s_a, atol=1e-6)


def test_without_heads_the_score_is_training_free(weights, images, refs):
    det = Detector(InCTRLWeights(CFG, weights.clip_params, None, TAPS), batch_size=4)
    results = det.score(images[:4], refs)
    assert {r.mode for r in results} == {"training_free"}
    for r in results:
        assert abs(r.score - 0.5 * (r.s_p + r.s_a)) <= 1e-6 and np.isnan(r.s_i)
        assert abs(r.s_p - r.residual_map.max()) <= 1e-7


def test_bad_inputs_raise_clear_errors(detector, images, refs):
    with pytest.raises(ValueError, match=r"expected a preprocessed \[32, 32, 3\]"):
        detector.build_reference_set([np.zeros((48, 48, 3), np.float32)], "screw")
    with pytest.raises(ReferenceSetError, match="k=5 reference images requested"):
        detector.build_reference_set(images[:2], "screw", k=5)
    with pytest.raises(ReferenceSetError, match="empty reference set"):
        detector.build_reference_set([], "screw")
    bad = images[:2].copy()
    bad[1, 3, 3, 0] = np.nan
    with pytest.raises(ValueError, match=r"NaN or Inf pixels in array\[1\]"):
        detector.score(bad, refs)
    other = Detector(_weights(seed=3), batch_size=2, backbone_id="other-backbone")
    with pytest.raises(ReferenceSetError, match="does not fit this detector"):
        other.predict(images[:2], refs)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        detector.score(["/nonexistent/x.png"], refs)


def test_image_files_and_folders_are_preprocessed_like_the_reference(detector, refs, tmp_path):
    from inctrl_jax.data.preprocess import load_image

    rng = np.random.default_rng(2)
    folder = tmp_path / "good"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 52, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    files = sorted(folder.glob("*.png"))
    from_folder = detector.score(folder, refs)
    from_arrays = detector.predict(np.stack([load_image(f, 32) for f in files]), refs)
    np.testing.assert_array_equal(_scores(from_folder), from_arrays.score)
    assert [r.source for r in from_folder] == [str(f) for f in files]
    assert from_folder[0].anomaly_map.shape == (40, 52)  # original file size (H, W)
    ref_from_folder = detector.build_reference_set(folder, "screw")
    assert ref_from_folder.reference_files == [str(f) for f in files]


def test_official_prompt_file_gives_the_same_reference_set(detector, images, tmp_path):
    import torch

    path = tmp_path / "screw.pt"
    torch.save([torch.from_numpy(im.transpose(2, 0, 1).copy()) for im in images[:2]], path)
    from_file = detector.reference_set_from_prompt_file(path, "screw")
    direct = detector.build_reference_set(images[:2], "screw")
    np.testing.assert_array_equal(from_file.patch_tokens, direct.patch_tokens)
    np.testing.assert_array_equal(from_file.class_embeds, direct.class_embeds)
