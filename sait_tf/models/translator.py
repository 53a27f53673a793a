"""The semantically adaptive translation network F (paper Sec. 3.1-3.2 and Sec. 4).

Two auto-encoders share a latent space: encoders E_S, E_T and generators G_S, G_T. The
generators' residual blocks normalise with Instance Norm followed by SPADE conditioned on the
segmenter's unnormalised logits of the image being translated, so every pixel is denormalised
according to its predicted class (Eq. 6). x_{A->B} = G_B(E_A(x_A), M(x_A)). Images are RGB in
[-1, 1]; every convolution is spectrally normalised (Sec. 4). The block layout (7x7 stem,
4x4/2 down-sampling, residual blocks, nearest x2 + 5x5 conv + Layer Norm up-sampling, 7x7
conv + tanh, reflect padding) is that of NVlabs/MUNIT ``networks.py`` (``ContentEncoder``,
``Decoder``), a public peer of the same shared-latent-space design, except that a
convolution followed by instance norm has no bias: instance norm subtracts each channel's
mean, so such a bias never changes the output and its exact gradient is zero. In float32 the
gradient is rounding noise, which Adam (dividing each update by the gradient's magnitude)
turned into steps of the learning rate whose sign depends on the summation order: those
biases drifted apart by ~1e-3 between a one-device run and the same run on two replicas
(docs/distribution.md).
"""

from __future__ import annotations

import gin
import keras
import numpy as np
import tensorflow as tf

from sait_tf import images
from sait_tf.models.layers import add_sublayers, conv2d_valid, spectral_conv

DOMAINS = ("source", "target")
RESIDUAL_NORMS = ("spade", "in")
INSTANCE_NORM_EPSILON = 1e-5
LAYER_NORM_EPSILON = 1e-5


def reflect_pad(x: tf.Tensor, pad: int) -> tf.Tensor:
    """Mirror padding of H and W by ``pad`` pixels (PyTorch's ReflectionPad2d)."""
    if pad == 0:
        return x
    return tf.pad(x, [[0, 0], [pad, pad], [pad, pad], [0, 0]], mode="REFLECT")


def instance_norm(affine: bool, name: str | None = None) -> keras.layers.GroupNormalization:
    """Instance Norm: one group per channel, statistics per sample over H and W."""
    return keras.layers.GroupNormalization(groups=-1, epsilon=INSTANCE_NORM_EPSILON,
                                           center=affine, scale=affine, name=name)


class LayerNormCHW(keras.layers.Layer):
    """Layer Norm of the up-sampling blocks, which the paper found to preserve the style
    better (Sec. 4): per sample over C, H and W together.

    Unlike ``keras.layers.LayerNormalization(axis=-1)``, which normalises each pixel over its
    channels, the statistics here span the whole sample (Ba et al., as ``LayerNorm`` in
    NVlabs/MUNIT ``networks.py``), keeping the relative contrast between pixels; the affine
    ``gamma`` and ``beta`` are per channel.
    """

    def __init__(self, epsilon: float = LAYER_NORM_EPSILON, **kwargs) -> None:
        super().__init__(**kwargs)
        self.epsilon = epsilon

    def build(self, input_shape) -> None:
        channels = input_shape[-1]
        self.gamma = self.add_weight(shape=(channels,), initializer="ones", name="gamma")
        self.beta = self.add_weight(shape=(channels,), initializer="zeros", name="beta")

    def call(self, x: tf.Tensor) -> tf.Tensor:
        mean, variance = tf.nn.moments(x, axes=[1, 2, 3], keepdims=True)
        normalised = (x - mean) * tf.math.rsqrt(variance + self.epsilon)
        return normalised * self.gamma + self.beta


