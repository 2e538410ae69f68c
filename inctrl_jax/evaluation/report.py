"""Versioned result folders that make every reported number reproducible.

Layout (``model`` names the scorer, e.g. ``inctrl-ViT-B-16-plus-240-training_free``)::

    results/<model>/<dataset>/<category>/v<N>/       one evaluation of one category
        meta.json          package version, backbone id, checkpoint path + sha256, mode, notice
        config.json        the full evaluation config
        references.json    per (K, seed): the exact reference file list, the seed, how they were
                           chosen and the backbone id of their features
        scores_k<K>_seed<S>.csv / .jsonl     per-image scores of that run
        metrics.json / metrics.csv            every run, and mean +- std over seeds per K
        metrics.md                            the same as a Markdown table
        failed_images.txt  images that could not be read (only when there are any)
    results/<model>/<dataset>/_dataset/v<N>/          mean over categories, same files
    ... and a ``latest`` symlink beside the versions, pointing at the newest.

Files are rewritten after every finished run, so a crash in a later run or category loses
nothing that was already computed.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import hashlib
import json
import math
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

METRIC_NAMES = ("image_auroc", "image_auprc", "image_f1_max", "pixel_auroc", "pixel_aupro")
DATASET_DIR = "_dataset"


def package_version() -> str:
    try:
        from importlib.metadata import version

        return version("inctrl_jax")
    except Exception:  # not installed (running from a source tree)
        return "unknown"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes (identifies the exact checkpoint used)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _safe_name(name: str) -> str:
    """A path component: keeps letters, digits, ``.-_+@``, replaces the rest with ``-``."""
    cleaned = re.sub(r"[^A-Za-z0-9.\-_+@]+", "-", str(name)).strip("-")
    return cleaned or "unnamed"


def new_version_dir(parent: str | os.PathLike) -> Path:
    """Create ``parent/v<N+1>`` (N = highest existing version) and point ``parent/latest`` at it."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    while True:
        versions = [int(m.group(1)) for p in parent.iterdir() if (m := re.fullmatch(r"v(\d+)", p.name))]
        path = parent / f"v{max(versions, default=0) + 1}"
        try:
            path.mkdir()  # fails if a concurrent run took the same number; then try the next
            break
        except FileExistsError:
            continue
    link = parent / "latest"
    tmp = parent / f".latest.{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(path.name, target_is_directory=True)
    os.replace(tmp, link)
    return path


def _jsonable(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return _jsonable(x.item())
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else str(x)  # strict JSON has no NaN; null means "undefined"
    if isinstance(x, Path):
        return str(x)
    return x


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_jsonable(obj), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> None:
    columns = list(columns) if columns else list(dict.fromkeys(k for r in rows for k in r))
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("nan" if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()})
    os.replace(tmp, path)


def write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(_jsonable(r), allow_nan=False) + "\n")
    os.replace(tmp, path)


