"""What every command line of sait_tf shares: size flags, one-line errors, --verbose.

``run(main, define_flags)`` is the entry point of each command (``python -m`` and the
console scripts): a user error ends the command with one line ``error: ...`` and exit
status 1, a pre-emption (SIGTERM, SIGINT) with one line and 128 + the signal number;
``--verbose`` or the environment variable ``SAIT_VERBOSE=1`` shows the traceback instead,
for bug reports.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from absl import app, flags

from sait_tf.runtime.preemption import Preempted

VERBOSE_ENV = "SAIT_VERBOSE"
# Errors whose message names what the user must change (a file, a binding, a flag).
EXPLAINED_ERRORS = (OSError, ValueError, RuntimeError, KeyError)


def parse_size(values: list[str] | None, flag: str) -> tuple[int, int] | None:
    """``--flag=HEIGHT,WIDTH`` (an absl list flag) as a tuple; None when the flag is unset."""
    if not values:
        return None
    try:
        size = tuple(int(v) for v in values)
    except ValueError as error:
        raise app.UsageError(f"--{flag} must be HEIGHT,WIDTH, got {values}") from error
    if len(size) != 2 or min(size) < 1:
        raise app.UsageError(f"--{flag} must be HEIGHT,WIDTH of positive ints, got {values}")
    return size


def one_line(error: BaseException) -> str:
    """The error's message on one line, without gin's "In call to configurable" trail."""
    lines = (line.strip() for line in str(error).splitlines())
    text = " ".join(line for line in lines
                    if line and not line.startswith("In call to configurable"))
    return text or type(error).__name__


def verbose() -> bool:
    """True with ``--verbose`` or ``SAIT_VERBOSE=1``: errors show their traceback."""
    flag = flags.FLAGS["verbose"].value if "verbose" in flags.FLAGS else False
    return bool(flag) or os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def guarded(main: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
    """``main`` with the one-line error convention of the module docstring."""

    def run_main(argv: list[str]) -> None:
        try:
            main(argv)
        except app.UsageError:
            raise
        except Preempted as stop:
            print(f"sait_tf: {one_line(stop)}", file=sys.stderr)
            sys.exit(stop.exit_code)
        except Exception as error:
            if verbose():
                raise
            message = one_line(error)
            if not isinstance(error, EXPLAINED_ERRORS):
                message = (f"{type(error).__name__}: {message} (run with --verbose for the "
                           "traceback)")
            sys.exit(f"error: {message}")

    return run_main


def run(main: Callable[[list[str]], None], define_flags: Callable[[], None]) -> None:
    """Defines the command's flags and ``--verbose``, then runs ``guarded(main)``; ``--help``
    shows the command's docstring and flags also as a console script."""
    define_flags()
    if "verbose" not in flags.FLAGS:
        flags.DEFINE_bool("verbose", False, "Show the traceback of an error (for bug reports; "
                          f"also {VERBOSE_ENV}=1).")
    command = sys.modules[main.__module__]
    if command is not sys.modules["__main__"]:  # a console script: its __main__ is a stub
        sys.modules["__main__"].__doc__ = command.__doc__
        for flag in flags.FLAGS.get_key_flags_for_module(command):
            flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS["verbose"])
    app.run(guarded(main))
