"""Per-step batches: gathered on the device and on the read-ahead host thread, both equal to a plain gather."""

from __future__ import annotations

import jax
import numpy as np
import pytest

L, P, D, E = 3, 4, 8, 6


@pytest.fixture(scope="module")
def parts():
    from inctrl_jax.data import BalancedEpisodeSampler
    from inctrl_jax.data.layouts import Sample
    from inctrl_jax.training.feature_cache import FeatureCache
    from inctrl_jax.training.step import make_mesh

    samples = [
        Sample(f"{cat}/{i}.png", int(i >= 5), cat, "good" if i < 5 else "crack", None, "train")
        for cat in ("bottle", "cable")
        for i in range(8)
    ]
    rng = np.random.default_rng(0)
    cache = FeatureCache(
        rng.standard_normal((len(samples), L, P, D)).astype(np.float16),
        rng.standard_normal((len(samples), E)).astype(np.float32),
    )
    protos = {c: rng.standard_normal((2, E)).astype(np.float32) for c in ("bottle", "cable")}
    sampler = BalancedEpisodeSampler(samples, 3, 4, seed=7, num_steps=6)
    return cache, protos, sampler, make_mesh(1)


def _plain_gather(cache, protos, episode) -> dict[str, np.ndarray]:
    """The batch written out index by index: reference k of query j fills patches k*P..(k+1)*P-1."""
    b, k = episode.references.shape
    refs = np.zeros((b, L, k * P, D), np.float32)
    for j in range(b):
        for r in range(k):
            for layer in range(L):
                refs[j, layer, r * P : (r + 1) * P] = cache.patch_tokens[episode.references[j, r], layer]
    return {
        "query_tokens": np.stack([cache.patch_tokens[q] for q in episode.query]).astype(np.float32),
        "query_embeds": np.stack([cache.class_embeds[q] for q in episode.query]),
        "reference_tokens": refs,
        "reference_embeds": np.stack([[cache.class_embeds[i] for i in row] for row in episode.references]),
        "text_prototypes": np.stack([protos[c] for c in episode.category]),
        "labels": np.asarray(episode.label),
    }


@pytest.mark.parametrize("placement", ["device", "host"])
def test_batches_equal_a_plain_gather_and_resume_mid_stream(parts, placement):
    from inctrl_jax.training.feed import BatchFeed

    cache, protos, sampler, mesh = parts
    feed = BatchFeed(cache, protos, sampler, mesh, "float32", placement)
    state = sampler.get_state()
    stream = list(feed.iterate(0, 6))
    assert [s for s, _ in stream] == list(range(6))
    assert sampler.get_state() == state, "reading ahead moved the sampler's checkpointed state"
    for step, batch in stream:
        expected = _plain_gather(cache, protos, sampler.episode(step))
        assert batch.keys() == expected.keys()
        for key, value in expected.items():
            got = np.asarray(batch[key])
            assert got.dtype == value.dtype and got.shape == value.shape, (key, got.dtype, got.shape)
            assert np.array_equal(got, value), (
                f"{placement}: {key} of step {step} differs from a plain gather"
            )
    resumed = list(feed.iterate(3, 6))  # a restart at step 3 sees the same batches
    for (step, batch), (ref_step, ref_batch) in zip(resumed, stream[3:], strict=True):
        assert step == ref_step
        assert all(np.array_equal(np.asarray(batch[k]), np.asarray(ref_batch[k])) for k in batch)


def test_auto_placement_gathers_on_the_host_on_cpu_and_refuses_unknown_names(parts):
    from inctrl_jax.training.feed import choose_placement

    mesh = parts[3]
    assert jax.devices()[0].platform == "cpu"
    assert choose_placement("auto", 150 * 2**20, mesh) == "host"  # aligned host batches are not copied
    assert choose_placement("device", 1, mesh) == "device"
    with pytest.raises(ValueError, match="config.cache.placement='gpu'"):
        choose_placement("gpu", 1, mesh)
