"""CLIP vision and text towers in Flax linen.

The towers follow the pre-LayerNorm ViT/Transformer of OpenAI CLIP and open_clip. The vision
tower can additionally return the raw residual stream after chosen blocks (1-based indices),
which is what InCTRL compares between a query and its reference images.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

Activation = Literal["gelu", "quick_gelu"]


def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI CLIP's sigmoid approximation of GELU."""
    return x * jax.nn.sigmoid(1.702 * x)


def activation_fn(name: str):
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    if name == "quick_gelu":
        return quick_gelu
    raise ValueError(f"unknown activation {name!r}; expected 'gelu' or 'quick_gelu'")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """Shape of a CLIP vision tower."""

    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    embed_dim: int = 512
    act: Activation = "quick_gelu"
    ln_eps: float = 1e-5

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """Shape of a CLIP text tower. Pooling reads the first ``eos_token_id`` position."""

    vocab_size: int = 49408
    context_length: int = 77
    width: int = 512
    layers: int = 12
    heads: int = 8
    mlp_dim: int = 2048
    embed_dim: int = 512
    act: Activation = "quick_gelu"
    ln_eps: float = 1e-5
    eos_token_id: int = 49407


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    vision: VisionConfig = VisionConfig()
    text: TextConfig = TextConfig()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CLIPConfig:
        return cls(vision=VisionConfig(**d["vision"]), text=TextConfig(**d["text"]))


class MLP(nn.Module):
    hidden: int
    act: str
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        x = nn.Dense(self.hidden, dtype=self.dtype, name="fc1")(x)
        x = activation_fn(self.act)(x)
        return nn.Dense(width, dtype=self.dtype, name="fc2")(x)


class Attention(nn.Module):
    heads: int
    causal: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        batch, length, width = x.shape
        head_dim = width // self.heads

        def proj(name):
            y = nn.Dense(width, dtype=self.dtype, name=name)(x)
            return y.reshape(batch, length, self.heads, head_dim)

        q, k, v = proj("q"), proj("k"), proj("v")
        y = jax.nn.dot_product_attention(q, k, v, is_causal=self.causal)
        y = y.reshape(batch, length, width)
        return nn.Dense(width, dtype=self.dtype, name="out")(y)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    heads: int
    mlp_dim: int
    act: str
    ln_eps: float
    causal: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        y = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="ln_1")(x)
        x = x + Attention(self.heads, self.causal, self.dtype, name="attn")(y)
        y = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="ln_2")(x)
        return x + MLP(self.mlp_dim, self.act, self.dtype, name="mlp")(y)


class VisionOutput(NamedTuple):
    embeds: jax.Array
    """Projected class token after ``ln_post``, ``[B, embed_dim]``, not normalised."""
    taps: jax.Array
    """Residual stream after the requested blocks, ``[B, n_taps, 1 + num_patches, width]``.

    Token 0 is the class token; patch tokens follow in row-major grid order. No LayerNorm and no
    projection is applied. Shape ``[B, 0, T, width]`` when no taps are requested."""


