"""Optimisers of the trainers: the peers' schedules and per-variable-group learning rates.

A Keras 3 optimiser has a single learning rate, while the peers train parts of a network at
a multiple of it (DeepLabV2's classifier at 10x, FCN8s' biases at 2x). ``GroupedOptimizer``
therefore holds one Keras optimiser per group of variables, chosen by variable path. The
per-architecture recipes are gin configurables picked by ``segmentation_optimizer.arch``, so
the trainers never look at the architecture. The updates are PyTorch's, step for step
(tests/test_step_parity.py): SGD keeps the learning rate out of the momentum buffer
(``TorchSGD``), and Adam is Keras' own, which is PyTorch 0.4's (the version liyunsheng13/BDL
ran, README "Requirements"; docs/training.md).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import gin
import keras
import tensorflow as tf
from keras import ops

from sait_tf.train import distribute

OptimizerFactory = Callable[[int], "GroupedOptimizer"]
Schedule = keras.optimizers.schedules.LearningRateSchedule


def poly_schedule(learning_rate: float, total_steps: int, power: float = 0.9,
                  decay_steps: int | None = None) -> Schedule:
    """``lr * (1 - step / horizon) ** power`` (0 after the horizon), the peers' 'poly'.

    The horizon is ``decay_steps``, or the stage's ``total_steps`` when None (decay to 0 at
    the end of the stage). liyunsheng13/BDL decays over ``--num-steps`` (250000) but stops at
    ``--num-steps-stop`` (120000), ending at 0.55x (``options/train_options.py``,
    ``model/deeplab.py`` and ``model/discriminator.py`` ``adjust_learning_rate``).
    """
    horizon = total_steps if decay_steps is None else decay_steps
    return keras.optimizers.schedules.PolynomialDecay(
        learning_rate, decay_steps=max(int(horizon), 1), end_learning_rate=0.0, power=power)


def step_schedule(learning_rate: float, every: int) -> Schedule:
    """``lr * 0.1 ** floor(step / every)``: liyunsheng13/BDL's FCN8s and its D_seg
    (``model/fcn8s.py`` and ``model/discriminator.py`` ``adjust_learning_rate``, every 50000)."""
    return keras.optimizers.schedules.ExponentialDecay(
        learning_rate, decay_steps=every, decay_rate=0.1, staircase=True)


def decay_schedule(learning_rate: float, total_steps: int, power: float,
                   decay_steps: int | None, step_decay_every: int | None) -> Schedule:
    """``step_schedule`` when ``step_decay_every`` is set, else ``poly_schedule``."""
    if step_decay_every:
        return step_schedule(learning_rate, step_decay_every)
    return poly_schedule(learning_rate, total_steps, power, decay_steps)


class TorchSGD(keras.optimizers.SGD):
    """SGD with momentum as ``torch.optim.SGD`` (the peers' DeepLabV2 optimiser).

    PyTorch keeps the learning rate out of the momentum buffer (``buf = momentum * buf + g``,
    ``w -= lr * buf``); Keras' SGD puts it in (``v = momentum * v - lr * g``, ``w += v``). The
    two agree while the rate is constant and drift apart under a decaying one. Nesterov
    momentum is not provided.
    """

    def __init__(self, learning_rate: float | Schedule, momentum: float, name: str) -> None:
        super().__init__(learning_rate, momentum=momentum, name=name)

    def update_step(self, gradient: tf.Tensor, variable: tf.Variable,
                    learning_rate: tf.Tensor | float) -> None:
        if not self.momentum:
            return super().update_step(gradient, variable, learning_rate)
        learning_rate = ops.cast(learning_rate, variable.dtype)
        gradient = ops.cast(gradient, variable.dtype)
        buffer = self.momentums[self._get_variable_index(variable)]
        momentum = ops.cast(self.momentum, variable.dtype)
        self.assign(buffer, ops.add(ops.multiply(buffer, momentum), gradient))
        self.assign_sub(variable, ops.multiply(buffer, learning_rate))


@gin.configurable(denylist=["learning_rate", "beta_1", "beta_2", "name"])
def adam(learning_rate: float | Schedule, beta_1: float, beta_2: float,
         name: str, epsilon: float = 1e-8) -> keras.optimizers.Adam:
    """Adam with PyTorch's epsilon (1e-8), as every Adam of the peers and of the paper.

    Keras adds epsilon to sqrt(v) before the bias correction, as ``torch.optim.Adam`` of
    PyTorch 0.4 does (the version liyunsheng13/BDL requires, README "Requirements");
    later PyTorch adds it after, which moves only gradients near epsilon differently.
    ``epsilon`` (gin ``adam.epsilon``, every Adam of the job) is there for comparisons of
    runs: with 1e-8 the first update is about ``learning_rate * sign(gradient)``, so a
    gradient element within rounding of zero moves by a whole step either way, and a
    gradient scaled by any factor makes the same update; with epsilon near the gradients'
    size the update follows the gradient's value (tests/multiworker_runs.py).
    """
    if not epsilon > 0:
        raise ValueError(f"adam.epsilon must be > 0, got {epsilon!r}")
    return keras.optimizers.Adam(learning_rate, beta_1=beta_1, beta_2=beta_2, epsilon=epsilon,
                                 name=name)


def loss_scaled(optimizer: keras.optimizers.Optimizer | GroupedOptimizer, model: keras.Layer,
                variables: Sequence[tf.Variable]) -> keras.optimizers.Optimizer | GroupedOptimizer:
    """``optimizer``, behind loss scaling when ``model`` computes in float16 (mixed_float16).

    A grouped optimiser gets a ``LossScaleOptimizer`` per group that trains some of
    ``variables``; a plain one is wrapped (and built on ``variables``) under its own name.
    """
    if not distribute.computes_in_float16(model):
        return optimizer
    if isinstance(optimizer, GroupedOptimizer):
        return optimizer.with_loss_scaling(variables)
    scaled = keras.optimizers.LossScaleOptimizer(optimizer, name=optimizer.name)
    scaled.build(list(variables))
    return scaled


class GroupedOptimizer:
    """One Keras optimiser per variable group; a variable joins the first group that matches.

    ``groups`` are ``(name, path_regex, optimizer)``; a ``None`` regex matches every variable
    (put it last). ``weight_decay`` is an L2 term added to the gradient before the optimiser,
    as PyTorch's SGD does, so it passes through momentum like in the peers.
    """

    def __init__(
        self,
        groups: Sequence[tuple[str, str | None, keras.optimizers.Optimizer]],
        weight_decay: float = 0.0,
    ) -> None:
        if not groups or groups[-1][1] is not None:
            raise ValueError("the last optimiser group must match every variable (regex None)")
        self._groups = [(name, None if rx is None else re.compile(rx), opt)
                        for name, rx, opt in groups]
        self.weight_decay = weight_decay

    @property
    def optimizers(self) -> dict[str, keras.optimizers.Optimizer]:
        """The Keras optimisers by group name (their state belongs in the checkpoint)."""
        return {name: opt for name, _, opt in self._groups}

    def group_of(self, variable: tf.Variable) -> str:
        """Name of the first group whose regex matches ``variable.path``."""
        for name, regex, _ in self._groups[:-1]:
            if regex.search(variable.path):
                return name
        return self._groups[-1][0]

    def partition(self, variables: Sequence[tf.Variable]) -> dict[str, list[tf.Variable]]:
        """The variables of each group, in their original order."""
        parts: dict[str, list[tf.Variable]] = {name: [] for name, _, _ in self._groups}
        for variable in variables:
            parts[self.group_of(variable)].append(variable)
        return parts

    def checkpoint_items(
        self, prefix: str, variables: Sequence[tf.Variable]
    ) -> dict[str, tuple[keras.optimizers.Optimizer, list[tf.Variable]]]:
        """``{prefix_group: (optimizer, its variables)}``, the ``StageCheckpoint`` optimizers."""
        parts = self.partition(variables)
        return {f"{prefix}_{name}": (opt, parts[name]) for name, _, opt in self._groups}

    def with_loss_scaling(self, variables: Sequence[tf.Variable]) -> GroupedOptimizer:
        """The same groups, each that trains some of ``variables`` behind a LossScaleOptimizer.

        For float16 models: the trainer scales the loss by the groups' common scale and
        ``distribute.apply_gradients`` keeps their scales equal (all step on every applied
        update, all halve on a skipped one). Groups without variables never step, so they
        stay unwrapped.
        """
        parts = self.partition(variables)
        groups = []
        for name, regex, opt in self._groups:
            if parts[name]:
                opt = keras.optimizers.LossScaleOptimizer(opt, name=name)
                opt.build(parts[name])  # its scale exists before the first update
            groups.append((name, None if regex is None else regex.pattern, opt))
        return GroupedOptimizer(groups, weight_decay=self.weight_decay)

    def apply(self, grads: Sequence[tf.Tensor], variables: Sequence[tf.Variable]) -> None:
        """Applies each group's gradients with its own optimiser (and learning rate).

        Call in replica context. Under tf.distribute the optimisers sum the replicas'
        gradients, so each replica adds its 1/replicas part of the weight decay term.
        Loss-scaled gradients get that term scaled alike, so the optimiser's unscaling
        leaves it as it is without scaling.
        """
        replicas = tf.distribute.get_replica_context().num_replicas_in_sync
        per_group: dict[str, tuple[list, list]] = {name: ([], []) for name, _, _ in self._groups}
        for grad, variable in zip(grads, variables, strict=True):
            if grad is None:
                continue
            group = self.group_of(variable)
            if self.weight_decay:
                decay = self.weight_decay / replicas * _loss_scale(self.optimizers[group])
                grad = grad + decay * variable
            group_grads, group_vars = per_group[group]
            group_grads.append(grad)
            group_vars.append(variable)
        for name, _, opt in self._groups:
            group_grads, group_vars = per_group[name]
            if group_vars:
                opt.apply(group_grads, group_vars)

    def learning_rates(self) -> dict[str, float]:
        """Current learning rate of each group (for TensorBoard; also of mirrored variables)."""
        return {name: float(tf.convert_to_tensor(opt.learning_rate))
                for name, _, opt in self._groups}


def _loss_scale(optimizer: keras.optimizers.Optimizer) -> tf.Tensor | float:
    """The current loss scale of a ``LossScaleOptimizer``; 1 for any other optimiser."""
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return optimizer.dynamic_scale
    return 1.0


@gin.configurable
def deeplabv2_optimizer(
    total_steps: int,
    learning_rate: float = 2.5e-4,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    classifier_multiplier: float = 10.0,
    power: float = 0.9,
    decay_steps: int | None = None,
) -> GroupedOptimizer:
    """SGD with momentum, L2 weight decay and poly decay over ``decay_steps`` (None: the
    stage); the classifier at 10x. liyunsheng13/BDL ``model/__init__.py`` (``CreateModel``),
    ``model/deeplab.py`` (``optim_parameters``, ``adjust_learning_rate``)."""
    def sgd(lr: float, name: str) -> keras.optimizers.Optimizer:
        return TorchSGD(poly_schedule(lr, total_steps, power, decay_steps), momentum=momentum,
                        name=name)

    return GroupedOptimizer(
        [("classifier", r"classifier", sgd(learning_rate * classifier_multiplier, "classifier")),
         ("base", None, sgd(learning_rate, "base"))],
        weight_decay=weight_decay)


@gin.configurable
def fcn8s_optimizer(
    total_steps: int,
    learning_rate: float = 1e-5,
    beta_1: float = 0.9,
    beta_2: float = 0.99,
    bias_multiplier: float = 2.0,
    power: float = 0.9,
    decay_steps: int | None = None,
    step_decay_every: int | None = None,
) -> GroupedOptimizer:
    """Adam (0.9, 0.99) with biases at 2x; x0.1 every ``step_decay_every`` steps when set
    (liyunsheng13/BDL: 50000, ``model/fcn8s.py``), else poly decay over ``decay_steps``.
    Groups as BDL ``model/__init__.py`` (``CreateModel``, ``get_parameters(bias=...)``)."""
    def schedule(lr: float) -> Schedule:
        return decay_schedule(lr, total_steps, power, decay_steps, step_decay_every)

    return GroupedOptimizer(
        [("bias", r"(^|/)bias$",
          adam(schedule(learning_rate * bias_multiplier), beta_1, beta_2, "bias")),
         ("base", None, adam(schedule(learning_rate), beta_1, beta_2, "base"))])


SEGMENTATION_OPTIMIZERS: dict[str, OptimizerFactory] = {
    "deeplabv2": deeplabv2_optimizer,
    "fcn8s": fcn8s_optimizer,
}


@gin.configurable
def segmentation_optimizer(total_steps: int, arch: str = "deeplabv2") -> GroupedOptimizer:
    """The optimiser recipe of segmenter ``arch`` (bind ``arch`` to the same macro as the model)."""
    if arch not in SEGMENTATION_OPTIMIZERS:
        raise ValueError(f"segmentation_optimizer.arch: unknown {arch!r}; expected one of "
                         f"{sorted(SEGMENTATION_OPTIMIZERS)}")
    return SEGMENTATION_OPTIMIZERS[arch](total_steps)


def _single_adam(learning_rate: Schedule, beta_1: float, beta_2: float) -> GroupedOptimizer:
    return GroupedOptimizer([("all", None, adam(learning_rate, beta_1, beta_2, "all"))])


@gin.configurable
def adam_optimizer(
    total_steps: int,
    learning_rate: float = 1e-3,
    beta_1: float = 0.9,
    beta_2: float = 0.99,
    power: float = 0.9,
    decay_steps: int | None = None,
) -> GroupedOptimizer:
    """One Adam with poly decay for every variable: for M trained from scratch (the demo),
    where SGD diverges on the un-normalised first layer and frozen identity BN."""
    return _single_adam(poly_schedule(learning_rate, total_steps, power, decay_steps),
                        beta_1, beta_2)


@gin.configurable
def discriminator_optimizer(
    total_steps: int,
    learning_rate: float = 1e-4,
    beta_1: float = 0.9,
    beta_2: float = 0.99,
    power: float = 0.9,
    decay_steps: int | None = None,
    step_decay_every: int | None = None,
) -> GroupedOptimizer:
    """D_seg: Adam lr 1e-4, betas (0.9, 0.99); poly decay over ``decay_steps`` (None: the
    stage), or x0.1 every ``step_decay_every`` steps. liyunsheng13/BDL ``model/__init__.py``
    (``CreateDiscriminator``) and ``model/discriminator.py`` (``adjust_learning_rate``: poly
    for DeepLab, x0.1 every 50000 for VGG)."""
    return _single_adam(decay_schedule(learning_rate, total_steps, power, decay_steps,
                                       step_decay_every), beta_1, beta_2)
