"""Translator F and its discriminators: SPADE, LayerNormCHW, spectral norm, shapes, switches."""

import gin
import keras
import numpy as np
import pytest
import tensorflow as tf

from sait_tf import images
from sait_tf.models.discriminators import build_patch_discriminator, downsample
from sait_tf.models.layers import spectral_conv
from sait_tf.models.translator import (
    SPADE,
    LayerNormCHW,
    UpsamplingBlock,
    build_translator,
    reflect_pad,
    translate_pixels,
)

NUM_CLASSES = 3
TINY = dict(dim=4, num_downsamplings=2, num_residual_blocks=1, spade_hidden=4)


def _two_region_logits(left_class: int, right_class: int, size: int = 16,
                       num_classes: int = 3) -> tf.Tensor:
    """One-hot logits (x 5): columns < size/2 are ``left_class``, the others ``right_class``."""
    classes = np.full((1, size, size), right_class)
    classes[:, :, : size // 2] = left_class
    return tf.constant(5.0 * np.eye(num_classes)[classes], tf.float32)


def _instance_norm(x: np.ndarray) -> np.ndarray:
    mean = x.mean(axis=(1, 2), keepdims=True)
    return (x - mean) / np.sqrt(x.var(axis=(1, 2), keepdims=True) + 1e-5)


def test_spade_modulation_follows_the_segmentation_per_pixel():
    x = tf.random.normal([1, 16, 16, 4], seed=1)
    spade = SPADE(channels=4, hidden=8)
    seg = _two_region_logits(0, 1)
    gamma, beta = (t.numpy() for t in spade.modulation(x, seg))
    # Two stacked 3x3 convs see 2 pixels around: columns 0-5 and 10-15 see one class only.
    left, right = np.s_[:, :, :6], np.s_[:, :, 10:]
    for field in (gamma, beta):
        np.testing.assert_allclose(field[left],
                                   np.broadcast_to(field[:1, :1, :1], field[left].shape),
                                   atol=1e-5)
        np.testing.assert_allclose(field[right],
                                   np.broadcast_to(field[:1, :1, -1:], field[right].shape),
                                   atol=1e-5)
        assert np.abs(field[0, 0, 0] - field[0, 0, -1]).max() > 1e-3

    output = spade(x, seg).numpy()
    expected = (1.0 + gamma) * _instance_norm(x.numpy()) + beta
    np.testing.assert_allclose(output, expected, atol=1e-4)

    changed = spade(x, _two_region_logits(0, 2)).numpy()
    np.testing.assert_allclose(changed[left], output[left], atol=1e-5)
    assert np.abs(changed[right] - output[right]).max() > 1e-3


def test_spade_resizes_logits_to_the_activation():
    spade = SPADE(channels=2, hidden=4)
    x = tf.random.normal([1, 8, 8, 2])
    low_res = _two_region_logits(0, 1, size=4)
    full_res = images.resize_logits(low_res, (8, 8))
    np.testing.assert_allclose(spade(x, low_res).numpy(), spade(x, full_res).numpy(), atol=1e-6)


def test_layer_norm_chw_normalises_each_sample_over_c_h_w():
    x = np.random.default_rng(0).normal(size=(2, 5, 6, 3)).astype(np.float32)
    x[1] = 10.0 * x[1] + 3.0
    layer = LayerNormCHW()
    y = layer(tf.constant(x)).numpy()
    np.testing.assert_allclose(y.mean(axis=(1, 2, 3)), [0.0, 0.0], atol=1e-5)
    np.testing.assert_allclose(y.var(axis=(1, 2, 3)), [1.0, 1.0], atol=1e-3)
    # Per-position LN (Keras' default) would give every pixel zero mean over its channels.
    assert np.abs(y.mean(axis=-1)).max() > 0.1

    layer.gamma.assign([1.0, 2.0, 3.0])
    layer.beta.assign([0.5, -1.0, 0.0])
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    normalised = (x - mean) / np.sqrt(x.var(axis=(1, 2, 3), keepdims=True) + 1e-5)
    expected = normalised * np.array([1.0, 2.0, 3.0]) + np.array([0.5, -1.0, 0.0])
    np.testing.assert_allclose(layer(tf.constant(x)).numpy(), expected, atol=1e-4)


def _largest_singular_value(kernel: np.ndarray) -> float:
    return float(np.linalg.svd(kernel.reshape(-1, kernel.shape[-1]), compute_uv=False)[0])


def test_spectral_norm_normalises_in_training_and_inference_uses_the_normalised_kernel():
    conv = spectral_conv(6, 3)
    x = tf.random.normal([1, 9, 9, 4])
    conv(x)  # build
    conv.kernel.assign(7.0 * conv.kernel)
    raw_kernel = conv.kernel.numpy()
    assert _largest_singular_value(raw_kernel) > 2.0

    # Inference before any training call: the normalised kernel, and no variable changes.
    u_before = conv.vector_u.numpy()
    inferred = conv(x, training=False).numpy()
    np.testing.assert_array_equal(conv.kernel.numpy(), raw_kernel)
    np.testing.assert_array_equal(conv.vector_u.numpy(), u_before)
    stock = tf.nn.conv2d(x, raw_kernel, 1, "VALID").numpy() + conv.layer.bias.numpy()
    assert np.abs(inferred - stock).max() > 1.0

    for _ in range(30):
        conv(x, training=True)
    assert not np.array_equal(conv.vector_u.numpy(), u_before)
    normalised = conv.kernel.numpy()
    assert _largest_singular_value(normalised) == pytest.approx(1.0, abs=1e-3)

    # An optimiser-like change of the stored kernel: inference still uses kernel / sigma.
    conv.kernel.assign(3.0 * normalised)
    expected = tf.nn.conv2d(x, normalised, 1, "VALID").numpy() + conv.layer.bias.numpy()
    np.testing.assert_allclose(conv(x, training=False).numpy(), expected, atol=1e-3)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("size", [(2, 2), (3, 5), (6, 4)])
def test_upsampling_block_equals_nearest_x2_reflect_pad_and_5x5_conv(size, training):
    """Outputs and gradients (input, kernel variable) of the phase decomposition equal
    MUNIT's up-sampling block computed on the up-sampled tensor, border lines included."""
    block = UpsamplingBlock(6, 5, norm=None, relu=False)
    x = tf.random.normal([2, *size, 4], seed=2)
    block(x)  # builds the variables
    block.conv.layer.bias.assign(tf.random.normal([6], seed=3))
    upstream = tf.random.normal([2, 2 * size[0], 2 * size[1], 6], seed=4)
    kernel_variable = block.conv.layer.kernel

    def reference(x: tf.Tensor) -> tf.Tensor:
        up = tf.repeat(tf.repeat(x, 2, axis=1), 2, axis=2)
        kernel = block.conv.kernel_for_call(training)
        return tf.nn.conv2d(reflect_pad(up, 2), kernel, 1, "VALID") + block.conv.layer.bias

    start = [v.numpy() for v in (kernel_variable, block.conv.vector_u)]
    results = []
    for function in (lambda x: block(x, training=training), reference):
        for variable, value in zip((kernel_variable, block.conv.vector_u), start, strict=True):
            variable.assign(value)  # a training call normalises the kernel in place
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = function(x)
            loss = tf.reduce_sum(y * upstream)
        results.append([y, *tape.gradient(loss, [x, kernel_variable])])
    for got, want in zip(*results, strict=True):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5,
                                   atol=1e-5 * float(tf.reduce_max(tf.abs(want))))