class SPADE(keras.layers.Layer):
    """Spatially adaptive denormalisation (Park et al.) of an instance-normalised activation.

    ``seg_logits`` (M's unnormalised logits, any resolution) are resized bilinearly to the
    activation, passed through a shared 3x3 conv + ReLU with ``hidden`` channels, and two 3x3
    convs give per-pixel ``gamma`` and ``beta``. The output is (1 + gamma) * IN(x) + beta:
    the paper's Eq. 6 writes gamma * IN(x) + beta, and the reference SPADE code
    (NVlabs/SPADE ``models/networks/normalization.py``) uses 1 + gamma so that a freshly
    initialised layer starts close to plain IN.
    """

    def __init__(self, channels: int, hidden: int = 128, **kwargs) -> None:
        super().__init__(**kwargs)
        self.norm = instance_norm(affine=False, name="instance_norm")
        self.shared = spectral_conv(hidden, 3, name="shared")
        self.to_gamma = spectral_conv(channels, 3, name="gamma")
        self.to_beta = spectral_conv(channels, 3, name="beta")

    def modulation(self, x: tf.Tensor, seg_logits: tf.Tensor,
                   training: bool = False) -> tuple[tf.Tensor, tf.Tensor]:
        """Per-pixel ``(gamma, beta)`` for activation ``x`` from ``seg_logits`` (resized to
        ``x`` unless they are at its size already)."""
        if not (x.shape[1:3].is_fully_defined() and seg_logits.shape[1:3] == x.shape[1:3]):
            seg_logits = images.resize_logits(seg_logits, tf.shape(x)[1:3])
        hidden = tf.nn.relu(self.shared(reflect_pad(seg_logits, 1), training=training))
        hidden = reflect_pad(hidden, 1)
        return (self.to_gamma(hidden, training=training),
                self.to_beta(hidden, training=training))

    def call(self, x: tf.Tensor, seg_logits: tf.Tensor, training: bool = False) -> tf.Tensor:
        gamma, beta = self.modulation(x, seg_logits, training=training)
        return self.norm(x) * (1.0 + gamma) + beta


class ConvBlock(keras.layers.Layer):
    """Reflect pad, spectrally normalised conv, optional norm, optional ReLU.

    ``use_bias`` False when ``norm`` is instance norm (module docstring).
    """

    def __init__(self, filters: int, kernel_size: int, strides: int = 1,
                 norm: keras.layers.Layer | None = None, relu: bool = True,
                 use_bias: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.pad = (kernel_size - 1) // 2
        self.conv = spectral_conv(filters, kernel_size, strides, name="conv", use_bias=use_bias)
        self.norm = norm
        self.relu = relu

    def call(self, x: tf.Tensor, training: bool = False) -> tf.Tensor:
        x = self.conv(reflect_pad(x, self.pad), training=training)
        if self.norm is not None:
            x = self.norm(x)
        return tf.nn.relu(x) if self.relu else x


# Nearest x2 up-sampling then a 5-tap kernel, along one axis: the output at 2i + r reads the
# up-sampled input at 2i + r - 2 ... 2i + r + 2, which is the input at i - 1, i, i + 1 only.
# UPSAMPLED_TAPS[r, d, t] is 1 where the kernel's tap t lands on the input at i + d - 1.
UPSAMPLED_TAPS = np.array([
    [[1, 1, 0, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 0, 1]],  # outputs 2i
    [[1, 0, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 0, 1, 1]],  # outputs 2i + 1
], np.float32)


class UpsamplingBlock(ConvBlock):
    """Nearest x2 up-sampling, reflect pad 2, 5x5 conv, norm, ReLU (MUNIT's up-sampling block),
    computed from the input without the up-sampled tensor; same weights and outputs.

    Each of the four output phases (even/odd row, even/odd column) is a 3x3 convolution of
    the input whose taps are sums of the 5x5 kernel's (``UPSAMPLED_TAPS``): 36 multiply-adds
    per input pixel and channel pair instead of 100, as one convolution with four times the
    output channels and ``depth_to_space``. The convolution's input kept for the backward pass
    is the input, a quarter of the up-sampled tensor. With the input's edges repeated this
    equals the reflect-padded original everywhere except the first and last output row and
    column, whose outermost tap reads the input's second row (column) after the reflection;
    those four lines are computed the original way, from five input lines each.
    """

    def call(self, x: tf.Tensor, training: bool = False) -> tf.Tensor:
        if not self.conv.built:
            self.conv.build((None, None, None, x.shape[-1]))
        conv = self.conv.layer
        kernel = self.conv.kernel_for_call(training)
        taps = tf.constant(UPSAMPLED_TAPS, kernel.dtype)
        phases = tf.einsum("pat,qbs,tsio->abipqo", taps, taps, kernel)
        phases = tf.reshape(phases, [3, 3, kernel.shape[2], 4 * kernel.shape[3]])
        x = tf.cast(x, conv.compute_dtype)
        kernel = tf.cast(kernel, conv.compute_dtype)
        edged = tf.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]], mode="SYMMETRIC")
        y = tf.nn.depth_to_space(conv2d_valid(edged, tf.cast(phases, conv.compute_dtype)), 2)
        for axis in (1, 2):
            last = tf.shape(x)[axis] - 1
            first_line = self._upsampled_line(x, kernel, axis, tf.constant([1, 0, 0, 0, 1]))
            last_line = self._upsampled_line(x, kernel, axis, tf.stack(
                [last - 1, last, last, last, last - 1]))
            # tf.slice: its gradient is a Pad, StridedSlice's a StridedSliceGrad (slower on CPU).
            begin, size = [0, 0, 0, 0], [-1, -1, -1, -1]
            begin[axis], size[axis] = 1, 2 * last
            inner = tf.slice(y, begin, tf.stack(size))
            y = tf.concat([first_line, inner, last_line], axis=axis)
        if conv.use_bias:
            y = y + tf.cast(conv.bias, conv.compute_dtype)
        if self.norm is not None:
            y = self.norm(y)
        return tf.nn.relu(y) if self.relu else y

    @staticmethod
    def _upsampled_line(x: tf.Tensor, kernel: tf.Tensor, axis: int,
                        lines: tf.Tensor) -> tf.Tensor:
        """One output line along ``axis`` the original way: the five input lines ``lines``
        (the reflect-padded up-sampled lines it reads), the other axis up-sampled and
        reflect-padded, a 5x5 convolution."""
        strip = tf.gather(x, lines, axis=axis)
        other = 3 - axis
        # Nearest x2 along ``other``; tf.repeat's gradient logs a oneDNN int32 error on CPUs
        # without AVX-512.
        shape = tf.shape(strip)
        strip = tf.reshape(tf.stack([strip, strip], axis=other + 1), tf.concat(
            [shape[:other], [2 * shape[other]], shape[other + 1:]], axis=0))
        paddings = [[0, 0], [0, 0], [0, 0], [0, 0]]
        paddings[other] = [2, 2]
        return conv2d_valid(tf.pad(strip, paddings, mode="REFLECT"), kernel)


