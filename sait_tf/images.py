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
    """Bilinear upsampling of NHWC logits to ``size`` (H, W), as before the loss and argmax."""
    return tf.image.resize(logits, size, method="bilinear")


def write_png(path: str, image: np.ndarray | Image.Image) -> None:
    """Writes a PNG under a hidden temporary name in the same folder, then renames it over
    ``path``, so a killed process never leaves a half-written file that looks complete."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    with files.atomic_open(path, "wb") as f:
        image.save(f, format="PNG")
