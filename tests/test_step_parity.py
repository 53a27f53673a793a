"""M's training step equals the peers' PyTorch step, from the same weights and batches.

The PyTorch side is written as liyunsheng13/BDL writes its loop (``BDL.py``): its parameter
groups and ``adjust_learning_rate`` (``model/deeplab.py``, ``model/fcn8s.py``,
``model/discriminator.py``), logits up-sampled with ``align_corners=True`` before
``CrossEntropy2d`` and D_seg, BCE with source 0 / target 1, and the optimisers of BDL's
PyTorch 0.4 (``torch_reference.Adam04``). The Keras side is the trainer's own
``SegmentationStep``. Two steps each, so momentum, Adam's moments and the learning-rate
schedules (a decay horizon longer than the stage, as BDL's) all enter. DeepLabV2's BN runs in
both modes the configs use, affine parameters frozen: loaded statistics ("frozen", the demo)
and BDL's train mode ("train", the paper configs: each image's statistics, running statistics
updated, which the comparison of every variable checks too). FCN8s' dropout is off on both sides
(random masks cannot match), and its rate is 100x BDL's so that Adam's steps stand well above
the float32 rounding of the weights. The seeds leave no ReLU input within rounding of 0,
where TF's graph optimisations and PyTorch may round to opposite sides.
"""

from __future__ import annotations

import copy
import functools

import keras
import numpy as np
import pytest
import tensorflow as tf

torch = pytest.importorskip("torch")

from sait_tf import images  # noqa: E402
from sait_tf.models.discriminators import OutputDiscriminator  # noqa: E402
from sait_tf.tools import convert_torch  # noqa: E402
from sait_tf.tools import torch_reference as reference  # noqa: E402
from sait_tf.train import optimizers  # noqa: E402
from sait_tf.train.segmentation import SegmentationStep  # noqa: E402

NUM_CLASSES = 19
SIZE = (64, 99)  # odd width: DeepLabV2 logits 9 x 13, up-sampled back to 64 x 99
TINY_DEEPLAB = {"blocks": (1, 1, 1, 1), "width_multiplier": 0.125}
TINY_FCN8S = {"width_multiplier": 0.0625, "dropout": 0.0}
D_WIDTH = 4
STEPS = 2
HORIZON = 4  # BDL's --num-steps: the poly rate falls to 0.77x at the second step
WEIGHT_DECAY = 5e-4
# ||Keras - PyTorch|| of each variable after the steps, relative to the PyTorch update. Adam
# moves every weight by about lr whatever its gradient, so where a gradient is near zero (the
# two halves of D_seg's loss nearly cancel) float32 noise decides its step: a looser bound,
# 3x below the gap to later PyTorch's Adam (epsilon added after the bias correction).
SGD_RTOL = 1e-4
ADAM_RTOL = 5e-3


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -------------------------------------------------------------------------------------------
# Up-sampling of logits.

@pytest.mark.parametrize("in_size, out_size", [
    ((9, 13), (64, 99)), ((8, 12), (64, 96)), ((16, 16), (33, 17)),
    ((64, 99), (9, 13)), ((33, 18), (8, 12)), ((9, 13), (9, 13))])
@pytest.mark.parametrize("jit_compile", [False, True])
def test_resize_logits_is_torch_bilinear_with_aligned_corners(in_size, out_size, jit_compile):
    logits = np.random.default_rng(0).normal(0, 5, (2, *in_size, NUM_CLASSES)).astype(np.float32)
    resize = tf.function(images.resize_logits, jit_compile=jit_compile)
    actual = resize(tf.constant(logits), tf.constant(out_size)).numpy()
    expected = reference.upsample_logits(torch.from_numpy(logits.transpose(0, 3, 1, 2)),
                                         out_size).numpy().transpose(0, 2, 3, 1)
    assert actual.shape == (2, *out_size, NUM_CLASSES)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-5)


# -------------------------------------------------------------------------------------------
# The two sides.

