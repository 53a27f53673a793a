"""Layers and helpers shared by more than one architecture in ``sait_tf.models``.

Segmenters (DeepLabV2, FCN8s): the Caffe input convention of the peers' checkpoints,
PyTorch's ceil-mode max-pooling and explicit zero padding, the size-knob checks. Translation
networks (F and its PatchGAN discriminators): spectrally normalised convolutions, which the
paper applies to every model of the translation part (Sec. 4), and ``add_sublayers``. Every
network: ``Conv2D`` and ``conv2d_valid``, whose gradients are forward convolutions on a CPU
that runs TensorFlow's own kernels (docs/PERFORMANCE.md, "Convolution gradients").
"""

from __future__ import annotations

import keras
import tensorflow as tf

from sait_tf import images
from sait_tf.runtime.machine import eigen_convolutions


@keras.saving.register_keras_serializable(package="sait_tf")
class CaffePreprocess(keras.layers.Layer):
    """RGB [0, 255] -> BGR minus the Caffe mean, inside the model so exports take raw images."""

    def call(self, rgb_pixels: tf.Tensor) -> tf.Tensor:
        return images.caffe_preprocess(rgb_pixels)


@keras.saving.register_keras_serializable(package="sait_tf")
class MaxPool2DCeil(keras.layers.Layer):
    """Max-pooling with PyTorch's ``ceil_mode=True`` output size, for any (dynamic) H, W.

    PyTorch: ``out = ceil((n + 2p - k) / s) + 1``, minus one when the last window would start
    in the right padding (at or after ``n + p``). Padding never wins the max.
    """

    def __init__(self, pool_size: int, strides: int, padding: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.pool_size, self.strides, self.padding = pool_size, strides, padding

    def output_size(self, n: int | tf.Tensor) -> int | tf.Tensor:
        """PyTorch's ceil-mode output length for an input length ``n`` (int or int tensor)."""
        k, s, p = self.pool_size, self.strides, self.padding
        out = (n + 2 * p - k + s - 1) // s + 1
        if isinstance(n, int):
            return out - 1 if (out - 1) * s >= n + p else out
        return tf.where((out - 1) * s >= n + p, out - 1, out)

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        k, s, p = self.pool_size, self.strides, self.padding
        # Pad enough on the right for the ceil-mode windows, pool, then drop a window that
        # PyTorch's rule removes.
        edge = [p, p + s - 1]
        padded = tf.pad(inputs, [[0, 0], edge, edge, [0, 0]], constant_values=inputs.dtype.min)
        pooled = tf.nn.max_pool2d(padded, k, s, "VALID")
        shape = tf.shape(inputs)
        return pooled[:, : self.output_size(shape[1]), : self.output_size(shape[2]), :]

    def compute_output_shape(self, input_shape):
        batch, height, width, channels = input_shape
        return (batch,
                None if height is None else self.output_size(height),
                None if width is None else self.output_size(width),
                channels)

    def get_config(self) -> dict:
        return {**super().get_config(), "pool_size": self.pool_size, "strides": self.strides,
                "padding": self.padding}


def zero_pad(x: tf.Tensor, padding: int | tuple[int, int]) -> tf.Tensor:
    """Symmetric zero padding of H and W (or (H, W)), as in PyTorch's ``Conv2d(padding=...)``."""
    pad_h, pad_w = (padding, padding) if isinstance(padding, int) else padding
    return tf.pad(x, [[0, 0], [pad_h, pad_h], [pad_w, pad_w], [0, 0]])


def scaled_width(width: int, width_multiplier: float) -> int:
    """A layer width shrunk by the ``width_multiplier`` size knob (at least 1 channel)."""
    return max(1, round(width * width_multiplier))


def check_common_knobs(arch: str, num_classes: int, width_multiplier: float) -> None:
    """Rejects a non-positive ``width_multiplier`` or ``num_classes`` before any layer is made."""
    if not width_multiplier > 0:
        raise ValueError(f"{arch}: width_multiplier must be > 0, got {width_multiplier!r}")
    if num_classes < 1:
        raise ValueError(f"{arch}: num_classes must be >= 1, got {num_classes!r}")


# The built-in CPU input gradient is faster for inputs this narrow (docs/PERFORMANCE.md).
NARROW_INPUT_CHANNELS = 16


Dilation = tuple[int, int]


def _input_gradient(x: tf.Tensor, kernel: tf.Tensor, dy: tf.Tensor, dilation: Dilation
                    ) -> tf.Tensor:
    """dL/dx of a 'valid' stride-1 convolution: the full convolution of ``dy`` with the
    kernel turned by 180 degrees and its in/out channels swapped."""
    if (x.shape[-1] is not None and x.shape[-1] < NARROW_INPUT_CHANNELS
            and dilation == (1, 1)):
        return tf.raw_ops.Conv2DBackpropInput(input_sizes=tf.shape(x), filter=kernel,
                                              out_backprop=dy, strides=[1, 1, 1, 1],
                                              padding="VALID")
    pad_h, pad_w = (kernel.shape[0] - 1) * dilation[0], (kernel.shape[1] - 1) * dilation[1]
    turned = tf.transpose(tf.reverse(kernel, [0, 1]), [0, 1, 3, 2])
    padded = tf.pad(dy, [[0, 0], [pad_h, pad_h], [pad_w, pad_w], [0, 0]])
    return tf.nn.convolution(padded, turned, padding="VALID", dilations=dilation)


def _kernel_gradient(x: tf.Tensor, dy: tf.Tensor, dilation: Dilation) -> tf.Tensor:
    """dL/dkernel of a 'valid' stride-1 convolution, as one forward convolution: the input's
    channels as the batch, its batch as the channels, ``dy`` as the kernel; the output's
    stride is the dilation."""
    channels_as_batch = tf.transpose(x, [3, 1, 2, 0])
    dy_as_kernel = tf.transpose(dy, [1, 2, 0, 3])
    gradient = tf.nn.convolution(channels_as_batch, dy_as_kernel, strides=dilation,
                                 padding="VALID")
    return tf.transpose(gradient, [1, 2, 0, 3])


def _col_buffer_exceeds_tensors(x: tf.Tensor, kernel: tf.Tensor, dilation: Dilation) -> bool:
    """Whether the built-in CPU gradients' im2col buffer (output pixels x kernel taps x input
    channels) would be larger than the input, kernel and output together; True when the
    input's shape is not known when the step is traced."""
    if not x.shape.is_fully_defined():
        return True
    batch, height, width, channels = x.shape
    k_h, k_w, _, filters = kernel.shape
    output_pixels = (batch * (height - (k_h - 1) * dilation[0])
                     * (width - (k_w - 1) * dilation[1]))
    col_buffer = output_pixels * k_h * k_w * channels
    return col_buffer > x.shape.num_elements() + kernel.shape.num_elements() + (
        output_pixels * filters)


def conv2d_valid(x: tf.Tensor, kernel: tf.Tensor, dilation: int | Dilation = 1) -> tf.Tensor:
    """A 'valid' stride-1 convolution of NHWC ``x`` with an HWIO ``kernel``, dilated by
    ``dilation`` (both axes, or (H, W)).

    Where TensorFlow runs its own CPU kernels (``eigen_convolutions``), both gradients are
    forward convolutions when the built-in ones would need an im2col buffer larger than the
    tensors: those allocate output pixels x kernel taps x input channels floats per call
    (3.3 GB for F's 7x7 RGB convolution at 512x512) and ran 1.3-30x slower here. The values
    are the same up to float32 summation order. Elsewhere (oneDNN, GPUs) TensorFlow's
    gradients are kept, and so are they in eager execution: there, on a tiny translator
    step, this custom gradient moved some kernels 1e-3 away from TensorFlow's (cause not
    found), while inside ``tf.function``, where every trainer runs, the two agree to 1e-7.
    """
    spatial = kernel.shape[0] * kernel.shape[1] > 1
    dilation = (dilation, dilation) if isinstance(dilation, int) else tuple(dilation)
    if (tf.executing_eagerly() or not spatial or not eigen_convolutions()
            or not _col_buffer_exceeds_tensors(x, kernel, dilation)):
        return tf.nn.convolution(x, kernel, padding="VALID", dilations=dilation)

    @tf.custom_gradient
    def convolve(x: tf.Tensor, kernel: tf.Tensor):
        def gradients(dy: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            return (_input_gradient(x, kernel, dy, dilation),
                    _kernel_gradient(x, dy, dilation))
        return tf.nn.convolution(x, kernel, padding="VALID", dilations=dilation), gradients

    return convolve(x, kernel)


@keras.saving.register_keras_serializable(package="sait_tf")
class Conv2D(keras.layers.Conv2D):
    """``keras.layers.Conv2D`` whose 'valid' stride-1 convolutions are ``conv2d_valid``; the
    same variables, checkpoints and outputs."""

    def convolution_op(self, inputs: tf.Tensor, kernel: tf.Tensor) -> tf.Tensor:
        dilation = self.dilation_rate[0]
        if (self.padding == "valid" and tuple(self.strides) == (1, 1) and self.groups == 1
                and self.data_format == "channels_last"
                and self.dilation_rate == (dilation, dilation)):
            return conv2d_valid(inputs, tf.cast(kernel, inputs.dtype), dilation)
        return super().convolution_op(inputs, kernel)


def atrous_conv(conv: Conv2D, x: tf.Tensor) -> tf.Tensor:
    """``conv`` (stride 1, odd k x k kernel, dilation d) on ``x`` zero-padded by d * (k - 1) / 2
    on each side, which keeps the size: PyTorch's ``nn.Conv2d(padding=dilation)`` of the
    peers' atrous 3x3 convolutions.

    Along an axis of n pixels a tap i places from the kernel's centre reads only padding when
    i * d >= n; those taps are left out (the kernel is sliced, the padding shrinks). The
    output and every gradient are unchanged (a left-out tap's gradient is zero either way);
    the work is not: at the demo's 8x16 features DeepLabV2's classifier convolutions with
    dilations 12-24 become 1x3 and 1x1 convolutions. Nothing is left out at the paper's sizes
    (65x129 features, dilations up to 24) or when the size is unknown at tracing.
    """
    half, dilation = conv.kernel_size[0] // 2, conv.dilation_rate[0]
    kept = [half if size is None else min(half, (size - 1) // dilation)
            for size in x.shape[1:3]]
    if kept == [half, half]:
        return conv(zero_pad(x, half * dilation))
    keep_h, keep_w = kept
    kernel = conv.kernel[half - keep_h:half + keep_h + 1, half - keep_w:half + keep_w + 1]
    y = conv2d_valid(zero_pad(x, (keep_h * dilation, keep_w * dilation)),
                     tf.cast(kernel, x.dtype),
                     (dilation if keep_h else 1, dilation if keep_w else 1))
    return tf.nn.bias_add(y, tf.cast(conv.bias, y.dtype)) if conv.use_bias else y


class SpectralNormalization(keras.layers.SpectralNormalization):
    """Keras' spectral normalisation of a ``Conv2D``, without branches and exact at inference.

    ``training=True`` does what Keras does: ``power_iterations`` from the stored
    ``vector_u``, then the kernel divided by its spectral norm estimate sigma is written back
    into the kernel variable with the new ``vector_u`` (so gradients and optimiser updates
    act on the normalised kernel, as in TensorFlow Addons). Keras guards an all-zero kernel
    with a ``cond`` per call, which makes tracing a training step several times slower; here
    sigma is floored instead. With ``training=False`` Keras convolves with the stored kernel
    as it is: unnormalised before the first training call, and off by the last optimiser
    update after training. Here inference convolves with the kernel the next training call
    would use (stored kernel over sigma from the stored ``vector_u``) and changes no
    variable, like PyTorch's ``spectral_norm`` in eval mode.

    Under a mixed precision policy the normalisation runs in float32 (no autocasting inside
    the networks that hold it): the kernel written back is the float32 master weight, not a
    16-bit rounding that would swallow the optimiser's small updates; the convolution
    computes in 16 bits.
    """

    def __init__(self, layer: keras.layers.Conv2D, **kwargs) -> None:
        if not isinstance(layer, keras.layers.Conv2D) or layer.activation not in (
                None, keras.activations.linear):
            raise ValueError("SpectralNormalization here wraps a Conv2D without activation")
        kwargs.setdefault("autocast", False)
        super().__init__(layer, **kwargs)

    def build(self, input_shape) -> None:
        """Keras' build, with ``vector_u`` aggregated ONLY_FIRST_REPLICA.

        Every training call writes ``vector_u`` inside the replica step; under tf.distribute
        the first replica's value is then copied to all, so the replicas' copies cannot
        drift apart (Keras' default aggregation lets each replica keep its own).
        """
        keras.layers.Wrapper.build(self, input_shape)
        self.input_spec = keras.layers.InputSpec(min_ndim=1, axes={-1: input_shape[-1]})
        self.kernel = self.layer.kernel
        self.kernel_shape = self.kernel.shape
        self.vector_u = self.add_weight(
            shape=(1, self.kernel_shape[-1]),
            initializer=keras.initializers.TruncatedNormal(stddev=0.02), trainable=False,
            name="vector_u", dtype=self.layer.variable_dtype, aggregation="only_first_replica")

    def normalized_weights(self) -> tuple[tf.Tensor, tf.Tensor]:
        """``(vector_u after the power iterations, kernel / sigma)``; changes no variable."""
        kernel = self.kernel.value
        matrix = tf.reshape(kernel, [-1, self.kernel_shape[-1]])
        vector_u = self.vector_u.value
        for _ in range(self.power_iterations):
            vector_v = tf.math.l2_normalize(tf.matmul(vector_u, matrix, transpose_b=True))
            vector_u = tf.math.l2_normalize(tf.matmul(vector_v, matrix))
        vector_u = tf.stop_gradient(vector_u)
        vector_v = tf.stop_gradient(vector_v)
        sigma = tf.matmul(tf.matmul(vector_v, matrix), vector_u, transpose_b=True)
        return vector_u, kernel / tf.maximum(sigma[0, 0], 1e-12)

    def kernel_for_call(self, training: bool) -> tf.Tensor:
        """The kernel a call convolves with. In training the normalised kernel is written back
        with its ``vector_u`` first and read from the variable (the gradient reaches it, as
        through ``self.layer``); in inference nothing changes (class docstring)."""
        vector_u, kernel = self.normalized_weights()
        if not training:
            return kernel
        self.vector_u.assign(vector_u)
        self.kernel.assign(kernel)
        return self.kernel.value

    def call(self, inputs: tf.Tensor, training: bool = False) -> tf.Tensor:
        kernel = self.kernel_for_call(training)
        if training:
            return self.layer(inputs)
        compute_dtype = self.layer.compute_dtype
        outputs = self.layer.convolution_op(tf.cast(inputs, compute_dtype),
                                            tf.cast(kernel, compute_dtype))
        if self.layer.use_bias:
            outputs = outputs + tf.cast(self.layer.bias, compute_dtype)
        return outputs


def spectral_conv(filters: int, kernel_size: int, strides: int = 1,
                  name: str | None = None, use_bias: bool = True) -> SpectralNormalization:
    """A spectrally normalised ``Conv2D`` with 'valid' padding (callers pad explicitly);
    ``use_bias`` False before a normalisation that subtracts each channel's mean."""
    return SpectralNormalization(
        Conv2D(filters, kernel_size, strides=strides, padding="valid", use_bias=use_bias),
        name=name)


def add_sublayers(owner: keras.layers.Layer, prefix: str,
                  layers: list[keras.layers.Layer]) -> list[keras.layers.Layer]:
    """Sets ``layers`` as attributes ``prefix_0, prefix_1, ...`` of ``owner`` and returns them.

    Keras 3.15 on TensorFlow leaves layers held in a list or dict out of
    ``tf.train.Checkpoint``: only attributes are checkpointed.
    """
    for i, layer in enumerate(layers):
        setattr(owner, f"{prefix}_{i}", layer)
    return layers
