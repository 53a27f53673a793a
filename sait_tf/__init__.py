"""sait_tf: Semantically Adaptive Image-to-image Translation (Musto & Zinelli, BMVC 2020).

Importing the package imports TensorFlow quietly, before any submodule does. Unless the user
set ``TF_CPP_MIN_LOG_LEVEL``, it is 2: TensorFlow's C++ INFO and WARNING lines are hidden (the
cpu_feature_guard notice among them). TensorFlow 2.21 logs a few lines before it reads that
level (absl's "before absl::InitializeLog()" notice, the oneDNN notice, "Could not find cuda
drivers"); they are filtered by the same level, and so is the ERROR "failed call to cuInit"
that follows a missing CUDA driver. With ``--verbose`` on the command line, ``SAIT_VERBOSE=1``
or ``TF_CPP_MIN_LOG_LEVEL=0`` the package leaves TensorFlow's logging alone.

TensorFlow's own choice of CPU kernels stands: oneDNN on CPUs with AVX-512 VNNI/BF16, AVX-VNNI
or AMX, Eigen elsewhere. On an AVX2-only CPU oneDNN sends some convolutions of the paper's
sizes to its reference implementation, a hundred times slower (docs/PERFORMANCE.md), so the
package does not turn it on there; ``TF_ENABLE_ONEDNN_OPTS=1`` does, for small images.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Iterator

__version__ = "0.1.0"

_TF_LOG_LEVEL_ENV = "TF_CPP_MIN_LOG_LEVEL"
_DEFAULT_TF_LOG_LEVEL = "2"
_VERBOSE_ENV = "SAIT_VERBOSE"  # sait_tf.cli.VERBOSE_ENV, read here before flags exist
_VERBOSE_ARGS = {f"verbose{value}" for value in ("", "=true", "=t", "=1", "=yes", "=y")}
# An absl log record (C++ and Python): severity, MMDD, time, thread, file:line]. A line that
# is not one continues the record before it.
_RECORD = re.compile(r"^([IWEF])\d{4} [\d:.]+ +\d+ \S+:\d+\] ")
_SEVERITIES = "IWEF"  # in the order of TF_CPP_MIN_LOG_LEVEL's 0..3
_ABSL_NOTICE = "WARNING: All log messages before absl::InitializeLog() is called"
_NO_CUDA_DRIVER = "Could not find cuda drivers"
_CUINIT_FAILED = "failed call to cuInit"


def _verbose_requested() -> bool:
    """``--verbose`` among the arguments or ``SAIT_VERBOSE`` set (``sait_tf.cli.verbose``
    reads the same once the flags are parsed, which is after TensorFlow loads)."""
    arguments = (arg.lstrip("-").lower() for arg in getattr(sys, "argv", [])[1:])
    return (any(arg in _VERBOSE_ARGS for arg in arguments)
            or os.environ.get(_VERBOSE_ENV, "") not in ("", "0"))


def filter_start_up_log(text: str, min_level: int) -> str:
    """The lines of ``text`` (standard error while TensorFlow loads) that ``min_level``
    (``TF_CPP_MIN_LOG_LEVEL``) lets through: records of a lower severity and their
    continuation lines go, as do absl's pre-initialisation notice and, on a machine without
    a CUDA driver, the failed cuInit that follows from it."""
    no_driver = _NO_CUDA_DRIVER in text
    kept, keep = [], True
    for line in text.splitlines(keepends=True):
        if line.startswith(_ABSL_NOTICE):
            continue
        record = _RECORD.match(line)
        if record:
            keep = (_SEVERITIES.index(record.group(1)) >= min_level
                    and not (no_driver and _CUINIT_FAILED in line))
        if keep:
            kept.append(line)
    return "".join(kept)


@contextlib.contextmanager
def _filtered_stderr(min_level: int) -> Iterator[None]:
    """Captures file descriptor 2 (TensorFlow's C++ code writes there directly) and writes
    what ``filter_start_up_log`` keeps to ``sys.stderr`` afterwards."""
    try:
        saved = os.dup(2) if sys.stderr is not None else None
    except OSError:
        saved = None
    if saved is None:  # no standard error to filter
        yield
        return
    with tempfile.TemporaryFile() as captured:
        sys.stderr.flush()
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            sys.stderr.write(filter_start_up_log(captured.read().decode(errors="replace"),
                                                 min_level))
            sys.stderr.flush()


def _import_tensorflow_quietly() -> None:
    """Imports TensorFlow and probes its devices under ``TF_CPP_MIN_LOG_LEVEL`` (the user's,
    else 2) with the start-up lines filtered; nothing when TensorFlow is already imported or
    verbose output was asked for."""
    if "tensorflow" in sys.modules or _verbose_requested():
        return
    os.environ.setdefault(_TF_LOG_LEVEL_ENV, _DEFAULT_TF_LOG_LEVEL)
    try:
        min_level = int(os.environ[_TF_LOG_LEVEL_ENV])
    except ValueError:
        return
    if min_level < 1:
        return
    with _filtered_stderr(min_level):
        import tensorflow as tf

        tf.config.list_physical_devices()  # the CUDA probe logs here, not at the first op


_import_tensorflow_quietly()
