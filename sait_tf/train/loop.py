"""The one stage loop every trainer runs (in the spirit of TF-Agents' Learner with triggers).

A trainer supplies a ``StageStep``: the per-replica update of its models (the method's
equations) and what to checkpoint. The loop owns everything around it: the DONE check and the
restore of a finished stage, the strategy scope, the checkpoint and its resume, the
distributed iterator, the reduction of the replicas' results, the divergence guards, the
periodic summaries, checkpoints and triggers (evaluation, image previews), progress, and
pre-emption (SIGTERM, SIGINT: the current step finishes, is checkpointed, and the stage
stops with ``preemption.Preempted``).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
from collections.abc import Callable, Sequence
from typing import Protocol

import keras
import tensorflow as tf
from absl import logging

from sait_tf.runtime import checkpoints, files, preemption
from sait_tf.runtime.progress import Progress
from sait_tf.runtime.workers import Workers
from sait_tf.train import distribute, step_guard

APPLIED_SUFFIX = "_applied"


def add_gradients(a: tf.Tensor | None, b: tf.Tensor | None) -> tf.Tensor | None:
    """Sum of two gradients of one variable, either of which may be None (not reached).

    The trainers take a loss's gradient in parts (one direction or stream at a time) to keep
    fewer activations alive; this adds the parts.
    """
    if a is None or b is None:
        return b if a is None else a
    return a + b


class StageStep(Protocol):
    """What a trainer hands the loop; built inside the strategy's scope."""

    trackables: dict[str, keras.Model | dict[str, keras.Model]]
    """Models checkpointed with the stage, by checkpoint name."""
    optimizers: dict[str, tuple[keras.optimizers.Optimizer, list[tf.Variable]]]
    """``StageCheckpoint`` optimisers: {name: (optimizer, the variables it trains)}."""
    guarded: Sequence[str]
    """Names N whose update ``replica_step`` reports as the bool result ``N_applied``."""

    def replica_step(self, batch) -> dict[str, tf.Tensor]:
        """One update on this replica's slice of ``batch``: float32 scalar losses by name
        (averaged over replicas for the summaries) and the ``N_applied`` flags."""

    def learning_rates(self) -> dict[str, float]:
        """Current learning rates by summary name."""

    def progress_text(self, results: dict[str, tf.Tensor]) -> str:
        """The few numbers of a progress line."""


@dataclasses.dataclass(frozen=True)
class Trigger:
    """Calls ``fn(step, writer)`` every ``every`` steps and at the stage's last step; ``writer``
    is the stage's TensorBoard writer."""

    every: int
    fn: Callable[[int, tf.summary.SummaryWriter], None]
    name: str = "trigger"


def _check_intervals(configurable: str, stage: str, steps: int, **intervals: int) -> None:
    if steps < 1:
        raise ValueError(f"{configurable}: steps must be >= 1, got {steps} for {stage}")
    for name, value in intervals.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{configurable}.{name} must be an integer >= 1, got {value!r}")


