"""DeepLabV2: Caffe-style ResNet-101 backbone and the ASPP-sum classifier (paper Sec. 4).

The segmenter M of the paper's "D" rows, in the layout of the peers' checkpoints
(liyunsheng13/BDL and wasidennis/AdaptSegNet, ``model/deeplab.py``). A subclassed
``keras.Model`` over ``Bottleneck`` blocks. Keras layer names follow the peers' module names
(block ``layer3.5`` holds ``conv2``; ``layer1.0`` holds ``downsample.0``), and
``DeepLabV2.torch_layers`` maps each state_dict module path (``layer3.5.conv2``) to its
layer, so checkpoints convert by name. The peers' ``layer5`` is the layer named
``classifier`` (its variable paths contain "classifier", which optimisers use to give it 10x
learning rate); its branches are ``classifier.convs[i]`` (``layer5.conv2d_list.i``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType

import keras
import tensorflow as tf

from sait_tf.models.layers import (
    CaffePreprocess,
    Conv2D,
    MaxPool2DCeil,
    atrous_conv,
    check_common_knobs,
    scaled_width,
    zero_pad,
)

PAPER_BLOCKS = (3, 4, 23, 3)
PAPER_PLANES = (64, 128, 256, 512)
STEM_WIDTH = 64
STEM_KERNEL, STEM_PADDING = 7, 3
EXPANSION = 4
# (stride, dilation) of layer1..layer4: output stride 8, atrous layer3/layer4.
LAYER_STRIDES_DILATIONS = ((1, 1), (2, 1), (1, 2), (1, 4))
CLASSIFIER_DILATIONS = (6, 12, 18, 24)
BN_EPSILON = 1e-5
BN_MOMENTUM = 0.1  # torch.nn.BatchNorm2d's: running = 0.9 running + 0.1 batch
BN_MODES = ("frozen", "train")
# Typical magnitude of Caffe-preprocessed pixels (mean-subtracted, 0..255 range).
CAFFE_INPUT_SCALE = 64.0


@keras.saving.register_keras_serializable(package="sait_tf")
class FrozenBatchNorm(keras.layers.Layer):
    """Batch normalisation whose affine parameters never train; statistics by ``bn_mode``.

    ``"frozen"``: always the loaded statistics (deterministic; the demo, and M while it
    guides F or labels images). ``"train"``: as the peers train, BN in train mode with frozen
    affine parameters (liyunsheng13/BDL ``model/deeplab.py`` sets ``requires_grad = False``,
    ``BDL.py`` calls ``model.train()``): in a training call each batch is normalised with its
    own statistics and the running ones follow them as ``torch.nn.BatchNorm2d`` updates them
    (momentum 0.1, unbiased variance); inference calls use the running statistics. The
    weights are created non-trainable, so even ``model.trainable = True`` cannot train them.
    """

    def __init__(self, epsilon: float = BN_EPSILON, bn_mode: str = "frozen", **kwargs) -> None:
        if bn_mode not in BN_MODES:
            raise ValueError(f"deeplabv2: bn_mode must be one of {BN_MODES}, got {bn_mode!r}")
        kwargs.setdefault("trainable", False)
        super().__init__(**kwargs)
        self.epsilon, self.bn_mode = epsilon, bn_mode

    def build(self, input_shape: Sequence[int | None]) -> None:
        channels = (input_shape[-1],)
        self.gamma = self.add_weight(shape=channels, initializer="ones", trainable=False,
                                     name="gamma")
        self.beta = self.add_weight(shape=channels, initializer="zeros", trainable=False,
                                    name="beta")
        # "mean": replicas of a distributed step each update them; their values are averaged.
        self.moving_mean = self.add_weight(shape=channels, initializer="zeros",
                                           trainable=False, name="moving_mean",
                                           aggregation="mean")
        self.moving_variance = self.add_weight(shape=channels, initializer="ones",
                                               trainable=False, name="moving_variance",
                                               aggregation="mean")

    def call(self, inputs: tf.Tensor, training: bool | None = None) -> tf.Tensor:
        if training and self.bn_mode == "train":
            mean, variance = self._batch_statistics(inputs)
            scale = self.gamma * tf.math.rsqrt(variance + self.epsilon)
            # Centred first, as PyTorch's training BN. With the folded form below, two
            # train-mode steps on Eigen's kernels moved conv1 6% of its update away from
            # PyTorch's float64 steps (tests/test_step_parity.py); centred: 1.5e-6 of it.
            return (inputs - mean) * scale + self.beta
        scale = self.gamma * tf.math.rsqrt(self.moving_variance + self.epsilon)
        return inputs * scale + (self.beta - self.moving_mean * scale)

    def _batch_statistics(self, inputs: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """The batch's mean and (biased) variance; moves the running ones towards them."""
        mean, variance = tf.nn.moments(inputs, axes=[0, 1, 2])
        count = tf.cast(tf.reduce_prod(tf.shape(inputs)[:3]), variance.dtype)
        unbiased = variance * count / tf.maximum(count - 1.0, 1.0)
        self.moving_mean.assign((1.0 - BN_MOMENTUM) * self.moving_mean + BN_MOMENTUM * mean)
        self.moving_variance.assign(
            (1.0 - BN_MOMENTUM) * self.moving_variance + BN_MOMENTUM * unbiased)
        return mean, variance

    def get_config(self) -> dict:
        return {**super().get_config(), "epsilon": self.epsilon, "bn_mode": self.bn_mode}


