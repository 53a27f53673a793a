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
    # float32 before resizing: XLA cannot differentiate the bilinear resize of bfloat16.
    logits = resize_logits(tf.cast(logits, tf.float32), tf.shape(labels)[1:3])
    labels = tf.cast(labels, tf.int32)
    valid = tf.not_equal(labels, IGNORE_INDEX)
    safe_labels = tf.where(valid, labels, tf.zeros_like(labels))
    per_pixel = tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=safe_labels, logits=logits)
    valid = tf.cast(valid, tf.float32)
    return tf.reduce_sum(per_pixel * valid) / tf.maximum(tf.reduce_sum(valid), 1.0)


def binary_cross_entropy_with_logits(logits: tf.Tensor, target: float) -> tf.Tensor:
    """Mean BCE of discriminator logits against a constant domain label (Eq. 11)."""
    logits = tf.cast(logits, tf.float32)
    return tf.reduce_mean(
        tf.nn.sigmoid_cross_entropy_with_logits(labels=tf.fill(tf.shape(logits), target),
                                                logits=logits))


def l1_loss(prediction: tf.Tensor, target: tf.Tensor) -> tf.Tensor:
    """Mean absolute difference: image reconstruction (Eq. 2), image and latent cycle (Eq. 4)."""
    return tf.reduce_mean(tf.abs(tf.cast(prediction, tf.float32) - tf.cast(target, tf.float32)))


def lsgan_discriminator_loss(real_outputs: list[tf.Tensor],
                             fake_outputs: list[tf.Tensor]) -> tf.Tensor:
    """LSGAN loss of a multi-scale discriminator (Eq. 3): real -> 1, fake -> 0.

    Per scale 1/2 E[(D(real) - 1)^2] + 1/2 E[D(fake)^2] over every patch score, summed over
    the scales. Eq. 3 prints both players' targets in one expression, with the labels
    swapped on the real term; this is the standard pair of Mao et al. with the paper's 1/2.
    """
    return tf.add_n([
        0.5 * tf.reduce_mean(tf.square(tf.cast(real, tf.float32) - 1.0))
        + 0.5 * tf.reduce_mean(tf.square(tf.cast(fake, tf.float32)))
        for real, fake in zip(real_outputs, fake_outputs, strict=True)])


def lsgan_generator_loss(fake_outputs: list[tf.Tensor]) -> tf.Tensor:
    """LSGAN loss of the translator against a multi-scale discriminator (Eq. 3): fake -> 1.

    Per scale 1/2 E[(D(x_{A->B}) - 1)^2], the fake term of Eq. 3, summed over the scales.
    """
    return tf.add_n([0.5 * tf.reduce_mean(tf.square(tf.cast(fake, tf.float32) - 1.0))
                     for fake in fake_outputs])


def symmetric_cross_entropy(logits: tf.Tensor, translated_logits: tf.Tensor) -> tf.Tensor:
    """Symmetric cross-entropy between M(x) and M(x_{A->B}) (Eq. 5).

    -sum_c p_t log p - sum_c p log p_t per pixel, with p = softmax(M(x)) and
    p_t = softmax(M(x_{A->B})), averaged over pixels and batch. Both logits come from the
    same segmenter at the same resolution; gradients flow into both arguments.
    """
    logits = tf.cast(logits, tf.float32)
    translated_logits = tf.cast(translated_logits, tf.float32)
    log_p = tf.nn.log_softmax(logits, axis=-1)
    log_p_translated = tf.nn.log_softmax(translated_logits, axis=-1)
    per_pixel = -tf.reduce_sum(tf.exp(log_p_translated) * log_p + tf.exp(log_p) * log_p_translated,
                               axis=-1)
    return tf.reduce_mean(per_pixel)
