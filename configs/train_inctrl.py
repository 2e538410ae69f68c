"""InCTRL head training with the reference protocol (K=2, 8+8 queries per step, 1,000 steps, seed 10).

Run:
  python train.py --config configs/train_inctrl.py --workdir runs/mvtec_k2 \
      --config.data.datasets='("mvtec:/data/mvtec_ad",)'

Several auxiliary datasets, in any layout (see inctrl_jax/training/data.py), e.g. VisA to evaluate
on MVTec AD: ``--config.data.datasets='("visa:/data/VisA", "mvtec:/data/elpv:elpv")'``.
Change any value with ``--config.<key>=<value>`` (e.g. ``--config.model.k=4``). Large runs: keep
the feature cache on disk with ``--config.cache.dir=/path`` (reused by later runs, float16 with
``--config.cache.dtype=float16``); ``--config.cache.placement=device|host`` overrides where each
step's batch is gathered (default ``auto``: host on CPU, device on GPU/TPU when the cache fits).

Small variants: ``--config configs/train_inctrl.py:tiny`` (the golden fixtures' random tiny backbone,
20 steps, for a laptop) and ``:micro`` (a 3-block 64-px random backbone, for fast tests).
"""

from inctrl_jax.training.trainer import default_config


def get_config(arg: str | None = None):
    config = default_config()
    if arg in ("tiny", "micro"):
        config.backbone.source = "random"
        config.backbone.arch = f"inctrl-{arg}"
        config.train.steps = 20
        config.checkpoint.every = 10
    if arg == "micro":
        config.backbone.tap_layers = (1, 2, 3)
    elif arg not in (None, "", "tiny"):
        raise ValueError(f"configs/train_inctrl.py:{arg}: unknown variant; use ':tiny', ':micro' or none")
    return config
