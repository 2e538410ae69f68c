"""The offline CLIP tokenizer against the official code's token ids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from inctrl_jax.clip.tokenizer import EOT_TOKEN_ID, SOT_TOKEN_ID, clean_text, get_tokenizer, tokenize

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
GOLDEN = SHARED / "golden" / "inctrl_tiny"


@pytest.mark.parametrize("name", ["text_transistor.npz", "text_elpv.npz"])
def test_ids_equal_official_for_all_prompts(name):
    d = np.load(GOLDEN / name)
    ids = tokenize(list(d["sentences"]))
    assert ids.shape == (242, 77) and ids.dtype == np.int32
    mismatched = [
        str(s) for s, a, b in zip(d["sentences"], ids, d["token_ids"], strict=True) if (a != b).any()
    ]
    assert not mismatched, f"{len(mismatched)} prompts tokenize differently, e.g. {mismatched[:3]}"
    np.testing.assert_array_equal(ids.argmax(-1), d["eot_index"])


def test_known_ids_padding_and_vocab():
    assert len(get_tokenizer()) == 49408
    ids = tokenize("a photo of a damaged bottle.")
    expected = [SOT_TOKEN_ID, 320, 1125, 539, 320, 13568, 5392, 269, EOT_TOKEN_ID]
    assert ids[0, :9].tolist() == expected and not ids[0, 9:].any()


def test_truncation_keeps_end_token():
    ids = tokenize(["word " * 200, "short"], context_length=20)
    assert ids.shape == (2, 20)
    assert ids[0, 0] == SOT_TOKEN_ID and ids[0, -1] == EOT_TOKEN_ID and (ids[0] != 0).all()
    assert ids[1, 2] == EOT_TOKEN_ID and not ids[1, 3:].any()


def test_open_clip_text_cleaning():
    # ftfy fixes full-width letters and mojibake, HTML entities are unescaped, whitespace collapses.
    assert clean_text("  Ｆｕｌｌ\twidth &amp;amp;  CafÃ©\n") == "full width & café"
    np.testing.assert_array_equal(tokenize("Ｆｕｌｌ  WIDTH"), tokenize("full width"))


def test_works_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    get_tokenizer.cache_clear()
    assert tokenize(["a"]).shape == (1, 77)