class ResidualBlock(keras.layers.Layer):
    """x + [conv3x3, norm, ReLU, conv3x3, norm](x); norm is IN, or IN + SPADE when guided."""

    def __init__(self, norm: str, spade_hidden: int = 128, **kwargs) -> None:
        super().__init__(**kwargs)
        if norm not in RESIDUAL_NORMS:
            raise ValueError(f"residual_norm: expected one of {RESIDUAL_NORMS}, got {norm!r}")
        self.guided = norm == "spade"
        self.spade_hidden = spade_hidden

    def build(self, input_shape) -> None:
        channels = input_shape[-1]
        # Both feed instance norm (plain or inside SPADE): no bias (module docstring).
        self.conv_1 = spectral_conv(channels, 3, name="conv_1", use_bias=False)
        self.conv_2 = spectral_conv(channels, 3, name="conv_2", use_bias=False)
        if self.guided:
            self.norm_1 = SPADE(channels, self.spade_hidden, name="spade_1")
            self.norm_2 = SPADE(channels, self.spade_hidden, name="spade_2")
        else:
            self.norm_1 = instance_norm(affine=True, name="instance_norm_1")
            self.norm_2 = instance_norm(affine=True, name="instance_norm_2")

    def _norm(self, layer: keras.layers.Layer, x: tf.Tensor, seg_logits: tf.Tensor | None,
              training: bool) -> tf.Tensor:
        if self.guided:
            return layer(x, seg_logits, training=training)
        return layer(x)

    def call(self, x: tf.Tensor, seg_logits: tf.Tensor | None = None,
             training: bool = False) -> tf.Tensor:
        y = self.conv_1(reflect_pad(x, 1), training=training)
        y = tf.nn.relu(self._norm(self.norm_1, y, seg_logits, training))
        y = self.conv_2(reflect_pad(y, 1), training=training)
        return x + self._norm(self.norm_2, y, seg_logits, training)