def run_stage(
    stage_dir: str,
    log_dir: str,
    steps: int,
    dataset: tf.data.Dataset,
    make_step: Callable[[], StageStep],
    inference_models: dict[str, keras.Model],
    *,
    configurable: str,
    strategy: tf.distribute.Strategy | None = None,
    checkpoint_every: int = 1000,
    summary_every: int = 50,
    triggers: Sequence[Trigger] = (),
    jit_compile: bool = False,
) -> bool:
    """Trains a stage for ``steps`` updates in ``stage_dir``; resumable and idempotent.

    A stage with a DONE marker only restores ``inference_models`` from its newest checkpoint
    and returns False. Otherwise ``make_step()`` is called in the strategy's scope, the newest
    checkpoint (step, weights, optimiser state) is restored, and the stage runs from there
    over the repeated ``dataset`` (global batches; each replica gets its slice), writing
    TensorBoard summaries to ``log_dir``; returns True. A run killed after its last step but
    before the DONE marker runs the triggers once at that step; triggers run in the
    strategy's scope. ``jit_compile`` compiles the whole step, updates included, with XLA
    (one device only). Setting errors name the binding of ``configurable`` (the trainer's
    gin name).

    Under ``MultiWorkerMirroredStrategy`` the chief's ``stage_dir`` decides: its DONE marker
    and checkpoint, whose values are sent to the other workers. Those save their checkpoints
    to their own ``stage_dir`` (a temporary folder; a save takes part in collectives) and
    delete them at once, as TensorFlow's multi-worker tutorial does; a stop requested on any
    worker stops all of them at the same step.
    """
    stage = os.path.basename(os.path.normpath(stage_dir))
    strategy = strategy or tf.distribute.get_strategy()
    workers = Workers.of(strategy)
    if workers.chief_value(files.is_done(stage_dir)):
        if workers.is_chief:
            checkpoints.restore_for_inference(stage_dir, **inference_models)
        workers.sync_variables(_variables(inference_models))
        logging.info("[%s] already done; restored %s from %s", stage,
                     ", ".join(inference_models), stage_dir if workers.is_chief else "the chief")
        return False
    _check_intervals(configurable, stage, steps, checkpoint_every=checkpoint_every,
                     summary_every=summary_every,
                     **{f"{trigger.name}_every": trigger.every for trigger in triggers})
    distribute.check_jit_compile(strategy, jit_compile, f"{configurable}.jit_compile")
    with strategy.scope():
        step_object = make_step()
        ckpt = checkpoints.StageCheckpoint(stage_dir, optimizers=step_object.optimizers,
                                           **step_object.trackables)
    start = int(workers.chief_value(ckpt.restore_latest() if workers.is_chief else 0))
    workers.sync_variables(ckpt.variables)
    iterator = iter(strategy.experimental_distribute_dataset(dataset.repeat().prefetch(2)))

    @tf.function(autograph=False, reduce_retracing=True, jit_compile=jit_compile)
    def train_step(batch) -> dict[str, tf.Tensor]:
        results = strategy.run(step_object.replica_step, args=(batch,))
        first = strategy.experimental_local_results
        return {name: first(value)[0] if name.endswith(APPLIED_SUFFIX) else
                strategy.reduce(tf.distribute.ReduceOp.MEAN, value, axis=None)
                for name, value in results.items()}

    writer = tf.summary.create_file_writer(log_dir)
    guards = {name: step_guard.NonFiniteCounter(f"{stage}/{name}", writer=writer,
                                                tag=f"skipped_steps/{name}")
              for name in step_object.guarded}
    progress = Progress(stage, steps, start)
    try:
        for step in range(start + 1, steps + 1):
            results = train_step(next(iterator))
            for name, guard in guards.items():
                guard.update(bool(results.pop(name + APPLIED_SUFFIX)), step)
            last = step == steps
            if step % summary_every == 0 or last:
                with writer.as_default(step=step):
                    for name, value in results.items():
                        tf.summary.scalar(f"loss/{name}", value)
                    for name, value in step_object.learning_rates().items():
                        tf.summary.scalar(f"learning_rate/{name}", value)
                    for name, guard in guards.items():
                        tf.summary.scalar(f"skipped_steps/{name}", guard.total)
            for trigger in triggers:
                if step % trigger.every == 0 or last:
                    with strategy.scope():
                        trigger.fn(step, writer)
            stopping = _stop_requested(workers)
            if step % checkpoint_every == 0 or last or stopping:
                ckpt.save(step)
                if not workers.is_chief:
                    shutil.rmtree(stage_dir, ignore_errors=True)
            progress.update(step, extra=step_object.progress_text(results), force=last)
            if stopping:
                raise preemption.Preempted(
                    preemption.requested() or signal.SIGTERM,
                    f"after step {step}/{steps} of {stage} (checkpoint saved)"
                    + ("" if preemption.requested() else " on another worker"))
        if start >= steps:
            with strategy.scope():
                for trigger in triggers:
                    trigger.fn(steps, writer)
    finally:
        writer.flush()
    if workers.is_chief:
        files.mark_done(stage_dir)
    return True


def _variables(models: dict[str, keras.Model | dict[str, keras.Model]]) -> list[tf.Variable]:
    return [variable for model in models.values()
            for member in (model.values() if isinstance(model, dict) else [model])
            for variable in member.variables]


def _stop_requested(workers: Workers) -> bool:
    """Whether a stop was requested on this worker or, with several, on any of them."""
    requested = preemption.requested() is not None
    return bool(workers.sum(int(requested))) if workers.count > 1 else requested
