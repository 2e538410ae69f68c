"""Train the InCTRL heads on auxiliary data (frozen backbone).

  python train.py --config configs/train_inctrl.py --workdir runs/k2 \
      --config.data.datasets='("mvtec:/data/mvtec_ad", "visa:/data/VisA:candle,pcb1")'

Dataset entries are ``<layout>:<path>[:<categories>]`` with layout mvtec, visa, json or folder (see
inctrl_jax/training/data.py). Restarting the same command in the same --workdir resumes from the
last checkpoint; a config that differs in anything but steps, logging, checkpointing, mesh, cache
location or export is refused.

Multi-host (TPU pod slice / several GPU hosts): add ``--config.mesh.distributed=True`` and start the
same command on every host (TPU: ``gcloud compute tpus tpu-vm ssh NAME --worker=all --command="..."``;
GPU hosts: set ``JAX_COORDINATOR_ADDRESS=host0:1234 JAX_NUM_PROCESSES=N JAX_PROCESS_ID=i`` per host,
or launch under SLURM/Open MPI, which ``jax.distributed.initialize()`` detects by itself).
"""

import logging
import os
import sys

# Quiet third-party start-up lines before they are imported.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from inctrl_jax.evaluation.cli import USER_ERRORS, user_message  # noqa: E402
from inctrl_jax.training.trainer import train  # noqa: E402

CONFIG_FILE = "configs/train_inctrl.py"
EXIT_USER_ERROR = 2

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (ConfigDict).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, exported model.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show the Python traceback of errors.")
flags.mark_flags_as_required(["config", "workdir"])


def fail(message: str) -> None:
    """``train.py: error: <message>`` on stderr, exit status 2 (a user error)."""
    print(f"train.py: error: {message}", file=sys.stderr)
    raise SystemExit(EXIT_USER_ERROR)


def _config_file(argv: list[str]) -> str:
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1].split(":", 1)[0]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1].split(":", 1)[0]
    return CONFIG_FILE


def _parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with one line naming the flag instead of a traceback."""
    try:
        return flags.FLAGS(argv)
    except (KeyError, AttributeError) as err:
        # ml_collections raises these for an override of a key the config does not have.
        key = str(err.args[0] if err.args else err).strip("'\"")
        for arg in argv[1:]:
            name = arg.split("=", 1)[0].lstrip("-")
            if name.startswith("config.") and name.split(".")[-1] == key:
                key = name[len("config.") :]
                break
        fail(f"unknown config key {key!r} (see {_config_file(argv)})")
    except flags.Error as err:
        if "Traceback" in str(err):  # the config file raised: keep its own last line, drop the traceback
            if "--verbose" in argv:
                raise
            last = [line for line in str(err).splitlines() if line.strip()][-1]
            fail(f"could not read the config {_config_file(argv)!r} ({last})")
        fail(
            f"{err}\nusage: train.py --config {CONFIG_FILE} --workdir DIR [--config.<key>=<value>] [--verbose]"
        )
    except Exception as err:  # the config file itself failed to load (missing file, unknown variant)
        if "--verbose" in argv:
            raise
        fail(
            f"could not read the config {_config_file(argv)!r} ({type(err).__name__}: {err}); check --config"
        )
    raise AssertionError("unreachable")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}; settings are flags: --config.<key>=<value>")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for name in ("absl", "jax", "orbax", "absl.logging"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        config = _CONFIG.value
        config.keys()  # a config file that failed to load raises only on first use
    except OSError as err:  # ml_collections defers a config file that failed to load to this access
        if _VERBOSE.value:
            raise
        path = _config_file(sys.argv)
        reason = "no such file" if not os.path.exists(path) else str(err).splitlines()[0]
        fail(f"could not read the config file --config={path}: {reason}")
    try:
        result = train(config, _WORKDIR.value)
    except USER_ERRORS as err:  # ConfigError, DataError, checkpoint errors, missing files
        if _VERBOSE.value:
            raise
        fail(user_message(err))
    print(f"final loss {result.final_loss:.4f}; model: {result.model_dir}")


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
