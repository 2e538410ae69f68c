"""Named CLIP backbones and where their weights live."""

from __future__ import annotations

import dataclasses

from inctrl_jax.clip.model import CLIPConfig, TextConfig, VisionConfig


@dataclasses.dataclass(frozen=True)
class Backbone:
    """A named architecture plus the hub locations of its pretrained weights.

    ``weights`` maps a pretrained tag to ``(hub repo id, file name or None)``; a ``None`` file
    means a transformers directory (``config.json`` + weights).
    """

    name: str
    config: CLIPConfig
    layout: str  # "open_clip" or "hf"
    weights: dict[str, tuple[str, str | None]]
    default_tag: str
    tap_layers: tuple[int, ...] = (7, 9, 11)


_B16_PLUS_240 = CLIPConfig(
    vision=VisionConfig(
        image_size=240,
        patch_size=16,
        width=896,
        layers=12,
        heads=14,
        mlp_dim=3584,
        embed_dim=640,
        act="gelu",
    ),
    text=TextConfig(width=640, layers=12, heads=10, mlp_dim=2560, embed_dim=640, act="gelu"),
)

_OPENAI_B16 = CLIPConfig(
    vision=VisionConfig(
        image_size=224,
        patch_size=16,
        width=768,
        layers=12,
        heads=12,
        mlp_dim=3072,
        embed_dim=512,
        act="quick_gelu",
    ),
    text=TextConfig(width=512, layers=12, heads=8, mlp_dim=2048, embed_dim=512, act="quick_gelu"),
)

_OPENAI_L14_336 = CLIPConfig(
    vision=VisionConfig(
        image_size=336,
        patch_size=14,
        width=1024,
        layers=24,
        heads=16,
        mlp_dim=4096,
        embed_dim=768,
        act="quick_gelu",
    ),
    text=TextConfig(width=768, layers=12, heads=12, mlp_dim=3072, embed_dim=768, act="quick_gelu"),
)

BACKBONES: dict[str, Backbone] = {
    b.name: b
    for b in (
        Backbone(
            "ViT-B-16-plus-240",
            _B16_PLUS_240,
            "open_clip",
            {
                # open_clip 3.3.0's pretrained table points both tags at the e31 repository;
                # timm hosts each epoch under its own id, and InCTRL uses e32.
                "laion400m_e32": (
                    "timm/vit_base_patch16_plus_clip_240.laion400m_e32",
                    "open_clip_model.safetensors",
                ),
                "laion400m_e31": (
                    "timm/vit_base_patch16_plus_clip_240.laion400m_e31",
                    "open_clip_model.safetensors",
                ),
            },
            default_tag="laion400m_e32",
        ),
        Backbone(
            "ViT-B/16",
            _OPENAI_B16,
            "hf",
            {"openai": ("openai/clip-vit-base-patch16", None)},
            default_tag="openai",
        ),
        Backbone(
            "ViT-L/14@336",
            _OPENAI_L14_336,
            "hf",
            {"openai": ("openai/clip-vit-large-patch14-336", None)},
            default_tag="openai",
            # The same relative depths as 7/9/11 of 12 blocks.
            tap_layers=(14, 18, 22),
        ),
    )
}


def get_backbone(name: str) -> Backbone:
    try:
        return BACKBONES[name]
    except KeyError:
        raise KeyError(
            f"unknown backbone {name!r}; registered backbones: {', '.join(BACKBONES)}. "
            "Pass a local directory or checkpoint file to load other weights."
        ) from None
