"""Segmentation networks M: ``build_segmenter(arch, num_classes, **size_knobs)``."""

from __future__ import annotations

import inspect

import gin

from sait_tf import labels
from sait_tf.models.deeplabv2 import DeepLabV2, build_deeplabv2
from sait_tf.models.fcn8s import FCN8s, build_fcn8s

# Both are subclassed keras.Models with ``num_classes`` and ``torch_layers``.
Segmenter = DeepLabV2 | FCN8s
SEGMENTER_BUILDERS = {"deeplabv2": build_deeplabv2, "fcn8s": build_fcn8s}


def size_knobs_of(arch: str) -> tuple[str, ...]:
    """The size knobs ``build_segmenter`` accepts for ``arch`` (e.g. blocks, width_multiplier)."""
    if arch not in SEGMENTER_BUILDERS:
        raise ValueError(f"build_segmenter: unknown arch {arch!r}; "
                         f"valid: {', '.join(sorted(SEGMENTER_BUILDERS))}")
    parameters = inspect.signature(SEGMENTER_BUILDERS[arch]).parameters
    return tuple(name for name in parameters if name != "num_classes")


@gin.configurable
def build_segmenter(arch: str, num_classes: int = labels.NUM_CLASSES,
                    **size_knobs) -> Segmenter:
    """Segmenter M: float32 RGB [0, 255] NHWC in, ``num_classes`` logits NHWC out (any H, W).

    ``arch`` is "deeplabv2" (logits at output stride 8, PyTorch's size) or "fcn8s" (logits at
    the input size). ``size_knobs`` shrink the network (defaults are the paper's sizes):
    deeplabv2 ``blocks``, ``width_multiplier``; fcn8s ``width_multiplier``, ``dropout``;
    deeplabv2 also takes ``bn_mode`` ("frozen" or the peers' "train", see ``FrozenBatchNorm``).
    """
    valid_knobs = size_knobs_of(arch)
    unknown = sorted(set(size_knobs) - set(valid_knobs))
    if unknown:
        raise ValueError(f"build_segmenter: {arch} has no size knob {', '.join(unknown)}; "
                         f"valid: {', '.join(valid_knobs)}")
    return SEGMENTER_BUILDERS[arch](num_classes, **size_knobs)
