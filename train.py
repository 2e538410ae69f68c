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

from inctrl_jax import commandline  # noqa: E402
from inctrl_jax.commandline import config_file_from_argv, make_flags_parser  # noqa: E402
from inctrl_jax.evaluation.cli import USER_ERRORS, user_message  # noqa: E402
from inctrl_jax.training.trainer import train  # noqa: E402

CONFIG_FILE = "configs/train_inctrl.py"

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (ConfigDict).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, exported model.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show the Python traceback of errors.")
flags.mark_flags_as_required(["config", "workdir"])


def fail(message: str) -> None:
    commandline.fail("train.py", message)


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
        path = config_file_from_argv(sys.argv, CONFIG_FILE)
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
    app.run(
        main,
        flags_parser=make_flags_parser(
            "train.py",
            CONFIG_FILE,
            f"train.py --config {CONFIG_FILE} --workdir DIR [--config.<key>=<value>] [--verbose]",
        ),
    )
