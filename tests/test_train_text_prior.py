"""The trainer's text prior: all categories in one compiled program, prompts cut after the end-of-text token."""

from __future__ import annotations

import jax
import numpy as np
import pytest

CATEGORIES = ("elpv", "pipe_fryum", "toothbrush")


@pytest.fixture(scope="module")
def backbone():
    from inctrl_jax.training.trainer import TINY_CONFIG, random_backbone_params

    return TINY_CONFIG, random_backbone_params(TINY_CONFIG, 3)


def test_cut_token_ids_keep_every_prompt_up_to_its_end_of_text_token(backbone):
    from inctrl_jax.clip.tokenizer import tokenize
    from inctrl_jax.model.prompts import prompt_ensembles
    from inctrl_jax.training.text_prior import ensemble_token_ids

    config, _ = backbone
    ids, rows = ensemble_token_ids(CATEGORIES, 77, config.text.eos_token_id)
    full = np.concatenate([tokenize(sum(prompt_ensembles(c), []), 77) for c in CATEGORIES])
    assert [r[0] for r in rows] == list(CATEGORIES) and ids.shape[0] == full.shape[0] == sum(
        r[1] + r[2] for r in rows
    )
    assert ids.shape[1] < 30, f"prompts cut to {ids.shape[1]} tokens; the reference ensembles need < 30"
    np.testing.assert_array_equal(ids, full[:, : ids.shape[1]])
    assert np.all(full[:, ids.shape[1] :] == 0), "a cut removed a real token"
    assert np.all((ids == config.text.eos_token_id).sum(axis=1) == 1), "every row keeps its end-of-text token"


def test_batched_cut_prototypes_match_the_full_length_detector_per_category(backbone):
    from inctrl_jax.model.checkpoint import InCTRLWeights
    from inctrl_jax.model.detector import Detector
    from inctrl_jax.training.text_prior import _encode_prompts, text_prototypes_for

    config, params = backbone
    with jax.default_matmul_precision("highest"):
        before = _encode_prompts._cache_size()
        ours = text_prototypes_for(CATEGORIES, config, params, chunk=64)
        compiled = _encode_prompts._cache_size() - before
        detector = Detector(InCTRLWeights(config, params, None, (7, 9, 11)))
        for category in CATEGORIES:
            full = detector.text_prototypes(category)  # 77 tokens, one category at a time
            assert ours[category].shape == full.shape == (2, config.vision.embed_dim)
            err = float(np.max(np.abs(ours[category] - full)))
            # Same function (causal tower, pooled at end-of-text); only reduction rounding differs
            # (measured 2.2e-8 on prototypes of magnitude ~0.13).
            assert err < 1e-6, (
                f"{category}: cut, batched prototypes differ from full-length by {err:.3g} >= 1e-6"
            )
    # 3 x 242 prompts in 12 chunks of one shape: at most one new program.
    assert compiled <= 1, f"{compiled} text-tower programs compiled for {len(CATEGORIES)} categories"
