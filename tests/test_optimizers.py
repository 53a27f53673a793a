"""Per-group optimisers: hand-computed SGD/Adam updates, learning-rate multipliers, schedules.

The expected updates are PyTorch's (``torch.optim.SGD``: the rate multiplies the momentum
buffer) and the schedules liyunsheng13/BDL's (``adjust_learning_rate`` in ``model/``).
"""

import os

import keras
import numpy as np
import pytest

from sait_tf.train import optimizers


def _tiny_model() -> keras.Model:
    inputs = keras.Input((1,))
    hidden = keras.layers.Dense(1, name="backbone")(inputs)
    logits = keras.layers.Dense(1, name="classifier")(hidden)
    model = keras.Model(inputs, logits)
    for variable in model.trainable_variables:
        variable.assign(np.ones(variable.shape, np.float32))
    return model


def test_poly_schedule_values():
    schedule = optimizers.poly_schedule(0.1, total_steps=10, power=0.9)
    for step in (0, 3, 9, 10, 15):
        expected = 0.1 * (1 - min(step, 10) / 10) ** 0.9
        np.testing.assert_allclose(float(schedule(step)), expected, rtol=1e-6)


def test_poly_schedule_over_a_longer_horizon_than_the_stage():
    """BDL: poly over --num-steps 250000, stopped at --num-steps-stop 120000 (0.55x)."""
    schedule = optimizers.poly_schedule(2.5e-4, total_steps=120000, decay_steps=250000)
    for step in (0, 60000, 119999, 120000):
        np.testing.assert_allclose(float(schedule(step)), 2.5e-4 * (1 - step / 250000) ** 0.9,
                                   rtol=1e-5)
    np.testing.assert_allclose(float(schedule(120000)) / 2.5e-4, 0.555, atol=1e-3)
    np.testing.assert_allclose(float(schedule(300000)), 0.0)


