"""Mixed precision (bfloat16, float16 with loss scaling) and XLA: finite steps, float32 losses,
and the loss-scale bookkeeping of ``distribute.apply_gradients`` checked by hand."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from tiny_models import NUM_CLASSES, segmentation_batch, tiny_translation_step

from sait_tf.models import build_segmenter
from sait_tf.models.discriminators import OutputDiscriminator
from sait_tf.models.layers import SpectralNormalization
from sait_tf.runtime import files, machine
from sait_tf.train import distribute, optimizers
from sait_tf.train.segmentation import train_segmenter
from sait_tf.train.translation import DOMAINS

pytestmark = pytest.mark.usefixtures("skip_grappler")

COMPUTE_DTYPES = {"mixed_bfloat16": "bfloat16", "mixed_float16": "float16"}
BFLOAT16_MISSING = machine.onednn_bfloat16_missing()
needs_bfloat16 = pytest.mark.skipif(
    BFLOAT16_MISSING is not None, reason=f"no bfloat16 convolutions here: {BFLOAT16_MISSING}")
POLICIES = [pytest.param("mixed_bfloat16", marks=needs_bfloat16), "mixed_float16"]


@pytest.fixture(autouse=True)
def _restore_policy():
    previous = keras.mixed_precision.global_policy()
    yield
    keras.mixed_precision.set_global_policy(previous)



def test_set_precision_sets_the_policy_of_models_built_afterwards():
    with pytest.raises(ValueError, match="set_precision.policy"):
        distribute.set_precision("float16")
    distribute.set_precision("mixed_float16")
    assert distribute.computes_in_float16(keras.layers.Dense(1))
    if BFLOAT16_MISSING:
        return
    distribute.set_precision("mixed_bfloat16")
    layer = keras.layers.Dense(1)
    assert not distribute.computes_in_float16(layer)
    assert (layer.compute_dtype, layer.variable_dtype) == ("bfloat16", "float32")


@pytest.mark.parametrize("onednn, isa, flags, missing", [
    (True, "AVX2", machine.AVX512_CORE_FLAGS, "ONEDNN_MAX_CPU_ISA=AVX2 holds oneDNN below"),
    (True, "", ("avx", "avx2", "fma"), "the CPU has no AVX-512"),
    (True, "avx512_core_amx", machine.AVX512_CORE_FLAGS, None),
    (True, "", ("avx2", "avx_vnni", "avx_ne_convert"), None),
    (False, "AVX2", ("avx2",), None),
])
def test_mixed_bfloat16_is_refused_where_onednn_has_no_bfloat16_convolutions(
        monkeypatch, onednn, isa, flags, missing):
    """oneDNN held to AVX2 fails at the first convolution ("could not create a primitive
    descriptor"); set_precision names why before any model is built."""
    monkeypatch.setattr(machine, "onednn_enabled", lambda: onednn)
    monkeypatch.setattr(machine, "cpu_flags", lambda: list(flags))
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", isa)
    if missing is None:
        distribute.set_precision("mixed_bfloat16")
        assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"
        return
    with pytest.raises(ValueError, match=f"set_precision.policy = 'mixed_bfloat16'.*{missing}"):
        distribute.set_precision("mixed_bfloat16")
    assert keras.mixed_precision.global_policy().name == "float32"


def test_apply_gradients_halves_the_scale_on_skipped_steps_and_unscales_applied_ones():
    variable = keras.Variable([1.0, 2.0], name="w")
    optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.5), initial_scale=8.0,
                                                    dynamic_growth_steps=2)
    optimizer.build([variable])
    loss = tf.constant(1.0)
    assert float(distribute.scale_loss(optimizer, loss)) == 8.0

    assert not bool(distribute.apply_gradients(optimizer, [tf.constant([np.inf, 1.0])],
                                               [variable], loss))
    np.testing.assert_array_equal(variable.numpy(), [1.0, 2.0])
    assert (float(optimizer.dynamic_scale), int(optimizer.step_counter)) == (4.0, 0)

    # Gradients of the loss scaled by 4: the update uses [1, 2].
    assert bool(distribute.apply_gradients(optimizer, [tf.constant([4.0, 8.0])], [variable],
                                           loss))
    np.testing.assert_allclose(variable.numpy(), [0.5, 1.0])
    assert (float(optimizer.dynamic_scale), int(optimizer.step_counter)) == (4.0, 1)
    distribute.apply_gradients(optimizer, [tf.constant([4.0, 8.0])], [variable], loss)
    np.testing.assert_allclose(variable.numpy(), [0.0, 0.0])
    assert (float(optimizer.dynamic_scale), int(optimizer.step_counter)) == (8.0, 0)


