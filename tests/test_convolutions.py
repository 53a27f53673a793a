"""``conv2d_valid`` and ``Conv2D``: forward convolutions for the gradients, same values."""

import numpy as np
import pytest
import tensorflow as tf

from sait_tf.models import layers


def _op_types(function, *args) -> set[str]:
    graph = tf.function(function).get_concrete_function(*args).graph
    return {op.type for op in graph.get_operations()}


def _gradients(convolve, x: tf.Tensor, kernel: tf.Tensor, weights: tf.Tensor):
    with tf.GradientTape() as tape:
        tape.watch([x, kernel])
        loss = tf.reduce_sum(convolve(x, kernel) * weights)
    return tape.gradient(loss, [x, kernel])


@pytest.fixture
def eigen(monkeypatch):
    """Runs ``conv2d_valid`` as on a CPU with TensorFlow's own kernels, whatever this one has."""
    monkeypatch.setattr(layers, "eigen_convolutions", lambda: True)


# (batch, height, width, in, out, kernel, dilation): F's 7x7 RGB output, a 3x3 residual conv,
# DeepLabV2's dilated 3x3, and a 3-channel input (its input gradient stays built in).
SHAPES = [(1, 24, 30, 32, 3, 7, 1), (2, 12, 10, 24, 20, 3, 1), (1, 20, 18, 16, 8, 3, 4),
          (2, 16, 16, 3, 16, 7, 1)]


@pytest.mark.parametrize("shape", SHAPES)
def test_gradients_equal_tensorflows_without_backprop_kernels(eigen, shape):
    batch, height, width, channels, filters, size, dilation = shape
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(batch, height, width, channels)), tf.float32)
    kernel = tf.constant(rng.normal(size=(size, size, channels, filters)), tf.float32)
    out_h, out_w = height - (size - 1) * dilation, width - (size - 1) * dilation
    weights = tf.constant(rng.normal(size=(batch, out_h, out_w, filters)), tf.float32)

    def builtin(x, kernel):
        return tf.nn.convolution(x, kernel, padding="VALID", dilations=dilation)

    def ours(x, kernel):
        return layers.conv2d_valid(x, kernel, dilation)

    np.testing.assert_allclose(tf.function(ours)(x, kernel), builtin(x, kernel), rtol=1e-5,
                               atol=1e-4)
    traced = tf.function(_gradients)
    for got, want in zip(traced(ours, x, kernel, weights),
                         traced(builtin, x, kernel, weights), strict=True):
        scale = float(tf.reduce_max(tf.abs(want)))
        np.testing.assert_allclose(got / scale, want / scale, atol=2e-6)
    ops = _op_types(lambda x, kernel: _gradients(ours, x, kernel, weights), x, kernel)
    assert "Conv2DBackpropFilter" not in ops
    assert ("Conv2DBackpropInput" in ops) == (channels < layers.NARROW_INPUT_CHANNELS)


def test_small_outputs_and_one_by_one_kernels_keep_tensorflows_gradients(eigen):
    """FCN8s' fc6 (7x7 kernel, few output pixels) and 1x1 convs: no im2col buffer to avoid."""
    fc6 = (tf.zeros([1, 8, 8, 64]), tf.zeros([7, 7, 64, 128]))
    one_by_one = (tf.zeros([1, 32, 32, 64]), tf.zeros([1, 1, 64, 64]))
    for x, kernel in (fc6, one_by_one):
        ops = _op_types(lambda x, kernel: _gradients(
            layers.conv2d_valid, x, kernel, tf.ones_like(layers.conv2d_valid(x, kernel))),
            x, kernel)
        assert "Conv2DBackpropFilter" in ops


def test_without_eigen_kernels_tensorflows_gradients_stand(monkeypatch):
    monkeypatch.setattr(layers, "eigen_convolutions", lambda: False)
    x, kernel = tf.zeros([1, 40, 40, 32]), tf.zeros([7, 7, 32, 3])
    ops = _op_types(lambda x, kernel: _gradients(
        layers.conv2d_valid, x, kernel, tf.ones([1, 34, 34, 3])), x, kernel)
    assert {"Conv2DBackpropFilter", "Conv2DBackpropInput"} <= ops


def test_conv2d_layer_uses_it_only_for_valid_stride_one(eigen):
    x = tf.random.normal([1, 20, 20, 16])
    for layer, custom in ((layers.Conv2D(8, 3), True), (layers.Conv2D(8, 3, strides=2), False),
                          (layers.Conv2D(8, 3, padding="same"), False)):
        layer.build(x.shape)
        want = tf.nn.convolution(x, layer.kernel, strides=layer.strides,
                                 padding=layer.padding.upper()) + layer.bias
        np.testing.assert_allclose(tf.function(layer)(x), want, rtol=1e-5, atol=1e-5)

        def loss(x, layer=layer):
            with tf.GradientTape() as tape:
                value = tf.reduce_sum(layer(x) ** 2)
            return tape.gradient(value, layer.kernel)

        assert ("Conv2DBackpropFilter" not in _op_types(loss, x)) == custom


def _filter_shapes(function, *args) -> list[list[int]]:
    graph = tf.function(function).get_concrete_function(*args).graph
    return [op.inputs[1].shape.as_list() for op in graph.get_operations()
            if op.type == "Conv2D"]


@pytest.mark.parametrize("eigen_kernels", [True, False])
@pytest.mark.parametrize("dilation, kept_kernel", [(6, [3, 3]), (12, [1, 3]), (18, [1, 1])])
def test_atrous_conv_leaves_out_taps_that_read_only_padding(monkeypatch, eigen_kernels,
                                                            dilation, kept_kernel):
    """On 8x16 features (the demo's DeepLabV2 classifier) a dilation >= 8 leaves the kernel's
    outer rows on padding, >= 16 its outer columns too: values and every gradient are those
    of the full convolution of the zero-padded features."""
    monkeypatch.setattr(layers, "eigen_convolutions", lambda: eigen_kernels)
    rng = np.random.default_rng(dilation)
    x = tf.constant(rng.normal(size=(2, 8, 16, 12)), tf.float32)
    conv = layers.Conv2D(5, 3, dilation_rate=dilation, bias_initializer="random_normal")
    conv.build(layers.zero_pad(x, dilation).shape)
    conv.kernel.assign(rng.normal(size=(3, 3, 12, 5)))
    weights = tf.constant(rng.normal(size=(2, 8, 16, 5)), tf.float32)

    def full(x):
        return conv(layers.zero_pad(x, dilation))

    def loss_and_gradients(convolve, x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(convolve(x) * weights)
        return [loss, *tape.gradient(loss, [x, conv.kernel, conv.bias])]

    def ours(x):
        return layers.atrous_conv(conv, x)

    traced = tf.function(loss_and_gradients)
    np.testing.assert_allclose(tf.function(ours)(x), full(x), rtol=1e-5, atol=1e-5)
    for got, want in zip(traced(ours, x), traced(full, x), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    assert [shape[:2] for shape in _filter_shapes(ours, x)] == [kept_kernel]
