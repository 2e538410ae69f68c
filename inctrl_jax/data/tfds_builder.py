"""Optional tensorflow-datasets builder for MVTec-layout data, TF-free.

Needs the ``tfds`` extra (``pip install 'inctrl_jax[tfds]'``); tensorflow itself is never needed:
the builder always writes ``array_record`` files and is read with ``as_data_source()`` (random
access, usable directly as a grain source). ``as_dataset()`` is not supported by array_record.

Example::

    from inctrl_jax.data.tfds_builder import build_mvtec_data_source
    sources = build_mvtec_data_source("/data/mvtec", data_dir="/tmp/tfds", categories=["bottle"])
    record = sources["test"][0]  # {"image": uint8 [H,W,3], "mask": uint8 [H,W,1], "label", ...}

Images are stored as RGB PNG (decode-time preprocessing should still use
:mod:`inctrl_jax.data.preprocess` on the decoded array for reference parity of colour images; for
grayscale datasets use the folder pipeline, since the reference resizes them in ``L`` mode).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any


def _tfds() -> Any:
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError(
            "inctrl_jax.data.tfds_builder needs tensorflow-datasets: pip install 'inctrl_jax[tfds]' "
            "(tensorflow is not needed; the builder writes array_record files)"
        ) from e
    return tfds


def _png(image: Any) -> Any:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    buf.seek(0)
    return buf


def make_builder_class() -> type:
    """Create the ``MvtecLayout`` builder class (done lazily so that importing this module needs no tfds)."""
    tfds = _tfds()
    import numpy as np
    from PIL import Image

    from inctrl_jax.data.layouts import scan_mvtec

    base: Any = tfds.core.GeneratorBasedBuilder

    class MvtecLayout(base):
        """MVTec-layout anomaly-detection data (any MVTec-like tree)."""

        VERSION = tfds.core.Version("1.0.0")

        def __init__(self, *, root: str, categories: Sequence[str] | None = None, **kwargs: Any):
            self._root, self._categories = root, categories
            kwargs.setdefault("file_format", "array_record")
            super().__init__(**kwargs)

        def _info(self) -> Any:
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Image(shape=(None, None, 3)),
                        "mask": tfds.features.Image(shape=(None, None, 1)),
                        "label": tfds.features.ClassLabel(names=["normal", "anomalous"]),
                        "category": tfds.features.Text(),
                        "defect_type": tfds.features.Text(),
                        "path": tfds.features.Text(),
                    }
                ),
            )

        def _split_generators(self, dl_manager: Any) -> Any:
            ds = scan_mvtec(self._root, self._categories)
            return {split: self._generate_examples(ds.select(split=split)) for split in ("train", "test")}

        def _generate_examples(self, samples: Any) -> Any:
            for s in samples:
                with Image.open(s.path) as im:
                    image = im.convert("RGB")
                mask = np.zeros((image.height, image.width), np.uint8)
                if s.mask_path:
                    with Image.open(s.mask_path) as m:
                        mask = (np.asarray(m.convert("L")) > 0).astype(np.uint8) * 255
                yield (
                    s.path,
                    {
                        # Encoded here with PIL: tfds encodes numpy arrays with TensorFlow.
                        "image": _png(image),
                        "mask": _png(Image.fromarray(mask, mode="L")),
                        "label": s.label,
                        "category": s.category,
                        "defect_type": s.defect_type,
                        "path": s.path,
                    },
                )

    return MvtecLayout


def build_mvtec_data_source(
    root: str | os.PathLike[str],
    data_dir: str | os.PathLike[str],
    categories: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Prepare (once) and open an MVTec-layout tree as TFDS array_record data sources per split."""
    builder = make_builder_class()(root=os.fspath(root), categories=categories, data_dir=os.fspath(data_dir))
    builder.download_and_prepare()
    return builder.as_data_source()
