"""The one place where images change representation.

Conventions: datasets yield float32 RGB in [0, 255]; the segmenter takes that range and
applies the Caffe BGR-mean convention inside (docs/facts.md s.2, "Input of the published
checkpoints"; liyunsheng13/BDL ``data/__init__.py``); the translator works
in RGB [-1, 1]; labels are int32 trainIds with ``IGNORE_INDEX`` for ignored pixels.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
from PIL import Image

from sait_tf import labels
from sait_tf.runtime import files

CAFFE_BGR_MEAN = (104.00698793, 116.66876762, 122.67891434)


def caffe_preprocess(rgb_pixels: tf.Tensor) -> tf.Tensor:
    """RGB [0, 255] -> BGR minus the ImageNet mean, the input of the published checkpoints."""
    bgr = tf.reverse(tf.cast(rgb_pixels, tf.float32), axis=[-1])
    return bgr - tf.constant(CAFFE_BGR_MEAN, dtype=tf.float32)


def pixels_to_unit(pixels: tf.Tensor) -> tf.Tensor:
    """RGB [0, 255] -> RGB [-1, 1], the translator's range."""
    return tf.cast(pixels, tf.float32) / 127.5 - 1.0


def unit_to_pixels(unit: tf.Tensor) -> tf.Tensor:
    """RGB [-1, 1] -> float RGB [0, 255], the segmenter's range."""
    return (tf.cast(unit, tf.float32) + 1.0) * 127.5


def to_uint8(pixels: tf.Tensor) -> tf.Tensor:
    """Float RGB [0, 255] -> uint8, rounded and clipped."""
    return tf.cast(tf.clip_by_value(tf.round(pixels), 0.0, 255.0), tf.uint8)


def colorize(train_ids: tf.Tensor) -> tf.Tensor:
    """trainIds [..., H, W] -> uint8 RGB [..., H, W, 3], Cityscapes palette; ignore is black."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    palette[: labels.NUM_CLASSES] = labels.PALETTE
    return tf.gather(tf.constant(palette), tf.clip_by_value(tf.cast(train_ids, tf.int32), 0, 255))


def resize_logits(logits: tf.Tensor, size: tuple[int, int] | tf.Tensor) -> tf.Tensor:
    """Bilinear resizing of NHWC logits to ``size`` (H, W) with the corners aligned; float32.

    PyTorch's ``interpolate(..., mode="bilinear", align_corners=True)``, with which the peers
    up-sample logits before the loss and D_seg (liyunsheng13/BDL ``model/deeplab.py``), the
    pseudo-labels (``SSL.py``) and the evaluation (``evaluation.py``); TF2's
    ``tf.image.resize`` samples half-pixel centres instead. Written with gathers, in PyTorch's
    order (along W, then H): XLA's ``ResizeBilinear`` with ``align_corners`` returns wrong
    rows for some sizes (8x12 -> 64x96 on TF 2.21).
    """
    columns = _interpolate_aligned(tf.cast(logits, tf.float32), size[1], axis=2)
    return _interpolate_aligned(columns, size[0], axis=1)


def _interpolate_aligned(x: tf.Tensor, out_size: int | tf.Tensor, axis: int) -> tf.Tensor:
    """Linear interpolation of NHWC ``x`` along ``axis`` to ``out_size`` samples, the first
    and last on the first and last input samples (PyTorch's ``align_corners=True`` source
    index ``dst * (in - 1) / (out - 1)``, weights ``1 - t`` and ``t``)."""
    in_size = tf.shape(x)[axis]
    out_size = tf.cast(out_size, tf.int32)
    scale = (tf.cast(in_size - 1, tf.float32)
             / tf.cast(tf.maximum(out_size - 1, 1), tf.float32))
    source = tf.range(out_size, dtype=tf.float32) * scale
    lower = tf.minimum(tf.cast(source, tf.int32), in_size - 1)
    upper = tf.minimum(lower + 1, in_size - 1)
    shape = [1, 1, 1, 1]
    shape[axis] = -1
    weight = tf.reshape(source - tf.cast(lower, tf.float32), shape)
    return ((1.0 - weight) * tf.gather(x, lower, axis=axis)
            + weight * tf.gather(x, upper, axis=axis))


def write_png(path: str, image: np.ndarray | Image.Image) -> None:
    """Writes a PNG under a hidden temporary name in the same folder, then renames it over
    ``path``, so a killed process never leaves a half-written file that looks complete."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    with files.atomic_open(path, "wb") as f:
        image.save(f, format="PNG")
