"""The user-facing InCTRL detector.

Example::

    det = Detector.from_checkpoint("checkpoints/8/checkpoint.pyth")     # or a saved directory
    refs = det.build_reference_set(["good/000.png", "good/001.png"], category="transistor")
    refs.save("refs/transistor")                                       # reuse later: ReferenceSet.load
    results = det.score(["test/bent_lead/000.png"], refs)
    results[0].score, results[0].anomaly_map
    for r in det.iter_scores("huge_folder/", refs, return_maps=False):   # streams, flat memory
        print(r.source, r.score)

Scoring is batched and jit-compiled: one backbone forward per batch of queries, the last batch
padded to a fixed size so nothing recompiles; the reference set and its text prototypes are built
once and never recomputed per query. Query images are decoded and preprocessed one batch at a
time, so memory does not grow with the number of images; only the per-image results are kept.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import itertools
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from inctrl_jax.clip.model import CLIP, CLIPConfig
from inctrl_jax.data.layouts import DataError, Skipped
from inctrl_jax.data.preprocess import ImageDecodeError, open_image, preprocess_with_geometry
from inctrl_jax.model import checkpoint as ckpt
from inctrl_jax.model.prompts import prompt_ensembles
from inctrl_jax.model.reference import ReferenceSet, ReferenceSetError, load_prompt_file
from inctrl_jax.model.scoring import (
    DEFAULT_CHUNK,
    ScoreOutputs,
    l2_normalize,
    score_queries,
    text_prior,
    text_prototypes_from_embeds,
)

FITS = ("crop", "pad")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)

ImageInput = str | os.PathLike | np.ndarray | Any  # path, preprocessed array [S, S, 3], or PIL image


@dataclasses.dataclass
class ScoreResult:
    """The scores and maps of one query image.

    Attributes:
      score: final anomaly score; higher = more anomalous. Its meaning depends on ``mode``.
      s_p: patch score, max of the residual map (NaN when zero-shot).
      s_i: image-level score of the image head (NaN without trained heads or zero-shot).
      s_a: text prior, probability of the abnormal text prototype.
      residual_map: M on the patch grid, ``[g, g]`` (NaN when zero-shot).
      anomaly_map: M bilinearly upsampled to the input image: the original file's size for paths
        and PIL images (NaN on the border the centre crop removed), ``[S, S]`` for arrays;
        ``None`` when scored with ``return_maps=False``.
      mode: ``"inctrl"`` (trained heads: (h + s_p) / 2), ``"training_free"`` (no heads:
        (s_p + s_a) / 2) or ``"zero_shot"`` (no references: s_a).
      source: the file path, or ``"array[i]"``.
    """

    score: float
    s_p: float
    s_i: float
    s_a: float
    residual_map: np.ndarray
    anomaly_map: np.ndarray | None
    mode: str
    source: str

    @property
    def zero_shot(self) -> bool:
        """True when the score is the text prior alone (the reference set had no images)."""
        return self.mode == "zero_shot"


def _is_image_file(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_SUFFIXES


_GLOB_CHARS = frozenset("*?[")


def _is_glob(text: str) -> bool:
    return any(c in _GLOB_CHARS for c in text)


def _folder_images(folder: Path) -> list[Path]:
    """Image files anywhere under ``folder``, sorted by path; followed symlinks are visited once.

    Directory symlinks are followed, but a directory whose real path was already visited (a symlink
    loop, or two links to the same folder) is not entered again, so the walk always ends.
    """
    files: list[Path] = []
    seen: set[str] = set()
    for root, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()
        files.extend(Path(root) / n for n in names if _is_image_file(Path(n)) and (Path(root) / n).is_file())
    return sorted(files)


def _expand_path(item: str | os.PathLike) -> list[Path] | None:
    """A folder (recursively) or glob pattern as its sorted image files; ``None`` for a plain path.

    Raises:
      ValueError: a folder without image files.
      FileNotFoundError: a glob pattern that matches no image file.
    """
    text = os.fspath(item)
    p = Path(text).expanduser()
    if p.is_dir():
        files = _folder_images(p)
        if not files:
            raise ValueError(
                f"folder {p} contains no image files ({', '.join(IMAGE_SUFFIXES)}), also in its subfolders"
            )
        return files
    if not p.exists() and _is_glob(text):
        found: set[Path] = set()
        for match in glob.glob(os.path.expanduser(text), recursive=True):
            m = Path(match)
            if m.is_dir():
                found.update(_folder_images(m))
            elif m.is_file() and _is_image_file(m):
                found.add(m)
        if not found:
            raise FileNotFoundError(
                f"the pattern {text!r} matches no image files ({', '.join(IMAGE_SUFFIXES)}); check the pattern"
            )
        unique: dict[str, Path] = {}  # "**" follows directory symlinks: keep one path per real file
        for m in sorted(found, key=lambda f: (len(f.parts), f)):
            unique.setdefault(os.path.realpath(m), m)
        return sorted(unique.values())
    return None


def _check_fit(fit: str) -> None:
    if fit not in FITS:
        raise ValueError(f"fit={fit!r} is not supported; use 'crop' (the reference centre crop) or 'pad'")


def _check_finite(pixels: np.ndarray, sources: Sequence[str]) -> None:
    bad = ~np.isfinite(pixels).all(axis=(1, 2, 3))
    if bad.any():
        names = [sources[i] for i in np.flatnonzero(bad)[:5]]
        raise ValueError(f"NaN or Inf pixels in {', '.join(names)}; check the inputs")


class _DeviceReferences(NamedTuple):
    """A reference set's arrays on the device, made once per scoring call."""

    zero_shot: bool
    tokens: jax.Array | None
    embeds: jax.Array | None
    prototypes: jax.Array


