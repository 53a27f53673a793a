"""Divergence guard: a non-finite loss or gradient never updates the weights."""

from __future__ import annotations

from collections.abc import Sequence

import gin
import keras
import tensorflow as tf


class DivergenceError(RuntimeError):
    """Raised after too many consecutive non-finite steps; the last good checkpoint is kept."""


def all_finite(loss: tf.Tensor, grads: Sequence[tf.Tensor | None]) -> tf.Tensor:
    """True when ``loss`` and every gradient are finite on this replica."""
    checks = [tf.reduce_all(tf.math.is_finite(loss))]
    checks += [tf.reduce_all(tf.math.is_finite(g)) for g in grads if g is not None]
    return tf.reduce_all(tf.stack(checks))


def apply_if_finite(
    optimizer: keras.optimizers.Optimizer,
    grads: Sequence[tf.Tensor],
    variables: Sequence[tf.Variable],
    loss: tf.Tensor,
) -> tf.Tensor:
    """Applies ``grads`` only when they and ``loss`` are finite on every replica.

    Call it in a replica context (inside ``strategy.run`` or with no strategy). The decision
    is all-reduced so every replica skips together; the ``tf.cond`` runs in cross-replica
    context because the optimiser's own gradient all-reduce cannot sit inside a replica-side
    conditional. Returns a scalar bool: whether the update was applied.
    """
    context = tf.distribute.get_replica_context()
    bad_replicas = context.all_reduce(
        tf.distribute.ReduceOp.SUM, 1.0 - tf.cast(all_finite(loss, grads), tf.float32))

    def cross_replica(distribution, bad_replicas, grads):
        finite = tf.equal(distribution.experimental_local_results(bad_replicas)[0], 0.0)

        def apply():
            distribution.extended.call_for_each_replica(
                lambda g: optimizer.apply(g, variables), args=(grads,))
            return tf.constant(True)

        return tf.cond(finite, apply, lambda: tf.constant(False))

    return context.merge_call(cross_replica, args=(bad_replicas, list(grads)))


@gin.configurable(denylist=["stage", "writer", "tag"])
class NonFiniteCounter:
    """Counts skipped steps; raises ``DivergenceError`` after ``max_consecutive`` in a row.

    With a ``writer``, every skipped step also writes the running total as the scalar ``tag``
    at that step, and the writer is flushed before raising: the count of the steps that
    stopped the run reaches TensorBoard even though the trainer never gets to its next
    summary.
    """

    def __init__(self, stage: str, max_consecutive: int = 20,
                 writer: tf.summary.SummaryWriter | None = None, tag: str = "skipped_steps"
                 ) -> None:
        self.stage = stage
        self.max_consecutive = max_consecutive
        self.writer = writer
        self.tag = tag
        self.consecutive = 0
        self.total = 0

    def update(self, applied: bool, step: int) -> None:
        if applied:
            self.consecutive = 0
            return
        self.consecutive += 1
        self.total += 1
        if self.writer is not None:
            with self.writer.as_default(step=step):
                tf.summary.scalar(self.tag, self.total)
        if self.consecutive >= self.max_consecutive:
            if self.writer is not None:
                self.writer.flush()
            raise DivergenceError(
                f"[{self.stage}] {self.consecutive} consecutive non-finite steps up to step "
                f"{step}; stopped. The last good checkpoint is kept: lower the learning rate "
                f"or check the data, then run the same command again to resume.")
