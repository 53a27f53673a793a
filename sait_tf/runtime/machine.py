"""What a speed or memory figure was measured on, and which kernels TensorFlow runs here.

``cpu_flags`` and ``simd_flags`` read the CPU without TensorFlow; ``onednn_enabled`` and
``eigen_convolutions`` ask the TensorFlow that is imported.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence


def cpu_flags() -> list[str]:
    """The CPU's feature flags (``/proc/cpuinfo``), empty where unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line.split(":", 1)[1].split()
    except OSError:
        pass
    return []


def simd_flags(flag_list: Sequence[str]) -> list[str]:
    """The vector-arithmetic subset of ``flag_list`` (AVX*, FMA, AMX, F16C): what decides
    oneDNN's kernels, so what makes the same code 2-4x faster or slower between machines."""
    return [flag for flag in flag_list if flag.startswith(("avx", "fma", "amx", "f16c"))]


def onednn_enabled() -> bool | None:
    """Whether TensorFlow runs its oneDNN kernels (its default for the CPU, or
    ``TF_ENABLE_ONEDNN_OPTS``); None where this TensorFlow cannot say."""
    try:
        from tensorflow.python.util import _pywrap_util_port
        return bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError):
        return None


@functools.cache
def eigen_convolutions() -> bool:
    """True when convolutions run in TensorFlow's own (Eigen) CPU kernels: no GPU is visible
    and oneDNN is off. Asked once per process; the answer cannot change after TensorFlow
    has started."""
    import tensorflow as tf

    return not tf.config.list_physical_devices("GPU") and onednn_enabled() is False
