"""Frozen-feature cache: one backbone forward per unique training image.

The CLIP backbone is frozen, so everything the heads need from an image is fixed: its tapped
patch tokens (L2-normalised, class token dropped, ``[L, P, D]``) and its projected class token
(``[E]``, not normalised). They are computed once; the head steps then only gather rows of the
cache. (The text prior needs only the class token and the category's text prototypes, which are
computed once per category elsewhere.)

The cache lives in memory or, with a directory, in ``.npy`` files that are memory-mapped and
reused by later runs with the same images and backbone (a fingerprint is checked).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

CACHE_DTYPES = ("float32", "float16")


def load_image(path: str, image_size: int) -> np.ndarray:
    """Reference preprocessing of one image (see :mod:`inctrl_jax.data.preprocess`), ``[S, S, 3]``."""
    from inctrl_jax.data.preprocess import load_image as data_load_image

    return np.asarray(data_load_image(path, image_size=image_size), np.float32)


@dataclasses.dataclass
class FeatureCache:
    """Per-image frozen features, row i = image i of the training set."""

    patch_tokens: np.ndarray  # [N, L, P, D], L2-normalised, float32 or float16
    class_embeds: np.ndarray  # [N, E] float32

    def __len__(self) -> int:
        return self.patch_tokens.shape[0]

    @property
    def nbytes(self) -> int:
        return int(self.patch_tokens.nbytes + self.class_embeds.nbytes)


def estimate_cache_bytes(
    num_images: int, num_layers: int, num_patches: int, width: int, embed_dim: int, dtype: str
) -> int:
    """Bytes the cache will take: patch tokens in ``dtype`` plus float32 class tokens."""
    item = np.dtype(dtype).itemsize
    return num_images * (num_layers * num_patches * width * item + embed_dim * 4)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def fingerprint(paths: Sequence[str], backbone_id: str, tap_layers: Sequence[int], dtype: str) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([list(paths), backbone_id, list(tap_layers), dtype]).encode())
    return h.hexdigest()[:16]


EncodeFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
"""pixels [B, H, W, 3] -> (normalised patch tokens [B, L, P, D], class embeds [B, E])."""


def build_feature_cache(
    paths: Sequence[str],
    encode: EncodeFn,
    image_size: int,
    shapes: tuple[int, int, int, int],
    *,
    dtype: str = "float32",
    batch_size: int = 16,
    directory: str | Path | None = None,
    fingerprint_id: str = "",
    progress: bool = True,
) -> FeatureCache:
    """Encodes every image once and returns the cache.

    Args:
      paths: image files, row order of the cache.
      encode: jitted backbone call, see :data:`EncodeFn`.
      image_size: backbone input size.
      shapes: ``(L, P, D, E)``: tapped layers, patches, width, embed dim.
      dtype: storage dtype of the patch tokens, ``"float32"`` or ``"float16"``.
      batch_size: images per backbone call.
      directory: if set, the cache is stored there as ``.npy`` files and reused when its
        fingerprint matches ``fingerprint_id``.
      fingerprint_id: identifies images + backbone + dtype (see :func:`fingerprint`).
      progress: show a tqdm bar.
    """
    if dtype not in CACHE_DTYPES:
        raise ValueError(f"config.cache.dtype={dtype!r}; use one of {CACHE_DTYPES}")
    n = len(paths)
    num_layers, num_patches, width, embed_dim = shapes
    patch_tokens: np.ndarray
    if directory is not None:
        directory = Path(directory)
        meta_file = directory / "cache.json"
        if meta_file.exists():
            meta = json.loads(meta_file.read_text())
            if meta.get("fingerprint") == fingerprint_id and meta.get("complete"):
                log.info("feature cache: reusing %s (%d images)", directory, n)
                return FeatureCache(
                    np.load(directory / "patch_tokens.npy", mmap_mode="r"),
                    np.load(directory / "class_embeds.npy"),
                )
        directory.mkdir(parents=True, exist_ok=True)
        patch_tokens = np.lib.format.open_memmap(
            directory / "patch_tokens.npy", mode="w+", dtype=dtype, shape=(n, num_layers, num_patches, width)
        )
    else:
        patch_tokens = np.empty((n, num_layers, num_patches, width), dtype)
    class_embeds = np.empty((n, embed_dim), np.float32)

    from tqdm import tqdm

    def decode(lo: int) -> np.ndarray:
        hi = min(n, lo + batch_size)
        pixels = np.stack([load_image(p, image_size) for p in paths[lo:hi]])
        if hi - lo < batch_size:  # pad so the jitted encoder sees one shape
            pixels = np.concatenate(
                [pixels, np.zeros((batch_size - (hi - lo),) + pixels.shape[1:], pixels.dtype)]
            )
        return pixels

    start = time.perf_counter()
    bar = tqdm(total=n, desc="feature cache", unit="img", disable=not progress, leave=False)
    # The next batch is decoded on a thread (PIL releases the GIL) while the backbone encodes this one.
    with ThreadPoolExecutor(1, thread_name_prefix="cache-decode") as pool:
        next_pixels = pool.submit(decode, 0) if n else None
        for lo in range(0, n, batch_size):
            hi = min(n, lo + batch_size)
            assert next_pixels is not None
            pixels = next_pixels.result()
            next_pixels = pool.submit(decode, hi) if hi < n else None
            tokens, embeds = encode(pixels)
            tokens, embeds = np.asarray(tokens)[: hi - lo], np.asarray(embeds)[: hi - lo]
            patch_tokens[lo:hi] = tokens.astype(dtype)
            class_embeds[lo:hi] = embeds
            bar.update(hi - lo)
    bar.close()
    log.info("feature cache: encoded %d images in %.1f s", n, time.perf_counter() - start)

    if directory is not None:
        if isinstance(patch_tokens, np.memmap):
            patch_tokens.flush()
        np.save(directory / "class_embeds.npy", class_embeds)
        (directory / "cache.json").write_text(
            json.dumps({"fingerprint": fingerprint_id, "complete": True, "num_images": n, "dtype": dtype})
        )
    return FeatureCache(patch_tokens, class_embeds)


def cached_text_prototypes(
    categories: Sequence[str],
    compute: Callable[[Sequence[str]], dict[str, np.ndarray]],
    directory: str | Path | None,
    backbone_id: str,
) -> dict[str, np.ndarray]:
    """``{category: [g_n, g_a]}``; with a cache directory, reused from ``text_prototypes.npz`` there.

    ``compute`` encodes several categories in one call (see
    :func:`inctrl_jax.training.text_prior.text_prototypes_for`). The stored prototypes are only
    reused when they come from the same backbone (``backbone_id``); categories missing from the
    file are computed together and added.
    """
    if directory is None:
        computed = compute(list(categories))
        return {c: np.asarray(computed[c]) for c in categories}
    file = Path(directory) / "text_prototypes.npz"
    stored: dict[str, np.ndarray] = {}
    if file.exists():
        with np.load(file) as npz:
            if str(npz["backbone_id"]) == backbone_id:
                stored = {k[len("category/") :]: npz[k] for k in npz.files if k.startswith("category/")}
    missing = [c for c in categories if c not in stored]
    if missing:
        stored.update({c: np.asarray(v) for c, v in compute(missing).items()})
        Path(directory).mkdir(parents=True, exist_ok=True)
        arrays = {f"category/{c}": v for c, v in stored.items()}
        # Written under a temporary name and renamed when complete: a killed run leaves no half file.
        tmp = file.with_name("text_prototypes.tmp.npz")
        np.savez(tmp, backbone_id=np.asarray(backbone_id), **arrays)  # type: ignore[arg-type]
        tmp.replace(file)
    return {c: stored[c] for c in categories}