def test_step_schedule_is_bdl_x01_every_n_steps():
    schedule = optimizers.step_schedule(1e-5, every=50000)
    for step in (0, 49999, 50000, 99999, 100000, 160000):
        np.testing.assert_allclose(float(schedule(step)), 1e-5 * 0.1 ** (step // 50000),
                                   rtol=1e-5)


def test_deeplabv2_sgd_momentum_weight_decay_and_classifier_10x():
    model = _tiny_model()
    variables = model.trainable_variables
    opt = optimizers.deeplabv2_optimizer(total_steps=10, learning_rate=0.1, momentum=0.9,
                                         weight_decay=0.01)
    assert opt.partition(variables) == {
        "classifier": [v for v in variables if "classifier" in v.path],
        "base": [v for v in variables if "backbone" in v.path]}
    grads = [np.full(v.shape, 0.5, np.float32) for v in variables]

    def expected_after_two_steps(lr0: float) -> float:
        """torch.optim.SGD: buf = 0.9 buf + (g + wd w); w -= lr buf (lr outside the buffer)."""
        w, buffer = 1.0, 0.0
        for step in range(2):
            lr = lr0 * (1 - step / 10) ** 0.9
            buffer = 0.9 * buffer + (0.5 + 0.01 * w)
            w -= lr * buffer
        return w

    opt.apply(grads, variables)
    opt.apply(grads, variables)
    for variable in variables:
        lr0 = 1.0 if "classifier" in variable.path else 0.1
        np.testing.assert_allclose(variable.numpy(), expected_after_two_steps(lr0), rtol=1e-6)
    np.testing.assert_allclose(opt.learning_rates()["classifier"], 1.0 * 0.8 ** 0.9, rtol=1e-6)
    np.testing.assert_allclose(opt.learning_rates()["base"], 0.1 * 0.8 ** 0.9, rtol=1e-6)


def test_deeplabv2_decay_steps_sets_the_horizon():
    opt = optimizers.deeplabv2_optimizer(total_steps=4, learning_rate=0.1, decay_steps=8)
    model = _tiny_model()
    grads = [np.zeros(v.shape, np.float32) for v in model.trainable_variables]
    for _ in range(4):
        opt.apply(grads, model.trainable_variables)
    np.testing.assert_allclose(opt.learning_rates()["base"], 0.1 * 0.5 ** 0.9, rtol=1e-6)
    np.testing.assert_allclose(opt.learning_rates()["classifier"], 1.0 * 0.5 ** 0.9, rtol=1e-6)


def test_fcn8s_adam_biases_at_2x():
    model = _tiny_model()
    variables = model.trainable_variables
    opt = optimizers.fcn8s_optimizer(total_steps=100, learning_rate=1e-2)
    grads = [np.full(v.shape, 3.0, np.float32) for v in variables]
    opt.apply(grads, variables)
    # First Adam step with bias correction moves every weight by lr * sign(grad).
    for variable in variables:
        step = 2e-2 if variable.path.endswith("bias") else 1e-2
        np.testing.assert_allclose(variable.numpy(), 1.0 - step, rtol=1e-6)


def test_fcn8s_step_decay():
    opt = optimizers.fcn8s_optimizer(total_steps=100, learning_rate=1e-2, step_decay_every=3)
    model = _tiny_model()
    grads = [np.zeros(v.shape, np.float32) for v in model.trainable_variables]
    for _ in range(4):
        opt.apply(grads, model.trainable_variables)
    np.testing.assert_allclose(opt.learning_rates()["base"], 1e-3, rtol=1e-6)
    np.testing.assert_allclose(opt.learning_rates()["bias"], 2e-3, rtol=1e-6)


def test_discriminator_optimizer_poly():
    opt = optimizers.discriminator_optimizer(total_steps=4)
    model = _tiny_model()
    grads = [np.zeros(v.shape, np.float32) for v in model.trainable_variables]
    opt.apply(grads, model.trainable_variables)
    np.testing.assert_allclose(opt.learning_rates()["all"], 1e-4 * 0.75 ** 0.9, rtol=1e-6)


@pytest.mark.parametrize("knobs, expected", [
    ({"decay_steps": 8}, 1e-4 * 0.75 ** 0.9),       # BDL DeepLab: poly over --num-steps
    ({"step_decay_every": 2}, 1e-5)])               # BDL VGG: x0.1 every 50000 (here 2)
def test_discriminator_optimizer_follows_the_segmenters_schedule(knobs, expected):
    opt = optimizers.discriminator_optimizer(total_steps=4, **knobs)
    model = _tiny_model()
    grads = [np.zeros(v.shape, np.float32) for v in model.trainable_variables]
    for _ in range(2):
        opt.apply(grads, model.trainable_variables)
    np.testing.assert_allclose(opt.learning_rates()["all"], expected, rtol=1e-6)


def test_segmentation_optimizer_dispatches_on_arch():
    assert set(optimizers.segmentation_optimizer(10, arch="fcn8s").optimizers) == {"bias", "base"}
    assert set(optimizers.segmentation_optimizer(10, arch="deeplabv2").optimizers) == {
        "classifier", "base"}
    with pytest.raises(ValueError, match="segmentation_optimizer.arch"):
        optimizers.segmentation_optimizer(10, arch="unet")


def test_adam_optimizer_one_rate_for_all_variables():
    model = _tiny_model()
    opt = optimizers.adam_optimizer(total_steps=10, learning_rate=1e-2)
    grads = [np.full(v.shape, -2.0, np.float32) for v in model.trainable_variables]
    opt.apply(grads, model.trainable_variables)
    for variable in model.trainable_variables:
        np.testing.assert_allclose(variable.numpy(), 1.0 + 1e-2, rtol=1e-6)
    np.testing.assert_allclose(opt.learning_rates()["all"], 1e-2 * 0.9 ** 0.9, rtol=1e-6)


@pytest.fixture
def paper_config():
    """Parses gin/NAME.gin as ``python -m sait_tf.train`` does; clears gin afterwards."""
    import gin

    from sait_tf.train.__main__ import parse_gin

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    yield lambda name: parse_gin([os.path.join(repo, "gin", f"{name}.gin")], [])
    gin.clear_config()


@pytest.mark.parametrize("config, final_fraction", [
    ("gta5_deeplabv2", 0.52 ** 0.9), ("synthia_deeplabv2", 0.52 ** 0.9),
    ("gta5_deeplabv2_from_scratch", 0.52 ** 0.9), ("ablation_spade_sce", 0.52 ** 0.9),
    ("gta5_fcn8s", 0.01), ("synthia_fcn8s", 0.01)])
def test_paper_configs_follow_bdls_schedules(paper_config, config, final_fraction):
    """After 120000 steps (a stage of M): DeepLabV2 and its D_seg at (1 - 120000/250000)^0.9
    of their rates, FCN8s and its D_seg at 0.01x (x0.1 every 50000): BDL's schedules."""
    paper_config(config)
    segmenter, discriminator = (optimizers.segmentation_optimizer(120000),
                                optimizers.discriminator_optimizer(120000))
    for grouped in (segmenter, discriminator):
        for name, optimizer in grouped.optimizers.items():
            initial = float(optimizer.learning_rate)
            optimizer.iterations.assign(120000)
            np.testing.assert_allclose(float(optimizer.learning_rate), final_fraction * initial,
                                       rtol=1e-5, err_msg=name)
