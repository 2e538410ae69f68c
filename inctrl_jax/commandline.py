"""What ``evaluate.py`` and ``train.py`` share: one-line user errors and config-flag parsing."""

from __future__ import annotations

import sys
from collections.abc import Callable

from absl import flags

EXIT_USER_ERROR = 2


def fail(program: str, message: str, status: int = EXIT_USER_ERROR) -> None:
    """Print ``<program>: error: <message>`` on stderr and exit with ``status`` (2: a user error)."""
    print(f"{program}: error: {message}", file=sys.stderr)
    raise SystemExit(status)


def config_file_from_argv(argv: list[str], default: str) -> str:
    """The ``--config`` file named on the command line, without a ``:variant`` suffix."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1].split(":", 1)[0]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1].split(":", 1)[0]
    return default


def make_flags_parser(program: str, default_config: str, usage: str) -> Callable[[list[str]], list[str]]:
    """An absl ``flags_parser`` that turns flag and config mistakes into one line naming the flag.

    ``--verbose`` on the command line keeps the traceback of a config file that fails to load.
    """

    def parse(argv: list[str]) -> list[str]:
        config_file = config_file_from_argv(argv, default_config)
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
            fail(program, f"unknown config key {key!r} (see {config_file} for the available keys)")
        except flags.Error as err:
            if "Traceback" in str(err):  # the config file raised: keep its last line, drop the traceback
                if "--verbose" in argv:
                    raise
                last = [line for line in str(err).splitlines() if line.strip()][-1]
                fail(program, f"could not read the config {config_file!r} ({last})")
            fail(program, f"{err}\nusage: {usage}")
        except Exception as err:  # the config file itself failed to load (missing file, unknown variant)
            if "--verbose" in argv:
                raise
            fail(
                program,
                f"could not read the config {config_file!r} ({type(err).__name__}: {err}); check --config",
            )
        raise AssertionError("unreachable")

    return parse