def test_translator_training_calls_run_the_power_iteration():
    translator = build_translator(NUM_CLASSES, **TINY)
    x = tf.random.uniform([1, 16, 16, 3], -1.0, 1.0)
    seg = tf.random.normal([1, 2, 2, 3])
    translator.translate(x, seg, "source", "target")
    translator.translate(x, seg, "target", "source")
    u_vectors = [v for v in translator.non_trainable_variables if "vector_u" in v.path]
    # Per domain: encoder stem, 2 down, 2 residual convs; generator 2 residual convs,
    # 2 SPADE x 3 convs, 2 up, to_rgb.
    assert len(u_vectors) == 2 * ((1 + 2 + 2) + (2 + 2 * 3 + 2 + 1))
    before = [v.numpy() for v in u_vectors]
    translator.translate(x, seg, "source", "target", training=False)
    assert all(np.array_equal(b, v.numpy()) for b, v in zip(before, u_vectors, strict=True))
    translator.translate(x, seg, "source", "target", training=True)
    for b, v in zip(before, u_vectors, strict=True):
        used = v.path.startswith(("source_encoder", "target_generator"))
        assert np.array_equal(b, v.numpy()) != used, v.path


def test_in_residual_norm_has_no_spade_and_ignores_the_logits():
    x = tf.random.uniform([1, 16, 16, 3], -1.0, 1.0)
    seg_a, seg_b = tf.random.normal([1, 4, 4, 3]), tf.random.normal([1, 4, 4, 3])
    plain = build_translator(NUM_CLASSES, **TINY, residual_norm="in")
    out_a = plain.translate(x, seg_a, "source", "target")
    assert not plain.conditioned
    assert not [v.path for v in plain.variables if "spade" in v.path]
    np.testing.assert_array_equal(out_a.numpy(),
                                  plain.translate(x, seg_b, "source", "target").numpy())

    guided = build_translator(NUM_CLASSES, **TINY)
    out_a = guided.translate(x, seg_a, "source", "target")
    assert [v.path for v in guided.variables if "spade" in v.path]
    assert np.abs(out_a - guided.translate(x, seg_b, "source", "target")).max() > 1e-4


