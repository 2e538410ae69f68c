"""inctrl_jax: InCTRL few-shot generalist visual anomaly detection in JAX/Flax.

Typical use::

    from inctrl_jax import Detector

    detector = Detector.from_checkpoint("checkpoint.pyth")      # or Detector.from_backbone("ViT-B-16-plus-240")
    refs = detector.build_reference_set("bottle/train/good", category="bottle", k=4)
    results = detector.score("bottle/test/broken_large", refs)  # ScoreResult per image
"""

from importlib.metadata import PackageNotFoundError, version

from inctrl_jax.model.checkpoint import load_model, load_official_checkpoint, save_model
from inctrl_jax.model.detector import Detector, ScoreResult
from inctrl_jax.model.reference import ReferenceSet

try:
    __version__ = version("inctrl_jax")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0+unknown"

__all__ = [
    "Detector",
    "ReferenceSet",
    "ScoreResult",
    "__version__",
    "load_model",
    "load_official_checkpoint",
    "save_model",
]
