"""Image conversions: Caffe preprocessing, ranges, colourisation."""

import numpy as np
import tensorflow as tf

from sait_tf import images, labels


def test_caffe_preprocess_reverses_channels_and_subtracts_bgr_mean():
    rgb = tf.constant([[[[10.0, 20.0, 30.0]]]])
    out = images.caffe_preprocess(rgb).numpy()[0, 0, 0]
    np.testing.assert_allclose(out, [30 - 104.00698793, 20 - 116.66876762, 10 - 122.67891434],
                               rtol=1e-6)


def test_unit_range_round_trip_and_uint8_rounding():
    pixels = tf.constant([0.0, 127.5, 255.0])
    np.testing.assert_allclose(images.pixels_to_unit(pixels).numpy(), [-1.0, 0.0, 1.0])
    np.testing.assert_allclose(images.unit_to_pixels(images.pixels_to_unit(pixels)), pixels)
    np.testing.assert_array_equal(images.to_uint8(tf.constant([-3.0, 1.5, 254.4, 300.0])),
                                  [0, 2, 254, 255])


def test_colorize_uses_palette_and_black_for_ignore():
    colours = images.colorize(tf.constant([[0, 13, 255]])).numpy()
    np.testing.assert_array_equal(colours[0], [labels.PALETTE[0], labels.PALETTE[13], [0, 0, 0]])
