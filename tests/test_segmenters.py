"""Segmentation networks M and the output discriminator: sizes, contracts, learning."""

from __future__ import annotations

import itertools

import gin
import keras
import numpy as np
import pytest
import tensorflow as tf

from sait_tf import losses
from sait_tf.models import build_segmenter
from sait_tf.models.discriminators import build_output_discriminator
from sait_tf.models.layers import MaxPool2DCeil, zero_pad

TINY_DEEPLAB = {"blocks": (1, 1, 1, 1), "width_multiplier": 0.125}
TINY_FCN = {"width_multiplier": 0.0625}


def _images(size, seed=0, batch=1):
    return np.random.default_rng(seed).uniform(0, 255, (batch, *size, 3)).astype(np.float32)


def test_ceil_max_pool_matches_pytorch_rule_on_known_values():
    row = np.arange(1, 6, dtype=np.float32)  # 1..5
    x = np.tile(row[None, None, :, None], (1, 1, 1, 1))
    # k=3, s=3, p=1, n=5: ceil gives 3 windows, but the third would start in the right
    # padding, so PyTorch keeps 2: [pad, 1, 2] and [3, 4, 5].
    np.testing.assert_array_equal(MaxPool2DCeil(3, 3, padding=1)(x).numpy().ravel(), [2, 5])
    # k=3, s=2, p=1, n=4: ceil mode adds a window [4, pad, pad] that floor mode drops.
    x4 = x[:, :, :4]
    np.testing.assert_array_equal(MaxPool2DCeil(3, 2, padding=1)(x4).numpy().ravel(), [2, 4, 4])
    # Negative inputs: padding never wins the max.
    np.testing.assert_array_equal(MaxPool2DCeil(3, 2, padding=1)(-x4).numpy().ravel(),
                                  [-1, -2, -4])


@pytest.mark.parametrize("size, expected", [((65, 97), (9, 13)), ((64, 99), (9, 13)),
                                            ((33, 33), (5, 5)), ((512, 1024), (65, 129))])
def test_deeplabv2_output_size_is_pytorchs(size, expected):
    model = build_segmenter("deeplabv2", 19, **TINY_DEEPLAB)
    assert model(np.zeros((1, *size, 3), np.float32)).shape == (1, *expected, 19)


def test_fcn8s_output_is_input_size_for_any_size():
    model = build_segmenter("fcn8s", 5, **TINY_FCN)
    for size in [(65, 97), (32, 50), (41, 41)]:
        assert model(_images(size)).shape == (1, *size, 5)


def test_deeplabv2_classifier_contract_and_frozen_bn():
    model = build_segmenter("deeplabv2", 19, **TINY_DEEPLAB)
    classifier = sorted(v.path for v in model.trainable_variables if "classifier" in v.path)
    assert classifier == sorted(f"deeplabv2/classifier/conv_d{d}/{w}" for d in (6, 12, 18, 24)
                                for w in ("kernel", "bias"))
    convs = [layer for name, layer in model.torch_layers.items()
             if isinstance(layer, keras.layers.Conv2D) and not name.startswith("layer5.")]
    assert len(model.trainable_variables) == len(convs) + 8  # backbone kernels + classifier
    model.trainable = True  # cannot unfreeze the loaded BN statistics or affine parameters
    assert len(model.trainable_variables) == len(convs) + 8
    # 4 statistics each for the stem BN, 3 BNs per block and 4 downsample BNs.
    assert len(model.non_trainable_variables) == 4 * (1 + 4 * 3 + 4)
    image = _images((41, 57))
    np.testing.assert_array_equal(model(image, training=True), model(image, training=False))


def test_variable_order_is_kept_for_checkpoints():
    """runtime/checkpoints.py keys variables by position, so their order must never change."""
    model = build_segmenter("deeplabv2", 3, **TINY_DEEPLAB)
    bn = ["gamma", "beta", "moving_mean", "moving_variance"]
    expected = ["conv1/kernel", *(f"bn1/{w}" for w in bn), "conv2/kernel",
                *(f"bn2/{w}" for w in bn), "conv3/kernel", "downsample.0/kernel",
                *(f"bn3/{w}" for w in bn), *(f"downsample.1/{w}" for w in bn)]
    paths = [v.path for v in model.variables]
    assert paths[:5] == ["deeplabv2/conv1/kernel", *(f"deeplabv2/bn1/{w}" for w in bn)]
    for index in range(1, 5):
        prefix = f"deeplabv2/layer{index}.0/"
        assert [p[len(prefix):] for p in paths if p.startswith(prefix)] == expected
    assert paths[-8:] == [f"deeplabv2/classifier/conv_d{d}/{w}" for d in (6, 12, 18, 24)
                          for w in ("kernel", "bias")]
    fcn = build_segmenter("fcn8s", 3, **TINY_FCN)
    # The dropout layers' seed generators own a variable each, between fc6, fc7 and score_fr.
    owners = ["seed" if "seed_generator" in v.path else v.path.split("/")[1]
              for v in fcn.variables]
    assert [owner for owner, _ in itertools.groupby(owners)] == [
        "conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3", "conv4_1",
        "conv4_2", "conv4_3", "conv5_1", "conv5_2", "conv5_3", "fc6", "seed", "fc7", "seed",
        "score_fr", "upscore2", "score_pool4", "upscore_pool4", "score_pool3", "upscore8"]


