"""Reference sets (few-shot normal prompts) of one category, cached once and reused for every query.

A :class:`ReferenceSet` holds what the scoring needs from the K normal reference images, so that
scoring a query costs one backbone forward plus the residual search: the L2-normalised patch tokens
of the tapped layers ``[L, K*P, D]``, the projected class tokens ``[K, E]`` and the category's two
text prototypes ``[2, E]``. K = 0 is a zero-shot set: only the text prior is available.

On disk a reference set is a directory with ``reference_set.json`` (category, backbone id, files,
shapes) and ``reference_set.safetensors`` (the arrays).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

META_FILE = "reference_set.json"
ARRAYS_FILE = "reference_set.safetensors"
FORMAT_NAME = "inctrl_jax.reference_set"


class ReferenceSetError(ValueError):
    """A reference set is empty, malformed or does not fit the detector."""


@dataclasses.dataclass
class ReferenceSet:
    """Cached features of the K normal reference images of one category.

    Attributes:
      category: the category name; it is also the object word of the text prompts.
      patch_tokens: L2-normalised patch tokens of the tapped layers, ``[L, K*P, D]`` (reference-major).
      class_embeds: projected class tokens t_k (not normalised), ``[K, E]``.
      text_prototypes: ``[g_n, g_a]``, ``[2, E]``.
      reference_files: where each reference came from (file path or a description), length K.
      backbone: identifier of the backbone that produced the features (must match the detector).
      tap_layers: 1-based tapped blocks.
      num_patches: P, patches per image.
    """

    category: str
    patch_tokens: np.ndarray
    class_embeds: np.ndarray
    text_prototypes: np.ndarray
    reference_files: list[str]
    backbone: str
    tap_layers: tuple[int, ...]
    num_patches: int

    def __post_init__(self) -> None:
        k = self.class_embeds.shape[0]
        if self.patch_tokens.ndim != 3 or self.patch_tokens.shape[1] != k * self.num_patches:
            raise ReferenceSetError(
                f"reference set {self.category!r}: patch_tokens has shape {self.patch_tokens.shape}, expected "
                f"[{len(self.tap_layers)}, {k} * {self.num_patches}, D] for {k} references"
            )
        if self.text_prototypes.shape[0] != 2:
            raise ReferenceSetError(
                f"reference set {self.category!r}: text_prototypes must be [2, E], got {self.text_prototypes.shape}"
            )
        if len(self.reference_files) != k:
            raise ReferenceSetError(
                f"reference set {self.category!r}: {len(self.reference_files)} file names for {k} references"
            )

    @property
    def k(self) -> int:
        """Number of reference images K (0 = zero-shot)."""
        return int(self.class_embeds.shape[0])

    @property
    def zero_shot(self) -> bool:
        """True when there are no reference images and only the text prior can be used."""
        return self.k == 0

    def __repr__(self) -> str:
        return (
            f"ReferenceSet(category={self.category!r}, K={self.k}, backbone={self.backbone!r}, "
            f"tap_layers={self.tap_layers}, patch_tokens={tuple(self.patch_tokens.shape)})"
        )

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``reference_set.json`` + ``reference_set.safetensors`` into ``directory``."""
        from safetensors.numpy import save_file

        d = Path(directory).expanduser()
        d.mkdir(parents=True, exist_ok=True)
        save_file(
            {
                "patch_tokens": np.ascontiguousarray(self.patch_tokens, np.float32),
                "class_embeds": np.ascontiguousarray(self.class_embeds, np.float32),
                "text_prototypes": np.ascontiguousarray(self.text_prototypes, np.float32),
            },
            str(d / ARRAYS_FILE),
            metadata={"format": FORMAT_NAME},
        )
        meta = {
            "format": FORMAT_NAME,
            "category": self.category,
            "k": self.k,
            "backbone": self.backbone,
            "tap_layers": list(self.tap_layers),
            "num_patches": self.num_patches,
            "reference_files": list(self.reference_files),
        }
        (d / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike) -> ReferenceSet:
        """Read a directory written by :meth:`save`.

        Raises:
          FileNotFoundError: one of the two files is missing.
          ReferenceSetError: the files are not a reference set or are inconsistent.
        """
        from safetensors.numpy import load_file

        d = Path(directory).expanduser()
        for name in (META_FILE, ARRAYS_FILE):
            if not (d / name).is_file():
                raise FileNotFoundError(
                    f"{d / name} not found: a saved reference set is a directory with {META_FILE} and {ARRAYS_FILE}"
                )
        meta = json.loads((d / META_FILE).read_text())
        if meta.get("format") != FORMAT_NAME:
            raise ReferenceSetError(f"{d / META_FILE} is not a reference set (format {meta.get('format')!r})")
        arrays = load_file(str(d / ARRAYS_FILE))
        missing = {"patch_tokens", "class_embeds", "text_prototypes"} - set(arrays)
        if missing:
            raise ReferenceSetError(
                f"{d / ARRAYS_FILE} lacks {sorted(missing)}; build and save the set again"
            )
        return cls(
            category=meta["category"],
            patch_tokens=arrays["patch_tokens"],
            class_embeds=arrays["class_embeds"],
            text_prototypes=arrays["text_prototypes"],
            reference_files=list(meta["reference_files"]),
            backbone=meta["backbone"],
            tap_layers=tuple(meta["tap_layers"]),
            num_patches=int(meta["num_patches"]),
        )


def load_prompt_file(path: str | os.PathLike) -> np.ndarray:
    """Read an official few-shot prompt file (``torch.save`` of a list of K ``[3, S, S]`` tensors).

    The tensors are already preprocessed (CLIP-normalised). Needs torch
    (``pip install 'inctrl_jax[torch]'``).

    Returns:
      ``[K, S, S, 3]`` float32 (NHWC).

    Raises:
      ReferenceSetError: the file is not a list/tuple of ``[3, S, S]`` tensors (or a ``[K, 3, S, S]`` tensor).
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"prompt file {p} does not exist; pass the .pt file of the category")
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"reading {p} needs torch: install it with `pip install 'inctrl_jax[torch]'`, or pass the "
            "reference images as files instead"
        ) from e
    obj = torch.load(str(p), map_location="cpu", weights_only=True)
    items: Sequence
    if isinstance(obj, torch.Tensor) and obj.ndim == 4:
        items = list(obj)
    elif isinstance(obj, list | tuple):
        items = obj
    else:
        raise ReferenceSetError(
            f"{p} holds a {type(obj).__name__}; an InCTRL prompt file is a list of K preprocessed [3, S, S] tensors"
        )
    arrays = []
    for i, t in enumerate(items):
        if not isinstance(t, torch.Tensor) or t.ndim != 3 or t.shape[0] != 3:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ReferenceSetError(f"{p}: prompt {i} is {shape}, expected a [3, S, S] tensor")
        arrays.append(t.detach().to(torch.float32).numpy().transpose(1, 2, 0))
    if not arrays:
        raise ReferenceSetError(f"{p} holds no prompt images")
    return np.stack(arrays)
