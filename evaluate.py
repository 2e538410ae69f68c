"""Few-shot evaluation and prediction with InCTRL.

    python evaluate.py --config configs/eval_default.py --config.dataset_root=/data/mvtec_ad
    python evaluate.py --config configs/eval_default.py --config.layout=visa --config.dataset_root=/data/visa \
        --config.checkpoint=checkpoints/8/checkpoint.pyth
    python evaluate.py predict --config configs/eval_default.py --config.predict.references=refs/ \
        --config.predict.inputs='new/*.png' --config.predict.category=transistor

Exit status: 0 when every requested run was done, 1 when some could not be (partial results are
still written), 2 for a user error (config, flag, missing file, unreadable data or checkpoint; one
message, no traceback; ``--verbose`` shows the traceback). Intentionally short: the work is in
``inctrl_jax.evaluation``.
"""

from __future__ import annotations

import os

# Quiet third-party start-up lines before they are imported ("PyTorch was not found", TPU probing).
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import logging  # noqa: E402
import sys  # noqa: E402

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from inctrl_jax.commandline import make_flags_parser  # noqa: E402
from inctrl_jax.evaluation import cli  # noqa: E402

CONFIG_FILE = "configs/eval_default.py"
if not any(arg == "--config" or arg.startswith("--config=") for arg in sys.argv[1:]):
    # A default given to DEFINE_config_file is parsed at import, where an unknown --config.<key>
    # override would escape the one-line error handling of the flags parser below.
    sys.argv.insert(1, f"--config={CONFIG_FILE}")
_CONFIG = config_flags.DEFINE_config_file("config", None, "Evaluation config file.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show the Python traceback of errors.")


def main(argv: list[str]) -> int:
    command = argv[1] if len(argv) > 1 else "test"
    if command not in ("test", "predict") or len(argv) > 2:
        cli.fail(f"usage: evaluate.py [test|predict] --config ...; got {argv[1:]}")
    cli.setup_logging()
    run = cli.run_predict if command == "predict" else cli.run_evaluation
    try:
        outcome = run(_CONFIG.value)
    except cli.USER_ERRORS as err:
        if _VERBOSE.value:
            raise
        cli.fail(cli.user_message(err))
    return cli.exit_status(outcome)


if __name__ == "__main__":
    logging.captureWarnings(False)
    sys.exit(
        app.run(
            main,
            flags_parser=make_flags_parser(
                "evaluate.py",
                CONFIG_FILE,
                "evaluate.py [test|predict] --config configs/eval_default.py --config.<key>=<value>",
            ),
        )
    )