def test_grouped_loss_scaling_unscales_gradients_and_keeps_weight_decay_unscaled():
    head, base = keras.Variable([2.0], name="head"), keras.Variable([4.0], name="base")
    grouped = optimizers.GroupedOptimizer(
        [("head", r"head", keras.optimizers.SGD(0.1)),
         ("unused", r"nothing", keras.optimizers.SGD(0.1)),
         ("base", None, keras.optimizers.SGD(1.0))], weight_decay=0.25).with_loss_scaling(
        [head, base])
    wrapped = {name: isinstance(opt, keras.optimizers.LossScaleOptimizer)
               for name, opt in grouped.optimizers.items()}
    assert wrapped == {"head": True, "unused": False, "base": True}
    loss = tf.constant(1.0)
    scale = float(distribute.scale_loss(grouped, loss))
    assert scale == 2.0**15
    assert bool(distribute.apply_gradients(grouped, [tf.constant([scale * 1.0]),
                                                     tf.constant([scale * 2.0])],
                                           [head, base], loss))
    np.testing.assert_allclose(head.numpy(), [2.0 - 0.1 * (1.0 + 0.25 * 2.0)])
    np.testing.assert_allclose(base.numpy(), [4.0 - 1.0 * (2.0 + 0.25 * 4.0)])


@pytest.mark.parametrize("policy", POLICIES)
def test_translation_step_is_finite_in_mixed_precision(policy):
    distribute.set_precision(policy)

    def adam(translator: keras.Model) -> keras.optimizers.Optimizer:
        optimizer = keras.optimizers.Adam(1e-3)
        if distribute.computes_in_float16(translator):
            return keras.optimizers.LossScaleOptimizer(optimizer)
        return optimizer

    step = tiny_translation_step(adam)
    translator, discriminators = step.translator, step.discriminators
    assert translator.compute_dtype == COMPUTE_DTYPES[policy]
    before = [v.numpy() for v in step.generator_variables if v.path.endswith("bias")]
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 16, 16, 3)).astype(np.float32)
    results = step.replica_step({"source": pixels, "target": pixels[::-1]})
    assert bool(results["translator_applied"]) and bool(results["discriminators_applied"])
    for name in ("translator", "discriminators", "sce", "gan"):
        assert results[name].dtype == tf.float32 and np.isfinite(results[name].numpy()), name
    every = translator.variables + [v for d in DOMAINS for v in discriminators[d].variables]
    assert all(v.dtype == "float32" and np.isfinite(v.numpy()).all() for v in every)
    after = [v.numpy() for v in step.generator_variables if v.path.endswith("bias")]
    assert any(not np.array_equal(a, b) for a, b in zip(after, before, strict=True))


@needs_bfloat16
def test_spectral_norm_writes_float32_master_kernels_under_mixed_precision():
    """One power iteration in float64 by hand: a kernel normalised in bfloat16 would be
    ~0.4% off, and the optimiser's small updates would be rounded away at every call."""
    distribute.set_precision("mixed_bfloat16")
    layer = SpectralNormalization(keras.layers.Conv2D(4, 3))
    model = keras.Sequential([keras.Input((8, 8, 3)), layer])  # nested, as in F and D
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(3, 3, 3, 4)).astype(np.float32)
    layer.kernel.assign(kernel)
    u = layer.vector_u.numpy().astype(np.float64)
    outputs = model(tf.constant(rng.normal(size=(1, 8, 8, 3)), tf.float32), training=True)
    assert outputs.dtype == tf.bfloat16
    matrix = kernel.reshape(-1, 4).astype(np.float64)
    v = u @ matrix.T
    v /= np.linalg.norm(v)
    u = v @ matrix
    u /= np.linalg.norm(u)
    sigma = (v @ matrix @ u.T).item()
    assert layer.kernel.dtype == layer.vector_u.dtype == "float32"
    np.testing.assert_allclose(layer.vector_u.numpy(), u, rtol=1e-5)
    np.testing.assert_allclose(layer.kernel.numpy(), kernel / sigma, rtol=1e-5)