def test_unknown_residual_norm_names_the_parameter():
    with pytest.raises(ValueError, match="residual_norm"):
        build_translator(NUM_CLASSES, **TINY, residual_norm="batch")


def test_num_classes_comes_from_the_segmenter_not_from_gin():
    try:
        with pytest.raises(ValueError, match="num_classes"):
            gin.parse_config("build_translator.num_classes = 3")
    finally:
        gin.clear_config()
    with pytest.raises(TypeError, match="num_classes"):
        build_translator(**TINY)


def _build_by_two_calls(translator: keras.Model) -> None:
    """How F used to be built before a restore: a source -> target call (which marks the
    model built), then a target -> source translation."""
    side = 4 * translator.size_multiple
    x_unit = tf.zeros([1, side, side, 3])
    seg_logits = tf.zeros([1, side, side, translator.num_classes])
    translator((x_unit, seg_logits))
    translator.translate(x_unit, seg_logits, "target", "source")


@pytest.mark.slow
def test_build_creates_all_four_networks_in_the_old_checkpoint_order():
    translator = build_translator(19, **TINY)
    translator.build()
    assert translator.built
    for network in (translator.source_encoder, translator.target_encoder,
                    translator.source_generator, translator.target_generator):
        assert network.variables, network.name

    old = build_translator(19, **TINY)
    _build_by_two_calls(old)
    assert ([tuple(v.shape) for v in translator.variables]
            == [tuple(v.shape) for v in old.variables])
    # Checkpoints key variables by position: with old's values copied by position, F must
    # translate exactly as old in both directions.
    for variable, old_variable in zip(translator.variables, old.variables, strict=True):
        variable.assign(old_variable)
    x = tf.random.uniform([1, 16, 16, 3], -1.0, 1.0)
    seg = tf.random.normal([1, 4, 4, 19])
    for domains in (("source", "target"), ("target", "source")):
        np.testing.assert_array_equal(translator.translate(x, seg, *domains).numpy(),
                                      old.translate(x, seg, *domains).numpy())


def test_translate_pixels_guides_f_on_unit_images_with_m_on_pixels():
    conv = keras.layers.Conv2D(NUM_CLASSES, 3, strides=2, padding="same")
    m_training_flags = []

    def segmenter(pixels: tf.Tensor, training: bool) -> tf.Tensor:
        m_training_flags.append(training)
        return conv(pixels / 127.5 - 1.0)

    translator = build_translator(NUM_CLASSES, **TINY)
    pixels = tf.random.uniform([2, 13, 18, 3], 0.0, 255.0, seed=1)
    for domains in (("source", "target"), ("target", "source")):
        got = translate_pixels(segmenter, translator, pixels, *domains)
        expected = images.unit_to_pixels(translator.translate(
            images.pixels_to_unit(pixels), segmenter(pixels, False), *domains))
        assert got.shape == pixels.shape and got.dtype == tf.float32
        np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-5, atol=1e-4)

    # ``training`` reaches F (its spectral norms update) while M stays in inference mode.
    u_before = translator.source_encoder.stem.conv.vector_u.numpy()
    translate_pixels(segmenter, translator, pixels, training=True)
    assert m_training_flags[-1] is False
    assert not np.array_equal(u_before, translator.source_encoder.stem.conv.vector_u.numpy())


def test_translate_pixels_of_an_unguided_translator_does_not_call_m():
    def segmenter(pixels: tf.Tensor, training: bool = False) -> tf.Tensor:
        raise AssertionError("M must not run for an IN translator")

    translator = build_translator(NUM_CLASSES, **TINY, residual_norm="in")
    pixels = tf.random.uniform([1, 8, 8, 3], 0.0, 255.0, seed=2)
    expected = images.unit_to_pixels(translator.translate(
        images.pixels_to_unit(pixels), None, "source", "target"))
    np.testing.assert_array_equal(translate_pixels(segmenter, translator, pixels).numpy(),
                                  expected.numpy())


