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

from absl import app, flags
from ml_collections import config_flags

from inctrl_jax.training.trainer import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (ConfigDict).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, exported model.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for name in ("absl", "jax", "orbax", "absl.logging"):
        logging.getLogger(name).setLevel(logging.WARNING)
    result = train(_CONFIG.value, _WORKDIR.value)
    print(f"final loss {result.final_loss:.4f}; model: {result.model_dir}")


if __name__ == "__main__":
    app.run(main)