def _batch(seed: int) -> dict[str, np.ndarray]:
    """RGB [0, 255] images and trainIds with some ignored pixels, batch 1 as in the paper."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, NUM_CLASSES, (1, *SIZE)).astype(np.int32)
    label[rng.random(label.shape) < 0.2] = 255
    return {"image": rng.uniform(0, 255, (1, *SIZE, 3)).astype(np.float32), "label": label}


def _torch_batch(batch: dict[str, np.ndarray],
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    return (reference.caffe_input(batch["image"]).to(dtype),
            torch.from_numpy(batch["label"]).long())


def _bce(logits: torch.Tensor, label: float) -> torch.Tensor:
    return torch.nn.BCEWithLogitsLoss()(logits, torch.full_like(logits, label))


def _bdl_iteration(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict,
                   discriminator: torch.nn.Module | None = None,
                   d_optimizer: torch.optim.Optimizer | None = None,
                   lambda_adv: float = 0.0) -> dict[str, float]:
    """One iteration of BDL ``BDL.py``'s loop after ``adjust_learning_rate``; its losses."""
    adversarial = discriminator is not None
    dtype = next(model.parameters()).dtype
    optimizer.zero_grad()
    if adversarial:
        d_optimizer.zero_grad()
        discriminator.requires_grad_(False)
    src_img, src_lbl = _torch_batch(batch["source"], dtype)
    src_score = reference.upsample_logits(model(src_img), src_lbl.shape[1:])
    loss_seg_src = reference.cross_entropy_2d(src_score, src_lbl)
    loss_seg_src.backward()
    losses = {"seg": loss_seg_src.item()}
    if adversarial:
        trg_img, trg_lbl = _torch_batch(batch["target"], dtype)
        trg_score = reference.upsample_logits(model(trg_img), trg_lbl.shape[1:])
        loss_seg_trg = reference.cross_entropy_2d(trg_score, trg_lbl)
        loss_d_trg_fake = _bce(discriminator(torch.softmax(trg_score, dim=1)), 0.0)
        (lambda_adv * loss_d_trg_fake + loss_seg_trg).backward()
        discriminator.requires_grad_(True)
        loss_d_src_real = _bce(discriminator(torch.softmax(src_score.detach(), dim=1)), 0.0) / 2
        loss_d_src_real.backward()
        loss_d_trg_real = _bce(discriminator(torch.softmax(trg_score.detach(), dim=1)), 1.0) / 2
        loss_d_trg_real.backward()
        losses.update(ssl=loss_seg_trg.item(), adv=loss_d_trg_fake.item(),
                      output_discriminator=(loss_d_src_real + loss_d_trg_real).item())
    optimizer.step()
    if adversarial:
        d_optimizer.step()
    return losses


def _keras_steps(step: SegmentationStep, batches: list[dict]) -> list[dict[str, float]]:
    """``step.replica_step`` on each batch, compiled as the stage loop compiles it."""
    for optimizer, variables in step.optimizers.values():
        optimizer.build(variables)  # as StageCheckpoint does before the first step
    run = tf.function(step.replica_step, autograph=False)
    results = []
    for batch in batches:
        terms = run(batch)
        assert all(bool(terms[f"{name}_applied"]) for name in step.guarded)
        results.append({name: float(value) for name, value in terms.items()
                        if not name.endswith("_applied")})
    return results


def _keras_discriminator(torch_model: reference.OutputDiscriminator) -> OutputDiscriminator:
    """D_seg with the PyTorch weights (``conv1``-``conv4``, ``classifier`` -> ``logits``)."""
    model = OutputDiscriminator(width=D_WIDTH)
    model(tf.zeros([1, 32, 32, NUM_CLASSES]))
    modules = (torch_model.conv1, torch_model.conv2, torch_model.conv3, torch_model.conv4,
               torch_model.classifier)
    for conv, module in zip(model.convs, modules, strict=True):
        conv.kernel.assign(module.weight.detach().numpy().transpose(2, 3, 1, 0))
        conv.bias.assign(module.bias.detach().numpy())
    return model


def _state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {key: value.detach().numpy().copy() for key, value in model.state_dict().items()}


def _deeplabv2_pair(seed: int, bn_mode: str) -> tuple[reference.DeepLabV2, keras.Model]:
    """A random tiny DeepLabV2 with BN in ``bn_mode``, ``layer5`` weights N(0, 0.01) as BDL
    ``model/deeplab.py`` initialises them, and the same network converted to Keras."""
    torch_model = reference.freeze_batchnorm_(reference.randomize_(
        reference.DeepLabV2(NUM_CLASSES, **TINY_DEEPLAB), seed=seed, input_scale=64.0), bn_mode)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for conv in torch_model.layer5.conv2d_list:
            conv.weight.copy_(0.01 * torch.randn(conv.weight.shape, generator=generator))
    return torch_model, _converted(torch_model, "deeplabv2", {**TINY_DEEPLAB, "bn_mode": bn_mode})


def _converted(torch_model: torch.nn.Module, arch: str, knobs: dict) -> keras.Model:
    return convert_torch.convert_state_dict(_state(torch_model), arch, NUM_CLASSES, **knobs)



def _bdl_sgd(torch_model: reference.DeepLabV2, learning_rate: float) -> torch.optim.SGD:
    """BDL ``model/__init__.py`` ``CreateModel`` for DeepLab."""
    return torch.optim.SGD(reference.deeplab_optim_parameters(torch_model, learning_rate),
                           lr=learning_rate, momentum=0.9, weight_decay=WEIGHT_DECAY)


