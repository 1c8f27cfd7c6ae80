"""Command-line plumbing shared by `launch.py` and `spcl_jax.plan`: absl flags with a `--config` file and
`--config.<key>=<value>` overrides, every mistake reported in one line with exit status 2.

Importing this module starts nothing: no JAX, no config file.
"""
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from absl import flags

EXIT_USAGE = 2


def program() -> str:
    """The name the user typed: launch.py, or a console script's name (spcl-train, spcl-plan)."""
    return os.path.basename(sys.argv[0]) or "launch.py"


def die(message: str, name: str | None = None) -> NoReturn:
    """`<program>: error: <message>` on stderr (and train.log, once a run has one), exit 2."""
    from spcl_jax import progress

    progress.show(f"{name or program()}: error: {message}", sys.stderr)
    sys.exit(EXIT_USAGE)


def parse_flags(argv: Sequence[str], doc: str, name: str | None = None) -> list[str]:
    """absl parsing with one-line errors and exit 2 instead of absl's usage dump and exit 1; `--help` prints
    `doc` and the flags."""
    if "--help" in argv or "-h" in argv:
        print(doc)
        print(flags.FLAGS.main_module_help())
        sys.exit(0)
    for i, arg in enumerate(argv):
        path = arg.split("=", 1)[1] if arg.startswith("--config=") else (
            argv[i + 1] if arg == "--config" and i + 1 < len(argv) else None)
        if path is not None and not os.path.isfile(path):
            die(f"config file {path!r} not found; valid: a file like configs/digits.py", name)
        if path is not None:
            check_config_file(path, name)
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        die(" ".join(str(e).split()), name)
    except (KeyError, AttributeError) as e:
        text = str(e.args[0] if e.args else e).encode().decode("unicode_escape")
        key, *hint = [line.strip("'\" ") for line in text.splitlines() if line.strip("'\" ")]
        die(f"unknown config key {key!r}{' (' + hint[0] + ')' if hint else ''}; valid keys are "
            "those of configs/default.py", name)
    except (TypeError, ValueError) as e:
        die(f"bad --config override: {' '.join(str(e).split())}", name)


def check_config_file(path: str, name: str | None = None) -> None:
    """One line for a config file that does not load, or whose get_config() does not return a full ConfigDict
    (absl would show a traceback, or take a missing get_config() for an unknown key)."""
    import importlib.util
    import traceback

    import ml_collections

    from configs import default

    def where(error: BaseException) -> str:
        lines = [frame.lineno for frame in traceback.extract_tb(error.__traceback__)
                 if os.path.abspath(frame.filename) == os.path.abspath(path)]
        return f" at line {lines[-1]}" if lines else ""

    try:
        spec = importlib.util.spec_from_file_location("_spcl_config_file", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except SyntaxError as e:
        die(f"config file {path} line {e.lineno}: {e.msg}; fix it (a config file is Python, like configs/digits.py)",
            name)
    except Exception as e:
        die(f"config file {path} cannot be loaded ({type(e).__name__}: {e}{where(e)}); fix it or its imports", name)
    if not callable(getattr(module, "get_config", None)):
        die(f"config file {path} defines no get_config(); valid: a file like configs/digits.py, whose get_config() "
            "returns the config", name)
    try:
        config = module.get_config()
    except Exception as e:
        die(f"get_config() in {path} raised {type(e).__name__}: {e}{where(e)}", name)
    if not isinstance(config, ml_collections.ConfigDict):
        die(f"get_config() in {path} returned a {type(config).__name__}; valid: an ml_collections.ConfigDict, e.g. "
            "configs.default.get_config() with changes", name)
    missing = sorted(set(default.get_config()) - set(config))
    if missing:
        die(f"get_config() in {path} returned a config without {', '.join(missing[:5])}"
            f"{f' and {len(missing) - 5} more keys' if len(missing) > 5 else ''}; valid: start from "
            "configs.default.get_config(), which holds every option", name)
