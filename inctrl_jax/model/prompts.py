"""Text prompts of the InCTRL text prior (compositional prompt ensemble).

For an object name ``c`` (the category with ``_`` replaced by a space) the normal ensemble is every
normal state (7) in every template (22), state-major and template-minor, i.e. 154 sentences; the
abnormal ensemble uses the 4 abnormal states, 88 sentences. CIFAR-10 class names (and ``animal``)
use one sentence per ensemble instead.
"""

from __future__ import annotations

NORMAL_STATES: tuple[str, ...] = (
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
)

ABNORMAL_STATES: tuple[str, ...] = (
    "damaged {}",
    "{} with flaw",
    "{} with defect",
    "{} with damage",
)

TEMPLATES: tuple[str, ...] = (
    "a cropped photo of the {}.",
    "a cropped photo of a {}.",
    "a close-up photo of a {}.",
    "a close-up photo of the {}.",
    "a bright photo of a {}.",
    "a bright photo of the {}.",
    "a dark photo of a {}.",
    "a dark photo of the {}.",
    "a jpeg corrupted photo of a {}.",
    "a jpeg corrupted photo of the {}.",
    "a blurry photo of the {}.",
    "a blurry photo of a {}.",
    "a photo of the {}.",
    "a photo of a {}.",
    "a photo of a small {}.",
    "a photo of the small {}.",
    "a photo of a large {}.",
    "a photo of the large {}.",
    "a photo of a {} for visual inspection.",
    "a photo of the {} for visual inspection.",
    "a photo of a {} for anomaly detection.",
    "a photo of the {} for anomaly detection.",
)

SINGLE_SENTENCE_CATEGORIES: frozenset[str] = frozenset(
    {"airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck", "animal"}
)
"""Categories (CIFAR-10 class names and ``animal``) whose ensembles are a single sentence each."""


def object_name(category: str) -> str:
    """The object word used in the prompts: ``category.replace('_', ' ')``."""
    return category.replace("_", " ")


def prompt_ensembles(category: str) -> tuple[list[str], list[str]]:
    """The (normal, abnormal) sentences for ``category``, in the reference code's order.

    Raises:
      ValueError: ``category`` is empty.
    """
    if not category or not category.strip():
        raise ValueError("category must be a non-empty name such as 'transistor' (it is the prompt object)")
    name = object_name(category)
    if name in SINGLE_SENTENCE_CATEGORIES:
        return [f"a photo of {name} for anomaly detection."], [
            f"a photo without {name} for anomaly detection."
        ]
    normal = [t.format(s.format(name)) for s in NORMAL_STATES for t in TEMPLATES]
    abnormal = [t.format(s.format(name)) for s in ABNORMAL_STATES for t in TEMPLATES]
    return normal, abnormal
