"""The paper backbone at full size: parameter count (no allocation) and one CPU forward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from inctrl_jax.clip.model import VisionTower, init_params
from inctrl_jax.clip.registry import get_backbone


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_paper_backbone_parameter_count():
    shapes = jax.eval_shape(lambda: init_params(get_backbone("ViT-B-16-plus-240").config))
    # open_clip ViT-B-16-plus-240 as counted in the reference notes (frozen CLIP of InCTRL).
    assert _count(shapes) == 208_377_344
    assert _count(shapes["visual"]) == 117_213_824
    assert _count(shapes["text"]) == 91_163_520


def test_paper_backbone_forward_on_cpu():
    b = get_backbone("ViT-B-16-plus-240")
    shapes = jax.eval_shape(lambda: init_params(b.config))["visual"]
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32) * 0.02, shapes)
    pixels = jnp.asarray(rng.standard_normal((1, 240, 240, 3), np.float32))
    out = jax.jit(lambda p, x: VisionTower(b.config.vision).apply({"params": p}, x, b.tap_layers))(
        params, pixels
    )
    assert out.embeds.shape == (1, 640)
    assert out.taps.shape == (1, 3, 226, 896)
    assert np.isfinite(np.asarray(out.taps)).all() and np.isfinite(np.asarray(out.embeds)).all()