@keras.saving.register_keras_serializable(package="sait_tf")
class ASPPSum(keras.layers.Layer):
    """The DeepLabV2 classifier: 3x3 convs with dilations 6/12/18/24 on the same features,
    all four outputs summed, as in liyunsheng13/BDL ``model/deeplab.py`` (the
    wasidennis/AdaptSegNet ``model/deeplab.py`` returns inside its loop, after the first
    two). Weights N(0, 0.01), biases zero, as in the peers."""

    def __init__(self, num_classes: int, dilations: Sequence[int] = CLASSIFIER_DILATIONS,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_classes, self.dilations = num_classes, tuple(dilations)
        self.convs = [
            Conv2D(num_classes, 3, dilation_rate=d, use_bias=True,
                                kernel_initializer=keras.initializers.RandomNormal(0.0, 0.01),
                                name=f"conv_d{d}")
            for d in self.dilations
        ]

    @property
    def torch_layers(self) -> Mapping[str, keras.layers.Layer]:
        """Read-only: the peers' module name inside ``layer5`` -> branch conv
        (``conv2d_list.i``). Not a dict, which Keras' weights files would walk again."""
        return MappingProxyType({f"conv2d_list.{i}": conv for i, conv in enumerate(self.convs)})

    def build(self, input_shape: Sequence[int | None]) -> None:
        for conv in self.convs:
            conv.build(input_shape)

    def call(self, features: tf.Tensor) -> tf.Tensor:
        return tf.add_n([atrous_conv(conv, features) for conv in self.convs])

    def compute_output_shape(self, input_shape):
        return (*input_shape[:3], self.num_classes)

    def get_config(self) -> dict:
        return {**super().get_config(), "num_classes": self.num_classes,
                "dilations": self.dilations}


def _conv(filters: int, kernel: int, name: str, strides: int = 1, dilation: int = 1,
          input_scale: float = 1.0) -> Conv2D:
    """PyTorch-style conv without bias; callers pad explicitly (``zero_pad``, ``atrous_conv``).

    He initialisation divided by ``input_scale``, the typical magnitude of the input, so
    activations start near unit scale under frozen identity BN (training from scratch).
    """
    initializer = keras.initializers.VarianceScaling(2.0 / input_scale**2, "fan_in",
                                                     "truncated_normal")
    return Conv2D(filters, kernel, strides=strides, dilation_rate=dilation,
                               use_bias=False, kernel_initializer=initializer, name=name)


def _with_channels(input_shape: Sequence[int | None], channels: int) -> tuple:
    return (*tuple(input_shape)[:-1], channels)


@keras.saving.register_keras_serializable(package="sait_tf")
class Bottleneck(keras.layers.Layer):
    """Caffe-style ResNet bottleneck: the stride is on the first 1x1 conv, not on the 3x3.

    With ``project`` the shortcut is a strided 1x1 conv and a frozen BN (the peers'
    ``downsample.0`` and ``downsample.1``), otherwise the identity. Sub-layer names are the
    peers' module names inside a block (``conv1`` .. ``bn3``, ``downsample.0``, ...).
    """

    def __init__(self, planes: int, stride: int = 1, dilation: int = 1, project: bool = False,
                 bn_mode: str = "frozen", **kwargs) -> None:
        super().__init__(**kwargs)
        self.planes, self.stride, self.dilation, self.project = planes, stride, dilation, project
        # The assignment order fixes the order of ``variables``, which runtime/checkpoints.py
        # uses as checkpoint keys: keep it (conv3 before the shortcut conv, bn3 before its BN)
        # so existing checkpoints restore.
        self.conv1 = _conv(planes, 1, "conv1", strides=stride)
        self.bn1 = FrozenBatchNorm(bn_mode=bn_mode, name="bn1")
        self.conv2 = _conv(planes, 3, "conv2", dilation=dilation)
        self.bn2 = FrozenBatchNorm(bn_mode=bn_mode, name="bn2")
        self.conv3 = _conv(planes * EXPANSION, 1, "conv3")
        self.downsample_conv = (_conv(planes * EXPANSION, 1, "downsample.0", strides=stride)
                                if project else None)
        self.bn3 = FrozenBatchNorm(bn_mode=bn_mode, name="bn3")
        self.downsample_bn = (FrozenBatchNorm(bn_mode=bn_mode, name="downsample.1")
                              if project else None)

    @property
    def torch_layers(self) -> Mapping[str, keras.layers.Layer]:
        """Read-only: the peers' module name inside the block -> the layer holding its
        parameters. Not a dict, which Keras' weights files would walk again."""
        layers = [self.conv1, self.bn1, self.conv2, self.bn2, self.conv3, self.bn3]
        if self.project:
            layers += [self.downsample_conv, self.downsample_bn]
        return MappingProxyType({layer.name: layer for layer in layers})

    def build(self, input_shape: Sequence[int | None]) -> None:
        """Creates the variables; only the channel count of ``input_shape`` matters."""
        planes = _with_channels(input_shape, self.planes)
        expanded = _with_channels(input_shape, self.planes * EXPANSION)
        self.conv1.build(input_shape)
        self.bn1.build(planes)
        self.conv2.build(planes)
        self.bn2.build(planes)
        self.conv3.build(planes)
        self.bn3.build(expanded)
        if self.project:
            self.downsample_conv.build(input_shape)
            self.downsample_bn.build(expanded)

    def call(self, x: tf.Tensor) -> tf.Tensor:
        shortcut = x
        if self.project:
            shortcut = self.downsample_bn(self.downsample_conv(x))
        y = tf.nn.relu(self.bn1(self.conv1(x)))
        y = tf.nn.relu(self.bn2(atrous_conv(self.conv2, y)))
        y = self.bn3(self.conv3(y))
        return tf.nn.relu(y + shortcut)

    def get_config(self) -> dict:
        return {**super().get_config(), "planes": self.planes, "stride": self.stride,
                "dilation": self.dilation, "project": self.project,
                "bn_mode": self.bn1.bn_mode}


class DeepLabV2(keras.Model):
    """DeepLabV2-ResNet101 on RGB [0, 255] NHWC; logits at output stride 8 with PyTorch's size.

    ``blocks`` (bottlenecks per layer) and ``width_multiplier`` (scales the stem and the planes
    64/128/256/512) shrink the network for demos; the defaults are the paper's. ``bn_mode``
    is ``FrozenBatchNorm``'s: "frozen" (loaded statistics) or "train" (the peers' train-mode
    BN). Every variable exists once the constructor returns (see ``build``).
    ``torch_layers`` finds a layer by its peers' state_dict module path; ``num_classes`` is
    the number of logit channels.
    """

    def __init__(self, num_classes: int, blocks: Sequence[int] = PAPER_BLOCKS,
                 width_multiplier: float = 1.0, bn_mode: str = "frozen", **kwargs) -> None:
        blocks = tuple(blocks)
        if len(blocks) != 4 or any(int(b) != b or b < 1 for b in blocks):
            raise ValueError(f"deeplabv2: blocks must be 4 positive integers, got {blocks!r}")
        check_common_knobs("deeplabv2", num_classes, width_multiplier)
        kwargs.setdefault("name", "deeplabv2")
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.caffe_preprocess = CaffePreprocess(name="caffe_preprocess")
        self.conv1 = _conv(scaled_width(STEM_WIDTH, width_multiplier), STEM_KERNEL, "conv1",
                           strides=2, input_scale=CAFFE_INPUT_SCALE)
        self.bn1 = FrozenBatchNorm(bn_mode=bn_mode, name="bn1")
        self.maxpool = MaxPool2DCeil(3, 2, padding=1, name="maxpool")
        self.blocks = [
            Bottleneck(scaled_width(planes, width_multiplier), stride=stride if block == 0 else 1,
                       dilation=dilation, project=block == 0, bn_mode=bn_mode,
                       name=f"layer{index}.{block}")
            for index, (count, planes, (stride, dilation)) in enumerate(
                zip(blocks, PAPER_PLANES, LAYER_STRIDES_DILATIONS, strict=True), start=1)
            for block in range(int(count))
        ]
        # The peers' layer5, named "classifier" for the optimisers (see the module docstring).
        self.classifier = ASPPSum(num_classes, name="classifier")
        modules = {"conv1": self.conv1, "bn1": self.bn1}
        for block in self.blocks:
            modules.update({f"{block.name}.{name}": layer
                            for name, layer in block.torch_layers.items()})
        modules.update({f"layer5.{name}": layer
                        for name, layer in self.classifier.torch_layers.items()})
        self._torch_layers = MappingProxyType(modules)
        self.build((None, None, None, 3))

    @property
    def torch_layers(self) -> Mapping[str, keras.layers.Layer]:
        """Read-only: the peers' state_dict module path (``conv1``, ``layer3.5.conv2``,
        ``layer2.0.downsample.1``, ``layer5.conv2d_list.0``) -> the layer holding its
        parameters. Nested layers are not in ``layers`` nor found by ``get_layer``."""
        return self._torch_layers

    def build(self, input_shape: Sequence[int | None]) -> None:
        """Creates every variable; only the channel count of ``input_shape`` matters."""
        self.conv1.build(input_shape)
        shape = _with_channels(input_shape, self.conv1.filters)
        self.bn1.build(shape)
        for block in self.blocks:
            block.build(shape)
            shape = _with_channels(shape, block.planes * EXPANSION)
        self.classifier.build(shape)

    def features(self, images: tf.Tensor) -> tf.Tensor:
        """Backbone features at output stride 8, the classifier's input."""
        x = self.caffe_preprocess(images)
        x = tf.nn.relu(self.bn1(self.conv1(zero_pad(x, STEM_PADDING))))
        x = self.maxpool(x)
        for block in self.blocks:
            x = block(x)
        return x

    def call(self, images: tf.Tensor) -> tf.Tensor:
        return self.classifier(self.features(images))


def build_deeplabv2(num_classes: int, blocks: Sequence[int] = PAPER_BLOCKS,
                    width_multiplier: float = 1.0, bn_mode: str = "frozen") -> DeepLabV2:
    """``DeepLabV2(num_classes, blocks, width_multiplier, bn_mode)``: the builder
    ``build_segmenter`` dispatches to; its parameters are the architecture's knobs."""
    return DeepLabV2(num_classes, blocks, width_multiplier, bn_mode)
