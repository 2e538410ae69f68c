"""Few-shot evaluation and prediction with InCTRL.

    python evaluate.py --config configs/eval_default.py --config.dataset_root=/data/mvtec_ad
    python evaluate.py --config configs/eval_default.py --config.layout=visa --config.dataset_root=/data/visa \
        --config.checkpoint=checkpoints/8/checkpoint.pyth
    python evaluate.py predict --config configs/eval_default.py --config.predict.references=refs/ \
        --config.predict.inputs='new/*.png' --config.predict.category=transistor

Intentionally short: the work is in ``inctrl_jax.evaluation``.
"""

from __future__ import annotations

import logging
import sys

from absl import app
from ml_collections import config_flags

from inctrl_jax.evaluation import cli

_CONFIG = config_flags.DEFINE_config_file("config", "configs/eval_default.py", "Evaluation config file.")


def main(argv: list[str]) -> None:
    command = argv[1] if len(argv) > 1 else "test"
    if command not in ("test", "predict") or len(argv) > 2:
        raise app.UsageError(f"usage: evaluate.py [test|predict] --config ...; got {argv[1:]}")
    cli.setup_logging()
    if command == "predict":
        cli.run_predict(_CONFIG.value)
    else:
        cli.run_evaluation(_CONFIG.value)


if __name__ == "__main__":
    logging.captureWarnings(False)
    sys.exit(app.run(main))
