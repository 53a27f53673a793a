"""The translator's losses (Eq. 2-5) on hand-computed values."""

import math

import numpy as np
import pytest
import tensorflow as tf

from sait_tf import losses


def test_l1_loss_is_the_mean_absolute_difference():
    prediction = tf.constant([[1.0, -2.0], [0.5, 3.0]])
    target = tf.constant([[0.0, 0.0], [1.0, 1.0]])
    assert float(losses.l1_loss(prediction, target)) == pytest.approx((1 + 2 + 0.5 + 2) / 4)


def test_lsgan_discriminator_loss_sums_the_scales():
    real = [tf.constant([[1.0, 0.0]]), tf.constant([[3.0]])]
    fake = [tf.constant([[0.0, 2.0]]), tf.constant([[-1.0]])]
    # scale 0: 0.5 * mean(0, 1) + 0.5 * mean(0, 4) = 0.25 + 1.0
    # scale 1: 0.5 * 4 + 0.5 * 1 = 2.5
    assert float(losses.lsgan_discriminator_loss(real, fake)) == pytest.approx(3.75)


def test_lsgan_discriminator_loss_is_zero_at_its_targets():
    real = [tf.ones([2, 3, 3, 1]), tf.ones([2, 2, 2, 1])]
    fake = [tf.zeros([2, 3, 3, 1]), tf.zeros([2, 2, 2, 1])]
    assert float(losses.lsgan_discriminator_loss(real, fake)) == 0.0
    assert float(losses.lsgan_discriminator_loss(fake, real)) == pytest.approx(2.0)


def test_lsgan_generator_loss_pushes_fakes_to_one():
    fake = [tf.constant([[1.0, 3.0]]), tf.constant([[0.0]])]
    # 0.5 * mean(0, 4) + 0.5 * 1
    assert float(losses.lsgan_generator_loss(fake)) == pytest.approx(1.5)
    assert float(losses.lsgan_generator_loss([tf.ones([1, 4, 4, 1])])) == 0.0


def test_symmetric_cross_entropy_on_hand_computed_pixels():
    logits = tf.constant([[[[0.0, 0.0]], [[math.log(3.0), 0.0]]]])  # p = (.5, .5), (.75, .25)
    translated = tf.constant([[[[math.log(3.0), 0.0]], [[math.log(3.0), 0.0]]]])
    p = np.array([[0.5, 0.5], [0.75, 0.25]])
    q = np.array([[0.75, 0.25], [0.75, 0.25]])
    expected = np.mean(-(q * np.log(p)).sum(-1) - (p * np.log(q)).sum(-1))
    value = float(losses.symmetric_cross_entropy(logits, translated))
    assert value == pytest.approx(expected, rel=1e-6)
    assert float(losses.symmetric_cross_entropy(translated, logits)) == pytest.approx(value)


def test_symmetric_cross_entropy_gradient_reaches_the_translated_logits():
    logits = tf.constant([[[[2.0, -1.0, 0.0]]]])
    translated = tf.Variable([[[[0.0, 1.0, 0.0]]]])
    with tf.GradientTape() as tape:
        loss = losses.symmetric_cross_entropy(tf.stop_gradient(logits), translated)
    grad = tape.gradient(loss, translated).numpy()
    p = tf.nn.softmax(logits).numpy()
    q = tf.nn.softmax(translated).numpy()
    # d/dz [-sum q log p - sum p log q] = q * (-log p - H(q, p)) + (q - p)
    cross = -(q * np.log(p)).sum(-1, keepdims=True)
    expected = q * (-np.log(p) - cross) + (q - p)
    np.testing.assert_allclose(grad, expected, atol=1e-6)
