"""DeepLabV2: Caffe-style ResNet-101 backbone and the ASPP-sum classifier (REFERENCE.md s.2).

Keras layer names follow the PyTorch peers' state_dict module paths (``conv1``, ``bn1``,
``layer3.5.conv2``, ``layer1.0.downsample.0``) so checkpoints convert by name. The peers'
``layer5`` is the layer named ``classifier`` (its variable paths contain "classifier", which
optimisers use to give it 10x learning rate); its branches are ``classifier.convs[i]``
(``layer5.conv2d_list.i``).

The layers shared with FCN8s (Caffe preprocessing, ceil-mode max-pooling) live here too.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import tensorflow as tf

from sait_tf import images

PAPER_BLOCKS = (3, 4, 23, 3)
PAPER_PLANES = (64, 128, 256, 512)
STEM_WIDTH = 64
EXPANSION = 4
# (stride, dilation) of layer1..layer4: output stride 8, atrous layer3/layer4.
LAYER_STRIDES_DILATIONS = ((1, 1), (2, 1), (1, 2), (1, 4))
CLASSIFIER_DILATIONS = (6, 12, 18, 24)
BN_EPSILON = 1e-5
# Typical magnitude of Caffe-preprocessed pixels (mean-subtracted, 0..255 range).
CAFFE_INPUT_SCALE = 64.0


@keras.saving.register_keras_serializable(package="sait_tf")
class CaffePreprocess(keras.layers.Layer):
    """RGB [0, 255] -> BGR minus the Caffe mean, inside the model so exports take raw images."""

    def call(self, rgb_pixels: tf.Tensor) -> tf.Tensor:
        return images.caffe_preprocess(rgb_pixels)


@keras.saving.register_keras_serializable(package="sait_tf")
class FrozenBatchNorm(keras.layers.Layer):
    """Batch normalisation that always uses its loaded statistics; none of its weights train.

    Peers freeze the affine parameters and keep BN in train mode with batch 1; using the
    loaded statistics is the reproducible choice (REFERENCE.md s.2). The weights are created
    non-trainable, so even ``model.trainable = True`` cannot unfreeze them.
    """

    def __init__(self, epsilon: float = BN_EPSILON, **kwargs) -> None:
        kwargs.setdefault("trainable", False)
        super().__init__(**kwargs)
        self.epsilon = epsilon

    def build(self, input_shape: Sequence[int | None]) -> None:
        channels = (input_shape[-1],)
        self.gamma = self.add_weight(shape=channels, initializer="ones", trainable=False,
                                     name="gamma")
        self.beta = self.add_weight(shape=channels, initializer="zeros", trainable=False,
                                    name="beta")
        self.moving_mean = self.add_weight(shape=channels, initializer="zeros",
                                           trainable=False, name="moving_mean")
        self.moving_variance = self.add_weight(shape=channels, initializer="ones",
                                               trainable=False, name="moving_variance")

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        scale = self.gamma * tf.math.rsqrt(self.moving_variance + self.epsilon)
        return inputs * scale + (self.beta - self.moving_mean * scale)

    def get_config(self) -> dict:
        return {**super().get_config(), "epsilon": self.epsilon}


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


@keras.saving.register_keras_serializable(package="sait_tf")
class ASPPSum(keras.layers.Layer):
    """The DeepLabV2 classifier: 3x3 convs with dilations 6/12/18/24 on the same features,
    all of their outputs summed. Weights N(0, 0.01), biases zero, as in the peers."""

    def __init__(self, num_classes: int, dilations: Sequence[int] = CLASSIFIER_DILATIONS,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_classes, self.dilations = num_classes, tuple(dilations)
        self.paddings = [keras.layers.ZeroPadding2D(d, name=f"pad_d{d}") for d in self.dilations]
        self.convs = [
            keras.layers.Conv2D(num_classes, 3, dilation_rate=d, use_bias=True,
                                kernel_initializer=keras.initializers.RandomNormal(0.0, 0.01),
                                name=f"conv_d{d}")
            for d in self.dilations
        ]

    def build(self, input_shape: Sequence[int | None]) -> None:
        for conv in self.convs:
            conv.build(input_shape)

    def call(self, features: tf.Tensor) -> tf.Tensor:
        pairs = zip(self.paddings, self.convs, strict=True)
        return tf.add_n([conv(pad(features)) for pad, conv in pairs])

    def compute_output_shape(self, input_shape):
        return (*input_shape[:3], self.num_classes)

    def get_config(self) -> dict:
        return {**super().get_config(), "num_classes": self.num_classes,
                "dilations": self.dilations}


def _conv(x, filters: int, kernel: int, name: str, strides: int = 1, dilation: int = 1,
          padding: int = 0, input_scale: float = 1.0):
    """PyTorch-style conv without bias: explicit symmetric zero padding, then a valid conv.

    He initialisation divided by ``input_scale``, the typical magnitude of the input, so
    activations start near unit scale under frozen identity BN (training from scratch).
    """
    if padding:
        x = keras.layers.ZeroPadding2D(padding, name=f"{name}.pad")(x)
    initializer = keras.initializers.VarianceScaling(2.0 / input_scale**2, "fan_in",
                                                     "truncated_normal")
    return keras.layers.Conv2D(filters, kernel, strides=strides, dilation_rate=dilation,
                               use_bias=False, kernel_initializer=initializer, name=name)(x)


def _bn(x, name: str, relu: bool):
    x = FrozenBatchNorm(name=name)(x)
    return keras.layers.ReLU(name=f"{name}.relu")(x) if relu else x


def _bottleneck(x, planes: int, name: str, stride: int, dilation: int, project: bool):
    """Caffe-style bottleneck: the stride is on the first 1x1 conv, not on the 3x3."""
    shortcut = x
    if project:
        shortcut = _conv(x, planes * EXPANSION, 1, f"{name}.downsample.0", strides=stride)
        shortcut = _bn(shortcut, f"{name}.downsample.1", relu=False)
    y = _bn(_conv(x, planes, 1, f"{name}.conv1", strides=stride), f"{name}.bn1", relu=True)
    y = _conv(y, planes, 3, f"{name}.conv2", dilation=dilation, padding=dilation)
    y = _bn(y, f"{name}.bn2", relu=True)
    y = _bn(_conv(y, planes * EXPANSION, 1, f"{name}.conv3"), f"{name}.bn3", relu=False)
    y = keras.layers.Add(name=f"{name}.add")([y, shortcut])
    return keras.layers.ReLU(name=f"{name}.relu")(y)


def _scaled(width: int, width_multiplier: float) -> int:
    return max(1, round(width * width_multiplier))


def build_deeplabv2(num_classes: int, blocks: Sequence[int] = PAPER_BLOCKS,
                    width_multiplier: float = 1.0) -> keras.Model:
    """DeepLabV2-ResNet101 on RGB [0, 255] NHWC; logits at output stride 8 with PyTorch's size.

    ``blocks`` (bottlenecks per layer) and ``width_multiplier`` (scales the stem and the planes
    64/128/256/512) shrink the network for demos; the defaults are the paper's.
    """
    blocks = tuple(blocks)
    if len(blocks) != 4 or any(int(b) != b or b < 1 for b in blocks):
        raise ValueError(f"deeplabv2: blocks must be 4 positive integers, got {blocks!r}")
    if not width_multiplier > 0:
        raise ValueError(f"deeplabv2: width_multiplier must be > 0, got {width_multiplier!r}")
    if num_classes < 1:
        raise ValueError(f"deeplabv2: num_classes must be >= 1, got {num_classes!r}")

    rgb = keras.Input(shape=(None, None, 3), name="image")
    x = CaffePreprocess(name="caffe_preprocess")(rgb)
    x = _conv(x, _scaled(STEM_WIDTH, width_multiplier), 7, "conv1", strides=2, padding=3,
              input_scale=CAFFE_INPUT_SCALE)
    x = _bn(x, "bn1", relu=True)
    x = MaxPool2DCeil(3, 2, padding=1, name="maxpool")(x)
    for index, (count, planes, (stride, dilation)) in enumerate(
            zip(blocks, PAPER_PLANES, LAYER_STRIDES_DILATIONS, strict=True), start=1):
        for block in range(int(count)):
            x = _bottleneck(x, _scaled(planes, width_multiplier), f"layer{index}.{block}",
                            stride=stride if block == 0 else 1, dilation=dilation,
                            project=block == 0)
    logits = ASPPSum(num_classes, name="classifier")(x)
    return keras.Model(rgb, logits, name="deeplabv2")
