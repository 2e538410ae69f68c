"""Loading CLIP weights through the public loader, with parity against PyTorch.

Reference checkpoints are tiny random ``transformers.CLIPModel`` instances made here with torch
and written with ``save_pretrained``; the open_clip/InCTRL layout is checked against the golden
fixture of the official code.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers import CLIPConfig as HFCLIPConfig
from transformers import CLIPModel, CLIPTextConfig, CLIPVisionConfig

from inctrl_jax.clip.cli import main as convert_main
from inctrl_jax.clip.convert import ConversionError
from inctrl_jax.clip.loading import (
    INCTRL_HEAD_PREFIXES,
    CheckpointError,
    infer_config,
    load_clip,
    load_inctrl_checkpoint,
    read_state_dict,
)
from inctrl_jax.clip.model import CLIP, CLIPConfig, TextConfig, VisionConfig

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
GOLDEN = SHARED / "golden" / "inctrl_tiny"
GOLDEN_CONFIG = CLIPConfig(
    VisionConfig(240, 16, 64, 12, 4, 256, 640, "gelu"), TextConfig(49408, 77, 32, 2, 2, 128, 640, "gelu")
)
TOL = 1e-5

jax.config.update("jax_default_matmul_precision", "highest")


def _hf_model(act: str, image_size: int, patch: int, vision_layers: int) -> CLIPModel:
    text = CLIPTextConfig(
        vocab_size=1000,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=998,
        eos_token_id=999,
        pad_token_id=1,
        hidden_act=act,
    )
    vision = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=vision_layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch,
        hidden_act=act,
    )
    cfg = HFCLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=24)
    torch.manual_seed(0)
    model = CLIPModel(cfg).eval()
    with torch.no_grad():  # make the default-zero LayerNorm biases and small inits visible to the test
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


# Two activations; the second is shaped like ViT-B-16-plus-240 (gelu, 240 px, patch 16) but tiny.
CASES = {
    "quick_gelu_32px": dict(act="quick_gelu", image_size=32, patch=8, vision_layers=3),
    "gelu_240px_p16": dict(act="gelu", image_size=240, patch=16, vision_layers=3),
}


@pytest.fixture(scope="module", params=list(CASES))
def hf_case(request, tmp_path_factory):
    model = _hf_model(**CASES[request.param])
    out = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(out)
    size = CASES[request.param]["image_size"]
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(2, 3, size, size, generator=g)
    ids = torch.zeros(2, 77, dtype=torch.long)
    ids[0, :5] = torch.tensor([998, 5, 17, 300, 999])
    ids[1, :8] = torch.tensor([998, 44, 45, 46, 47, 48, 49, 999])
    with torch.no_grad():
        vis = model.vision_model(pixel_values=pixels, output_hidden_states=True)
        img = model.visual_projection(vis.pooler_output)
        txt = model.get_text_features(input_ids=ids)
        txt = getattr(txt, "pooler_output", txt)
    ref = {
        "image": img.numpy(),
        "text": txt.numpy(),
        "hidden": [h.numpy() for h in vis.hidden_states],  # [i] = residual stream after block i
    }
    return out, model, pixels.numpy(), ids.numpy().astype(np.int32), ref


def _check_parity(config, params, pixels, ids, ref, layers):
    model = CLIP(config)
    taps = tuple(range(1, layers + 1))
    out = model.apply({"params": params}, pixels.transpose(0, 2, 3, 1), taps, method=CLIP.encode_image)
    text = model.apply({"params": params}, ids, method=CLIP.encode_text)
    d_img = float(np.abs(np.asarray(out.embeds) - ref["image"]).max())
    d_txt = float(np.abs(np.asarray(text) - ref["text"]).max())
    d_taps = max(
        float(np.abs(np.asarray(out.taps[:, i]) - ref["hidden"][t]).max()) for i, t in enumerate(taps)
    )
    assert d_img <= TOL, f"image embeds differ from torch by {d_img:.2e} > {TOL}"
    assert d_txt <= TOL, f"text embeds differ from torch by {d_txt:.2e} > {TOL}"
    assert d_taps <= TOL, f"tapped hidden states differ from torch by {d_taps:.2e} > {TOL}"


def test_transformers_dir_parity(hf_case):
    path, model, pixels, ids, ref = hf_case
    config, params = load_clip(path)
    hf_v = model.config.vision_config
    assert config.vision.act == hf_v.hidden_act and config.text.eos_token_id == 999
    assert config.vision.image_size == hf_v.image_size and config.vision.heads == 4
    _check_parity(config, params, pixels, ids, ref, hf_v.num_hidden_layers)


def test_transformers_pytorch_model_bin(hf_case, tmp_path):
    path, model, pixels, ids, ref = hf_case
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    config, params = load_clip(tmp_path)
    _check_parity(config, params, pixels, ids, ref, model.config.vision_config.num_hidden_layers)


def test_legacy_eos_token_id_means_last_vocab_id(tmp_path):
    cfg = HFCLIPConfig().to_dict()
    cfg["text_config"]["eos_token_id"] = 2
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    from inctrl_jax.clip.loading import config_from_transformers

    assert config_from_transformers(tmp_path / "config.json").text.eos_token_id == 49407


# ---------------------------------------------------------------- open_clip / InCTRL layout


@pytest.fixture(scope="module")
def golden():
    d = np.load(GOLDEN / "infer_transistor_k2.npz")
    pixels = np.load(GOLDEN / "images.npz")["pixels"][d["query_image_idx"][:2]].transpose(0, 2, 3, 1)
    return pixels, d["query_class_token"][:2], d["query_patch_tokens"][:2]


def _check_golden(config, params, golden):
    pixels, cls_ref, taps_ref = golden
    out = CLIP(config).apply({"params": params}, pixels, (7, 9, 11), method=CLIP.encode_image)
    d_cls = float(np.abs(np.asarray(out.embeds) - cls_ref).max())
    d_taps = float(np.abs(np.asarray(out.taps) - taps_ref).max())
    assert d_cls <= TOL, f"class token differs from the official code by {d_cls:.2e} > {TOL}"
    assert d_taps <= TOL, f"tapped tokens differ from the official code by {d_taps:.2e} > {TOL}"


def test_golden_open_clip_safetensors(golden):
    config, params = load_clip(GOLDEN / "weights.safetensors", backbone=GOLDEN_CONFIG, towers=("visual",))
    assert set(params) == {"visual"}
    _check_golden(config, params, golden)


def test_golden_inctrl_pyth_with_module_prefix(golden, tmp_path):
    sd = load_file(str(GOLDEN / "weights.safetensors"))
    wrapped = {"model_state": {"module." + k: torch.from_numpy(v) for k, v in sd.items()}}
    path = tmp_path / "checkpoint.pyth"
    torch.save(wrapped, path)
    config, params = load_clip(path, backbone=GOLDEN_CONFIG)
    _check_golden(config, params, golden)
    config, params, heads = load_inctrl_checkpoint(path, backbone=GOLDEN_CONFIG, towers=("visual",))
    expected_heads = {k for k in sd if k.startswith(INCTRL_HEAD_PREFIXES)}
    assert set(heads) == expected_heads and len(heads) > 0
    np.testing.assert_array_equal(heads["adapter.fc.0.weight"], sd["adapter.fc.0.weight"])


def test_infer_config_from_open_clip_shapes():
    cfg = infer_config(read_state_dict(GOLDEN / "weights.safetensors"))
    # Everything but the head count (head width 16 here, 64 assumed) is read off the shapes.
    assert cfg.vision == GOLDEN_CONFIG.vision.__class__(**{**GOLDEN_CONFIG.vision.__dict__, "heads": 1})
    assert cfg.text.width == 32 and cfg.text.layers == 2 and cfg.text.embed_dim == 640


def test_cli_converts_pickle_once(golden, tmp_path, capsys):
    sd = load_file(str(GOLDEN / "weights.safetensors"))
    src = tmp_path / "checkpoint.pyth"
    torch.save({"model_state": {k: torch.from_numpy(v) for k, v in sd.items()}}, src)
    out = tmp_path / "out.safetensors"
    config_json = tmp_path / "cfg.json"
    config_json.write_text("{}")
    assert convert_main([str(src), str(out), "--backbone", "ViT-B-16-plus-240"]) == 2
    assert "does not match" in capsys.readouterr().err
    from inctrl_jax.clip.cli import convert_checkpoint

    convert_checkpoint(src, out, backbone=GOLDEN_CONFIG)  # type: ignore[arg-type]
    assert set(load_file(str(out))) == set(sd)
    config, params = load_clip(out)  # the architecture travels in the file's metadata
    assert config == GOLDEN_CONFIG
    _check_golden(config, params, golden)


# ---------------------------------------------------------------- strictness and bad input


@pytest.fixture(scope="module")
def golden_sd():
    return load_file(str(GOLDEN / "weights.safetensors"))


def _write(tmp_path, sd, name="w.safetensors"):
    path = tmp_path / name
    save_file(sd, str(path))
    return path


def test_missing_key_is_named(golden_sd, tmp_path):
    sd = dict(golden_sd)
    del sd["visual.transformer.resblocks.3.ln_1.weight"]
    with pytest.raises(ConversionError, match=r"missing keys.*resblocks\.3\.ln_1\.weight"):
        load_clip(_write(tmp_path, sd), backbone=GOLDEN_CONFIG)


def test_unexpected_key_is_named(golden_sd, tmp_path):
    sd = dict(golden_sd)
    sd["visual.extra_head.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ConversionError, match=r"unexpected keys.*visual\.extra_head\.weight"):
        load_clip(_write(tmp_path, sd), backbone=GOLDEN_CONFIG)


def test_wrong_shape_is_named(golden_sd, tmp_path):
    sd = dict(golden_sd)
    sd["visual.ln_post.weight"] = np.ones(65, np.float32)
    with pytest.raises(
        ConversionError, match=r"shape mismatches.*ln_post/scale: expected \(64,\), got \(65,\)"
    ):
        load_clip(_write(tmp_path, sd), backbone=GOLDEN_CONFIG)


def test_wrong_architecture(tmp_path):
    with pytest.raises(ConversionError, match=r"weights\.safetensors does not match .*vision width 896"):
        load_clip(GOLDEN / "weights.safetensors", backbone="ViT-B-16-plus-240")


def test_truncated_safetensors(tmp_path):
    data = (GOLDEN / "weights.safetensors").read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors.*truncated") as e:
        load_clip(path, backbone=GOLDEN_CONFIG)
    assert e.value.__cause__ is not None


def test_truncated_pickle(golden_sd, tmp_path):
    full = tmp_path / "full.pth"
    torch.save({k: torch.from_numpy(v) for k, v in golden_sd.items()}, full)
    data = full.read_bytes()
    path = tmp_path / "cut.pth"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pth.*truncated, damaged or not a PyTorch checkpoint"):
        load_clip(path, backbone=GOLDEN_CONFIG)


@pytest.mark.parametrize("name", ["notes.bin", "notes.txt", "image.safetensors"])
def test_not_a_checkpoint(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"this is a plain text file, not model weights\n" * 4)
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        load_clip(path)


def test_state_dict_of_another_model(tmp_path):
    path = _write(tmp_path, {"encoder.weight": np.zeros((2, 2), np.float32)})
    with pytest.raises(CheckpointError, match=r"neither a transformers CLIPModel .* nor an open_clip"):
        load_clip(path)


def test_missing_path_and_unknown_name():
    with pytest.raises(CheckpointError, match=r"does_not_exist\.pyth.*check the path"):
        load_clip("/nonexistent/does_not_exist.pyth")
    with pytest.raises(CheckpointError, match=r"unknown backbone 'ViT-X'"):
        load_clip(GOLDEN / "weights.safetensors", backbone="ViT-X")


def test_hub_id_offline_is_explained(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")
    with pytest.raises(CheckpointError, match=r"'nobody-xyz/no-such-clip'.*offline mode.*local"):
        load_clip("nobody-xyz/no-such-clip")
    # A registry name names the repository and the file it needs.
    with pytest.raises(CheckpointError, match=r"vit_base_patch16_plus_clip_240\.laion400m_e32.*open_clip"):
        load_clip("ViT-B-16-plus-240")


def test_without_torch(monkeypatch, golden_sd, tmp_path):
    pth = tmp_path / "checkpoint.pyth"
    torch.save({k: torch.from_numpy(v) for k, v in golden_sd.items()}, pth)
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(CheckpointError, match=r"pip install 'inctrl_jax\[torch\]'.*inctrl-convert"):
        read_state_dict(pth)
    # safetensors needs no torch
    assert len(read_state_dict(GOLDEN / "weights.safetensors")) == len(golden_sd)


def test_bfloat16_compute_option(golden):
    import jax.numpy as jnp

    config, params = load_clip(GOLDEN / "weights.safetensors", backbone=GOLDEN_CONFIG, towers=("visual",))
    pixels, cls_ref, _ = golden
    out = CLIP(config, dtype=jnp.bfloat16).apply({"params": params}, pixels, (7,), method=CLIP.encode_image)
    assert out.embeds.dtype == jnp.bfloat16
    err = float(np.abs(np.asarray(out.embeds, np.float32) - cls_ref).max() / np.abs(cls_ref).max())
    assert err < 5e-2, f"bf16 class token is off by {err:.3f} of its range (tolerance 5e-2)"


class _Holder(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_torchscript_release_file(golden, golden_sd, tmp_path):
    # OpenAI's original .pt releases are TorchScript archives whose state dict also carries
    # input_resolution / context_length / vocab_size buffers.
    root = _Holder()
    for key, value in golden_sd.items():
        *parents, leaf = key.split(".")
        module = root
        for part in parents:
            if not hasattr(module, part):
                module.add_module(part, _Holder())
            module = getattr(module, part)
        module.register_buffer(leaf, torch.from_numpy(value.copy()))
    for extra in ("input_resolution", "context_length", "vocab_size"):
        root.register_buffer(extra, torch.tensor(7))
    path = tmp_path / "ViT-legacy.pt"
    torch.jit.script(root).save(str(path))
    config, params = load_clip(path, backbone=GOLDEN_CONFIG, towers=("visual",))
    _check_golden(config, params, golden)


def test_vision_only_transformers_dir(tmp_path):
    from transformers import CLIPVisionModelWithProjection

    vcfg = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=32, patch_size=16, projection_dim=8, hidden_act="gelu",
    )  # fmt: skip
    torch.manual_seed(0)
    model = CLIPVisionModelWithProjection(vcfg).eval()
    model.save_pretrained(tmp_path)
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = model(pixel_values=pixels).image_embeds.numpy()
    config, params = load_clip(tmp_path, towers=("visual",))
    assert config.vision.act == "gelu" and config.vision.embed_dim == 8
    out = CLIP(config).apply(
        {"params": params}, pixels.numpy().transpose(0, 2, 3, 1), method=CLIP.encode_image
    )
    diff = float(np.abs(np.asarray(out.embeds) - ref).max())
    assert diff <= TOL, f"vision-only image embeds differ from torch by {diff:.2e} > {TOL}"


def test_bfloat16_safetensors_are_upcast(tmp_path):
    from safetensors.torch import save_file as save_torch

    w = torch.randn(4, 3).to(torch.bfloat16)
    save_torch({"visual.proj": w}, str(tmp_path / "bf16.safetensors"))
    sd = read_state_dict(tmp_path / "bf16.safetensors")
    assert sd["visual.proj"].dtype == np.float32
    np.testing.assert_array_equal(sd["visual.proj"], w.float().numpy())
