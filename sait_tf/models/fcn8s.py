"""FCN8s with a VGG16 backbone, in the layout of the peers' checkpoints (REFERENCE.md s.2).

Keras layer names are the peers' state_dict module names (``conv1_1`` .. ``conv5_3``, ``fc6``,
``fc7``, ``score_fr``, ``score_pool4``, ``score_pool3``, ``upscore2``, ``upscore_pool4``,
``upscore8``). ``conv1_1`` pads by 100 so the crops (offsets 5, 9, 31) realign the skips and
return logits at the input size for any H, W.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf

from sait_tf.models.deeplabv2 import CaffePreprocess, MaxPool2DCeil

# (channels, convs) of the five VGG16 stages.
VGG16_STAGES = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))
FC_WIDTH = 4096
CONV1_1_PADDING = 100
POOL4_SCALE = 0.01
POOL3_SCALE = 0.0001
SCORE_POOL4_OFFSET = 5
SCORE_POOL3_OFFSET = 9
OUTPUT_OFFSET = 31


@keras.saving.register_keras_serializable(package="sait_tf")
class BilinearUpsampling(keras.initializers.Initializer):
    """Fixed bilinear kernel for a channel-to-same-channel transposed conv (kh, kw, C, C)."""

    def __call__(self, shape, dtype=None):
        kernel_size, _, out_channels, in_channels = shape
        factor = (kernel_size + 1) // 2
        center = factor - 1 if kernel_size % 2 == 1 else factor - 0.5
        ramp = 1.0 - np.abs(np.arange(kernel_size) - center) / factor
        kernel = np.zeros(shape, dtype=np.float32)
        for channel in range(min(out_channels, in_channels)):
            kernel[:, :, channel, channel] = np.outer(ramp, ramp)
        return tf.constant(kernel, dtype=dtype or "float32")


@keras.saving.register_keras_serializable(package="sait_tf")
class CropLike(keras.layers.Layer):
    """``x[:, o:o + H, o:o + W]`` with H, W of a reference tensor: the FCN8s alignment crops."""

    def __init__(self, offset: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.offset = offset

    def call(self, inputs: Sequence[tf.Tensor]) -> tf.Tensor:
        x, reference = inputs
        size = tf.shape(reference)
        o = self.offset
        return x[:, o: o + size[1], o: o + size[2], :]

    def compute_output_shape(self, input_shapes):
        x_shape, reference_shape = input_shapes
        return (x_shape[0], reference_shape[1], reference_shape[2], x_shape[3])

    def get_config(self) -> dict:
        return {**super().get_config(), "offset": self.offset}


def _conv(x, filters: int, kernel: int, name: str, padding: int = 0, relu: bool = True,
          initializer: str = "he_normal"):
    if padding:
        x = keras.layers.ZeroPadding2D(padding, name=f"{name}.pad")(x)
    return keras.layers.Conv2D(filters, kernel, activation="relu" if relu else None,
                               kernel_initializer=initializer, name=name)(x)


def _score(x, num_classes: int, name: str):
    """1x1 class scores, zero-initialised as in the peers."""
    return _conv(x, num_classes, 1, name, relu=False, initializer="zeros")


def _upsample(x, num_classes: int, kernel: int, stride: int, name: str):
    return keras.layers.Conv2DTranspose(num_classes, kernel, strides=stride, use_bias=False,
                                        kernel_initializer=BilinearUpsampling(),
                                        trainable=False, name=name)(x)


def build_fcn8s(num_classes: int, width_multiplier: float = 1.0,
                dropout: float = 0.5) -> keras.Model:
    """FCN8s-VGG16 on RGB [0, 255] NHWC; logits at the input size.

    ``width_multiplier`` scales the VGG widths and the 4096-wide fc6/fc7 for demos;
    ``dropout`` is the channel dropout after fc6 and fc7 (PyTorch ``Dropout2d``), active only
    when the model is called with ``training=True``.
    """
    if not width_multiplier > 0:
        raise ValueError(f"fcn8s: width_multiplier must be > 0, got {width_multiplier!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"fcn8s: dropout must be in [0, 1), got {dropout!r}")
    if num_classes < 1:
        raise ValueError(f"fcn8s: num_classes must be >= 1, got {num_classes!r}")

    def scaled(width: int) -> int:
        return max(1, round(width * width_multiplier))

    rgb = keras.Input(shape=(None, None, 3), name="image")
    x = CaffePreprocess(name="caffe_preprocess")(rgb)
    pools = []
    for stage, (channels, convs) in enumerate(VGG16_STAGES, start=1):
        for index in range(1, convs + 1):
            padding = CONV1_1_PADDING if (stage, index) == (1, 1) else 1
            x = _conv(x, scaled(channels), 3, f"conv{stage}_{index}", padding=padding)
        x = MaxPool2DCeil(2, 2, name=f"pool{stage}")(x)
        pools.append(x)
    pool3, pool4 = pools[2], pools[3]

    x = _conv(x, scaled(FC_WIDTH), 7, "fc6")
    x = keras.layers.SpatialDropout2D(dropout, name="drop6")(x)
    x = _conv(x, scaled(FC_WIDTH), 1, "fc7")
    x = keras.layers.SpatialDropout2D(dropout, name="drop7")(x)

    upscore2 = _upsample(_score(x, num_classes, "score_fr"), num_classes, 4, 2, "upscore2")
    score_pool4 = _score(keras.layers.Rescaling(POOL4_SCALE, name="scale_pool4")(pool4),
                         num_classes, "score_pool4")
    score_pool4 = CropLike(SCORE_POOL4_OFFSET, name="crop_pool4")([score_pool4, upscore2])
    fuse_pool4 = keras.layers.Add(name="fuse_pool4")([upscore2, score_pool4])

    upscore_pool4 = _upsample(fuse_pool4, num_classes, 4, 2, "upscore_pool4")
    score_pool3 = _score(keras.layers.Rescaling(POOL3_SCALE, name="scale_pool3")(pool3),
                         num_classes, "score_pool3")
    score_pool3 = CropLike(SCORE_POOL3_OFFSET, name="crop_pool3")([score_pool3, upscore_pool4])
    fuse_pool3 = keras.layers.Add(name="fuse_pool3")([upscore_pool4, score_pool3])

    upscore8 = _upsample(fuse_pool3, num_classes, 16, 8, "upscore8")
    logits = CropLike(OUTPUT_OFFSET, name="crop_output")([upscore8, rgb])
    return keras.Model(rgb, logits, name="fcn8s")
