"""Data: dataset layouts, reference-identical preprocessing, few-shot reference sets, sampling, pipeline."""

from inctrl_jax.data.layouts import (
    DataError,
    Dataset,
    Sample,
    Skipped,
    read_inctrl_json,
    scan_folder,
    scan_mvtec,
    scan_mvtec_like,
    scan_visa,
)
from inctrl_jax.data.preprocess import (
    Geometry,
    ImageDecodeError,
    load_image,
    load_mask,
    preprocess,
    preprocess_mask,
    preprocess_tiles,
    preprocess_with_geometry,
    project_to_original,
    stitch_tile_maps,
)
from inctrl_jax.data.references import (
    ReferenceSet,
    load_prompt_file,
    references_from_folder,
    references_from_paths,
    select_references,
)
from inctrl_jax.data.sampling import BalancedEpisodeSampler, Episode

__all__ = [
    "BalancedEpisodeSampler",
    "DataError",
    "Dataset",
    "Episode",
    "Geometry",
    "ImageDecodeError",
    "ReferenceSet",
    "Sample",
    "Skipped",
    "load_image",
    "load_mask",
    "load_prompt_file",
    "preprocess",
    "preprocess_mask",
    "preprocess_tiles",
    "preprocess_with_geometry",
    "project_to_original",
    "read_inctrl_json",
    "references_from_folder",
    "references_from_paths",
    "scan_folder",
    "scan_mvtec",
    "scan_mvtec_like",
    "scan_visa",
    "select_references",
    "stitch_tile_maps",
]
