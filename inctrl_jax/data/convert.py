"""Convert between dataset layouts: any supported layout -> InCTRL JSON lists or an MVTec-like tree.

As a command::

    python -m inctrl_jax.data.convert --layout mvtec --root /data/mvtec --to json --out /data/json
    python -m inctrl_jax.data.convert --layout visa --root /data/VisA --to mvtec --out /data/visa_mvtec
    python -m inctrl_jax.data.convert --layout folder --normal-dir good --abnormal-dir bad \\
        --mask-dir masks --category pcb --to mvtec --out /data/pcb_tree
    python -m inctrl_jax.data.convert --layout json --json a_normal.json a_outlier.json --to mvtec --out t

The JSON output follows the official generation scripts, per category ``<c>_normal.json`` (train and
test normals), ``<c>_outlier.json`` (test anomalies), ``<c>_val_normal.json`` (test normals) and
``<c>_val_outlier.json`` (test anomalies), each a list of ``{"image_path", "target", "type"}``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from PIL import Image

from inctrl_jax.data.layouts import (
    NORMAL_DEFECT,
    DataError,
    Dataset,
    OnError,
    Sample,
    read_inctrl_json,
    scan_folder,
    scan_mvtec,
    scan_visa,
)

LinkMode = Literal["copy", "symlink", "hardlink"]


def to_inctrl_json(
    samples: Dataset | Sequence[Sample], out_dir: str | os.PathLike[str], *, absolute_paths: bool = True
) -> list[Path]:
    """Write the official InCTRL JSON lists for every category; returns the files written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    groups: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for s in samples:
        path = os.path.abspath(s.path) if absolute_paths else s.path
        entry = {"image_path": path, "target": s.label, "type": s.category}
        g = groups[s.category]
        if s.label == 0:
            g["normal"].append(entry)
            if s.split == "test":
                g["val_normal"].append(entry)
        else:
            g["outlier"].append(entry)
            if s.split == "test":
                g["val_outlier"].append(entry)
    written = []
    for category, lists in sorted(groups.items()):
        for kind in ("normal", "outlier", "val_normal", "val_outlier"):
            f = out / f"{category}_{kind}.json"
            f.write_text(json.dumps(lists.get(kind, []), indent=1))
            written.append(f)
    return written


def _place(src: Path, dst: Path, mode: LinkMode) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists() or dst.is_symlink():
        dst.unlink()
    if mode == "symlink":
        dst.symlink_to(src.resolve())
    elif mode == "hardlink":
        os.link(src, dst)
    else:
        shutil.copy2(src, dst)


def to_mvtec_tree(
    samples: Dataset | Sequence[Sample], out_root: str | os.PathLike[str], *, mode: LinkMode = "copy"
) -> Dataset:
    """Write ``<out>/<category>/{train/good, test/<defect>, ground_truth/<defect>/<stem>_mask.png}``.

    File names are kept; clashes (two sources with the same name in one target folder) get a
    ``_<n>`` suffix. Masks that are not PNG are re-encoded as 8-bit PNG (binarised, non-zero -> 255).

    Returns:
        The written tree read back with :func:`scan_mvtec`.
    """
    if mode not in ("copy", "symlink", "hardlink"):
        raise ValueError(f"mode={mode!r} is not supported; use 'copy', 'symlink' or 'hardlink'")
    out = Path(out_root)
    used: set[Path] = set()
    for s in samples:
        src = Path(s.path)
        defect = (
            NORMAL_DEFECT if s.label == 0 else (s.defect_type if s.defect_type != NORMAL_DEFECT else "defect")
        )
        split = s.split if s.label == 0 else "test"
        folder = out / s.category / split / defect
        stem, n = src.stem, 0
        while (folder / f"{stem}{src.suffix.lower()}") in used:
            n += 1
            stem = f"{src.stem}_{n}"
        dst = folder / f"{stem}{src.suffix.lower()}"
        used.add(dst)
        _place(src, dst, mode)
        if s.mask_path:
            msrc = Path(s.mask_path)
            mdst = out / s.category / "ground_truth" / defect / f"{stem}_mask.png"
            if msrc.suffix.lower() == ".png" and mode != "copy":
                _place(msrc, mdst, mode)
            else:
                mdst.parent.mkdir(parents=True, exist_ok=True)
                with Image.open(msrc) as m:
                    m.convert("L").point(lambda v: 255 if v else 0).save(mdst)
    return scan_mvtec(out)


def _read(args: argparse.Namespace) -> Dataset:
    on_error: OnError = "skip" if args.skip_bad else "raise"
    if args.layout in ("mvtec", "mvtec_like"):
        if not args.root:
            raise DataError("--root is required for --layout mvtec")
        return scan_mvtec(args.root, args.categories, on_error=on_error)
    if args.layout == "visa":
        if not args.root:
            raise DataError("--root is required for --layout visa")
        return scan_visa(args.root, args.categories, split_csv=args.split_csv, on_error=on_error)
    if args.layout == "folder":
        if not args.normal_dir:
            raise DataError("--normal-dir is required for --layout folder")
        return scan_folder(
            args.normal_dir,
            args.abnormal_dir,
            mask_dir=args.mask_dir,
            normal_test_dir=args.normal_test_dir,
            category=args.category,
            on_error=on_error,
        )
    if args.layout == "json":
        if not args.json:
            raise DataError("--json is required for --layout json")
        return read_inctrl_json(args.json, root=args.root, on_error=on_error)
    raise DataError(f"--layout {args.layout!r} is not supported")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m inctrl_jax.data.convert", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--layout", required=True, choices=["mvtec", "mvtec_like", "visa", "folder", "json"])
    parser.add_argument("--to", required=True, choices=["json", "mvtec"], help="output format")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--root", help="dataset root (mvtec, visa; base folder for relative json paths)")
    parser.add_argument("--categories", nargs="*", help="categories to convert (default: all)")
    parser.add_argument("--split-csv", help="VisA split file (default: <root>/split_csv/1cls.csv)")
    parser.add_argument("--normal-dir")
    parser.add_argument("--abnormal-dir")
    parser.add_argument("--mask-dir")
    parser.add_argument("--normal-test-dir")
    parser.add_argument("--category", help="category name for --layout folder")
    parser.add_argument("--json", nargs="*", help="InCTRL JSON list(s) for --layout json")
    parser.add_argument("--mode", default="copy", choices=["copy", "symlink", "hardlink"], help="--to mvtec")
    parser.add_argument("--relative-paths", action="store_true", help="--to json: keep paths as read")
    parser.add_argument(
        "--skip-bad", action="store_true", help="skip bad files with a warning instead of failing"
    )
    args = parser.parse_args(argv)
    try:
        ds = _read(args)
        if args.to == "json":
            files = to_inctrl_json(ds, args.out, absolute_paths=not args.relative_paths)
            print(f"wrote {len(files)} JSON lists for {len(ds.categories)} categories to {args.out}")
        else:
            to_mvtec_tree(ds, args.out, mode=args.mode)
            print(f"wrote an MVTec-like tree of {len(ds)} images to {args.out}")
        for s in ds.skipped:
            print(f"skipped {s.path}: {s.reason}", file=sys.stderr)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