@pytest.mark.parametrize("size", [(16, 24), (37, 29), (18, 21)])
def test_translation_keeps_the_input_size(size):
    translator = build_translator(NUM_CLASSES, **TINY)
    x = tf.random.uniform([2, *size, 3], -1.0, 1.0)
    seg = tf.random.normal([2, 5, 4, 3])
    z = translator.encode(x, "source")
    assert z.shape[-1] == 4 * 2**2
    out = translator.translate(x, seg, "source", "target")
    assert out.shape == x.shape
    assert np.abs(out.numpy()).max() <= 1.0
    if size[0] % 4 == 0 and size[1] % 4 == 0:
        np.testing.assert_array_equal(out.numpy(),
                                      translator.decode(z, seg, "target").numpy())


def test_odd_sizes_are_translated_as_the_mirror_padded_image():
    translator = build_translator(NUM_CLASSES, **TINY)
    x = tf.random.uniform([1, 13, 11, 3], -1.0, 1.0)
    seg = tf.random.normal([1, 13, 11, 3])
    padded_x = tf.pad(x, [[0, 0], [0, 3], [0, 1], [0, 0]], mode="REFLECT")
    padded_seg = tf.pad(seg, [[0, 0], [0, 3], [0, 1], [0, 0]], mode="REFLECT")
    expected = translator.decode(translator.encode(padded_x, "source"), padded_seg, "target")
    np.testing.assert_allclose(translator.translate(x, seg, "source", "target").numpy(),
                               expected[:, :13, :11].numpy(), atol=1e-6)


def test_checkpoints_hold_every_variable(tmp_path):
    translator = build_translator(NUM_CLASSES, **TINY)
    translator.translate(tf.zeros([1, 16, 16, 3]), tf.zeros([1, 2, 2, 3]), "source", "target")
    discriminator = build_patch_discriminator(dim=4, num_layers=2, num_scales=2)
    discriminator(tf.zeros([1, 16, 16, 3]))
    path = tf.train.Checkpoint(translator=translator, discriminator=discriminator).save(
        str(tmp_path / "ckpt"))
    saved = [name for name, _ in tf.train.list_variables(path)
             if name.startswith(("translator/", "discriminator/"))]
    assert len(saved) == len(translator.variables) + len(discriminator.variables)


def test_average_pool_excludes_the_padding_from_the_mean():
    x = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1)
    # Windows centred on rows/cols 0 and 2 (PyTorch padding 1): the corner window covers
    # rows 0-1 x cols 0-1 only, so its mean is (0 + 1 + 4 + 5) / 4.
    expected = np.array([[(0 + 1 + 4 + 5) / 4, (1 + 2 + 3 + 5 + 6 + 7) / 6],
                         [(4 + 5 + 8 + 9 + 12 + 13) / 6,
                          (5 + 6 + 7 + 9 + 10 + 11 + 13 + 14 + 15) / 9]])
    np.testing.assert_allclose(downsample(tf.constant(x)).numpy()[0, :, :, 0], expected,
                               rtol=1e-6)


def test_multi_scale_discriminator_scores_every_scale():
    discriminator = build_patch_discriminator(dim=4, num_layers=3, num_scales=3)
    outputs = discriminator(tf.zeros([2, 64, 48, 3]))
    assert [tuple(o.shape) for o in outputs] == [(2, 8, 6, 1), (2, 4, 3, 1), (2, 2, 1, 1)]
    kernels = [v for v in discriminator.variables if v.path.endswith("kernel")]
    assert [int(k.shape[-1]) for k in kernels] == [4, 8, 16, 1] * 3
    with pytest.raises(ValueError, match="num_scales"):
        discriminator(tf.zeros([1, 16, 16, 3]))


def test_a_generator_resizes_the_logits_once_for_all_its_spade_layers(monkeypatch):
    translator = build_translator(num_classes=5, dim=4, num_residual_blocks=3, spade_hidden=8)
    x = tf.random.stateless_uniform([1, 16, 24, 3], seed=(1, 2), minval=-1.0, maxval=1.0)
    logits = tf.random.stateless_normal([1, 3, 4, 5], seed=(3, 4))
    translator.translate(x, logits, "source", "target")  # builds the layers
    calls = []
    resize = images.resize_logits
    monkeypatch.setattr(images, "resize_logits",
                        lambda *args: calls.append(args[1]) or resize(*args))
    translator.translate(x, logits, "source", "target")
    assert [tuple(int(v) for v in size) for size in calls] == [(4, 6)]  # 6 SPADE layers
