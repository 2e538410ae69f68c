"""Streaming scoring keeps memory flat; checkpoints without a config are loud about their assumption."""

from __future__ import annotations

import dataclasses
import weakref

import jax
import numpy as np
import pytest
from PIL import Image

from inctrl_jax.clip.model import CLIPConfig, TextConfig, VisionConfig, init_params
from inctrl_jax.model.checkpoint import (
    CheckpointMismatchError,
    InCTRLWeights,
    from_official_state_dict,
    to_official_state_dict,
)
from inctrl_jax.model.detector import Detector
from inctrl_jax.model.heads import init_heads
from inctrl_jax.model.reference import ReferenceSet

jax.config.update("jax_default_matmul_precision", "highest")

# 32 px, patch 8 -> a 4 x 4 grid; three tapped blocks; tiny text tower.
CFG = CLIPConfig(
    VisionConfig(
        image_size=32, patch_size=8, width=32, layers=3, heads=2, mlp_dim=64, embed_dim=16, act="gelu"
    ),
    TextConfig(width=16, layers=1, heads=2, mlp_dim=32, embed_dim=16, act="gelu"),
)
TAPS = (1, 2, 3)
BATCH = 4
N_QUERIES = 22  # 5 full batches + a padded batch of 2


def _random_tree(shapes, rng: np.random.Generator):
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    leaves = []
    for path, leaf in flat:
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        if "scale" in str(path[-1]) or "var" in str(path[-1]):
            leaves.append(1.0 + 0.1 * np.abs(noise))
        else:
            fan_in = leaf.shape[0] if len(leaf.shape) >= 2 else 16
            leaves.append((noise / np.sqrt(fan_in)).astype(np.float32))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _weights(config: CLIPConfig = CFG, seed: int = 0) -> InCTRLWeights:
    rng = np.random.default_rng(seed)
    clip = _random_tree(jax.eval_shape(lambda: init_params(config)), rng)
    v = config.vision
    heads = _random_tree(jax.eval_shape(lambda: init_heads(v.embed_dim, v.num_patches)), rng)
    return InCTRLWeights(config, clip, heads, TAPS)