def _assert_same_updates(actual: list, expected: list, before: list[np.ndarray],
                         rtol: float, bn_mode: str = "frozen",
                         torch_float32: list | None = None) -> None:
    """Per variable: ||Keras - PyTorch|| <= rtol ||PyTorch update|| plus both sides' float32
    rounding of the weights (L2 norms); every trainable variable moved, and in train-mode BN
    the running statistics; no other one did. With ``torch_float32``, ``expected`` is PyTorch
    in float64 and the bound grows by twice PyTorch's own float32 error: train-mode BN's
    gradient subtracts nearly equal terms, which float32 rounds to a few percent here."""
    noise = torch_float32 or [None] * len(actual)
    for variable, reference_variable, initial, float32_variable in zip(
            actual, expected, before, noise, strict=True):
        value, expected_value = variable.numpy(), reference_variable.numpy()
        update = np.linalg.norm(expected_value - initial)
        difference = np.linalg.norm(value - expected_value)
        rounding = 2 * np.finfo(np.float32).eps * np.linalg.norm(expected_value)
        if float32_variable is not None:
            rounding += 2 * np.linalg.norm(float32_variable.numpy() - expected_value)
        assert difference <= rtol * update + rounding, (variable.path, difference, update)
        moves = variable.trainable or (
            bn_mode == "train" and variable.path.endswith(("moving_mean", "moving_variance")))
        assert (update > 0) == moves, (variable.path, update)


def _assert_deeplabv2_updates(keras_model: keras.Model, torch_model: reference.DeepLabV2,
                              float64_model: reference.DeepLabV2, bdl_steps, before: list,
                              bn_mode: str) -> None:
    """M's updates against PyTorch's: in float32 with frozen BN; in train mode against
    ``bdl_steps`` run on ``float64_model`` (a copy of the initial weights), within PyTorch's
    own float32 error."""
    float32 = _converted(torch_model, "deeplabv2", TINY_DEEPLAB).weights
    if bn_mode == "frozen":
        _assert_same_updates(keras_model.weights, float32, before, SGD_RTOL, bn_mode)
        return
    bdl_steps(float64_model)
    float64 = _converted(float64_model.float(), "deeplabv2", TINY_DEEPLAB).weights
    _assert_same_updates(keras_model.weights, float64, before, SGD_RTOL, bn_mode, float32)


def _weights(model: keras.Model) -> list[np.ndarray]:
    return [w.numpy().copy() for w in model.weights]


# -------------------------------------------------------------------------------------------
# The parity tests.

@pytest.mark.slow
@pytest.mark.parametrize("bn_mode", ["frozen", "train"])
def test_deeplabv2_sgd_steps_match_pytorch(bn_mode):
    """(a) SGD momentum 0.9, weight decay 5e-4, ``layer5`` at 10x, poly over BDL's horizon."""
    learning_rate = 2.5e-4
    torch_model, keras_model = _deeplabv2_pair(seed=2, bn_mode=bn_mode)
    before = _weights(keras_model)
    batches = [{"source": _batch(seed)} for seed in range(STEPS)]

    def bdl_steps(model: reference.DeepLabV2) -> list[dict[str, float]]:
        optimizer = _bdl_sgd(model, learning_rate)
        torch_losses = []
        for i, batch in enumerate(batches):
            rate = reference.poly_learning_rate(learning_rate, i, HORIZON)
            reference.set_learning_rates(optimizer, [rate, 10 * rate])
            torch_losses.append(_bdl_iteration(model, optimizer, batch))
        return torch_losses

    float64_model = copy.deepcopy(torch_model).double()
    torch_losses = bdl_steps(torch_model)

    factory = functools.partial(optimizers.deeplabv2_optimizer, learning_rate=learning_rate,
                                weight_decay=WEIGHT_DECAY, decay_steps=HORIZON)
    step = SegmentationStep(keras_model, STEPS, None, 1.0, 1.0, 0.0, factory,
                            optimizers.discriminator_optimizer)
    keras_losses = _keras_steps(step, batches)

    for actual, expected in zip(keras_losses, torch_losses, strict=True):
        np.testing.assert_allclose(actual["seg"], expected["seg"], rtol=1e-5)
    _assert_deeplabv2_updates(keras_model, torch_model, float64_model, bdl_steps, before, bn_mode)


