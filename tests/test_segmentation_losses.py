"""Segmentation cross-entropy (Eq. 8, 10) and the output-space BCE (Eq. 11) on hand values."""

import numpy as np
import tensorflow as tf

from sait_tf import losses


def test_cross_entropy_upsamples_logits_and_skips_ignored_pixels():
    # One logit pixel upsampled to a 2x2 label: every pixel has logits (ln 3, 0).
    logits = tf.constant([[[[np.log(3.0), 0.0]]]], tf.float32)
    labels = tf.constant([[[0, 1], [255, 0]]])
    expected = (2 * -np.log(0.75) + -np.log(0.25)) / 3
    np.testing.assert_allclose(losses.segmentation_cross_entropy(logits, labels), expected,
                               rtol=1e-6)


def test_cross_entropy_of_an_all_ignored_label_is_zero_and_bfloat16_logits_work():
    logits = tf.cast(tf.ones((1, 2, 2, 3)), tf.bfloat16)
    assert float(losses.segmentation_cross_entropy(logits, tf.fill((1, 4, 4), 255))) == 0.0
    np.testing.assert_allclose(
        losses.segmentation_cross_entropy(logits, tf.zeros((1, 4, 4), tf.int32)), np.log(3.0),
        rtol=1e-6)


def test_bce_against_a_constant_domain_label():
    logits = tf.constant([0.0, 2.0])
    expected = (np.log(2.0) + np.log1p(np.exp(-2.0))) / 2
    np.testing.assert_allclose(losses.binary_cross_entropy_with_logits(logits, 1.0), expected,
                               rtol=1e-6)
