"""``inctrl-convert``: turn any supported CLIP/InCTRL checkpoint into one safetensors file.

Usage::

    inctrl-convert SRC OUT.safetensors [--backbone NAME] [--tag TAG]
    python -m inctrl_jax.clip.cli SRC OUT.safetensors

SRC is anything :func:`inctrl_jax.clip.loading.load_clip` accepts (a PyTorch pickle, a transformers
directory, a hub id or a registry name). The tensors are written under their original names (an
InCTRL checkpoint keeps its head keys), after checking that the backbone converts strictly. The
resolved architecture is stored in the file's metadata, so loading OUT later needs neither torch
nor ``--backbone``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from inctrl_jax.clip.convert import ConversionError
from inctrl_jax.clip.loading import (
    BACKBONES,
    CONFIG_METADATA_KEY,
    CheckpointError,
    load_clip,
    read_state_dict,
    resolve_source,
)


def convert_checkpoint(
    src: str | os.PathLike, out: str | os.PathLike, *, backbone: str | None = None, tag: str | None = None
) -> Path:
    """Write the checkpoint ``src`` as a safetensors file ``out``; return the path written.

    Raises:
      CheckpointError / ConversionError: ``src`` cannot be read or does not fit its architecture.
    """
    out_path = Path(out)
    if out_path.suffix != ".safetensors":
        raise CheckpointError(f"the output {out_path} must end in .safetensors.")
    config, _ = load_clip(src, backbone=backbone, tag=tag)  # strict check and config resolution
    files = resolve_source(src, tag=tag)
    sd: dict[str, np.ndarray] = {}
    for f in files:
        sd.update(read_state_dict(f))
    sd = {k: np.ascontiguousarray(v) for k, v in sd.items()}
    from safetensors.numpy import save_file

    out_path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": "pt",
        CONFIG_METADATA_KEY: json.dumps(dataclasses.asdict(config)),
        "source": os.fspath(src),
    }
    save_file(sd, str(out_path), metadata=meta)
    return out_path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="inctrl-convert",
        description="Convert a CLIP or InCTRL checkpoint (PyTorch pickle, transformers dir, hub id, "
        "registry name) into a single safetensors file, so that torch is needed only once.",
    )
    parser.add_argument("src", help="checkpoint file, transformers directory, hub id or registry name")
    parser.add_argument("out", help="output file, ending in .safetensors")
    parser.add_argument(
        "--backbone",
        default=None,
        help=f"architecture when SRC carries none and its shapes are ambiguous: {', '.join(BACKBONES)}",
    )
    parser.add_argument("--tag", default=None, help="pretrained tag when SRC is a registry name")
    args = parser.parse_args(argv)
    try:
        path = convert_checkpoint(args.src, args.out, backbone=args.backbone, tag=args.tag)
    except (CheckpointError, ConversionError) as e:
        print(f"inctrl-convert: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
