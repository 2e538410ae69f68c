"""Few-shot reference sets, balanced training sampling and the grain pipelines."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from inctrl_jax.data.layouts import DataError, Sample, scan_mvtec
from inctrl_jax.data.pipeline import SampleSource, eval_batches, train_batches
from inctrl_jax.data.preprocess import CLIP_MEAN, CLIP_STD, load_image
from inctrl_jax.data.references import (
    ReferenceSet,
    load_prompt_file,
    references_from_folder,
    select_references,
)
from inctrl_jax.data.sampling import BalancedEpisodeSampler

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _samples(normals: dict[str, int], anomalies: dict[str, int]) -> list[Sample]:
    out = []
    for c, n in normals.items():
        out += [Sample(f"{c}/n{i}.png", 0, c, "good", None, "train") for i in range(n)]
    for c, n in anomalies.items():
        out += [Sample(f"{c}/a{i}.png", 1, c, "crack", None, "test") for i in range(n)]
    return out


# ---- reference sets ----------------------------------------------------------------------------


def test_seeded_references_are_distinct_training_normals_and_reproducible():
    ds = scan_mvtec(DATA / "mvtec_ad")
    train_good = {s.path for s in ds.select(split="train", label=0)}
    a = select_references(ds, "transistor", 4, seed=3)
    assert a.k == 4 and len(set(a.paths)) == 4 and set(a.paths) <= train_good
    assert a == select_references(ds, "transistor", 4, seed=3)
    assert a.paths != select_references(ds, "transistor", 4, seed=4).paths
    assert ReferenceSet.from_dict(a.to_dict()) == a
    assert a.to_dict()["paths"] == list(a.paths)
    assert select_references(ds, "transistor", 32, seed=0).k == 32
    with pytest.raises(DataError, match="K=33 references requested but only 32"):
        select_references(ds, "transistor", 33)
    with pytest.raises(DataError, match="'cable' has no normal images"):
        select_references(ds, "cable", 2)


def test_reference_folder_and_loading():
    refs = references_from_folder(DATA / "glass/glass/train/good", "glass", k=2)
    assert [Path(p).name for p in refs.paths] == ["000.png", "001.png"]
    pixels = refs.load(240)
    assert pixels.shape == (2, 240, 240, 3)
    np.testing.assert_array_equal(pixels[1], load_image(refs.paths[1]))


def test_official_prompt_file_loads_as_nhwc(tmp_path):
    a = torch.arange(3 * 4 * 4, dtype=torch.float32).reshape(3, 4, 4)
    torch.save([a, -a], tmp_path / "widget.pt")
    out = load_prompt_file(tmp_path / "widget.pt")
    assert out.shape == (2, 4, 4, 3) and out.dtype == np.float32
    assert out[0, 1, 2, 0] == a[0, 1, 2].item() and out[1, 3, 0, 2] == -a[2, 3, 0].item()
    torch.save({"x": a}, tmp_path / "bad.pt")
    with pytest.raises(DataError, match="bad.pt: expected a list of K preprocessed"):
        load_prompt_file(tmp_path / "bad.pt")


# ---- balanced sampling -------------------------------------------------------------------------


def test_batches_are_half_normal_then_half_anomalous_with_references_of_own_category():
    samples = _samples({"a": 5, "b": 4}, {"a": 3, "b": 2})
    sampler = BalancedEpisodeSampler(samples, k=3, batch_size=8, seed=0)
    for step in range(6):
        ep = sampler.episode(step)
        assert ep.query.shape == (8,) and ep.references.shape == (8, 3)
        assert [samples[q].label for q in ep.query] == [0] * 4 + [1] * 4
        np.testing.assert_array_equal(ep.label, [0] * 4 + [1] * 4)
        for j, q in enumerate(ep.query):
            row = ep.references[j]
            assert len(set(row.tolist())) == 3
            assert all(samples[r].label == 0 and samples[r].category == samples[q].category for r in row)


def test_query_streams_are_permutations_of_each_class():
    samples = _samples({"a": 6}, {"a": 4})
    sampler = BalancedEpisodeSampler(samples, k=2, batch_size=4, seed=1)
    normal = np.concatenate([sampler.episode(t).query[:2] for t in range(3)])  # 6 draws = one permutation
    anomalous = np.concatenate([sampler.episode(t).query[2:] for t in range(2)])  # 4 draws = one permutation
    assert sorted(normal.tolist()) == list(range(6))
    assert sorted(anomalous.tolist()) == list(range(6, 10))


def test_query_may_be_its_own_reference_unless_excluded():
    samples = _samples({"a": 3}, {"a": 1})
    with_self = BalancedEpisodeSampler(samples, k=3, batch_size=2, seed=0)
    assert with_self.episode(0).query[0] in with_self.episode(0).references[0]  # k = all normals
    with pytest.raises(DataError, match="K=3 distinct references other than itself"):
        BalancedEpisodeSampler(samples, k=3, batch_size=2, exclude_query=True)
    excl = BalancedEpisodeSampler(samples, k=2, batch_size=2, seed=0, exclude_query=True)
    for t in range(10):
        ep = excl.episode(t)
        assert ep.query[0] not in ep.references[0]


def test_sampler_state_resumes_exactly_and_seed_determines_everything():
    samples = _samples({"a": 7, "b": 5}, {"a": 3, "b": 4})
    s1 = BalancedEpisodeSampler(samples, k=2, batch_size=4, seed=5)
    first = [next(s1) for _ in range(3)]
    state = s1.get_state()
    rest = [next(s1) for _ in range(4)]
    s2 = BalancedEpisodeSampler(samples, k=2, batch_size=4, seed=5)
    s2.set_state(state)
    for a, b in zip(rest, [next(s2) for _ in range(4)], strict=True):
        np.testing.assert_array_equal(a.query, b.query)
        np.testing.assert_array_equal(a.references, b.references)
    assert state == {"step": 3, "seed": 5}
    other = BalancedEpisodeSampler(samples, k=2, batch_size=4, seed=6)
    assert any((first[i].query != other.episode(i).query).any() for i in range(3))
    with pytest.raises(ValueError, match="seed 5"):
        other.set_state(state)


def test_sampler_fails_fast_on_impossible_requests():
    with pytest.raises(DataError, match="'b' has no normal images"):
        BalancedEpisodeSampler(_samples({"a": 4}, {"a": 1, "b": 1}), k=2, batch_size=2)
    with pytest.raises(DataError, match="'a' has 2 normal images but each query needs K=3"):
        BalancedEpisodeSampler(_samples({"a": 2}, {"a": 1}), k=3, batch_size=2)
    with pytest.raises(DataError, match="no anomalous images"):
        BalancedEpisodeSampler(_samples({"a": 2}, {}), k=1, batch_size=2)
    with pytest.raises(ValueError, match="must be even"):
        BalancedEpisodeSampler(_samples({"a": 2}, {"a": 1}), k=1, batch_size=3)


# ---- pipelines ---------------------------------------------------------------------------------


def test_eval_batches_have_fixed_shape_padding_mask_and_order():
    ds = scan_mvtec(DATA / "glass")
    samples = ds.select(split="test", label=0)[:7] + ds.select(split="test", label=1)[:2]
    batches = list(eval_batches(samples, 4, 32, with_masks=True, num_threads=2))
    assert len(batches) == 3
    for b in batches:
        assert b["image"].shape == (4, 32, 32, 3) and b["mask"].shape == (4, 32, 32)
    index = np.concatenate([b["index"] for b in batches])
    np.testing.assert_array_equal(index, list(range(9)) + [-1] * 3)
    np.testing.assert_array_equal(np.concatenate([b["valid"] for b in batches]), [True] * 9 + [False] * 3)
    np.testing.assert_array_equal(batches[0]["image"][2], load_image(samples[2].path, 32))
    labels = np.concatenate([b["label"] for b in batches])[:9]
    np.testing.assert_array_equal(labels, [s.label for s in samples])
    masks = np.concatenate([b["mask"] for b in batches])
    assert masks[7].sum() > 0 and masks[:5].sum() == 0


def test_headct_mixed_modes_decode_to_rgb():
    ds = scan_mvtec(DATA / "headct")
    modes = {}
    for s in ds:
        with Image.open(s.path) as im:
            modes.setdefault(im.mode, s)
    assert {"RGB", "RGBA"} <= set(modes)
    source = SampleSource(list(modes.values()), 64)
    for i in range(len(source)):
        rec = source[i]
        u8 = np.rint((rec["image"] * CLIP_STD + CLIP_MEAN) * 255)
        assert rec["valid"] and rec["image"].shape == (64, 64, 3)
        assert u8.min() >= 0 and u8.max() <= 255


def test_bad_image_skipped_in_pipeline_keeps_the_rest(tmp_path):
    good = DATA / "elpv/elpv/test/good/cell0062.png"
    bad = tmp_path / "broken.png"
    bad.write_bytes(good.read_bytes()[:200])
    samples = [
        Sample(str(good), 0, "elpv", "good", None, "test"),
        Sample(str(bad), 1, "elpv", "x", None, "test"),
    ]
    with pytest.raises(Exception, match="broken.png"):
        list(eval_batches(samples, 2, 16))
    source = SampleSource(samples, 16, on_error="skip")
    with pytest.warns(UserWarning, match="broken.png"):
        (batch,) = list(eval_batches(source, 2))
    np.testing.assert_array_equal(batch["valid"], [True, False])
    assert [f.path for f in source.failures] == [str(bad)]


def test_train_batches_decode_episodes_and_resume_from_grain_state():
    ds = scan_mvtec(DATA / "elpv")
    sampler = BalancedEpisodeSampler(ds, k=2, batch_size=4, seed=10, num_steps=4)
    it = train_batches(sampler, 16)
    b0 = next(it)
    assert b0["query"].shape == (4, 16, 16, 3) and b0["references"].shape == (4, 2, 16, 16, 3)
    np.testing.assert_array_equal(b0["label"], [0, 0, 1, 1])
    np.testing.assert_array_equal(
        b0["references"][3, 1], load_image(ds.samples[b0["reference_index"][3, 1]].path, 16)
    )
    state = it.get_state()
    b1 = next(it)
    resumed = train_batches(sampler, 16)
    resumed.set_state(state)
    b1_again = next(resumed)
    assert int(b1_again["step"]) == 1
    np.testing.assert_array_equal(b1["query"], b1_again["query"])
    np.testing.assert_array_equal(b1["reference_index"], sampler.episode(1).references)