class Encoder(keras.layers.Layer):
    """E: 7x7 conv, ``num_downsamplings`` 4x4/2 convs doubling the width, residual blocks; IN."""

    def __init__(self, dim: int = 64, num_downsamplings: int = 2, num_residual_blocks: int = 4,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.stem = ConvBlock(dim, 7, norm=instance_norm(True), use_bias=False, name="stem")
        down_blocks = []
        for i in range(num_downsamplings):
            dim *= 2
            down_blocks.append(ConvBlock(dim, 4, strides=2, norm=instance_norm(True),
                                         use_bias=False, name=f"down_{i}"))
        self.down_blocks = add_sublayers(self, "down", down_blocks)
        self.residual_blocks = add_sublayers(
            self, "residual", [ResidualBlock("in", name=f"residual_{i}")
                               for i in range(num_residual_blocks)])
        self.latent_dim = dim

    def call(self, x: tf.Tensor, training: bool = False) -> tf.Tensor:
        x = self.stem(x, training=training)
        for block in self.down_blocks:
            x = block(x, training=training)
        for block in self.residual_blocks:
            x = block(x, training=training)
        return x


class Generator(keras.layers.Layer):
    """G: residual blocks (IN + SPADE on M's logits, or IN), up-sampling blocks, 7x7 conv, tanh.

    An up-sampling block is nearest x2, 5x5 conv halving the width, ``LayerNormCHW``, ReLU
    (``UpsamplingBlock``).
    """

    def __init__(self, latent_dim: int = 256, num_upsamplings: int = 2,
                 num_residual_blocks: int = 4, spade_hidden: int = 128,
                 residual_norm: str = "spade", **kwargs) -> None:
        super().__init__(**kwargs)
        self.residual_blocks = add_sublayers(
            self, "residual", [ResidualBlock(residual_norm, spade_hidden, name=f"residual_{i}")
                               for i in range(num_residual_blocks)])
        dim = latent_dim
        up_blocks = []
        for i in range(num_upsamplings):
            dim //= 2
            up_blocks.append(UpsamplingBlock(dim, 5, norm=LayerNormCHW(name="layer_norm"),
                                             name=f"up_{i}"))
        self.up_blocks = add_sublayers(self, "up", up_blocks)
        self.to_rgb = ConvBlock(3, 7, relu=False, name="to_rgb")

    def call(self, z: tf.Tensor, seg_logits: tf.Tensor | None = None,
             training: bool = False) -> tf.Tensor:
        if seg_logits is not None and z.shape[1:3].is_fully_defined():
            # Every SPADE layer works at z's size: resize the logits once, not in each layer.
            seg_logits = images.resize_logits(seg_logits, tuple(z.shape[1:3]))
        x = z
        for block in self.residual_blocks:
            x = block(x, seg_logits, training=training)
        for block in self.up_blocks:
            x = block(x, training=training)
        return tf.tanh(self.to_rgb(x, training=training))


class Translator(keras.Model):
    """F: encoders and generators of both domains; x_{A->B} = G_B(E_A(x_A), M(x_A)).

    Images are RGB in [-1, 1] NHWC; ``seg_logits`` are M's logits of the image being
    translated, at any resolution (the SPADE layers resize them), with ``num_classes``
    channels. ``conditioned`` is False when the residual blocks use plain IN, in which case
    the logits are ignored.
    """

    def __init__(self, num_classes: int, dim: int = 64, num_downsamplings: int = 2,
                 num_residual_blocks: int = 4, spade_hidden: int = 128,
                 residual_norm: str = "spade", **kwargs) -> None:
        super().__init__(**kwargs)
        if residual_norm not in RESIDUAL_NORMS:
            raise ValueError(f"build_translator.residual_norm: expected one of "
                             f"{RESIDUAL_NORMS}, got {residual_norm!r}")
        self.num_classes = num_classes
        self.num_downsamplings = num_downsamplings
        self.residual_norm = residual_norm
        self.conditioned = residual_norm == "spade"
        self.source_encoder = Encoder(dim, num_downsamplings, num_residual_blocks,
                                      name="source_encoder")
        self.target_encoder = Encoder(dim, num_downsamplings, num_residual_blocks,
                                      name="target_encoder")
        latent_dim = self.source_encoder.latent_dim
        self.source_generator = Generator(latent_dim, num_downsamplings, num_residual_blocks,
                                          spade_hidden, residual_norm, name="source_generator")
        self.target_generator = Generator(latent_dim, num_downsamplings, num_residual_blocks,
                                          spade_hidden, residual_norm, name="target_generator")

    def build(self, input_shape=None) -> None:
        """Creates the variables of E_S, E_T, G_S and G_T and marks F built.

        The one way to build F: call ``translator.build()`` (no argument; ``input_shape`` is
        not needed) before restoring a checkpoint or building an optimiser, which need every
        variable of a built model. A translation builds only the encoder and generator it
        uses; the first ``__call__`` runs this method too. The variable order, the key of the
        checkpoints, is the attribute order of ``__init__``, whatever builds the networks.
        """
        side = 2 * self.size_multiple + 4
        x_unit = tf.zeros([1, side, side, 3])
        seg_logits = tf.zeros([1, 1, 1, self.num_classes])
        for domain in DOMAINS:
            z = self.encode(x_unit, domain)
            self.decode(z, seg_logits, domain)

    @property
    def size_multiple(self) -> int:
        """Image sides that are multiples of this survive encode + decode unchanged."""
        return 2 ** self.num_downsamplings

    def encoder(self, domain: str) -> Encoder:
        """E_domain; ``domain`` is 'source' or 'target'."""
        self._check_domain(domain)
        return getattr(self, f"{domain}_encoder")

    def generator(self, domain: str) -> Generator:
        """G_domain; ``domain`` is 'source' or 'target'."""
        self._check_domain(domain)
        return getattr(self, f"{domain}_generator")

    @staticmethod
    def _check_domain(domain: str) -> None:
        if domain not in DOMAINS:
            raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")

    def encode(self, x_unit: tf.Tensor, domain: str, training: bool = False) -> tf.Tensor:
        """E_domain(x): the shared latent code z."""
        return self.encoder(domain)(x_unit, training=training)

    def decode(self, z: tf.Tensor, seg_logits: tf.Tensor | None, domain: str,
               training: bool = False) -> tf.Tensor:
        """G_domain(z, M(x)): an image in [-1, 1], ``size_multiple`` times the size of z."""
        if self.conditioned and seg_logits is None:
            raise ValueError("a SPADE generator needs the segmenter's logits (seg_logits)")
        return self.generator(domain)(z, seg_logits if self.conditioned else None,
                                      training=training)

    def translate(self, x_unit: tf.Tensor, seg_logits: tf.Tensor | None, source_domain: str,
                  target_domain: str, training: bool = False) -> tf.Tensor:
        """x_{A->B} = G_B(E_A(x_A), M(x_A)) at the input's size.

        Sides that are not multiples of ``size_multiple`` are mirror-padded at the bottom and
        right and the result cropped back; the logits are then resized to the image and
        padded the same way, so the guidance stays aligned with the pixels.
        """
        height, width = tf.shape(x_unit)[1], tf.shape(x_unit)[2]
        pad_h = (-height) % self.size_multiple
        pad_w = (-width) % self.size_multiple
        static_h, static_w = x_unit.shape[1], x_unit.shape[2]
        needs_pad = (static_h is None or static_w is None
                     or static_h % self.size_multiple or static_w % self.size_multiple)
        if needs_pad:
            paddings = [[0, 0], [0, pad_h], [0, pad_w], [0, 0]]
            x_unit = tf.pad(x_unit, paddings, mode="REFLECT")
            if self.conditioned and seg_logits is not None:
                seg_logits = tf.pad(images.resize_logits(seg_logits, (height, width)),
                                    paddings, mode="REFLECT")
        z = self.encode(x_unit, source_domain, training=training)
        translated = self.decode(z, seg_logits, target_domain, training=training)
        return translated[:, :height, :width, :] if needs_pad else translated

    def call(self, inputs: tuple[tf.Tensor, tf.Tensor], training: bool = False) -> tf.Tensor:
        """Source -> target translation of ``(x_unit, seg_logits)``."""
        x_unit, seg_logits = inputs
        return self.translate(x_unit, seg_logits, "source", "target", training=training)


@gin.configurable(denylist=["num_classes"])
def build_translator(num_classes: int, dim: int = 64, num_downsamplings: int = 2,
                     num_residual_blocks: int = 4, spade_hidden: int = 128,
                     residual_norm: str = "spade") -> Translator:
    """F with the paper's sizes by default; ``residual_norm`` 'in' is Table 3's no-SPADE row.

    ``num_classes`` is M's (``segmenter.num_classes``), never a gin binding: the SPADE layers
    take M's logits, so F and M cannot disagree on it.
    """
    return Translator(num_classes=num_classes, dim=dim, num_downsamplings=num_downsamplings,
                      num_residual_blocks=num_residual_blocks, spade_hidden=spade_hidden,
                      residual_norm=residual_norm, name="translator")


def translate_pixels(segmenter: keras.Model, translator: Translator, pixels: tf.Tensor,
                     source_domain: str = "source", target_domain: str = "target",
                     training: bool = False) -> tf.Tensor:
    """x_{A->B} = G_B(E_A(x_A), M(x_A)) (paper Sec. 3.1) on float32 RGB [0, 255] NHWC images.

    The one translation every user of F wraps. M sees the pixels in its own range, always in
    inference mode; F sees them in [-1, 1] and runs with ``training``. A translator without
    SPADE guidance (``conditioned`` False, Table 3's IN rows) does not call M. Returns float32
    RGB [0, 255] of the input's shape (``Translator.translate`` handles any H, W).
    """
    seg_logits = segmenter(pixels, training=False) if translator.conditioned else None
    translated = translator.translate(images.pixels_to_unit(pixels), seg_logits, source_domain,
                                      target_domain, training=training)
    return images.unit_to_pixels(translated)
