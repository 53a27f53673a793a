"""FCN8s with a VGG16 backbone (paper Sec. 4), in the layout of the peers' checkpoints.

The segmenter M of the paper's "F" rows, as in liyunsheng13/BDL ``model/fcn8s.py``. A
subclassed ``keras.Model``. Its Keras layer names, the keys of ``FCN8s.torch_layers``, are
the peers' state_dict module names (``conv1_1`` .. ``conv5_3``, ``fc6``, ``fc7``,
``score_fr``, ``score_pool4``, ``score_pool3``, ``upscore2``, ``upscore_pool4``,
``upscore8``). ``conv1_1`` pads by 100 so the crops (offsets 5, 9, 31) realign the skips and
return logits at the input size for any H, W.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType

import keras
import numpy as np
import tensorflow as tf

from sait_tf.models.layers import (
    CaffePreprocess,
    Conv2D,
    MaxPool2DCeil,
    check_common_knobs,
    scaled_width,
    zero_pad,
)

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


def _conv(filters: int, kernel: int, name: str, relu: bool = True,
          initializer: str = "he_normal") -> Conv2D:
    """A conv with bias and 'valid' padding; callers pad explicitly (``zero_pad``)."""
    return Conv2D(filters, kernel, activation="relu" if relu else None,
                               kernel_initializer=initializer, name=name)


def _score(num_classes: int, name: str) -> Conv2D:
    """1x1 class scores, zero-initialised as in the peers."""
    return _conv(num_classes, 1, name, relu=False, initializer="zeros")


def _upsample(num_classes: int, kernel: int, stride: int,
              name: str) -> keras.layers.Conv2DTranspose:
    """A fixed (non-trainable) bilinear transposed conv."""
    return keras.layers.Conv2DTranspose(num_classes, kernel, strides=stride, use_bias=False,
                                        kernel_initializer=BilinearUpsampling(),
                                        trainable=False, name=name)


class FCN8s(keras.Model):
    """FCN8s-VGG16 on RGB [0, 255] NHWC; logits at the input size.

    ``width_multiplier`` scales the VGG widths and the 4096-wide fc6/fc7 for demos;
    ``dropout`` is the channel dropout after fc6 and fc7 (PyTorch ``Dropout2d``), active only
    when the model is called with ``training=True``. Every variable exists once the
    constructor returns (see ``build``). ``torch_layers`` finds a layer by its peers'
    state_dict module name; ``num_classes`` is the number of logit channels.
    """

    def __init__(self, num_classes: int, width_multiplier: float = 1.0, dropout: float = 0.5,
                 **kwargs) -> None:
        check_common_knobs("fcn8s", num_classes, width_multiplier)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"fcn8s: dropout must be in [0, 1), got {dropout!r}")
        kwargs.setdefault("name", "fcn8s")
        super().__init__(**kwargs)
        self.num_classes = num_classes

        # The assignment order (the forward order) fixes the order of ``variables``, which
        # runtime/checkpoints.py uses as checkpoint keys: keep it so existing checkpoints restore.
        self.caffe_preprocess = CaffePreprocess(name="caffe_preprocess")
        self.vgg_convs = [_conv(scaled_width(channels, width_multiplier), 3,
                                f"conv{stage}_{index}")
                          for stage, (channels, convs) in enumerate(VGG16_STAGES, start=1)
                          for index in range(1, convs + 1)]
        self.pools = [MaxPool2DCeil(2, 2, name=f"pool{stage}")
                      for stage in range(1, len(VGG16_STAGES) + 1)]
        self.fc6 = _conv(scaled_width(FC_WIDTH, width_multiplier), 7, "fc6")
        self.drop6 = keras.layers.SpatialDropout2D(dropout, name="drop6")
        self.fc7 = _conv(scaled_width(FC_WIDTH, width_multiplier), 1, "fc7")
        self.drop7 = keras.layers.SpatialDropout2D(dropout, name="drop7")
        self.score_fr = _score(num_classes, "score_fr")
        self.upscore2 = _upsample(num_classes, 4, 2, "upscore2")
        self.scale_pool4 = keras.layers.Rescaling(POOL4_SCALE, name="scale_pool4")
        self.score_pool4 = _score(num_classes, "score_pool4")
        self.crop_pool4 = CropLike(SCORE_POOL4_OFFSET, name="crop_pool4")
        self.upscore_pool4 = _upsample(num_classes, 4, 2, "upscore_pool4")
        self.scale_pool3 = keras.layers.Rescaling(POOL3_SCALE, name="scale_pool3")
        self.score_pool3 = _score(num_classes, "score_pool3")
        self.crop_pool3 = CropLike(SCORE_POOL3_OFFSET, name="crop_pool3")
        self.upscore8 = _upsample(num_classes, 16, 8, "upscore8")
        self.crop_output = CropLike(OUTPUT_OFFSET, name="crop_output")
        layers = [*self.vgg_convs, self.fc6, self.fc7, self.score_fr, self.score_pool4,
                  self.score_pool3, self.upscore2, self.upscore_pool4, self.upscore8]
        self._torch_layers = MappingProxyType({layer.name: layer for layer in layers})
        self.build((None, None, None, 3))

    @property
    def torch_layers(self) -> Mapping[str, keras.layers.Layer]:
        """Read-only: the peers' state_dict module name (``conv3_2``, ``fc6``, ``score_fr``,
        ``upscore2``, ...) -> the layer holding its parameters, which has that Keras name.
        The lookup by PyTorch name of both segmenters (see ``DeepLabV2.torch_layers``)."""
        return self._torch_layers

    def _stage_convs(self) -> list[list[Conv2D]]:
        """``vgg_convs`` split into the five VGG16 stages."""
        convs = iter(self.vgg_convs)
        return [[next(convs) for _ in range(count)] for _, count in VGG16_STAGES]

    def build(self, input_shape: Sequence[int | None]) -> None:
        """Creates every variable; only the channel count of ``input_shape`` matters."""
        shape = tuple(input_shape)
        stage_shapes = []
        for convs in self._stage_convs():
            for conv in convs:
                conv.build(shape)
                shape = (*shape[:-1], conv.filters)
            stage_shapes.append(shape)
        self.fc6.build(shape)
        self.fc7.build((*shape[:-1], self.fc6.filters))
        self.score_fr.build((*shape[:-1], self.fc7.filters))
        self.score_pool4.build(stage_shapes[3])
        self.score_pool3.build(stage_shapes[2])
        scores = (*shape[:-1], self.num_classes)
        for upsample in (self.upscore2, self.upscore_pool4, self.upscore8):
            upsample.build(scores)

    def call(self, images: tf.Tensor, training: bool = False) -> tf.Tensor:
        x = self.caffe_preprocess(images)
        pools = []
        for stage, (convs, pool) in enumerate(zip(self._stage_convs(), self.pools,
                                                  strict=True)):
            for index, conv in enumerate(convs):
                x = conv(zero_pad(x, CONV1_1_PADDING if stage == index == 0 else 1))
            x = pool(x)
            pools.append(x)
        pool3, pool4 = pools[2], pools[3]

        x = self.drop6(self.fc6(x), training=training)
        x = self.drop7(self.fc7(x), training=training)

        upscore2 = self.upscore2(self.score_fr(x))
        score_pool4 = self.crop_pool4([self.score_pool4(self.scale_pool4(pool4)), upscore2])
        upscore_pool4 = self.upscore_pool4(upscore2 + score_pool4)
        score_pool3 = self.crop_pool3([self.score_pool3(self.scale_pool3(pool3)),
                                       upscore_pool4])
        upscore8 = self.upscore8(upscore_pool4 + score_pool3)
        return self.crop_output([upscore8, images])


def build_fcn8s(num_classes: int, width_multiplier: float = 1.0,
                dropout: float = 0.5) -> FCN8s:
    """``FCN8s(num_classes, width_multiplier, dropout)``: the builder ``build_segmenter``
    dispatches to; its parameters are the architecture's size knobs."""
    return FCN8s(num_classes, width_multiplier, dropout)