class VisionTower(nn.Module):
    """CLIP ViT. Input: ``[B, H, W, 3]`` normalised pixels (NHWC)."""

    config: VisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixels: jax.Array, tap_layers: Sequence[int] = ()) -> VisionOutput:
        cfg = self.config
        tap_layers = tuple(int(t) for t in tap_layers)
        for t in tap_layers:
            if not 1 <= t <= cfg.layers:
                raise ValueError(
                    f"tap layer {t} is out of range: blocks are numbered 1..{cfg.layers} (1-based)"
                )
        batch = pixels.shape[0]
        x = nn.Conv(
            cfg.width,
            (cfg.patch_size, cfg.patch_size),
            strides=(cfg.patch_size, cfg.patch_size),
            padding="VALID",
            use_bias=False,
            dtype=self.dtype,
            name="patch_embed",
        )(pixels.astype(self.dtype))
        x = x.reshape(batch, -1, cfg.width)
        cls = self.param("class_embedding", nn.initializers.normal(cfg.width**-0.5), (cfg.width,))
        pos = self.param(
            "position_embedding",
            nn.initializers.normal(0.01),
            (cfg.num_patches + 1, cfg.width),
        )
        cls = jnp.broadcast_to(cls.astype(x.dtype), (batch, 1, cfg.width))
        x = jnp.concatenate([cls, x], axis=1) + pos.astype(x.dtype)
        x = nn.LayerNorm(epsilon=cfg.ln_eps, dtype=self.dtype, name="ln_pre")(x)

        taps = []
        for i in range(cfg.layers):
            x = Block(cfg.heads, cfg.mlp_dim, cfg.act, cfg.ln_eps, False, self.dtype, name=f"block_{i}")(x)
            if i + 1 in tap_layers:
                taps.append(x)
        pooled = nn.LayerNorm(epsilon=cfg.ln_eps, dtype=self.dtype, name="ln_post")(x[:, 0])
        embeds = nn.Dense(cfg.embed_dim, use_bias=False, dtype=self.dtype, name="proj")(pooled)
        # Keep the tap order the caller asked for.
        by_layer = dict(zip(sorted(set(tap_layers)), taps, strict=True))
        stacked = (
            jnp.stack([by_layer[t] for t in tap_layers], axis=1)
            if tap_layers
            else jnp.zeros((batch, 0) + x.shape[1:], x.dtype)
        )
        return VisionOutput(embeds=embeds, taps=stacked)


class TextTower(nn.Module):
    """CLIP text transformer. Input: ``[B, context_length]`` token ids."""

    config: TextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, token_ids: jax.Array) -> jax.Array:
        cfg = self.config
        length = token_ids.shape[-1]
        tok = nn.Embed(cfg.vocab_size, cfg.width, dtype=self.dtype, name="token_embedding")
        pos = self.param("position_embedding", nn.initializers.normal(0.01), (cfg.context_length, cfg.width))
        x = tok(token_ids) + pos[:length].astype(self.dtype)
        for i in range(cfg.layers):
            x = Block(cfg.heads, cfg.mlp_dim, cfg.act, cfg.ln_eps, True, self.dtype, name=f"block_{i}")(x)
        x = nn.LayerNorm(epsilon=cfg.ln_eps, dtype=self.dtype, name="ln_final")(x)
        eot = jnp.argmax(token_ids == cfg.eos_token_id, axis=-1)
        pooled = jnp.take_along_axis(x, eot[:, None, None], axis=1)[:, 0]
        return nn.Dense(cfg.embed_dim, use_bias=False, dtype=self.dtype, name="proj")(pooled)


class CLIP(nn.Module):
    """Both towers. ``encode_image`` / ``encode_text`` are the entry points."""

    config: CLIPConfig
    dtype: Any = jnp.float32

    def setup(self):
        self.visual = VisionTower(self.config.vision, self.dtype)
        self.text = TextTower(self.config.text, self.dtype)

    def encode_image(self, pixels, tap_layers: Sequence[int] = ()) -> VisionOutput:
        return self.visual(pixels, tap_layers)

    def encode_text(self, token_ids) -> jax.Array:
        return self.text(token_ids)

    def __call__(self, pixels, token_ids):
        return self.encode_image(pixels).embeds, self.encode_text(token_ids)


def init_params(config: CLIPConfig, seed: int = 0) -> dict:
    """Random parameters with the tree that the converters produce."""
    model = CLIP(config)
    v, t = config.vision, config.text
    pixels = jnp.zeros((1, v.image_size, v.image_size, 3), jnp.float32)
    ids = jnp.zeros((1, t.context_length), jnp.int32)
    return model.init(jax.random.PRNGKey(seed), pixels, ids)["params"]
