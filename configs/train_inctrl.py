"""InCTRL head training with the reference protocol (K=2, 8+8 queries per step, 1,000 steps, seed 10).

Run:
  python train.py --config configs/train_inctrl.py --workdir runs/mvtec_k2 \
      --config.data.root=/path/to/data --config.data.categories='("mvtec_ad/bottle", "mvtec_ad/cable")'

Change any value with ``--config.<key>=<value>`` (e.g. ``--config.model.k=4``). ``get_config("tiny")``
(``--config configs/train_inctrl.py:tiny``) uses a random tiny backbone and 20 steps for a laptop.
"""

from inctrl_jax.training.trainer import default_config


def get_config(arg: str | None = None):
    config = default_config()
    if arg == "tiny":
        config.backbone.source = "random"
        config.backbone.arch = "inctrl-tiny"
        config.train.steps = 20
        config.checkpoint.every = 10
    return config