class Detector:
    """InCTRL anomaly detector: a frozen CLIP backbone plus (optionally) the trained heads.

    Build one with :meth:`from_checkpoint` or :meth:`from_backbone`; then
    :meth:`build_reference_set` once per category and :meth:`score` any number of queries.

    Args:
      weights: backbone config and params, head variables (or ``None``), tap layers.
      backbone_id: name recorded in reference sets, so sets from another backbone are refused;
        default: :func:`backbone_fingerprint` (architecture name + a hash of the vision weights).
      batch_size: queries per backbone forward (the last batch is padded to this size); also the
        most query images held preprocessed at once while scoring.
      chunk: reference patches per step of the nearest-neighbour search (bounds memory).
      decode_threads: threads that decode and preprocess the images of one batch in parallel
        (1: in the calling thread). Decoding never runs ahead of the batch being scored.
      fit: how image files and PIL images become the square model input: ``"crop"`` (the
        reference: short side to S, centre crop; the cropped border is NaN in anomaly maps) or
        ``"pad"`` (long side to S, the short side padded with the mean colour: nothing of an
        elongated image is lost, maps cover the whole image). Use the same fit for the reference
        set and the queries; :meth:`build_reference_set`, :meth:`score` and :meth:`iter_scores`
        take a per-call ``fit`` too. Tiling elongated images (``preprocess_tiles``) is not yet
        available through the detector.

    Attributes:
      last_skipped: the files left out by the latest :meth:`score` / :meth:`iter_scores` call
        with ``on_error="skip"`` (:class:`inctrl_jax.data.Skipped`: ``path``, ``reason``);
        reset when such a call starts, complete once its results are exhausted.
    """

    def __init__(
        self,
        weights: ckpt.InCTRLWeights,
        *,
        backbone_id: str | None = None,
        batch_size: int = 8,
        chunk: int | None = DEFAULT_CHUNK,
        decode_threads: int = 1,
        fit: str = "crop",
    ) -> None:
        _check_fit(fit)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if decode_threads < 1:
            raise ValueError(f"decode_threads must be >= 1, got {decode_threads}")
        self.weights = weights
        self.backbone_id = backbone_id or backbone_fingerprint(weights.config, weights.clip_params)
        self.batch_size = int(batch_size)
        self.chunk = chunk
        self.decode_threads = int(decode_threads)
        self.fit = fit
        self.last_skipped: list[Skipped] = []
        self._model = CLIP(weights.config)
        self._clip_params = jax.tree.map(jnp.asarray, weights.clip_params)
        self._heads = (
            None if weights.head_variables is None else jax.tree.map(jnp.asarray, weights.head_variables)
        )
        self._prototype_cache: dict[str, np.ndarray] = {}
        taps = tuple(weights.tap_layers)
        model = self._model

        def encode(params, pixels):
            out = model.apply({"params": params}, pixels, taps, method=CLIP.encode_image)
            return out.embeds, out.taps[:, :, 1:]

        def score(params, heads, pixels, ref_tokens, ref_embeds, protos):
            embeds, tokens = encode(params, pixels)
            return score_queries(
                heads, tokens, embeds, ref_tokens, ref_embeds, protos, chunk=chunk, references_normalized=True
            )

        def zero_shot(params, pixels, protos):
            embeds, _ = encode(params, pixels)
            return jax.vmap(text_prior, in_axes=(0, None))(embeds, protos)

        def encode_text(params, ids):
            return model.apply({"params": params}, ids, method=CLIP.encode_text)

        self._encode = jax.jit(encode)
        self._score = jax.jit(score)
        self._zero_shot = jax.jit(zero_shot)
        self._encode_text = jax.jit(encode_text)

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        *,
        config: CLIPConfig | None = None,
        tap_layers: Sequence[int] = ckpt.DEFAULT_TAP_LAYERS,
        **kwargs: Any,
    ) -> Detector:
        """Load a trained detector: an official InCTRL checkpoint file or a directory saved by :meth:`save`.

        Args:
          path: ``checkpoint.pyth`` (torch pickle; needs torch), a safetensors copy of it, or a
            directory with ``config.json`` + ``model.safetensors``.
          config: backbone architecture for official files (inferred from shapes when ``None``).
          tap_layers: 1-based tapped blocks for official files (saved directories store theirs).
          **kwargs: ``batch_size``, ``chunk``, ``backbone_id``, ``decode_threads``, ``fit``.
        """
        p = Path(path).expanduser()
        if p.is_dir():
            weights = ckpt.load_model(p)
        else:
            weights = ckpt.load_official_checkpoint(p, config=config, tap_layers=tuple(tap_layers))
            if not weights.provenance:
                weights.provenance = {"backbone_weights": f"InCTRL checkpoint {p}", "real_result": True}
        return cls(weights, **kwargs)

    @classmethod
    def from_backbone(
        cls,
        name_or_path: str | os.PathLike,
        heads: dict[str, Any] | None = None,
        *,
        backbone: str | CLIPConfig | None = None,
        tag: str | None = None,
        tap_layers: Sequence[int] | None = None,
        **kwargs: Any,
    ) -> Detector:
        """A detector on a plain CLIP backbone (registry name, hub id, directory or file).

        Without ``heads`` it scores training-free: ``(s_p + s_a) / 2`` from the patch residuals and
        the text prior (results carry ``mode="training_free"``).

        Args:
          name_or_path: anything :func:`inctrl_jax.clip.loading.load_clip` accepts.
          heads: head variables ``{"params", "batch_stats"}`` (e.g. from training), or ``None``.
          backbone: architecture hint for sources without a config.
          tag: pretrained tag of a registry name.
          tap_layers: 1-based tapped blocks; default: the registry's, else (7, 9, 11).
          **kwargs: ``batch_size``, ``chunk``, ``backbone_id``, ``decode_threads``, ``fit``.
        """
        from inctrl_jax.clip.loading import load_clip
        from inctrl_jax.clip.registry import BACKBONES

        config, params = load_clip(name_or_path, backbone=backbone, tag=tag)
        if tap_layers is None:
            name = str(name_or_path)
            tap_layers = BACKBONES[name].tap_layers if name in BACKBONES else ckpt.DEFAULT_TAP_LAYERS
        provenance = {"backbone_weights": os.fspath(name_or_path), "real_result": True}
        weights = ckpt.InCTRLWeights(config, params, heads, tuple(tap_layers), provenance=provenance)
        return cls(weights, **kwargs)

    def save(self, directory: str | os.PathLike) -> Path:
        """Save backbone + heads as ``config.json`` + ``model.safetensors`` (load with :meth:`from_checkpoint`)."""
        return ckpt.save_model(directory, self.weights)

    def official_state_dict(self) -> dict[str, np.ndarray]:
        """The model as an official InCTRL state dict (PyTorch names and layouts, numpy arrays)."""
        return ckpt.to_official_state_dict(self.weights)

    @property
    def config(self) -> CLIPConfig:
        return self.weights.config

    @property
    def image_size(self) -> int:
        return self.weights.config.vision.image_size

    @property
    def has_heads(self) -> bool:
        return self.weights.head_variables is not None

    @property
    def provenance(self) -> dict[str, Any]:
        """Where the weights came from (``InCTRLWeights.provenance``): ``backbone_weights`` (a source
        id or ``"random"``) and ``real_result``; ``{}`` when unknown (older saved directories).
        :meth:`from_backbone` and official checkpoints record their source."""
        return self.weights.provenance

    @property
    def is_real_result(self) -> bool:
        """False when the provenance says the scores are not real (``real_result: false``, e.g. a
        model trained on a random backbone, or ``backbone_weights == "random"``); True otherwise,
        including unknown provenance."""
        prov = self.weights.provenance
        return bool(prov.get("real_result", True)) and prov.get("backbone_weights") != "random"

    # ---------------------------------------------------------------- inputs

    def load_images(
        self, images: ImageInput | Iterable[ImageInput], *, fit: str | None = None
    ) -> tuple[np.ndarray, list[str], list[Any]]:
        """Preprocess images into ``[N, S, S, 3]`` (all at once: meant for reference sets).

        Accepts a folder (the image files in it and in all its subfolders, sorted by path; symlink
        loops are entered once), a glob pattern (``"test/good/00*.png"``, ``"**"`` recursive;
        sorted), a file path, a list of any of these / PIL images / preprocessed ``[S, S, 3]``
        arrays, or one ``[N, S, S, 3]`` array. ``fit`` overrides the detector's ``fit``. Query images are
        better scored with :meth:`iter_scores` / :meth:`score`, which preprocess one batch at a time.

        Returns:
          ``(pixels, sources, geometries)``; a geometry is ``None`` for preprocessed arrays.

        Raises:
          ValueError: wrong array size, NaN/Inf pixels, a folder without images.
          FileNotFoundError: a path that does not exist, a glob pattern matching no image.
          ImageDecodeError: an image file that cannot be decoded (names the file).
        """
        fit = self._fit(fit)
        pixels: list[np.ndarray] = []
        sources: list[str] = []
        geoms: list[Any] = []
        for i, item in enumerate(self._expand(images)):
            arr, src, geom = self._load_item(i, item, fit)
            pixels.append(arr)
            sources.append(src)
            geoms.append(geom)
        s = self.image_size
        if not pixels:
            return np.zeros((0, s, s, 3), np.float32), [], []
        stacked = np.stack(pixels)
        _check_finite(stacked, sources)
        return stacked, sources, geoms

    def _fit(self, fit: str | None) -> str:
        if fit is None:
            return self.fit
        _check_fit(fit)
        return fit

    def _load_item(self, i: int, item: Any, fit: str = "crop") -> tuple[np.ndarray, str, Any]:
        """One input (path, PIL image or preprocessed array) -> ``(pixels [S,S,3], source, geometry)``."""
        s = self.image_size
        if isinstance(item, np.ndarray) or hasattr(item, "__jax_array__") or isinstance(item, jax.Array):
            arr = np.asarray(item, np.float32)
            if arr.shape != (s, s, 3):
                raise ValueError(
                    f"image array {i} has shape {arr.shape}; expected a preprocessed [{s}, {s}, 3] (NHWC) "
                    f"array, or pass the file path / PIL image and let the detector preprocess it"
                )
            return arr, f"array[{i}]", None
        if isinstance(item, str | os.PathLike):
            p = Path(item).expanduser()
            if not p.is_file():
                raise FileNotFoundError(f"image file {p} does not exist")
            arr, geom = self._preprocess_file(p, fit)
            return arr, str(p), geom
        arr, geom = self._preprocess_pil(item, fit)
        return arr, f"image[{i}]", geom

    @staticmethod
    def _expand(images: Any) -> list[Any]:
        return list(Detector._iter_inputs(images))

    @staticmethod
    def _iter_inputs(images: Any) -> Iterator[Any]:
        """The individual inputs, lazily for iterators and generators (nothing is decoded here).

        Paths in a list are checked up front, so a missing file fails before any scoring.
        """
        if isinstance(images, str | os.PathLike):
            files = _expand_path(images)
            return iter(files if files is not None else [Path(images).expanduser()])
        if isinstance(images, np.ndarray | jax.Array):
            arr = np.asarray(images)
            return iter(arr) if arr.ndim == 4 else iter([arr])  # rows are views: nothing is copied
        if hasattr(images, "convert") and hasattr(images, "size"):  # a single PIL image
            return iter([images])
        if isinstance(images, Sequence):
            if not any(isinstance(item, str | os.PathLike) for item in images):
                return iter(images)
            expanded: list[Any] = []
            for item in images:
                if isinstance(item, str | os.PathLike):
                    files = _expand_path(item)
                    if files is not None:
                        expanded.extend(files)
                        continue
                    if not Path(item).expanduser().is_file():
                        raise FileNotFoundError(f"image file {Path(item).expanduser()} does not exist")
                expanded.append(item)
            return iter(expanded)
        return Detector._expand_lazily(images)

    @staticmethod
    def _expand_lazily(images: Iterable[Any]) -> Iterator[Any]:
        """Folders and glob patterns met in a generator become their files as they are reached."""
        for item in images:
            files = _expand_path(item) if isinstance(item, str | os.PathLike) else None
            if files is None:
                yield item
            else:
                yield from files

    def _pixel_batches(
        self,
        images: ImageInput | Iterable[ImageInput],
        fit: str = "crop",
        on_error: str = "raise",
        skipped: list[Skipped] | None = None,
    ) -> Iterator[tuple[np.ndarray, list[str], list[Any]]]:
        """Fixed-shape ``[batch_size, S, S, 3]`` batches, decoded one batch at a time.

        Each batch is filled row by row in one buffer (padding rows repeat the last image), so at
        most ``batch_size`` preprocessed images exist at once, plus the one being decoded per thread.
        With ``on_error="skip"`` files that cannot be decoded are left out (warned about and appended
        to ``skipped``); the remaining rows of the batch move up.

        Yields:
          ``(pixels, sources, geometries)``; ``len(sources)`` rows of ``pixels`` are real.
        """
        items = self._iter_inputs(images)
        b, s = self.batch_size, self.image_size
        skip = on_error == "skip"
        pool = ThreadPoolExecutor(self.decode_threads) if self.decode_threads > 1 else None
        offset = 0
        try:
            while True:
                chunk = list(itertools.islice(items, b))
                if not chunk:
                    return
                buffer = np.empty((b, s, s, 3), np.float32)

                def fill(
                    j: int, item: Any, buffer: np.ndarray = buffer, offset: int = offset
                ) -> tuple[str, Any] | Skipped:
                    try:
                        arr, src, geom = self._load_item(offset + j, item, fit)
                    except (ImageDecodeError, DataError) as e:
                        if not skip or not isinstance(item, str | os.PathLike):
                            raise
                        return Skipped.from_error(item, e)
                    buffer[j] = arr
                    return src, geom

                jobs = range(len(chunk))
                done = list(pool.map(fill, jobs, chunk) if pool is not None else map(fill, jobs, chunk))
                offset += len(chunk)
                del chunk
                kept = [j for j, r in enumerate(done) if not isinstance(r, Skipped)]
                for r in done:
                    if isinstance(r, Skipped):
                        warnings.warn(f"skipped {r.path}: {r.reason}", stacklevel=3)
                        if skipped is not None:
                            skipped.append(r)
                if not kept:
                    continue
                if len(kept) < len(done):
                    buffer[: len(kept)] = buffer[kept]
                filled = [done[j] for j in kept]
                n = len(filled)
                buffer[n:] = buffer[n - 1]  # pad to a fixed shape so jit never recompiles
                sources = [src for src, _ in filled]  # type: ignore[misc]
                _check_finite(buffer[:n], sources)
                yield buffer, sources, [geom for _, geom in filled]  # type: ignore[misc]
                del buffer, fill  # free this batch before the next one is decoded
        finally:
            if pool is not None:
                pool.shutdown(wait=True)

    def _preprocess_pil(self, image: Any, fit: str = "crop") -> tuple[np.ndarray, Any]:
        return preprocess_with_geometry(image, self.image_size, fit)  # type: ignore[arg-type]

    def _preprocess_file(self, path: Path, fit: str = "crop") -> tuple[np.ndarray, Any]:
        image = open_image(path)
        try:
            return self._preprocess_pil(image, fit)
        except ValueError as e:  # e.g. an unsupported mode: name the file
            raise ImageDecodeError(f"{path}: {e}") from e

    # ---------------------------------------------------------------- features

    def _batches(self, pixels: np.ndarray) -> Iterator[tuple[np.ndarray, int]]:
        """Fixed-size float32 batches of an ``[N, S, S, 3]`` array (converted and checked per batch)."""
        b = self.batch_size
        for start in range(0, len(pixels), b):
            chunk = np.asarray(pixels[start : start + b], np.float32)
            n = len(chunk)
            if not np.isfinite(chunk).all():
                rows = start + np.flatnonzero(~np.isfinite(chunk).all(axis=(1, 2, 3)))
                raise ValueError(
                    f"NaN or Inf in the query pixels (rows {rows[:5].tolist()}); check the inputs"
                )
            if n < b:  # pad to a fixed shape so jit never recompiles
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], b - n, axis=0)])
            yield chunk, n

    def encode_images(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Class embeds ``[N, E]`` and patch tokens of the tapped layers ``[N, L, P, D]`` of preprocessed pixels."""
        embeds, tokens = [], []
        for chunk, n in self._batches(pixels):
            e, t = self._encode(self._clip_params, jnp.asarray(chunk))
            embeds.append(np.asarray(e[:n]))
            tokens.append(np.asarray(t[:n]))
        return np.concatenate(embeds), np.concatenate(tokens)

    def text_prototypes(self, category: str, token_ids: np.ndarray | None = None) -> np.ndarray:
        """``[g_n, g_a]`` of ``category`` (``[2, E]``), computed once per category and cached.

        Args:
          category: the category name (``_`` becomes a space in the prompts).
          token_ids: optional pre-tokenised ensemble ``[n_normal + n_abnormal, 77]`` in the order of
            :func:`~inctrl_jax.model.prompts.prompt_ensembles`; default: tokenise the prompts.
        """
        if token_ids is None and category in self._prototype_cache:
            return self._prototype_cache[category]
        normal, abnormal = prompt_ensembles(category)
        if token_ids is None:
            from inctrl_jax.clip.tokenizer import tokenize

            token_ids = tokenize(normal + abnormal, self.config.text.context_length)
        ids = np.asarray(token_ids, np.int32)
        if ids.shape[0] != len(normal) + len(abnormal):
            raise ValueError(
                f"token_ids has {ids.shape[0]} rows; {category!r} has {len(normal)} normal + "
                f"{len(abnormal)} abnormal prompts"
            )
        embeds = []
        b = 64
        for start in range(0, len(ids), b):
            part = ids[start : start + b]
            n = len(part)
            if n < b:
                part = np.concatenate([part, np.repeat(part[-1:], b - n, axis=0)])
            embeds.append(np.asarray(self._encode_text(self._clip_params, jnp.asarray(part)))[:n])
        emb = np.concatenate(embeds)
        protos = np.asarray(text_prototypes_from_embeds(emb[: len(normal)], emb[len(normal) :]))
        self._prototype_cache[category] = protos
        return protos

    # ---------------------------------------------------------------- reference sets

    def build_reference_set(
        self,
        images: ImageInput | Iterable[ImageInput],
        category: str,
        *,
        k: int | None = None,
        fit: str | None = None,
    ) -> ReferenceSet:
        """Encode K normal reference images of ``category`` once.

        Args:
          images: a folder, file paths, PIL images or preprocessed arrays (see :meth:`load_images`).
          category: the category name (also the text-prompt object).
          k: use the first ``k`` images (default: all).
          fit: ``"crop"`` or ``"pad"`` (default: the detector's ``fit``); use the queries' fit.

        Raises:
          ReferenceSetError: no images, or ``k`` larger than the number of images given.
        """
        pixels, sources, _ = self.load_images(images, fit=fit)
        if k is not None:
            if k < 1:
                raise ReferenceSetError(f"k must be >= 1 (got {k}); use zero_shot_reference_set() for K = 0")
            if k > len(pixels):
                raise ReferenceSetError(
                    f"k={k} reference images requested for {category!r} but only {len(pixels)} given"
                )
            pixels, sources = pixels[:k], sources[:k]
        if len(pixels) == 0:
            raise ReferenceSetError(
                f"empty reference set for {category!r}: pass at least one normal image, or call "
                "zero_shot_reference_set(category) to score with the text prior alone"
            )
        return self._reference_set_from_pixels(pixels, sources, category)

    def reference_set_from_prompt_file(self, path: str | os.PathLike, category: str) -> ReferenceSet:
        """A reference set from an official few-shot ``.pt`` file (list of preprocessed tensors; needs torch)."""
        pixels = load_prompt_file(path)
        s = self.image_size
        if pixels.shape[1:] != (s, s, 3):
            raise ReferenceSetError(
                f"{path}: prompts are {pixels.shape[1:3]} pixels, the backbone expects {s} x {s}"
            )
        if not np.isfinite(pixels).all():
            raise ReferenceSetError(f"{path}: NaN or Inf in the prompt tensors")
        return self._reference_set_from_pixels(pixels, [f"{path}[{i}]" for i in range(len(pixels))], category)

    def zero_shot_reference_set(self, category: str) -> ReferenceSet:
        """A K = 0 set: queries are scored by the text prior alone (``mode="zero_shot"``)."""
        cfg = self.config.vision
        protos = self.text_prototypes(category)
        return ReferenceSet(
            category=category,
            patch_tokens=np.zeros((len(self.weights.tap_layers), 0, cfg.width), np.float32),
            class_embeds=np.zeros((0, cfg.embed_dim), np.float32),
            text_prototypes=protos,
            reference_files=[],
            backbone=self.backbone_id,
            tap_layers=tuple(self.weights.tap_layers),
            num_patches=cfg.num_patches,
        )

    def _reference_set_from_pixels(
        self, pixels: np.ndarray, sources: list[str], category: str
    ) -> ReferenceSet:
        embeds, tokens = self.encode_images(pixels)
        k, n_layers, p, d = tokens.shape
        normalized = np.asarray(l2_normalize(jnp.asarray(tokens)))
        return ReferenceSet(
            category=category,
            patch_tokens=normalized.transpose(1, 0, 2, 3).reshape(n_layers, k * p, d),
            class_embeds=embeds,
            text_prototypes=self.text_prototypes(category),
            reference_files=list(sources),
            backbone=self.backbone_id,
            tap_layers=tuple(self.weights.tap_layers),
            num_patches=p,
        )

    def _check_reference_set(self, refs: ReferenceSet) -> None:
        cfg = self.config.vision
        problems = []
        if refs.backbone != self.backbone_id:
            problems.append(
                f"it was built with backbone {refs.backbone!r}, this detector is {self.backbone_id!r}"
            )
        if tuple(refs.tap_layers) != tuple(self.weights.tap_layers):
            problems.append(f"tap layers {refs.tap_layers} != {tuple(self.weights.tap_layers)}")
        if refs.num_patches != cfg.num_patches or refs.patch_tokens.shape[-1] != cfg.width:
            problems.append("its token shapes do not match the backbone")
        if problems:
            raise ReferenceSetError(
                f"reference set {refs.category!r} does not fit this detector: "
                + "; ".join(problems)
                + ". Build it again with this detector's build_reference_set()."
            )

    # ---------------------------------------------------------------- scoring

    def _score_batch(self, pixels: np.ndarray, n: int, refs: _DeviceReferences) -> ScoreOutputs:
        """Scores of one padded ``[batch_size, S, S, 3]`` batch; the first ``n`` rows as numpy."""
        if refs.zero_shot:
            s_a = np.asarray(self._zero_shot(self._clip_params, jnp.asarray(pixels), refs.prototypes))[:n]
            nan = np.full_like(s_a, np.nan)
            p, n_l = self.config.vision.num_patches, len(self.weights.tap_layers)
            nan_map = np.full((n, p), np.nan, np.float32)
            nan_e = np.full((n, self.config.vision.embed_dim), np.nan, np.float32)
            nan_layers = np.full((n, n_l, p), np.nan, np.float32)
            return ScoreOutputs(s_a, nan, nan, s_a, nan_map, nan_layers, nan_map, nan, nan_e, nan_e, None)
        out = self._score(
            self._clip_params, self._heads, jnp.asarray(pixels), refs.tokens, refs.embeds, refs.prototypes
        )
        return ScoreOutputs(*(np.asarray(a)[:n] for a in out[:-1]), None)  # type: ignore[call-arg]

    def _device_references(self, reference_set: ReferenceSet) -> _DeviceReferences:
        self._check_reference_set(reference_set)
        protos = jnp.asarray(reference_set.text_prototypes)
        if reference_set.zero_shot:
            return _DeviceReferences(True, None, None, protos)
        return _DeviceReferences(
            False, jnp.asarray(reference_set.patch_tokens), jnp.asarray(reference_set.class_embeds), protos
        )

    def predict(self, pixels: np.ndarray, reference_set: ReferenceSet) -> ScoreOutputs:
        """Batched scores of preprocessed ``[N, S, S, 3]`` pixels as numpy arrays (no upsampled maps).

        The pixels are read one batch at a time (converted to float32 and checked per batch), so no
        copy of the whole input is made. Zero-shot sets give ``score = s_a`` and NaN for everything else.
        """
        refs = self._device_references(reference_set)
        pixels = np.asarray(pixels)
        s = self.image_size
        if pixels.ndim != 4 or pixels.shape[1:] != (s, s, 3):
            raise ValueError(f"pixels must be [N, {s}, {s}, 3] (preprocessed, NHWC), got {pixels.shape}")
        if len(pixels) == 0:
            raise ValueError("no query images given")
        outs = [self._score_batch(chunk, n, refs) for chunk, n in self._batches(pixels)]
        fields = [np.concatenate(parts) for parts in zip(*(o[:-1] for o in outs), strict=True)]
        return ScoreOutputs(*fields, None)  # type: ignore[call-arg]

    def iter_scores(
        self,
        images: ImageInput | Iterable[ImageInput],
        reference_set: ReferenceSet,
        *,
        return_maps: bool = True,
        fit: str | None = None,
        on_error: str = "raise",
    ) -> Iterator[ScoreResult]:
        """Score query images as a stream: one :class:`ScoreResult` per image, in input order.

        Images are decoded and preprocessed one fixed-size batch at a time (``batch_size`` rows,
        the last one padded), scored, and the batch is dropped before the next one is read, so
        memory stays flat however many images there are. ``images`` may be a generator; it is
        consumed one batch ahead of the results at most.

        Args:
          images: a folder, file paths, PIL images, preprocessed ``[S, S, 3]`` arrays (a list or any
            iterable) or one ``[N, S, S, 3]`` array.
          reference_set: from :meth:`build_reference_set` (or :meth:`zero_shot_reference_set`).
          return_maps: also upsample the residual map to each input's size (``anomaly_map``); with
            ``False`` results carry ``anomaly_map=None`` (the small ``residual_map`` is kept).
          fit: ``"crop"`` or ``"pad"`` for this call (default: the detector's ``fit``); maps are
            projected back onto the original image either way.
          on_error: ``"raise"`` (default): an image file that cannot be decoded (unreadable,
            corrupt, truncated, not an image) raises :class:`~inctrl_jax.data.ImageDecodeError`.
            ``"skip"``: such files get no result; each is warned about (``UserWarning`` naming the
            file) and listed in :attr:`last_skipped`. Missing paths, NaN pixels and wrong array
            shapes still raise.

        Raises:
          ValueError: no images, a wrong array size or NaN/Inf pixels (when that batch is reached).
          FileNotFoundError: a path that does not exist, a glob pattern matching no image.
          ImageDecodeError: an undecodable image file with ``on_error="raise"``.
          ReferenceSetError: the reference set was built with another backbone.
        """
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        fit = self._fit(fit)
        skipped: list[Skipped] = []
        self.last_skipped = skipped
        return self._iter_scores(images, reference_set, return_maps, fit, on_error, skipped)

    def _iter_scores(
        self,
        images: ImageInput | Iterable[ImageInput],
        reference_set: ReferenceSet,
        return_maps: bool,
        fit: str,
        on_error: str,
        skipped: list[Skipped],
    ) -> Iterator[ScoreResult]:
        refs = self._device_references(reference_set)
        mode = "zero_shot" if reference_set.zero_shot else ("inctrl" if self.has_heads else "training_free")
        g = self.config.vision.grid_size
        scored = 0
        for pixels, sources, geoms in self._pixel_batches(images, fit, on_error, skipped):
            out = self._score_batch(pixels, len(sources), refs)
            del pixels
            for i, src in enumerate(sources):
                grid = np.array(out.residual_map[i], np.float32).reshape(g, g)  # a copy: frees the batch
                yield ScoreResult(
                    score=float(out.score[i]),
                    s_p=float(out.s_p[i]),
                    s_i=float(out.s_i[i]),
                    s_a=float(out.s_a[i]),
                    residual_map=grid,
                    anomaly_map=self._upsample(grid, geoms[i]) if return_maps else None,
                    mode=mode,
                    source=src,
                )
            scored += len(sources)
        if scored == 0:
            if skipped:
                raise ValueError(f"no query image could be read: all {len(skipped)} were skipped")
            raise ValueError("no query images given")

    def score(
        self,
        images: ImageInput | Iterable[ImageInput],
        reference_set: ReferenceSet,
        *,
        return_maps: bool = True,
        fit: str | None = None,
        on_error: str = "raise",
    ) -> list[ScoreResult]:
        """Score query images against a reference set (streamed: see :meth:`iter_scores`).

        Args:
          images: a folder, file paths, PIL images, preprocessed ``[S, S, 3]`` arrays or one
            ``[N, S, S, 3]`` array.
          reference_set: from :meth:`build_reference_set` (or :meth:`zero_shot_reference_set`).
          return_maps: keep the full-size ``anomaly_map`` of every image (``False`` for huge runs).
          fit: ``"crop"`` or ``"pad"`` for this call (default: the detector's ``fit``).
          on_error: ``"raise"`` or ``"skip"`` (undecodable files left out, listed in
            :attr:`last_skipped`); see :meth:`iter_scores`.

        Returns:
          One :class:`ScoreResult` per image scored, in input order.
        """
        return list(
            self.iter_scores(images, reference_set, return_maps=return_maps, fit=fit, on_error=on_error)
        )

    def _upsample(self, grid: np.ndarray, geometry: Any) -> np.ndarray:
        s = self.image_size
        if geometry is not None:
            from inctrl_jax.data.preprocess import project_to_original

            return project_to_original(grid, geometry)[0]
        return np.asarray(jax.image.resize(jnp.asarray(grid), (s, s), method="bilinear"))


@functools.lru_cache(maxsize=32)
def _registry_match(config: CLIPConfig) -> str | None:
    from inctrl_jax.clip.registry import BACKBONES

    for name, b in BACKBONES.items():
        if b.config == config:
            return name
    return None


def _config_id(config: CLIPConfig) -> str:
    """A readable backbone id: the registry name if the config is registered, else its shape."""
    name = _registry_match(config)
    if name is not None:
        return name
    v, t = config.vision, config.text
    return (
        f"vit{v.width}x{v.layers}h{v.heads}-p{v.patch_size}-{v.image_size}-e{v.embed_dim}-{v.act}"
        f"_text{t.width}x{t.layers}h{t.heads}"
    )


def backbone_fingerprint(config: CLIPConfig, clip_params: dict[str, Any]) -> str:
    """``<architecture>@<hash>``: the registry name (or shape) plus a hash of the patch embedding and
    class token, so reference sets built with other weights of the same architecture are refused."""
    import hashlib

    v = clip_params["visual"]
    digest = hashlib.sha1()
    for arr in (v["patch_embed"]["kernel"], v["class_embedding"], v["proj"]["kernel"]):
        digest.update(np.ascontiguousarray(np.asarray(arr, np.float32)).tobytes())
    return f"{_config_id(config)}@{digest.hexdigest()[:12]}"
