"""What a speed or memory figure was measured on: the CPU's feature flags (no TensorFlow)."""

from __future__ import annotations

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
