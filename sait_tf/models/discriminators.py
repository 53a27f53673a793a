"""Output-space discriminator D_seg (REFERENCE.md s.2, paper Eq. 11)."""

from __future__ import annotations

import keras
import tensorflow as tf

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
