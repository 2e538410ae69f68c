"""InCTRL model parity with the official PyTorch code (golden tiny fixtures), through the public API."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from inctrl_jax.clip.model import CLIPConfig, TextConfig, VisionConfig
from inctrl_jax.clip.tokenizer import tokenize
from inctrl_jax.model.checkpoint import load_official_checkpoint
from inctrl_jax.model.detector import Detector
from inctrl_jax.model.heads import InCTRLHeads
from inctrl_jax.model.prompts import prompt_ensembles
from inctrl_jax.model.scoring import legacy_scramble, score_queries

jax.config.update("jax_default_matmul_precision", "highest")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
GOLDEN = SHARED / "golden" / "inctrl_tiny"
TINY = CLIPConfig(
    VisionConfig(240, 16, 64, 12, 4, 256, 640, "gelu"), TextConfig(49408, 77, 32, 2, 2, 128, 640, "gelu")
)
ATOL = 1e-5
INFER_FILES = ("infer_transistor_k2", "infer_transistor_k4", "infer_elpv_k2")
# ScoreOutputs field -> golden key
FIELDS = {
    "layer_residuals": "layer_maps",
    "residual_map": "M",
    "s_p": "s_p",
    "psi_query": "psi_query",
    "image_residual": "r",
    "s_i": "s_i",
    "s_a": "s_a",
    "residual_map_plus": "M_plus",
    "h": "h",
    "score": "score",
}


def _maxdiff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.fixture(scope="module")
def detector() -> Detector:
    return Detector.from_checkpoint(GOLDEN / "weights.safetensors", config=TINY, batch_size=4)


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return np.load(GOLDEN / "images.npz")["pixels"].transpose(0, 2, 3, 1)


@pytest.mark.parametrize("name", INFER_FILES)
def test_every_intermediate_matches_official_code(detector, pixels, name):
    gold = np.load(GOLDEN / f"{name}.npz")
    refs = detector.build_reference_set(pixels[gold["prompt_image_idx"]], str(gold["category"]))
    assert refs.k == int(gold["K"])
    assert _maxdiff(refs.text_prototypes, gold["text_proto"]) <= ATOL, "text prototypes"
    out = detector.predict(pixels[gold["query_image_idx"]], refs)
    for field, key in FIELDS.items():
        diff = _maxdiff(getattr(out, field), gold[key])
        assert diff <= ATOL, f"{name}: {field} differs from official {key} by {diff:.2e} > {ATOL}"


def test_prompt_sentences_and_tokens_match_official_order():
    for category in ("transistor", "elpv"):
        text = np.load(GOLDEN / f"text_{category}.npz")
        normal, abnormal = prompt_ensembles(category)
        assert len(normal) == int(text["n_normal"]) == 154 and len(abnormal) == int(text["n_abnormal"]) == 88
        assert normal + abnormal == [str(s) for s in text["sentences"]]
        np.testing.assert_array_equal(tokenize(normal + abnormal), text["token_ids"])


def test_text_prototypes_from_stored_token_ids_match(detector):
    text = np.load(GOLDEN / "text_elpv.npz")
    gold = np.load(GOLDEN / "infer_elpv_k2.npz")
    protos = detector.text_prototypes("elpv", token_ids=text["token_ids"])
    assert _maxdiff(protos, gold["text_proto"]) <= ATOL


def test_score_results_carry_the_same_numbers_as_predict(detector, pixels):
    gold = np.load(GOLDEN / "infer_transistor_k2.npz")
    refs = detector.build_reference_set(pixels[gold["prompt_image_idx"]], "transistor")
    results = detector.score(pixels[gold["query_image_idx"]], refs)
    assert [r.mode for r in results] == ["inctrl"] * len(results)
    scores = np.array([r.score for r in results])
    assert _maxdiff(scores, gold["score"]) <= ATOL
    m = np.stack([r.residual_map for r in results]).reshape(len(results), -1)
    assert _maxdiff(m, gold["M"]) <= ATOL
    assert results[0].anomaly_map.shape == (240, 240)


def test_legacy_batch_scramble_reproduces_official_batch_of_three(detector, pixels):
    gold = np.load(GOLDEN / "batch_legacy_transistor_b3_k2.npz")
    k = int(gold["K"])
    q_emb, q_tok = detector.encode_images(pixels[gold["query_image_idx"]])
    r_emb, r_tok = detector.encode_images(pixels[gold["prompt_image_idx"]])
    n_layers, p, d = r_tok.shape[1:]
    shared_tokens = r_tok.transpose(1, 0, 2, 3).reshape(n_layers, k * p, d)
    protos = detector.text_prototypes("transistor")
    heads = detector.weights.head_variables

    legacy = score_queries(heads, q_tok, q_emb, shared_tokens, r_emb, protos, legacy_batch_scramble=True)
    assert _maxdiff(legacy.layer_residuals, gold["legacy_layer_maps"]) <= ATOL
    assert _maxdiff(legacy.residual_map, gold["legacy_M"]) <= ATOL
    assert _maxdiff(legacy.image_residual, gold["legacy_r"]) <= ATOL
    assert _maxdiff(legacy.s_i, gold["legacy_s_i"]) <= ATOL
    assert _maxdiff(legacy.h, gold["legacy_h"]) <= ATOL
    assert _maxdiff(legacy.score, gold["legacy_score"]) <= ATOL
    correct = score_queries(heads, q_tok, q_emb, shared_tokens, r_emb, protos)
    assert _maxdiff(correct.score, gold["correct_score"]) <= ATOL
    assert _maxdiff(legacy.score, correct.score) > 1e-3, "the scramble must change the scores for B = 3"


def test_legacy_scramble_follows_the_stored_index_maps():
    gold = np.load(GOLDEN / "batch_legacy_transistor_b3_k2.npz")
    b, k, n_layers, p = int(gold["B"]), int(gold["K"]), 3, 5
    # Tokens that encode their own origin: value = 1000*item + 100*layer + 10*shot (refs) + patch.
    q = np.array(
        [[[[1000 * i + 100 * ly + j] for j in range(p)] for ly in range(n_layers)] for i in range(b)], float
    )
    refs = np.array(
        [
            [
                [[1000 * i + 100 * ly + 10 * s + j] for s in range(k) for j in range(p)]
                for ly in range(n_layers)
            ]
            for i in range(b)
        ],
        float,
    )
    emb = np.array([[[1000 * i + 10 * s] for s in range(k)] for i in range(b)], float)
    sq, sr, se = (np.asarray(a) for a in legacy_scramble(jnp.asarray(q), jnp.asarray(refs), jnp.asarray(emb)))
    for j in range(b):
        for slot in range(n_layers):
            src = 1000 * gold["map_q_src_item"][j, slot] + 100 * gold["map_q_src_layer"][j, slot]
            assert sq[j, slot, 0, 0] == src
            for blk in range(k):
                src = (
                    1000 * gold["map_p_src_item"][j, slot, blk]
                    + 100 * gold["map_p_src_layer"][j, slot, blk]
                    + 10 * gold["map_p_src_shot"][j, slot, blk]
                )
                assert sr[j, slot, blk * p, 0] == src
        for t in range(k):
            assert (
                se[j, t, 0] == 1000 * gold["map_proto_src_item"][j, t] + 10 * gold["map_proto_src_shot"][j, t]
            )


@pytest.mark.parametrize("variant", ["correct", "legacy"])
def test_train_mode_heads_match_official_training_step(variant):
    gold = np.load(GOLDEN / f"train_step_{variant}_transistor_b4_k2.npz")
    weights = load_official_checkpoint(GOLDEN / "weights.safetensors", config=TINY)
    b, k = int(gold["B"]), int(gold["K"])
    flat = gold["prompt_class_token_flat"]  # row f = shot * B + item
    per_query = flat.reshape(k, b, -1).transpose(1, 0, 2)
    if variant == "legacy":
        dummy = jnp.zeros((b, 3, 1, 1))
        _, _, ref_emb = legacy_scramble(dummy, jnp.zeros((b, 3, k, 1)), jnp.asarray(per_query))
        np.testing.assert_array_equal(np.asarray(ref_emb), flat.reshape(b, k, -1))
    else:
        ref_emb = jnp.asarray(per_query)
    heads = InCTRLHeads(embed_dim=640, num_patches=225)
    out, mutated = heads.apply(
        weights.head_variables,
        jnp.asarray(gold["query_class_token"]),
        ref_emb,
        jnp.asarray(gold["M"]),
        jnp.asarray(gold["s_a"]),
        True,
        mutable=["batch_stats"],
    )
    # The fixture README: this step is ill-conditioned in fp32 (fp32 vs fp64 differ by ~1e-5).
    tol = 1e-4
    assert _maxdiff(out.image_residual, gold["r"]) <= tol
    assert _maxdiff(out.s_i, gold["s_i"]) <= tol
    assert _maxdiff(out.h, gold["h"]) <= tol
    assert _maxdiff(0.5 * (out.h + gold["s_p"]), gold["score"]) <= tol
    stats = mutated["batch_stats"]
    for official, ours in (("diff_head_ref", "image_head"), ("diff_head", "holistic_head")):
        for bn in ("bn2", "bn3"):
            for ours_key, key in (("mean", "running_mean"), ("var", "running_var")):
                diff = _maxdiff(stats[ours][bn][ours_key], gold[f"after/{official}.{bn}.{key}"])
                assert diff <= 1e-5, f"{official}.{bn}.{key} after the step differs by {diff:.2e} > 1e-5"
