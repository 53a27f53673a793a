"""Losses as small pure functions (paper Eq. 2-5, 8, 10, 11).

Every function returns a scalar that is a mean over the batch it is given; trainers
scale by the global batch under tf.distribute.
"""

from __future__ import annotations

import tensorflow as tf

from sait_tf.images import resize_logits
from sait_tf.labels import IGNORE_INDEX


def segmentation_cross_entropy(logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    """Pixel-wise cross-entropy, Eq. 8 and 10: mean over non-ignored pixels.

    ``logits`` NHWC at any resolution are upsampled bilinearly to the label size first,
    as the peers do; ``labels`` are int trainIds [N, H, W] with ``IGNORE_INDEX``.
    """
    logits = resize_logits(logits, tf.shape(labels)[1:3])
    labels = tf.cast(labels, tf.int32)
    valid = tf.not_equal(labels, IGNORE_INDEX)
    safe_labels = tf.where(valid, labels, tf.zeros_like(labels))
    per_pixel = tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=safe_labels, logits=tf.cast(logits, tf.float32))
    valid = tf.cast(valid, tf.float32)
    return tf.reduce_sum(per_pixel * valid) / tf.maximum(tf.reduce_sum(valid), 1.0)


def binary_cross_entropy_with_logits(logits: tf.Tensor, target: float) -> tf.Tensor:
    """Mean BCE of discriminator logits against a constant domain label (Eq. 11)."""
    logits = tf.cast(logits, tf.float32)
    return tf.reduce_mean(
        tf.nn.sigmoid_cross_entropy_with_logits(labels=tf.fill(tf.shape(logits), target),
                                                logits=logits))
