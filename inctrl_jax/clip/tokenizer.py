"""Offline CLIP tokenizer with open_clip-identical ids.

The CLIP byte-pair-encoding vocabulary (OpenAI, MIT licence; see ``assets/LICENSE-CLIP-BPE.txt``)
ships with the package as ``assets/bpe_simple_vocab_16e6.txt.gz``. It is turned into the
``vocab``/``merges`` pair of a ``transformers`` :class:`~transformers.CLIPTokenizer` in memory, so
no network access and no files outside the package are needed.

Text is cleaned the way open_clip cleans it before byte-pair encoding (``ftfy.fix_text``, HTML
unescape twice, whitespace collapsed, lower case). Each row of the result is
``<start_of_text> tokens <end_of_text>`` padded with zeros to the context length; longer texts
are truncated and keep ``<end_of_text>`` as their last token.
"""

from __future__ import annotations

import functools
import gzip
import html
import re
from collections.abc import Sequence
from importlib import resources
from typing import Any

import numpy as np

SOT_TOKEN_ID = 49406
"""``<|startoftext|>``."""
EOT_TOKEN_ID = 49407
"""``<|endoftext|>``; text pooling reads the first position holding this id."""
VOCAB_SIZE = 49408
CONTEXT_LENGTH = 77

_BPE_ASSET = "bpe_simple_vocab_16e6.txt.gz"
_NUM_MERGES = 49152 - 256 - 2


def _bytes_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable character table of GPT-2/CLIP byte-level BPE.

    The insertion order (printable bytes first, then the remapped ones) is the order of the first
    256 vocabulary ids, so it must not be sorted.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def bpe_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Read the shipped BPE file and return ``(vocab, merges)`` in CLIP's id order.

    Returns:
      ``vocab`` maps each of the 49408 tokens to its id; ``merges`` lists the 48894 merge pairs
      in priority order.
    """
    data = resources.files("inctrl_jax.clip").joinpath("assets", _BPE_ASSET).read_bytes()
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    # Line 0 is a version header; the next _NUM_MERGES lines are the merges.
    merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
    pairs: list[tuple[str, str]] = [(m[0], m[1]) for m in merges]
    base = list(_bytes_to_unicode().values())
    tokens = base + [t + "</w>" for t in base] + ["".join(p) for p in pairs]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise RuntimeError(
            f"the packaged CLIP vocabulary inctrl_jax/clip/assets/{_BPE_ASSET} gives {len(vocab)} tokens "
            f"instead of {VOCAB_SIZE}; the file is damaged: reinstall inctrl_jax."
        )
    return vocab, pairs


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> Any:
    """The cached ``transformers`` CLIP tokenizer built from the shipped vocabulary.

    transformers 5 takes the vocabulary as ``vocab=``/``merges=`` objects; the 4.x keywords
    ``vocab_file=``/``merges_file=`` would silently give a 2-token tokenizer, so the size is checked.
    """
    from transformers import CLIPTokenizer

    vocab, merges = bpe_vocab_and_merges()
    merge_pairs: Any = list(merges)  # the tokenizers backend takes (a, b) pairs
    tok = CLIPTokenizer(vocab=vocab, merges=merge_pairs)
    if len(tok) != VOCAB_SIZE or tok.convert_tokens_to_ids("<|endoftext|>") != EOT_TOKEN_ID:
        raise RuntimeError(
            f"transformers built a CLIP tokenizer with {len(tok)} tokens instead of {VOCAB_SIZE}; "
            "this transformers version is not supported (install transformers>=5.24,<6)."
        )
    return tok


def clean_text(text: str) -> str:
    """open_clip's default cleaning: ftfy, HTML unescape (twice), collapse whitespace, lower case."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip().lower()


def tokenize(texts: str | Sequence[str], context_length: int = CONTEXT_LENGTH) -> np.ndarray:
    """Token ids of ``texts``, identical to ``open_clip.tokenize``.

    Args:
      texts: one string or a sequence of strings.
      context_length: row length; CLIP text towers use 77.

    Returns:
      ``int32`` array ``[len(texts), context_length]``: start token, BPE ids, end token, zeros.
      Texts that do not fit are cut and end with the end token.
    """
    if isinstance(texts, str):
        texts = [texts]
    if context_length < 2:
        raise ValueError(f"context_length must be at least 2 (start and end token), got {context_length}")
    tok = get_tokenizer()
    cleaned = [clean_text(t) for t in texts]
    encoded = tok(cleaned, add_special_tokens=False)["input_ids"] if cleaned else []
    out = np.zeros((len(cleaned), context_length), np.int32)
    for row, ids in enumerate(encoded):
        seq = [SOT_TOKEN_ID, *ids, EOT_TOKEN_ID]
        if len(seq) > context_length:
            seq = seq[:context_length]
            seq[-1] = EOT_TOKEN_ID
        out[row, : len(seq)] = seq
    return out
