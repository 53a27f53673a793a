"""What a speed or memory figure was measured on, and which kernels TensorFlow runs here.

``cpu_flags`` and ``simd_flags`` read the CPU without TensorFlow; ``onednn_enabled``,
``eigen_convolutions`` and ``onednn_bfloat16_missing`` ask the TensorFlow that is imported.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

# Values of ONEDNN_MAX_CPU_ISA below oneDNN's first instruction set with bfloat16
# convolutions (AVX-512 core, emulated; AVX2_VNNI_2 and AVX-512 BF16 natively).
ISAS_WITHOUT_BFLOAT16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI")
AVX512_CORE_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq")


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


def onednn_bfloat16_missing() -> str | None:
    """Why TensorFlow's oneDNN kernels cannot run a bfloat16 convolution here ("could not
    create a primitive descriptor" at the first step), or None when they can or are off, or
    a GPU computes. oneDNN needs AVX-512 (or AVX2_VNNI_2) for bfloat16."""
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU") or not onednn_enabled():
        return None
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if isa in ISAS_WITHOUT_BFLOAT16:
        return f"ONEDNN_MAX_CPU_ISA={isa} holds oneDNN below AVX-512"
    flags = cpu_flags()
    if not (all(flag in flags for flag in AVX512_CORE_FLAGS) or "avx_ne_convert" in flags):
        return "the CPU has no AVX-512"
    return None