def test_deeplabv2_all_four_classifier_branches_are_summed():
    model = build_segmenter("deeplabv2", 3, **TINY_DEEPLAB)
    image = _images((65, 97))
    classifier = model.classifier
    features = model.features(image)
    branches = [conv(zero_pad(features, conv.dilation_rate[0])) for conv in classifier.convs]
    assert all(float(tf.reduce_max(tf.abs(b))) > 0 for b in branches)
    np.testing.assert_allclose(model(image), tf.add_n(branches), rtol=1e-5, atol=1e-5)
    assert [conv.dilation_rate for conv in classifier.convs] == [(6, 6), (12, 12), (18, 18),
                                                                 (24, 24)]


def test_fcn8s_fixed_bilinear_upsampling_biases_and_dropout():
    model = build_segmenter("fcn8s", 2, **TINY_FCN)
    upscore2 = model.torch_layers["upscore2"]
    assert not upscore2.trainable_weights
    ramp = np.array([0.25, 0.75, 0.75, 0.25])
    np.testing.assert_allclose(upscore2.kernel.numpy()[:, :, 1, 1], np.outer(ramp, ramp))
    np.testing.assert_array_equal(upscore2.kernel.numpy()[:, :, 0, 1], 0.0)
    trainable = [v.path for v in model.trainable_variables]
    # 13 VGG convs, fc6, fc7 and the three score layers have biases.
    assert sum(path.endswith("bias") for path in trainable) == 18
    assert not any("upscore" in path for path in trainable)

    # Dropout acts only with training=True; a non-zero score_fr makes fc7 visible.
    score = model.torch_layers["score_fr"]
    score.kernel.assign(tf.random.normal(score.kernel.shape))
    image = _images((33, 41))
    np.testing.assert_array_equal(model(image, training=False), model(image))
    assert not np.allclose(model(image, training=True), model(image))


def test_build_segmenter_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown arch 'resnet'.*deeplabv2, fcn8s"):
        build_segmenter("resnet")
    with pytest.raises(ValueError, match="fcn8s has no size knob blocks"):
        build_segmenter("fcn8s", 19, blocks=(1, 1, 1, 1))
    with pytest.raises(ValueError, match="blocks must be 4 positive integers"):
        build_segmenter("deeplabv2", 19, blocks=(1, 1, 1))


def test_size_knobs_bind_through_gin():
    try:
        gin.parse_config("""
            build_segmenter.arch = "deeplabv2"
            build_segmenter.num_classes = 7
            build_segmenter.blocks = (1, 2, 1, 1)
            build_segmenter.width_multiplier = 0.125
        """)
        model = build_segmenter()
    finally:
        gin.clear_config()
    assert {"layer2.1.conv3", "layer3.0.conv3"} <= set(model.torch_layers)
    assert "layer3.1.conv3" not in model.torch_layers
    assert model.torch_layers["layer4.0.conv3"].kernel.shape == (1, 1, 64, 256)
    assert model.num_classes == 7
    assert model(np.zeros((1, 33, 33, 3), np.float32)).shape == (1, 5, 5, 7)


def test_tiny_frozen_bn_deeplabv2_learns_from_scratch():
    """The demo trains a tiny DeepLabV2 from scratch: identity BN and the scaled stem
    initialisation must let plain SGD fit a toy batch."""
    model = build_segmenter("deeplabv2", 3, **TINY_DEEPLAB)
    height, width = 33, 49
    labels = np.zeros((2, height, width), np.int32)
    labels[:, :, width // 3:] = 1
    labels[:, :, 2 * width // 3:] = 2
    labels[1] = labels[1, :, ::-1]
    colors = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]], np.float32)
    noise = np.random.default_rng(0).normal(0, 20, (2, height, width, 3)).astype(np.float32)
    images = colors[labels] + noise
    optimizer = keras.optimizers.SGD(5e-5, momentum=0.9)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = losses.segmentation_cross_entropy(model(images, training=True), labels)
        gradients = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables, strict=True))
        return loss

    history = [float(step()) for _ in range(25)]
    assert 0.8 < history[0] < 2.0  # near log(3): the initial logits are sane
    assert history[-1] < 0.1 * history[0]


