"""Tiny in-memory set-ups of the trainers' tests: F's step with stand-in networks, M's batch."""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from sait_tf import labels
from sait_tf.models.discriminators import build_patch_discriminator
from sait_tf.models.translator import build_translator
from sait_tf.train.translation import DOMAINS, TranslationStep

NUM_CLASSES = 3
HEIGHT, WIDTH = 32, 64
LOSS_WEIGHTS = dict(reconstruction=10.0, gan=1.0, image_cycle=10.0, latent_cycle=1.0, sce=10.0)


def _sgd(translator: keras.Model) -> keras.optimizers.Optimizer:
    del translator
    return keras.optimizers.SGD(0.1)


def tiny_translation_step(
    make_optimizer: Callable[[keras.Model], keras.optimizers.Optimizer] = _sgd,
    discriminator_layers: int = 2,
    segmenter_seed: int = 0,
    translator_seed: int | None = None,
) -> TranslationStep:
    """F's step (SCE on) with a one-convolution stand-in M, a tiny F and tiny D_S, D_T, all
    built, and built optimisers from ``make_optimizer(translator)``.

    The seeds set the initial weights: ``segmenter_seed`` before M; ``translator_seed``, when
    given, before F and the discriminators, which otherwise continue M's random sequence.
    """
    keras.utils.set_random_seed(segmenter_seed)
    inputs = keras.Input((None, None, 3))
    segmenter = keras.Model(inputs, keras.layers.Conv2D(
        NUM_CLASSES, 3, strides=2, padding="same")(inputs / 127.5 - 1.0))
    if translator_seed is not None:
        keras.utils.set_random_seed(translator_seed)
    translator = build_translator(num_classes=NUM_CLASSES, dim=4, num_downsamplings=1,
                                  num_residual_blocks=1, spade_hidden=4)
    translator.build()
    discriminators = {d: build_patch_discriminator(dim=4, num_layers=discriminator_layers,
                                                   num_scales=1)
                      for d in DOMAINS}
    for discriminator in discriminators.values():
        discriminator(tf.zeros([1, 16, 16, 3]))
    step = TranslationStep(segmenter, translator, discriminators, make_optimizer(translator),
                           make_optimizer(translator), LOSS_WEIGHTS, use_sce=True)
    step.generator_optimizer.build(step.generator_variables)
    step.discriminator_optimizer.build(step.discriminator_variables)
    return step


def segmentation_batch(seed: int) -> tf.data.Dataset:
    """A batch of 2 HEIGHT x WIDTH examples with different numbers of ignored pixels."""
    rng = np.random.default_rng(seed)
    image = rng.uniform(0, 255, (2, HEIGHT, WIDTH, 3)).astype(np.float32)
    label = rng.integers(0, NUM_CLASSES, (2, HEIGHT, WIDTH)).astype(np.int32)
    label[0, : HEIGHT // 2] = labels.IGNORE_INDEX
    return tf.data.Dataset.from_tensors({"image": image, "label": label})