@pytest.mark.parametrize("policy", POLICIES)
def test_segmenter_steps_are_finite_in_mixed_precision(policy, tmp_path):
    """Tiny DeepLabV2 (frozen BN, Caffe preprocessing) and D_seg, 8 steps: finite weights that
    moved. In float16 the first steps overflow at the initial loss scale 2^15 and are skipped
    while the scale halves."""
    distribute.set_precision(policy)
    keras.utils.set_random_seed(3)
    segmenter = build_segmenter("deeplabv2", num_classes=NUM_CLASSES, blocks=(1, 1, 1, 1),
                                width_multiplier=0.125)
    discriminator = OutputDiscriminator(width=4)
    assert segmenter.compute_dtype == COMPUTE_DTYPES[policy]
    before = [v.numpy() for v in segmenter.trainable_variables]
    stage = str(tmp_path / "stage")
    train_segmenter(segmenter, stage, str(tmp_path / "logs"), 8,
                    source_dataset=segmentation_batch(1), target_dataset=segmentation_batch(2),
                    output_discriminator=discriminator, lambda_adv=0.1,
                    optimizer_factory=optimizers.adam_optimizer)
    variables = segmenter.variables + discriminator.variables
    assert all(v.dtype == "float32" and np.isfinite(v.numpy()).all() for v in variables)
    moved = [not np.array_equal(a, v.numpy())
             for a, v in zip(before, segmenter.trainable_variables, strict=True)]
    assert all(moved)
    # A float16 M trains through a LossScaleOptimizer: its scale and counter are checkpointed.
    expected = optimizers.adam_optimizer(8).optimizers["all"]
    if policy == "mixed_float16":
        expected = keras.optimizers.LossScaleOptimizer(expected)
    expected.build(segmenter.trainable_variables)
    stored = [name for name, _ in tf.train.list_variables(tf.train.latest_checkpoint(stage))
              if name.startswith("segmenter_optimizer_all/")]
    assert len(stored) == len(expected.variables)
    assert files.is_done(stage)


def test_segmenter_step_compiles_with_xla(tmp_path):
    """jit_compile: the same update as without it (tape and update in one XLA function)."""
    def stand_in() -> keras.Model:
        keras.utils.set_random_seed(5)
        inputs = keras.Input((32, 64, 3))
        features = keras.layers.Conv2D(4, 3, strides=4, padding="same", activation="relu")(
            inputs / 127.5 - 1.0)
        return keras.Model(inputs, keras.layers.Conv2D(NUM_CLASSES, 1, name="classifier")(
            features))

    results = {}
    for jit_compile in (False, True):
        model = stand_in()
        train_segmenter(model, str(tmp_path / f"jit_{jit_compile}"), str(tmp_path / "logs"), 2,
                        source_dataset=segmentation_batch(1), jit_compile=jit_compile)
        results[jit_compile] = model.get_weights()
    for compiled, plain in zip(results[True], results[False], strict=True):
        assert np.isfinite(compiled).all()
        np.testing.assert_allclose(compiled, plain, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="train_segmenter.jit_compile: XLA cannot compile"):
        train_segmenter(stand_in(), str(tmp_path / "mirrored"), str(tmp_path / "logs"), 1,
                        source_dataset=segmentation_batch(1), jit_compile=True,
                        strategy=distribute.make_strategy("mirrored", ["/cpu:0", "/cpu:1"]))


@pytest.mark.slow
def test_translation_step_compiles_with_xla():
    """The F step as ``train_translator.jit_compile`` compiles it equals the uncompiled one."""
    results = {}
    for jit_compile in (False, True):
        step = tiny_translation_step(discriminator_layers=1)
        pixels = np.random.default_rng(0).uniform(0, 255, (2, 16, 16, 3)).astype(np.float32)
        run = tf.function(step.replica_step, autograph=False, jit_compile=True) if jit_compile \
            else step.replica_step
        run({"source": pixels, "target": pixels[::-1]})
        results[jit_compile] = [v.numpy() for v in step.translator.variables]
    for compiled, plain in zip(results[True], results[False], strict=True):
        np.testing.assert_allclose(compiled, plain, rtol=1e-4, atol=1e-6)
