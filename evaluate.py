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

from inctrl_jax.evaluation import cli  # noqa: E402

CONFIG_FILE = "configs/eval_default.py"
_CONFIG = config_flags.DEFINE_config_file("config", CONFIG_FILE, "Evaluation config file.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show the Python traceback of errors.")


def _parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing with one clear line for bad flags instead of chained tracebacks."""
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
        cli.fail(f"unknown config key {key!r} (see {_config_file(argv)} for the available keys)")
    except flags.Error as err:
        cli.fail(
            f"{err}\nusage: evaluate.py [test|predict] --config configs/eval_default.py --config.<key>=<value>"
        )
    except Exception as err:  # the config file itself failed to load
        if "--verbose" in argv:
            raise
        cli.fail(f"could not read the config ({type(err).__name__}: {err}); check --config")
    raise AssertionError("unreachable")


def _config_file(argv: list[str]) -> str:
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return CONFIG_FILE


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
    sys.exit(app.run(main, flags_parser=_parse_flags))
