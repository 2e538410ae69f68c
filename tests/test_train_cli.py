"""``train.py`` user errors: one ``train.py: error: ...`` line naming the key, flag or file, exit 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _train(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, str(REPO / "train.py"), "--config", "configs/train_inctrl.py:micro",
        "--workdir", str(tmp_path / "run"), *flags,
    ]  # fmt: skip
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ("--config.x=1",),
            "train.py: error: unknown config key 'x' (see configs/train_inctrl.py for the available keys)",
        ),
        (
            ("--config.data.datasets=('mvtec:/no/such/dir',)",),
            "train.py: error: config.data.datasets entry 'mvtec:/no/such/dir': /no/such/dir does not exist",
        ),
        (
            ("--config.data.datasets=('mvtec:/data',)", "--config.backbone.source=/no/such/clip.pt"),
            "train.py: error: config.backbone.source='/no/such/clip.pt': no such file or directory",
        ),
    ],
    ids=["unknown-key", "missing-data", "missing-backbone-source"],
)
def test_user_errors_print_one_message_and_exit_2_without_traceback(tmp_path, flags, message):
    proc = _train(tmp_path, *flags)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.count("train.py: error:") == 1 and message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "model").exists()


def test_verbose_shows_the_traceback_of_a_user_error(tmp_path):
    proc = _train(tmp_path, "--config.data.datasets=('mvtec:/no/such/dir',)", "--verbose")
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "DataError: config.data.datasets entry" in proc.stderr
