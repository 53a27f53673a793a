"""The discriminators: D_seg on M's outputs and the translator's multi-scale D_S, D_T.

``OutputDiscriminator`` is D_seg of the output-space adversarial loss (paper Eq. 11), the
discriminator of wasidennis/AdaptSegNet ``model/discriminator.py`` (``FCDiscriminator``).
``MultiScalePatchDiscriminator`` is D_S or D_T of the translator's LSGAN loss (Eq. 3): a
PatchGAN per scale, spectrally normalised (Sec. 4), laid out as ``MsImageDis`` in
NVlabs/MUNIT ``networks.py``. Each has a gin builder.
"""

from __future__ import annotations

import gin
import keras
import tensorflow as tf

from sait_tf.models.layers import add_sublayers, spectral_conv

PAPER_WIDTH = 64
HIDDEN_LAYERS = 4


class OutputDiscriminator(keras.Model):
    """D_seg: softmax probabilities (N, H, W, C) -> domain logits (N, H/32, W/32, 1).

    Five 4x4/2 convs with padding 1, widths ``width`` x 1, 2, 4, 8 then 1, LeakyReLU 0.2
    after the first four, no normalisation and no sigmoid (the loss takes logits).
    """

    def __init__(self, width: int = PAPER_WIDTH, **kwargs) -> None:
        kwargs.setdefault("name", "output_discriminator")
        super().__init__(**kwargs)
        if width < 1:
            raise ValueError(f"OutputDiscriminator: width must be >= 1, got {width!r}")
        self.width = width
        self.paddings = [keras.layers.ZeroPadding2D(1, name=f"pad{i}")
                         for i in range(1, HIDDEN_LAYERS + 2)]
        self.convs = [keras.layers.Conv2D(width * 2 ** i, 4, strides=2, name=f"conv{i + 1}")
                      for i in range(HIDDEN_LAYERS)]
        self.convs.append(keras.layers.Conv2D(1, 4, strides=2, name="logits"))
        self.activation = keras.layers.LeakyReLU(negative_slope=0.2, name="leaky_relu")

    def call(self, probabilities: tf.Tensor) -> tf.Tensor:
        x = probabilities
        for index, (pad, conv) in enumerate(zip(self.paddings, self.convs, strict=True)):
            x = conv(pad(x))
            if index < HIDDEN_LAYERS:
                x = self.activation(x)
        return x


@gin.configurable
def build_output_discriminator(width: int = PAPER_WIDTH) -> OutputDiscriminator:
    """D_seg with the peers' width 64 by default; a smaller ``width`` shrinks it for demos."""
    return OutputDiscriminator(width=width)


def downsample(x: tf.Tensor) -> tf.Tensor:
    """3x3 stride-2 average pool with 1-pixel zero padding that is left out of the mean.

    The same windows as PyTorch's ``AvgPool2d(3, 2, padding=1, count_include_pad=False)``
    between the scales of ``MsImageDis``; TensorFlow's 'SAME' would pad only at the bottom
    and right for even sizes.
    """
    paddings = [[0, 0], [1, 1], [1, 1], [0, 0]]
    window_sum = tf.nn.avg_pool2d(tf.pad(x, paddings), 3, 2, "VALID")
    window_count = tf.nn.avg_pool2d(tf.pad(tf.ones_like(x[..., :1]), paddings), 3, 2, "VALID")
    return window_sum / window_count


class PatchDiscriminator(keras.layers.Layer):
    """One scale: [zero pad 1, conv 4x4/2, LeakyReLU 0.2] x ``num_layers``, conv 1x1 -> 1."""

    def __init__(self, dim: int = 64, num_layers: int = 4, **kwargs) -> None:
        super().__init__(**kwargs)
        self.convs = add_sublayers(self, "conv", [
            spectral_conv(dim * 2**i, 4, strides=2, name=f"conv_{i}") for i in range(num_layers)])
        self.to_score = spectral_conv(1, 1, name="to_score")

    def call(self, x: tf.Tensor, training: bool = False) -> tf.Tensor:
        for conv in self.convs:
            x = conv(tf.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]]), training=training)
            x = tf.nn.leaky_relu(x, alpha=0.2)
        return self.to_score(x, training=training)


class MultiScalePatchDiscriminator(keras.Model):
    """D_S or D_T: a PatchGAN per scale, each scale seeing the previous one's image average
    pooled 3x3/2 (``downsample``); returns the list of score maps, finest scale first."""

    def __init__(self, dim: int = 64, num_layers: int = 4, num_scales: int = 3,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_layers = num_layers
        self.scales = add_sublayers(self, "scale", [
            PatchDiscriminator(dim, num_layers, name=f"scale_{i}") for i in range(num_scales)])

    def call(self, x_unit: tf.Tensor, training: bool = False) -> list[tf.Tensor]:
        smallest = 2 ** (len(self.scales) - 1 + self.num_layers)
        height, width = x_unit.shape[1], x_unit.shape[2]
        if height is not None and width is not None and min(height, width) < smallest:
            raise ValueError(
                f"MultiScalePatchDiscriminator: images of {height}x{width} are too small for "
                f"{len(self.scales)} scales of {self.num_layers} stride-2 layers; use sides of "
                f"at least {smallest} or lower build_patch_discriminator.num_scales/num_layers")
        outputs = []
        for i, scale in enumerate(self.scales):
            if i:
                x_unit = downsample(x_unit)
            outputs.append(scale(x_unit, training=training))
        return outputs


@gin.configurable
def build_patch_discriminator(dim: int = 64, num_layers: int = 4,
                              num_scales: int = 3) -> MultiScalePatchDiscriminator:
    """D_S or D_T with the paper's sizes by default (3 scales, 4 layers from 64 channels)."""
    return MultiScalePatchDiscriminator(dim, num_layers, num_scales)
