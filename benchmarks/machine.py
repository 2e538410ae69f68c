"""The machine a benchmark ran on, recorded with every results file."""

from __future__ import annotations

import os
import platform
import subprocess


def describe() -> dict:
    """CPU model (from lscpu), logical CPUs, platform, Python and the current load average."""
    model = "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(
            (ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), model
        )
    except (OSError, subprocess.CalledProcessError):
        pass
    return {
        "cpu": model,
        "logical_cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average": list(os.getloadavg()),
    }