@dataclasses.dataclass
class ImageScore:
    """One scored test image of one run."""

    path: str
    label: int
    score: float
    defect: str = ""
    mask_path: str | None = None
    s_p: float | None = None
    s_i: float | None = None
    s_a: float | None = None

    def row(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SCORE_COLUMNS = [f.name for f in dataclasses.fields(ImageScore)]


@dataclasses.dataclass
class RunResult:
    """The metrics of one (K, reference seed) evaluation of one category."""

    k: int
    seed: int
    metrics: dict[str, float]
    n_images: int
    n_normal: int
    n_anomalous: int
    references: list[str]
    seconds: float = math.nan
    warnings: list[str] = dataclasses.field(default_factory=list)
    reference_info: dict[str, Any] = dataclasses.field(default_factory=dict)
    """How the references were chosen (``source``) and the backbone id their features came from."""
    mode: str = ""
    """The Detector's mode of this run (``"zero_shot"`` for K = 0); empty = the evaluation's mode."""


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population std (numpy's default, ddof=0); NaN if any value is NaN or none given."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0 or np.isnan(arr).any():
        return math.nan, math.nan
    return float(arr.mean()), float(arr.std())


def summarise_over_seeds(runs: Sequence[RunResult]) -> list[dict[str, Any]]:
    """One row per K: ``<metric>_mean`` and ``<metric>_std`` over the seeds of that K."""
    rows = []
    for k in sorted({r.k for r in runs}):
        of_k = [r for r in runs if r.k == k]
        row: dict[str, Any] = {"k": k, "n_seeds": len(of_k), "seeds": [r.seed for r in of_k]}
        modes = sorted({r.mode for r in of_k if r.mode})
        if modes:
            row["mode"] = ",".join(modes)
        for name in METRIC_NAMES:
            if not any(name in r.metrics for r in of_k):
                continue  # not computed for this category (e.g. pixel metrics without masks)
            row[f"{name}_mean"], row[f"{name}_std"] = mean_std([r.metrics.get(name, math.nan) for r in of_k])
        rows.append(row)
    return rows


def _fmt(mean: float, std: float | None = None) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "NaN"
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def markdown_table(title: str, label: str, rows: Sequence[Mapping[str, Any]], first: str = "k") -> str:
    """Markdown for summary rows (``<metric>_mean`` / ``_std`` keys); ``label`` heads the table."""
    metrics = [m for m in METRIC_NAMES if any(f"{m}_mean" in r for r in rows)]
    with_mode = any("mode" in r for r in rows)
    head = [first, *(["mode"] if with_mode else []), "seeds", *metrics]
    lines = [f"### {title}", "", f"**{label}**", "", "| " + " | ".join(head) + " |"]
    lines.append("|" + "---|" * len(head))
    for r in rows:
        cells = [str(r[first]), *([str(r.get("mode", ""))] if with_mode else []), str(r.get("n_seeds", ""))]
        cells += [_fmt(r.get(f"{m}_mean", math.nan), r.get(f"{m}_std")) for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("mean ± std over reference seeds (ddof=0); NaN = undefined (one class only).")
    return "\n".join(lines) + "\n"


@dataclasses.dataclass
class RunInfo:
    """What identifies the scorer of an evaluation; written to every ``meta.json``."""

    model: str
    mode: str  # the Detector's mode name: "inctrl", "training_free" or (every K = 0) "zero_shot"
    backbone: str
    weights: str
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None
    backbone_id: str = ""
    """The detector's backbone fingerprint (architecture + weight hash), also stored in reference sets."""
    real_result: bool = True
    notice: str = ""
    """Short reason shown on every output when ``real_result`` is False."""
    details: str = ""
    """Longer explanation (what failed, what to provide), kept in ``meta.json``."""

    @property
    def label(self) -> str:
        """The one-line label put on every table, file and heat map of this evaluation."""
        parts = [f"model {self.model}", f"mode {self.mode}", f"backbone {self.backbone} ({self.weights})"]
        if self.mode == "training_free":
            parts.append("TRAINING-FREE score: patch residual + text prior only, no trained heads")
        if self.mode == "zero_shot":
            parts.append("ZERO-SHOT score: text prior only, no reference images")
        if not self.real_result:
            parts.append("NOT A REAL RESULT: " + (self.notice or "pipeline check"))
        return "; ".join(parts)

    def meta(self) -> dict[str, Any]:
        import jax

        return {
            **dataclasses.asdict(self),
            "label": self.label,
            "package_version": package_version(),
            "jax_version": jax.__version__,
            "python": sys.version.split()[0],
            "command": sys.argv,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }


class CategoryReport:
    """Result folder of one category; every ``add_run`` rewrites the summaries on disk."""

    def __init__(self, root: str | os.PathLike, info: RunInfo, dataset: str, category: str, config: Any):
        self.info, self.dataset, self.category = info, dataset, category
        self.dir = new_version_dir(
            Path(root) / _safe_name(info.model) / _safe_name(dataset) / _safe_name(category)
        )
        self.runs: list[RunResult] = []
        self.failed: list[tuple[str, str]] = []
        self.notes: list[str] = []
        self.missing_runs: list[dict[str, Any]] = []
        """Requested (K, seed) runs that could not be done, with the reason."""
        write_json(self.dir / "meta.json", {**info.meta(), "dataset": dataset, "category": category})
        write_json(self.dir / "config.json", config)
        self._write_summary()

    def add_failed(self, path: str, reason: str) -> None:
        self.failed.append((path, reason))
        (self.dir / "failed_images.txt").write_text("".join(f"{p}\t{r}\n" for p, r in self.failed))

    def add_note(self, note: str) -> None:
        self.notes.append(note)
        self._write_summary()

    def add_missing_run(self, k: int, seed: int, reason: str) -> None:
        """A requested run that could not be done (the process exits non-zero at the end)."""
        self.missing_runs.append({"k": k, "seed": seed, "reason": reason})
        self._write_summary()

    def add_run(self, run: RunResult, scores: Sequence[ImageScore]) -> None:
        stem = f"scores_k{run.k}_seed{run.seed}"
        marker = {"mode": run.mode or self.info.mode, "real_result": self.info.real_result}
        rows = [
            {"category": self.category, "k": run.k, "seed": run.seed, **marker, **s.row()} for s in scores
        ]
        write_csv(self.dir / f"{stem}.csv", rows, ["category", "k", "seed", *marker, *SCORE_COLUMNS])
        write_jsonl(self.dir / f"{stem}.jsonl", rows)
        self.runs.append(run)
        self._write_summary()

    def summary_rows(self) -> list[dict[str, Any]]:
        return summarise_over_seeds(self.runs)

    def _write_summary(self) -> None:
        refs = [{"k": r.k, "seed": r.seed, "references": r.references, **r.reference_info} for r in self.runs]
        write_json(self.dir / "references.json", refs)
        run_rows = [
            {
                "mode": r.mode or self.info.mode,
                "category": self.category,
                "k": r.k,
                "seed": r.seed,
                "n_images": r.n_images,
                "n_normal": r.n_normal,
                "n_anomalous": r.n_anomalous,
                "seconds": r.seconds,
                **r.metrics,
            }
            for r in self.runs
        ]
        summary = self.summary_rows()
        write_json(
            self.dir / "metrics.json",
            {
                "label": self.info.label,
                "real_result": self.info.real_result,
                "mode": self.info.mode,
                "dataset": self.dataset,
                "category": self.category,
                "runs": run_rows,
                "summary": summary,
                "warnings": sorted({w for r in self.runs for w in r.warnings}),
                "notes": self.notes,
                "missing_runs": self.missing_runs,
                "failed_images": len(self.failed),
            },
        )
        write_csv(
            self.dir / "metrics.csv",
            [{"real_result": self.info.real_result, **r} for r in run_rows],
            [
                "mode",
                "real_result",
                "category",
                "k",
                "seed",
                "n_images",
                "n_normal",
                "n_anomalous",
                "seconds",
                *METRIC_NAMES,
            ],
        )
        self.markdown = markdown_table(f"{self.dataset} / {self.category}", self.info.label, summary)
        missing = [f"NOT DONE: K={m['k']} seed={m['seed']}: {m['reason']}" for m in self.missing_runs]
        extra = "".join(
            f"\n- {n}" for n in missing + self.notes + sorted({w for r in self.runs for w in r.warnings})
        )
        (self.dir / "metrics.md").write_text(self.markdown + (f"\nNotes:{extra}\n" if extra else ""))


class DatasetReport:
    """``<dataset>/_dataset/v<N>``: per K, the mean over categories (each a mean over seeds), and
    the mean +- std over seeds of the per-seed category means."""

    def __init__(self, root: str | os.PathLike, info: RunInfo, dataset: str, config: Any):
        self.info, self.dataset = info, dataset
        self.dir = new_version_dir(Path(root) / _safe_name(info.model) / _safe_name(dataset) / DATASET_DIR)
        self.categories: dict[str, CategoryReport] = {}
        self.problems: dict[str, str] = {}
        self.failed: list[tuple[str, str]] = []
        write_json(self.dir / "meta.json", {**info.meta(), "dataset": dataset})
        write_json(self.dir / "config.json", config)

    def add_category(self, report: CategoryReport) -> None:
        self.categories[report.category] = report
        self.write()

    def add_failed(self, path: str, reason: str) -> None:
        """A file left out while reading the dataset that belongs to no evaluated category."""
        self.failed.append((path, reason))
        (self.dir / "failed_images.txt").write_text("".join(f"{p}\t{r}\n" for p, r in self.failed))

    def add_problem(self, category: str, problem: str) -> None:
        self.problems[category] = problem
        self.write()

    @property
    def missing_runs(self) -> dict[str, list[dict[str, Any]]]:
        """Per category, the requested runs that could not be done."""
        return {c: r.missing_runs for c, r in self.categories.items() if r.missing_runs}

    @property
    def complete(self) -> bool:
        """Whether every requested category, K and seed was evaluated."""
        return not self.problems and not self.missing_runs

    def rows(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(per-category rows, per-K dataset rows)."""
        per_cat = []
        for name, rep in self.categories.items():
            for r in rep.summary_rows():
                per_cat.append({"category": name, **r})
        per_k = []
        for k in sorted({r["k"] for r in per_cat}):
            cats = [r for r in per_cat if r["k"] == k]
            row: dict[str, Any] = {
                "k": k,
                "n_categories": len(cats),
                "n_seeds": min(r["n_seeds"] for r in cats),
            }
            modes = sorted({m for r in cats for m in str(r.get("mode", "")).split(",") if m})
            if modes:
                row["mode"] = ",".join(modes)
            for m in METRIC_NAMES:
                if not any(f"{m}_mean" in r for r in cats):
                    continue
                vals = [r.get(f"{m}_mean", math.nan) for r in cats if f"{m}_mean" in r]
                row[f"{m}_mean_over_categories"] = mean_std(vals)[0]
                # Per seed index: mean over categories, then mean +- std of those over seeds.
                per_seed = []
                for i in range(row["n_seeds"]):
                    seed_vals = []
                    for rep in self.categories.values():
                        of_k = [r for r in rep.runs if r.k == k]
                        if i < len(of_k) and m in of_k[i].metrics:
                            seed_vals.append(of_k[i].metrics[m])
                    per_seed.append(mean_std(seed_vals)[0])
                row[f"{m}_mean"], row[f"{m}_std"] = mean_std(per_seed)
            per_k.append(row)
        return per_cat, per_k

    def write(self) -> str:
        per_cat, per_k = self.rows()
        write_json(
            self.dir / "metrics.json",
            {
                "label": self.info.label,
                "real_result": self.info.real_result,
                "mode": self.info.mode,
                "dataset": self.dataset,
                "per_category": per_cat,
                "dataset_mean": per_k,
                "category_folders": {c: str(r.dir) for c, r in self.categories.items()},
                "problems": self.problems,
                "missing_runs": self.missing_runs,
                "complete": self.complete,
                "failed_images": len(self.failed),
            },
        )
        write_csv(
            self.dir / "metrics.csv",
            [{"mode": self.info.mode, "real_result": self.info.real_result, **r} for r in per_cat]
            + [
                {"mode": self.info.mode, "real_result": self.info.real_result, "category": "MEAN", **r}
                for r in per_k
            ],
        )
        md = markdown_table(f"{self.dataset}: mean over categories", self.info.label, per_k)
        for c, rep in self.categories.items():
            md += "\n" + markdown_table(f"{self.dataset} / {c}", self.info.label, rep.summary_rows())
        if self.problems:
            md += "\nProblems:\n" + "".join(f"- {c}: {p}\n" for c, p in self.problems.items())
        if self.missing_runs:
            md += "\nRequested runs NOT DONE:\n"
        for c, runs in self.missing_runs.items():
            md += "".join(f"- NOT DONE: {c} K={m['k']} seed={m['seed']}: {m['reason']}\n" for m in runs)
        (self.dir / "metrics.md").write_text(md)
        return md