@pytest.fixture(scope="module")
def detector() -> Detector:
    return Detector(_weights(), batch_size=BATCH)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((N_QUERIES, 32, 32, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def refs(detector) -> ReferenceSet:
    """Random unit-norm reference tokens and prototypes: no text encoding needed for these tests."""
    rng = np.random.default_rng(1)
    v = CFG.vision
    tokens = rng.standard_normal((len(TAPS), 2 * v.num_patches, v.width)).astype(np.float32)
    protos = rng.standard_normal((2, v.embed_dim)).astype(np.float32)
    return ReferenceSet(
        category="screw",
        patch_tokens=tokens / np.linalg.norm(tokens, axis=-1, keepdims=True),
        class_embeds=rng.standard_normal((2, v.embed_dim)).astype(np.float32),
        text_prototypes=protos / np.linalg.norm(protos, axis=-1, keepdims=True),
        reference_files=["random[0]", "random[1]"],
        backbone=detector.backbone_id,
        tap_layers=TAPS,
        num_patches=v.num_patches,
    )


@pytest.fixture(scope="module")
def batch_scores(detector, images, refs) -> np.ndarray:
    """Non-streaming values: the whole preprocessed array through predict()."""
    return detector.predict(images, refs).score


def test_a_generator_is_consumed_at_most_one_batch_ahead_of_the_results(detector, images, refs):
    pulled = 0

    def queries():
        nonlocal pulled
        for im in images:
            pulled += 1
            yield im

    n = 0
    for i, _ in enumerate(detector.iter_scores(queries(), refs)):
        current_batch_end = (i // BATCH + 1) * BATCH
        assert pulled <= current_batch_end, f"{pulled} inputs read while yielding result {i} (batch {BATCH})"
        n += 1
    assert n == N_QUERIES


def test_at_most_one_batch_of_preprocessed_images_is_held(detector, images, refs, tmp_path, monkeypatch):
    """Spy on every preprocessed image and every batch buffer; count those still alive (weak refs)
    whenever a new image is decoded. Earlier batches must be gone: held <= batch size."""
    files = []
    for i in range(N_QUERIES):
        files.append(tmp_path / f"{i:03d}.png")
        Image.fromarray((np.random.default_rng(i).random((40, 36, 3)) * 255).astype(np.uint8)).save(files[-1])

    item_refs: list[weakref.ref] = []
    batch_refs: list[weakref.ref] = []
    held: list[int] = []
    load_item, score_batch = detector._load_item, detector._score_batch

    def spy_load(i, item, *args):
        live_items = sum(r() is not None for r in item_refs)
        live_batches = sum(r() is not None for r in batch_refs)
        held.append(live_items + BATCH * live_batches + (i % BATCH))  # + rows already in the buffer
        out = load_item(i, item, *args)
        item_refs.append(weakref.ref(out[0]))
        return out

    def spy_score(pixels, n, device_refs):
        batch_refs.append(weakref.ref(pixels))
        return score_batch(pixels, n, device_refs)

    monkeypatch.setattr(detector, "_load_item", spy_load)
    monkeypatch.setattr(detector, "_score_batch", spy_score)
    results = [r.score for r in detector.iter_scores(iter(files), refs, return_maps=False)]

    assert len(results) == len(held) == N_QUERIES
    assert max(held) <= BATCH, f"up to {max(held)} preprocessed images held at once; batch size is {BATCH}"


def test_streamed_scores_equal_the_whole_array_scores(detector, images, refs, batch_scores):
    streamed = np.array([r.score for r in detector.iter_scores((im for im in images), refs)])
    listed = np.array([r.score for r in detector.score(list(images), refs)])
    # Same fixed batches through the same compiled function: bitwise equal (tolerance 0).
    np.testing.assert_array_equal(streamed, batch_scores)
    np.testing.assert_array_equal(listed, batch_scores)


def test_padding_keeps_one_compiled_shape(images, refs):
    det = Detector(_weights(), batch_size=BATCH)
    refs = dataclasses.replace(refs, backbone=det.backbone_id)
    for n in (N_QUERIES, 1, 3, BATCH):
        det.score(images[:n], refs, return_maps=False)
    assert det._score._cache_size() == 1, "scoring recompiled for a different number of images"


def test_decode_threads_and_return_maps_change_nothing_but_the_maps(images, refs, tmp_path):
    det1 = Detector(_weights(), batch_size=BATCH)
    det3 = Detector(_weights(), batch_size=BATCH, decode_threads=3)
    refs = dataclasses.replace(refs, backbone=det1.backbone_id)
    for i in range(7):
        Image.fromarray((np.random.default_rng(i).random((40, 52, 3)) * 255).astype(np.uint8)).save(
            tmp_path / f"{i:03d}.png"
        )
    with_maps = det1.score(tmp_path, refs)
    threaded = det3.score(tmp_path, refs, return_maps=False)
    assert (
        [r.source for r in threaded]
        == [r.source for r in with_maps]
        == sorted(str(p) for p in tmp_path.glob("*.png"))
    )
    np.testing.assert_array_equal([r.score for r in threaded], [r.score for r in with_maps])
    assert all(r.anomaly_map is None and r.residual_map.shape == (4, 4) for r in threaded)
    assert all(r.anomaly_map is not None and r.anomaly_map.shape == (40, 52) for r in with_maps)


def test_bad_image_mid_stream_names_the_input(detector, images, refs):
    bad = images[:9].copy()
    bad[6, 0, 0, 0] = np.inf
    stream = detector.iter_scores(list(bad), refs)
    first = [next(stream) for _ in range(BATCH)]  # the first batch is scored before the bad one is read
    assert len(first) == BATCH
    with pytest.raises(ValueError, match=r"NaN or Inf pixels in array\[6\]"):
        list(stream)
    with pytest.raises(ValueError, match="no query images given"):
        detector.score([], refs)


def test_checkpoint_without_config_refuses_widths_off_the_head_width_assumption():
    sd = to_official_state_dict(_weights())  # widths 32 and 16: not multiples of 64
    with pytest.raises(CheckpointMismatchError, match=r"head width 64.*vision width 32.*config="):
        from_official_state_dict(sd, source="tiny.pyth")


def test_checkpoint_without_config_warns_about_the_head_width_assumption():
    cfg = CLIPConfig(
        VisionConfig(image_size=16, patch_size=8, width=128, layers=1, heads=2, mlp_dim=32, embed_dim=8),
        TextConfig(width=64, layers=1, heads=1, mlp_dim=32, embed_dim=8),
    )
    sd = to_official_state_dict(_weights(cfg))
    with pytest.warns(UserWarning, match=r"head width 64 is assumed \(vision: 128 wide -> 2 heads.*config="):
        loaded = from_official_state_dict(sd, source="other.pyth")
    assert (loaded.config.vision.heads, loaded.config.text.heads) == (2, 1)
