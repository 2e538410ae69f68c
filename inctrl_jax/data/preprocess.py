"""Image decoding and preprocessing identical to the InCTRL reference transform.

The reference transform (official train and test code) is, in this order:

1. ``PIL.Image.open(path)`` in the file's native mode;
2. resize the shorter side to ``S`` with PIL bicubic, the longer side to ``int(S * long / short)``
   (truncation; skipped when the image already has that size);
3. centre crop ``S x S`` with ``top = int(round((h - S) / 2.0))`` (left likewise);
4. ``convert("RGB")`` *after* the resize, so grayscale images are resized in mode ``L``;
5. ``/ 255`` and CLIP mean/std normalisation, in float32.

:func:`preprocess` reproduces it bit for bit with PIL and numpy (NHWC output). Two additions keep
users' data usable without changing the reference path for ordinary 8-bit images:

* **EXIF orientation** is applied first (a no-op for files without an orientation tag, which is
  every image the reference was evaluated on).
* **16-bit and 32-bit integer images** (modes ``I;16*`` and ``I``) are scaled by their bit depth to
  8-bit ``L`` before step 2 (``round(v * 255 / (2**bits - 1))``). The bit depth is 16 for
  ``I;16*``; for ``I`` it is the TIFF ``BitsPerSample`` tag when present, otherwise 16 when every
  value fits in 16 bits (the usual 16-bit PNG) and 32 otherwise. Pass ``bit_depth`` to override it,
  e.g. ``12`` for 12-bit sensor data stored in 16-bit files. PIL's own conversion would clip every
  value above 255 instead, which turns most 16-bit images white.

Modes ``1`` and ``P`` are resized by PIL with nearest-neighbour regardless of the requested filter;
this is what the reference does too and is kept for parity.

Non-square images lose the border of their longer side in the reference centre crop. Two options
keep the whole image:

* ``fit="pad"``: resize the longer side to ``S`` and pad the shorter side symmetrically (padding is 0
  after normalisation, i.e. the CLIP mean colour). Same cost as the reference (one forward pass per
  image) but fewer pixels per object for elongated images.
* :func:`preprocess_tiles`: resize the shorter side to ``S`` (as the reference) and cover the longer
  side with ``ceil(long / S)`` overlapping ``S x S`` tiles. Cost: one forward pass per tile (a
  200 x 5000 line-scan image becomes 25 tiles). Score each tile, then bring per-tile maps back with
  :func:`stitch_tile_maps` (and take e.g. the max over tile scores as the image score).

Every function that changes geometry also returns a :class:`Geometry`, so masks follow the image
exactly (:func:`preprocess_mask`, nearest-neighbour and binarised) and anomaly maps computed on the
model input can be projected back onto the original image with :func:`project_to_original`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)

Fit = Literal["crop", "pad"]

_TIFF_BITS_PER_SAMPLE = 258


class ImageDecodeError(ValueError):
    """An image file could not be opened or decoded; the message names the file."""


@dataclasses.dataclass(frozen=True)
class Geometry:
    """How a model input of ``size x size`` pixels relates to the original image.

    The original image (``orig_w x orig_h``) is resized to ``resized_w x resized_h``; model input
    pixel ``(x, y)`` is resized-image pixel ``(x + origin_x, y + origin_y)``. A centre crop has a
    non-negative origin, padding a negative one.
    """

    orig_w: int
    orig_h: int
    resized_w: int
    resized_h: int
    origin_x: int
    origin_y: int
    size: int

    def valid_region(self) -> np.ndarray:
        """Boolean ``[size, size]`` mask of model-input pixels that come from the image (not padding)."""
        ys = np.arange(self.size) + self.origin_y
        xs = np.arange(self.size) + self.origin_x
        return ((ys >= 0) & (ys < self.resized_h))[:, None] & ((xs >= 0) & (xs < self.resized_w))[None, :]


def open_image(path: str | os.PathLike[str]) -> Image.Image:
    """Open and fully decode an image file in its native mode.

    Args:
        path: image file.

    Returns:
        The decoded PIL image (EXIF orientation not yet applied).

    Raises:
        ImageDecodeError: the file is missing, empty, unreadable, truncated or not an image.
    """
    path = os.fspath(path)
    try:
        if os.path.isfile(path) and os.path.getsize(path) == 0:
            raise ImageDecodeError(f"{path}: the file is empty (0 bytes); replace or remove it")
        image = Image.open(path)
        try:
            image.load()  # decode now so truncated data fails here, naming the file
        except BaseException:
            image.close()  # do not leak the file handle of a file that failed to decode
            raise
        return image
    except ImageDecodeError:
        raise
    except FileNotFoundError as e:
        raise ImageDecodeError(f"{path}: no such image file; check the path") from e
    except PermissionError as e:
        raise ImageDecodeError(
            f"{path}: permission denied while reading the image; check its permissions"
        ) from e
    except IsADirectoryError as e:
        raise ImageDecodeError(f"{path}: is a directory, not an image file") from e
    except UnidentifiedImageError as e:
        raise ImageDecodeError(f"{path}: not a recognised image format (corrupt or not an image)") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageDecodeError(
            f"{path}: image data is truncated or corrupt ({e}); replace or remove it"
        ) from e


def _bit_depth(image: Image.Image, values: np.ndarray) -> int:
    if image.mode.startswith("I;16"):
        return 16
    tag = getattr(image, "tag_v2", None)
    if tag is not None and _TIFF_BITS_PER_SAMPLE in tag:
        bits = tag[_TIFF_BITS_PER_SAMPLE]
        bits = bits[0] if isinstance(bits, tuple) else bits
        return int(bits)
    if values.size and values.min() >= 0 and values.max() <= 0xFFFF:
        return 16
    return 32


def to_8bit(image: Image.Image, bit_depth: int | None = None) -> Image.Image:
    """Bring a high-bit-depth image to an 8-bit mode that the reference path accepts.

    ``I;16*`` and ``I`` images become ``L`` scaled by their bit depth (see the module docstring);
    ``F`` (float) images are accepted when their values lie in [0, 1] (scaled by 255). Every other mode
    is returned unchanged.

    Args:
        image: a decoded PIL image.
        bit_depth: override of the bit depth of integer images (e.g. 12).

    Returns:
        The image, 8-bit.

    Raises:
        ValueError: a float image with values outside [0, 1], or an unsupported mode.
    """
    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(image).astype(np.float64)
        bits = bit_depth if bit_depth is not None else _bit_depth(image, values)
        scaled = np.rint(np.clip(values, 0, 2**bits - 1) * (255.0 / (2**bits - 1)))
        return Image.fromarray(scaled.astype(np.uint8), mode="L")
    if mode == "F":
        values = np.asarray(image).astype(np.float64)
        if values.size and (values.min() < 0 or values.max() > 1):
            raise ValueError(
                f"float image (mode F) with values in [{values.min()}, {values.max()}]; only [0, 1] is "
                "supported: rescale it to [0, 1] or save it as 8/16-bit"
            )
        return Image.fromarray(np.rint(values * 255).astype(np.uint8), mode="L")
    if mode in (
        "1",
        "L",
        "LA",
        "P",
        "PA",
        "RGB",
        "RGBA",
        "RGBX",
        "CMYK",
        "YCbCr",
        "LAB",
        "HSV",
        "La",
        "RGBa",
    ):
        return image
    raise ValueError(f"unsupported PIL image mode {mode!r}; convert the image to 8-bit RGB or L")


def _prepare(image: Image.Image, exif_transpose: bool, bit_depth: int | None) -> Image.Image:
    if exif_transpose:
        image = ImageOps.exif_transpose(image)
    return to_8bit(image, bit_depth)


def _short_side_size(w: int, h: int, size: int) -> tuple[int, int]:
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    return (size, new_long) if w <= h else (new_long, size)


def _long_side_size(w: int, h: int, size: int) -> tuple[int, int]:
    short, long = (w, h) if w <= h else (h, w)
    new_short = max(1, int(size * short / long))
    return (new_short, size) if w <= h else (size, new_short)


def _resize(image: Image.Image, wh: tuple[int, int], resample: Image.Resampling) -> Image.Image:
    if image.size == wh:
        return image
    return image.resize(wh, resample)


def _normalise(rgb: Image.Image) -> np.ndarray:
    x = np.asarray(rgb, dtype=np.uint8).astype(np.float32) / np.float32(255.0)
    return (x - CLIP_MEAN) / CLIP_STD


def _geometry(image: Image.Image, size: int, fit: Fit) -> Geometry:
    w, h = image.size
    if fit == "crop":
        rw, rh = _short_side_size(w, h, size)
        return Geometry(w, h, rw, rh, int(round((rw - size) / 2.0)), int(round((rh - size) / 2.0)), size)
    if fit == "pad":
        rw, rh = _long_side_size(w, h, size)
        return Geometry(w, h, rw, rh, -((size - rw) // 2), -((size - rh) // 2), size)
    raise ValueError(f"fit={fit!r} is not supported; use 'crop' (reference) or 'pad'")


def _apply(image: Image.Image, geom: Geometry, resample: Image.Resampling, fill: int = 0) -> Image.Image:
    resized = _resize(image, (geom.resized_w, geom.resized_h), resample)
    box = (geom.origin_x, geom.origin_y, geom.origin_x + geom.size, geom.origin_y + geom.size)
    if box == (0, 0, resized.width, resized.height):
        return resized
    if geom.origin_x >= 0 and geom.origin_y >= 0:
        return resized.crop(box)
    canvas = Image.new(resized.mode, (geom.size, geom.size), fill)
    canvas.paste(resized, (-geom.origin_x, -geom.origin_y))
    return canvas


def preprocess_with_geometry(
    image: Image.Image,
    image_size: int = 240,
    fit: Fit = "crop",
    *,
    exif_transpose: bool = True,
    bit_depth: int | None = None,
) -> tuple[np.ndarray, Geometry]:
    """Preprocess one image and say where its pixels came from.

    Args:
        image: a PIL image in any supported mode.
        image_size: side ``S`` of the square model input.
        fit: ``"crop"`` (reference: short side to S, centre crop) or ``"pad"`` (long side to S, pad).
        exif_transpose: apply the EXIF orientation tag first.
        bit_depth: override of the bit depth of 16/32-bit integer images.

    Returns:
        ``(pixels [S, S, 3] float32, geometry)``. With ``fit="pad"`` the padding is 0 (mean colour).
    """
    image = _prepare(image, exif_transpose, bit_depth)
    geom = _geometry(image, image_size, fit)
    out = _apply(image, geom, Image.Resampling.BICUBIC)
    pixels = _normalise(out.convert("RGB"))
    if fit == "pad":
        pixels = np.where(geom.valid_region()[..., None], pixels, np.float32(0.0)).astype(np.float32)
    return pixels, geom


def preprocess(image: Image.Image, image_size: int = 240, fit: Fit = "crop", **kwargs: object) -> np.ndarray:
    """Preprocess one PIL image exactly like the reference (``fit="crop"``).

    Args:
        image: a PIL image in any supported mode (see the module docstring).
        image_size: side ``S`` of the square model input.
        fit: ``"crop"`` (reference) or ``"pad"`` (keeps the whole image).
        **kwargs: ``exif_transpose`` and ``bit_depth`` of :func:`preprocess_with_geometry`.

    Returns:
        ``[S, S, 3]`` float32, CLIP-normalised RGB (NHWC without the batch axis).
    """
    return preprocess_with_geometry(image, image_size, fit, **kwargs)[0]  # type: ignore[arg-type]


def load_image(
    path: str | os.PathLike[str], image_size: int = 240, fit: Fit = "crop", **kwargs: object
) -> np.ndarray:
    """Open ``path`` and :func:`preprocess` it.

    Raises:
        ImageDecodeError: the file cannot be decoded (message names the file).
    """
    image = open_image(path)
    try:
        return preprocess(image, image_size, fit, **kwargs)
    except ValueError as e:
        raise ImageDecodeError(f"{os.fspath(path)}: {e}") from e


def tile_geometries(w: int, h: int, image_size: int = 240) -> list[Geometry]:
    """Tiles covering an image of ``w x h`` after the reference short-side resize.

    The longer side is covered by ``ceil(long / S)`` tiles of ``S x S``, evenly spaced from the first
    to the last pixel (they overlap when ``long`` is not a multiple of ``S``). A square image gives the
    single reference crop.
    """
    rw, rh = _short_side_size(w, h, image_size)
    long = max(rw, rh)
    n = max(1, math.ceil(long / image_size))
    if n == 1:
        starts = [int(round((long - image_size) / 2.0))]
    else:
        starts = [round(i * (long - image_size) / (n - 1)) for i in range(n)]
    if rw >= rh:
        return [Geometry(w, h, rw, rh, s, 0, image_size) for s in starts]
    return [Geometry(w, h, rw, rh, 0, s, image_size) for s in starts]


def preprocess_tiles(
    image: Image.Image,
    image_size: int = 240,
    *,
    exif_transpose: bool = True,
    bit_depth: int | None = None,
) -> tuple[np.ndarray, list[Geometry]]:
    """Cover the whole (resized) image with overlapping ``S x S`` tiles.

    Returns:
        ``(tiles [T, S, S, 3] float32, one Geometry per tile)``; feed the tiles as a batch of queries.
    """
    image = _prepare(image, exif_transpose, bit_depth)
    geoms = tile_geometries(image.width, image.height, image_size)
    resized = _resize(image, (geoms[0].resized_w, geoms[0].resized_h), Image.Resampling.BICUBIC)
    tiles = []
    for g in geoms:
        tile = resized.crop((g.origin_x, g.origin_y, g.origin_x + image_size, g.origin_y + image_size))
        tiles.append(_normalise(tile.convert("RGB")))
    return np.stack(tiles), geoms


def binarise_mask(mask: Image.Image) -> np.ndarray:
    """A mask image as a boolean array: every non-zero pixel is anomalous.

    Non-zero rather than >= 128 because VisA stores small class ids (1, 2, ...) in its masks.
    """
    mask = to_8bit(mask)
    if mask.mode != "L":
        mask = mask.convert("L")
    return np.asarray(mask) > 0


def preprocess_mask(mask: Image.Image, geometry: Geometry, *, exif_transpose: bool = True) -> np.ndarray:
    """Apply an image's geometry to its ground-truth mask (nearest-neighbour, then binarised).

    Args:
        mask: the mask image; it must have the size of the original image.
        geometry: the image's :class:`Geometry` (from :func:`preprocess_with_geometry` or a tile).
        exif_transpose: apply the mask's EXIF orientation first (as for the image).

    Returns:
        ``[S, S]`` uint8 in {0, 1}; padding is 0.

    Raises:
        ValueError: the mask size differs from the image size.
    """
    if exif_transpose:
        mask = ImageOps.exif_transpose(mask)
    if mask.size != (geometry.orig_w, geometry.orig_h):
        raise ValueError(
            f"mask is {mask.width}x{mask.height} but its image is {geometry.orig_w}x{geometry.orig_h}; "
            "masks must have exactly the size of their image"
        )
    binary = Image.fromarray(binarise_mask(mask).astype(np.uint8) * 255, mode="L")
    out = _apply(binary, geometry, Image.Resampling.NEAREST)
    return (np.asarray(out) >= 128).astype(np.uint8)


def load_mask(path: str | os.PathLike[str], geometry: Geometry) -> np.ndarray:
    """Open a mask file and :func:`preprocess_mask` it; errors name the file."""
    image = open_image(path)
    try:
        return preprocess_mask(image, geometry)
    except ValueError as e:
        raise ImageDecodeError(f"{os.fspath(path)}: {e}") from e


def _interp_axis(n_out: int, n_orig: int, n_resized: int, origin: int, n_canvas: int, n_map: int):
    """Map-space sample coordinates of the original pixel centres along one axis, plus validity."""
    resized = (np.arange(n_out) + 0.5) * (n_resized / n_orig) - 0.5
    canvas = resized - origin
    inside = (canvas >= -0.5) & (canvas <= n_canvas - 0.5)
    coord = np.clip((canvas + 0.5) * (n_map / n_canvas) - 0.5, 0, n_map - 1)
    lo = np.floor(coord).astype(np.int64)
    hi = np.minimum(lo + 1, n_map - 1)
    frac = (coord - lo).astype(np.float64)
    return lo, hi, frac, inside


def project_to_original(
    anomaly_map: np.ndarray, geometry: Geometry, fill: float = float("nan")
) -> tuple[np.ndarray, np.ndarray]:
    """Project a map computed on the model input back onto the original image (inverse resize + crop).

    ``anomaly_map`` may have any resolution (e.g. the 15 x 15 patch grid or S x S); it is taken to
    cover the whole model input and sampled bilinearly at the centres of the original pixels.

    Args:
        anomaly_map: ``[mh, mw]`` map over the model input.
        geometry: the input's :class:`Geometry`.
        fill: value for original pixels that the model never saw (the cropped-away border).

    Returns:
        ``(map [orig_h, orig_w] float32, seen [orig_h, orig_w] bool)``; ``seen`` is False on the
        cropped border (where the map holds ``fill``).
    """
    m = np.asarray(anomaly_map, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError(f"anomaly_map must be 2-D [h, w], got shape {m.shape}")
    g = geometry
    y0, y1, fy, vy = _interp_axis(g.orig_h, g.orig_h, g.resized_h, g.origin_y, g.size, m.shape[0])
    x0, x1, fx, vx = _interp_axis(g.orig_w, g.orig_w, g.resized_w, g.origin_x, g.size, m.shape[1])
    top = m[y0][:, x0] * (1 - fx) + m[y0][:, x1] * fx
    bottom = m[y1][:, x0] * (1 - fx) + m[y1][:, x1] * fx
    out = top * (1 - fy)[:, None] + bottom * fy[:, None]
    seen = vy[:, None] & vx[None, :]
    out = np.where(seen, out, fill)
    return out.astype(np.float32), seen


def stitch_tile_maps(
    tile_maps: Sequence[np.ndarray] | np.ndarray,
    geometries: Sequence[Geometry],
    fill: float = float("nan"),
) -> tuple[np.ndarray, np.ndarray]:
    """Stitch per-tile maps (from :func:`preprocess_tiles`) into one map over the original image.

    Overlapping tiles are averaged. Returns ``(map [orig_h, orig_w] float32, seen bool)``.
    """
    if len(tile_maps) != len(geometries) or not geometries:
        raise ValueError(f"got {len(tile_maps)} tile maps for {len(geometries)} tiles; pass one map per tile")
    total = np.zeros((geometries[0].orig_h, geometries[0].orig_w), np.float64)
    count = np.zeros_like(total)
    for m, g in zip(tile_maps, geometries, strict=True):
        proj, seen = project_to_original(m, g, fill=0.0)
        total += np.where(seen, proj, 0.0)
        count += seen
    seen_any = count > 0
    out = np.where(seen_any, total / np.maximum(count, 1), fill)
    return out.astype(np.float32), seen_any
