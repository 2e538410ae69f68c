"""An unreachable Hugging Face hub fails fast, with a message that fits the situation."""

from __future__ import annotations

import socket
import time

import pytest

from inctrl_jax.clip import loading
from inctrl_jax.clip.loading import CheckpointError, load_clip

REPO = "nonexistent-org/nonexistent-model"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again on exit: connections are refused at once


@pytest.fixture
def dead_hub(monkeypatch, tmp_path):
    """The hub endpoint points at a closed local port; downloads that reach the network are counted."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setattr(loading, "_hub_probe", {})
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    import huggingface_hub

    online_calls = []
    real = huggingface_hub.hf_hub_download

    def spy(*args, **kwargs):
        if not kwargs.get("local_files_only"):
            online_calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", spy)
    return online_calls


def test_unreachable_hub_fails_at_once_without_retries(dead_hub):
    start = time.perf_counter()
    with pytest.raises(CheckpointError) as info:
        load_clip(REPO)
    elapsed = time.perf_counter() - start
    assert elapsed < 5.0, f"took {elapsed:.1f} s to report an unreachable hub"
    assert dead_hub == [], "a download was attempted although the probe found the hub unreachable"
    message = str(info.value)
    assert REPO in message and "unreachable" in message and "hf download" in message
    assert ".." not in message
    assert "HF_HUB_OFFLINE" not in message  # not set: nothing to unset


def test_the_probe_runs_once_per_process(dead_hub, monkeypatch):
    import urllib.request

    probes = []
    real = urllib.request.urlopen

    def spy(*args, **kwargs):
        probes.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(urllib.request, "urlopen", spy)
    for _ in range(2):
        with pytest.raises(CheckpointError):
            load_clip(REPO)
    assert len(probes) == 1


def test_offline_mode_message_mentions_the_flag_once(dead_hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError) as info:
        load_clip(REPO)
    message = str(info.value)
    assert "offline mode (HF_HUB_OFFLINE) is on" in message and "unset HF_HUB_OFFLINE" in message
    assert ".." not in message