def test_output_discriminator_width_binds_through_gin():
    assert build_output_discriminator().width == 64
    try:
        gin.parse_config("build_output_discriminator.width = 8")
        discriminator = build_output_discriminator()
    finally:
        gin.clear_config()
    assert discriminator.width == 8


def test_output_discriminator_shape_and_pytorch_parity():
    discriminator = build_output_discriminator(width=8)
    probabilities = tf.nn.softmax(tf.random.normal((2, 65, 97, 19)))
    logits = discriminator(probabilities)
    assert logits.shape == (2, 2, 3, 1)  # 65 -> 32 -> 16 -> 8 -> 4 -> 2; 97 -> ... -> 3
    assert [conv.filters for conv in discriminator.convs] == [8, 16, 32, 64, 1]

    torch = pytest.importorskip("torch")
    from sait_tf.tools import torch_reference

    reference = torch_reference.randomize_(torch_reference.OutputDiscriminator(19, width=8), 5)
    modules = [reference.conv1, reference.conv2, reference.conv3, reference.conv4,
               reference.classifier]
    for conv, module in zip(discriminator.convs, modules, strict=True):
        conv.set_weights([module.weight.detach().numpy().transpose(2, 3, 1, 0),
                          module.bias.detach().numpy()])
    expected = torch_reference.run(
        reference, torch.from_numpy(probabilities.numpy().transpose(0, 3, 1, 2).copy()))
    np.testing.assert_allclose(discriminator(probabilities), expected, rtol=1e-4, atol=1e-5)


def test_train_mode_batchnorm_normalises_by_the_batch_and_only_training_moves_statistics():
    """bn_mode='train' (the peers' model.train()): a training call normalises each channel by
    the batch's statistics and moves the running ones 10% towards them (unbiased variance, as
    torch.nn.BatchNorm2d); an inference call uses and keeps the running statistics."""
    model = build_segmenter("deeplabv2", 19, bn_mode="train", **TINY_DEEPLAB)
    bn = model.bn1
    features = tf.random.stateless_normal([2, 5, 7, 3], seed=(1, 2)) * 4.0 + 3.0
    bn_input = tf.random.stateless_normal([1, 1, 1, bn.gamma.shape[0]], seed=(3, 4))
    assert np.allclose(bn.moving_mean.numpy(), 0.0)
    inference = bn(bn_input, training=False).numpy()
    np.testing.assert_allclose(inference, bn_input.numpy() / np.sqrt(1.0 + 1e-5), rtol=1e-6)

    wide = tf.random.stateless_normal([2, 5, 7, bn.gamma.shape[0]], seed=(5, 6)) * 4.0 + 3.0
    normalised = bn(wide, training=True).numpy()
    np.testing.assert_allclose(normalised.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(normalised.var(axis=(0, 1, 2)), 1.0, rtol=1e-3)
    values = wide.numpy().reshape(-1, wide.shape[-1])
    np.testing.assert_allclose(bn.moving_mean.numpy(), 0.1 * values.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(bn.moving_variance.numpy(),
                               0.9 + 0.1 * values.var(axis=0, ddof=1), rtol=1e-5)
    moved = bn.moving_mean.numpy().copy()
    model(features, training=False)
    np.testing.assert_array_equal(bn.moving_mean.numpy(), moved)
    model(features, training=True)  # the model passes training on to every BN
    assert not np.allclose(bn.moving_mean.numpy(), moved)


def test_frozen_batchnorm_ignores_training_and_bad_modes_are_named():
    model = build_segmenter("deeplabv2", 19, **TINY_DEEPLAB)
    before = [w.numpy().copy() for w in model.weights]
    features = tf.random.stateless_normal([1, 33, 41, 3], seed=(7, 8)) * 60.0
    np.testing.assert_allclose(model(features, training=True).numpy(),
                               model(features, training=False).numpy(), rtol=1e-5, atol=1e-5)
    for weight, value in zip(model.weights, before, strict=True):
        np.testing.assert_array_equal(weight.numpy(), value)
    with pytest.raises(ValueError, match="bn_mode must be one of.*'batch'"):
        build_segmenter("deeplabv2", 19, bn_mode="batch", **TINY_DEEPLAB)
