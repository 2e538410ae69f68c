"""Saved models record where their backbone weights came from (so random-backbone runs never pass as real)."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from inctrl_jax.clip.model import CLIPConfig, TextConfig, VisionConfig, init_params
from inctrl_jax.model.checkpoint import InCTRLWeights, load_model, save_model
from inctrl_jax.model.detector import Detector

CFG = CLIPConfig(
    VisionConfig(
        image_size=16, patch_size=8, width=16, layers=2, heads=2, mlp_dim=32, embed_dim=8, act="gelu"
    ),
    TextConfig(width=16, layers=1, heads=2, mlp_dim=32, embed_dim=8, act="gelu"),
)


@pytest.fixture(scope="module")
def clip_params():
    shapes = jax.eval_shape(lambda: init_params(CFG))
    return jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes)


def test_random_backbone_provenance_survives_save_and_load(clip_params, tmp_path):
    prov = {"backbone_weights": "random", "real_result": False, "note": "unit test"}
    save_model(tmp_path, InCTRLWeights(CFG, clip_params, None, (1, 2), provenance=prov))
    assert json.loads((tmp_path / "config.json").read_text())["provenance"] == prov
    assert load_model(tmp_path).provenance == prov
    det = Detector.from_checkpoint(tmp_path)
    assert det.provenance == prov
    assert det.is_real_result is False
    # a re-save through the detector keeps it
    det.save(tmp_path / "again")
    assert load_model(tmp_path / "again").provenance == prov


def test_real_result_false_alone_is_not_real_and_real_sources_are(clip_params, tmp_path):
    save_model(
        tmp_path / "a", InCTRLWeights(CFG, clip_params, None, (1, 2), provenance={"real_result": False})
    )
    assert Detector.from_checkpoint(tmp_path / "a").is_real_result is False
    real = {"backbone_weights": "ViT-B-16-plus-240/laion400m_e32", "real_result": True}
    save_model(tmp_path / "b", InCTRLWeights(CFG, clip_params, None, (1, 2), provenance=real))
    assert Detector.from_checkpoint(tmp_path / "b").is_real_result is True


def test_directories_without_provenance_load_with_an_empty_dict(clip_params, tmp_path):
    save_model(tmp_path, InCTRLWeights(CFG, clip_params, None, (1, 2)))
    meta = json.loads((tmp_path / "config.json").read_text())
    del meta["provenance"]  # as written before provenance existed
    (tmp_path / "config.json").write_text(json.dumps(meta))
    assert load_model(tmp_path).provenance == {}
    assert Detector.from_checkpoint(tmp_path).provenance == {}


def test_provenance_that_is_not_json_is_refused_before_anything_is_written(clip_params, tmp_path):
    with pytest.raises(TypeError, match="provenance"):
        save_model(
            tmp_path / "x", InCTRLWeights(CFG, clip_params, None, (1, 2), provenance={"when": object()})
        )
    assert not (tmp_path / "x").exists()