@pytest.mark.slow
def test_fcn8s_adam_steps_match_pytorch():
    """(b) Adam (0.9, 0.99), biases at 2x, BDL's x0.1 step decay (every step here)."""
    learning_rate = 1e-3
    torch_model = reference.randomize_(
        reference.FCN8s(NUM_CLASSES, width_multiplier=TINY_FCN8S["width_multiplier"]),
        seed=2, input_scale=64.0)
    with torch.no_grad():  # make both skips as strong as the fc7 path despite their scaling
        torch_model.score_pool4.weight.mul_(100.0)
        torch_model.score_pool3.weight.mul_(10000.0)
    keras_model = _converted(torch_model, "fcn8s", TINY_FCN8S)
    before = _weights(keras_model)
    batches = [{"source": _batch(10 + seed)} for seed in range(STEPS)]

    optimizer = reference.Adam04(reference.fcn8s_optim_parameters(torch_model, learning_rate),
                                 lr=learning_rate, betas=(0.9, 0.99))
    torch_losses = []
    for i, batch in enumerate(batches):
        rate = reference.step_learning_rate(learning_rate, i, every=1)
        reference.set_learning_rates(optimizer, [rate, 2 * rate])
        torch_losses.append(_bdl_iteration(torch_model, optimizer, batch))

    factory = functools.partial(optimizers.fcn8s_optimizer, learning_rate=learning_rate,
                                step_decay_every=1)
    step = SegmentationStep(keras_model, STEPS, None, 1.0, 1.0, 0.0, factory,
                            optimizers.discriminator_optimizer)
    keras_losses = _keras_steps(step, batches)

    for actual, expected in zip(keras_losses, torch_losses, strict=True):
        np.testing.assert_allclose(actual["seg"], expected["seg"], rtol=1e-5)
    _assert_same_updates(keras_model.weights, _converted(torch_model, "fcn8s", TINY_FCN8S).weights,
                         before, ADAM_RTOL)


@pytest.mark.slow
@pytest.mark.parametrize("bn_mode", ["frozen", "train"])
def test_adversarial_steps_match_pytorch(bn_mode):
    """(c) Eq. 7 with L_SSL and D_seg (lambda_adv 0.1), and D_seg's BCE step, as BDL.py."""
    learning_rate, d_learning_rate, lambda_adv = 2.5e-4, 1e-4, 0.1
    torch_model, keras_model = _deeplabv2_pair(seed=3, bn_mode=bn_mode)
    torch_d = reference.randomize_(reference.OutputDiscriminator(NUM_CLASSES, width=D_WIDTH),
                                   seed=4)
    keras_d = _keras_discriminator(torch_d)
    before, d_before = _weights(keras_model), _weights(keras_d)
    batches = [{"source": _batch(20 + seed), "target": _batch(30 + seed)}
               for seed in range(STEPS)]

    def bdl_steps(model: reference.DeepLabV2,
                  discriminator: reference.OutputDiscriminator) -> list[dict[str, float]]:
        optimizer = _bdl_sgd(model, learning_rate)
        d_optimizer = reference.Adam04(discriminator.parameters(), lr=d_learning_rate,
                                       betas=(0.9, 0.99))
        torch_losses = []
        for i, batch in enumerate(batches):
            rate = reference.poly_learning_rate(learning_rate, i, HORIZON)
            reference.set_learning_rates(optimizer, [rate, 10 * rate])
            reference.set_learning_rates(
                d_optimizer, [reference.poly_learning_rate(d_learning_rate, i, HORIZON)])
            torch_losses.append(_bdl_iteration(model, optimizer, batch, discriminator,
                                               d_optimizer, lambda_adv))
        return torch_losses

    float64_models = copy.deepcopy(torch_model).double(), copy.deepcopy(torch_d).double()
    torch_losses = bdl_steps(torch_model, torch_d)

    step = SegmentationStep(
        keras_model, STEPS, keras_d, 1.0, 1.0, lambda_adv,
        functools.partial(optimizers.deeplabv2_optimizer, learning_rate=learning_rate,
                          weight_decay=WEIGHT_DECAY, decay_steps=HORIZON),
        functools.partial(optimizers.discriminator_optimizer, learning_rate=d_learning_rate,
                          decay_steps=HORIZON))
    keras_losses = _keras_steps(step, batches)

    for actual, expected in zip(keras_losses, torch_losses, strict=True):
        for name in ("seg", "ssl", "adv", "output_discriminator"):
            np.testing.assert_allclose(actual[name], expected[name], rtol=1e-5, err_msg=name)
    _assert_deeplabv2_updates(keras_model, torch_model, float64_models[0],
                              lambda model: bdl_steps(model, float64_models[1]), before, bn_mode)
    _assert_same_updates(keras_d.weights, _keras_discriminator(torch_d).weights, d_before,
                         ADAM_RTOL)
