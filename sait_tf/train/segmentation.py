"""Trainer of the segmentation network M: source-only, oracle and feature-level adaptation.

One loop serves the three uses (paper Sec. 3.4, Eq. 7):
  L = lambda_seg * L_seg(X_S->T, Y_S) + lambda_SSL * L_SSL(X_T, Y_T^SSL)
      + lambda_adv * L_adv(D_seg(softmax(M(X_T))) -> source)
Source-only and oracle training pass only ``source_dataset`` (the oracle's "source" is the
labelled target). D_seg is trained on detached softmax outputs with BCE, source = 0 and
target = 1 (the peers' convention). The trainer knows no architecture: the optimiser recipe
comes from ``optimizer_factory`` (gin).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import gin
import keras
import tensorflow as tf
from absl import logging

from sait_tf import images, labels, losses
from sait_tf.evaluate import evaluate_segmenter
from sait_tf.train import checkpoints, distribute, step_guard
from sait_tf.train.optimizers import (
    GroupedOptimizer,
    discriminator_optimizer,
    segmentation_optimizer,
)
from sait_tf.train.progress import Progress

SOURCE_DOMAIN = 0.0
TARGET_DOMAIN = 1.0

Evaluation = dict  # {"mIoU", "per_class_iou", "num_classes"} from sait_tf.evaluate


def _image_and_label(element: dict) -> dict:
    return {key: element[key] for key in ("image", "label") if key in element}


def _require_labels(dataset: tf.data.Dataset, param: str) -> None:
    if "label" not in dataset.element_spec:
        raise ValueError(f"train_segmenter: {param} has no labels")


@gin.configurable(denylist=["segmenter", "stage_dir", "log_dir", "steps", "source_dataset",
                            "target_dataset", "target_unlabeled_dataset",
                            "output_discriminator", "eval_dataset", "num_classes_reported",
                            "strategy"])
def train_segmenter(
    segmenter: keras.Model,
    stage_dir: str,
    log_dir: str,
    steps: int,
    source_dataset: tf.data.Dataset | None = None,
    target_dataset: tf.data.Dataset | None = None,
    target_unlabeled_dataset: tf.data.Dataset | None = None,
    output_discriminator: keras.Model | None = None,
    lambda_seg: float = 1.0,
    lambda_ssl: float = 1.0,
    lambda_adv: float = 1e-3,
    optimizer_factory: Callable[[int], GroupedOptimizer] = segmentation_optimizer,
    discriminator_optimizer_factory: Callable[[int], GroupedOptimizer] = discriminator_optimizer,
    eval_dataset: tf.data.Dataset | None = None,
    eval_every: int = 1000,
    num_classes_reported: int = 19,
    checkpoint_every: int = 1000,
    summary_every: int = 50,
    num_grid_images: int = 3,
    strategy: tf.distribute.Strategy | None = None,
    jit_compile: bool = False,
) -> Evaluation | None:
    """Trains ``segmenter`` for ``steps`` updates in ``stage_dir``; resumable, idempotent.

    Datasets yield batches {"image" float32 RGB [0, 255], "label" int32 trainIds} and are
    repeated here. ``source_dataset`` gives L_seg, ``target_dataset`` (images with
    pseudo-labels) L_SSL, and with ``output_discriminator`` (built here on
    ``segmenter.num_classes`` channels) the adversarial term uses the images of
    ``target_unlabeled_dataset`` (default: those of ``target_dataset``). The stage resumes
    from its newest checkpoint (optimiser state included); a stage with a DONE marker only
    restores the segmenter's weights and returns None. Returns the evaluation on
    ``eval_dataset`` at the last step, or None without one.

    ``strategy`` (default: the current one) runs a replica step per device on its slice of
    each batch; the batch sizes are global. Models built under ``mixed_float16``
    (``distribute.set_precision``) train with loss-scaled optimisers. ``jit_compile``
    compiles the whole step (updates included) with XLA.
    """
    stage = os.path.basename(os.path.normpath(stage_dir))
    if checkpoints.is_stage_done(stage_dir):
        checkpoints.restore_for_inference(stage_dir, segmenter=segmenter)
        logging.info("[%s] already done; restored the segmenter from %s", stage, stage_dir)
        return None
    if steps < 1:
        raise ValueError(f"train_segmenter: steps must be >= 1, got {steps} for {stage}")
    if source_dataset is None and target_dataset is None:
        raise ValueError("train_segmenter: give source_dataset and/or target_dataset")
    if source_dataset is not None:
        _require_labels(source_dataset, "source_dataset")
    if target_dataset is not None:
        _require_labels(target_dataset, "target_dataset")
    has_target_images = target_dataset is not None or target_unlabeled_dataset is not None
    if output_discriminator is not None and (source_dataset is None or not has_target_images):
        raise ValueError("train_segmenter: output_discriminator needs source_dataset and target "
                         "images (target_dataset or target_unlabeled_dataset)")

    strategy = strategy or tf.distribute.get_strategy()
    distribute.check_jit_compile(strategy, jit_compile, "train_segmenter.jit_compile")
    streams = {}
    if source_dataset is not None:
        streams["source"] = source_dataset
    if target_dataset is not None:
        streams["target"] = target_dataset
    if output_discriminator is not None and target_unlabeled_dataset is not None:
        streams["unlabeled"] = target_unlabeled_dataset
    zipped = tf.data.Dataset.zip(
        {key: ds.map(_image_and_label).repeat() for key, ds in streams.items()})
    iterator = iter(strategy.experimental_distribute_dataset(zipped.prefetch(2)))

    with strategy.scope():
        seg_variables = segmenter.trainable_variables
        seg_optimizer = optimizer_factory(steps)
        if distribute.computes_in_float16(segmenter):
            seg_optimizer = seg_optimizer.with_loss_scaling(seg_variables)
        optimizers = seg_optimizer.checkpoint_items("segmenter_optimizer", seg_variables)
        trackables = {"segmenter": segmenter}
        d_variables, d_optimizer = [], None
        if output_discriminator is not None:
            num_classes = segmenter.num_classes
            output_discriminator(tf.zeros([1, 32, 32, num_classes]))
            d_variables = output_discriminator.trainable_variables
            d_optimizer = discriminator_optimizer_factory(steps)
            if distribute.computes_in_float16(output_discriminator):
                d_optimizer = d_optimizer.with_loss_scaling(d_variables)
            optimizers.update(d_optimizer.checkpoint_items("output_discriminator_optimizer",
                                                           d_variables))
            trackables["output_discriminator"] = output_discriminator
        ckpt = checkpoints.StageCheckpoint(stage_dir, optimizers=optimizers, **trackables)
    start = ckpt.restore_latest()

    def replica_step(batch: dict) -> tuple[dict, tf.Tensor, tf.Tensor]:
        """Losses in float32, each weighted by this replica's share of its global count."""
        share = {name: distribute.replica_share(tf.shape(stream["image"])[0])
                 for name, stream in batch.items()}
        labelled_share = {name: distribute.replica_share(tf.math.count_nonzero(
            stream["label"] != labels.IGNORE_INDEX)) for name, stream in batch.items()
            if "label" in stream}
        terms = {}
        with tf.GradientTape() as tape:
            total = tf.constant(0.0)
            scaled = tf.constant(0.0)
            probs = {}
            if "source" in batch:
                logits = segmenter(batch["source"]["image"], training=True)
                terms["seg"] = losses.segmentation_cross_entropy(logits, batch["source"]["label"])
                total += lambda_seg * terms["seg"]
                scaled += lambda_seg * terms["seg"] * labelled_share["source"]
                probs["source"] = _input_size_softmax(logits, batch["source"]["image"])
            if "target" in batch:
                logits = segmenter(batch["target"]["image"], training=True)
                terms["ssl"] = losses.segmentation_cross_entropy(logits, batch["target"]["label"])
                total += lambda_ssl * terms["ssl"]
                scaled += lambda_ssl * terms["ssl"] * labelled_share["target"]
                probs["target"] = _input_size_softmax(logits, batch["target"]["image"])
            if output_discriminator is not None:
                target_stream = "unlabeled" if "unlabeled" in batch else "target"
                if "unlabeled" in batch:
                    logits = segmenter(batch["unlabeled"]["image"], training=True)
                    probs["target"] = _input_size_softmax(logits, batch["unlabeled"]["image"])
                terms["adv"] = losses.binary_cross_entropy_with_logits(
                    output_discriminator(probs["target"], training=True), SOURCE_DOMAIN)
                total += lambda_adv * terms["adv"]
                scaled += lambda_adv * terms["adv"] * share[target_stream]
            terms["total"] = total
            grads_of = distribute.scale_loss(seg_optimizer, scaled)
        grads = tape.gradient(grads_of, seg_variables)
        seg_applied = distribute.apply_gradients(seg_optimizer, grads, seg_variables, scaled)
        d_applied = tf.constant(True)
        if output_discriminator is not None:
            with tf.GradientTape() as tape:
                d_loss = 0.0
                d_scaled = 0.0
                for domain, label, stream in (("source", SOURCE_DOMAIN, "source"),
                                              ("target", TARGET_DOMAIN, target_stream)):
                    d_logits = output_discriminator(tf.stop_gradient(probs[domain]),
                                                    training=True)
                    d_term = 0.5 * losses.binary_cross_entropy_with_logits(d_logits, label)
                    d_loss += d_term
                    d_scaled += d_term * share[stream]
                terms["discriminator"] = d_loss
                d_grads_of = distribute.scale_loss(d_optimizer, d_scaled)
            d_grads = tape.gradient(d_grads_of, d_variables)
            d_applied = distribute.apply_gradients(d_optimizer, d_grads, d_variables, d_scaled)
        return terms, seg_applied, d_applied

    @tf.function(reduce_retracing=True, jit_compile=jit_compile)
    def train_step(batch: dict) -> tuple[dict, tf.Tensor, tf.Tensor]:
        terms, seg_applied, d_applied = strategy.run(replica_step, args=(batch,))
        terms = {k: strategy.reduce(tf.distribute.ReduceOp.MEAN, v, axis=None)
                 for k, v in terms.items()}
        first = strategy.experimental_local_results
        return terms, first(seg_applied)[0], first(d_applied)[0]

    writer = tf.summary.create_file_writer(log_dir)
    seg_guard = step_guard.NonFiniteCounter(f"{stage}/segmenter", writer=writer,
                                            tag="skipped_steps/segmenter")
    d_guard = step_guard.NonFiniteCounter(f"{stage}/output_discriminator", writer=writer,
                                          tag="skipped_steps/output_discriminator")
    progress = Progress(stage, steps, start)
    grid_batches = list(eval_dataset.take(num_grid_images)) if eval_dataset is not None else []
    evaluation = None
    for step in range(start + 1, steps + 1):
        terms, seg_applied, d_applied = train_step(next(iterator))
        seg_guard.update(bool(seg_applied), step)
        d_guard.update(bool(d_applied), step)
        last = step == steps
        if step % summary_every == 0 or last:
            with writer.as_default(step=step):
                for name, value in terms.items():
                    tf.summary.scalar(f"loss/{name}", value)
                for name, value in seg_optimizer.learning_rates().items():
                    tf.summary.scalar(f"learning_rate/segmenter_{name}", value)
                tf.summary.scalar("skipped_steps/segmenter", seg_guard.total)
                if d_optimizer is not None:
                    for name, value in d_optimizer.learning_rates().items():
                        tf.summary.scalar(f"learning_rate/output_discriminator_{name}", value)
                    tf.summary.scalar("skipped_steps/output_discriminator", d_guard.total)
        if eval_dataset is not None and (step % eval_every == 0 or last):
            evaluation = _evaluate_and_log(segmenter, eval_dataset, grid_batches,
                                           num_classes_reported, writer, step, stage)
        if step % checkpoint_every == 0 or last:
            ckpt.save(step)
        progress.update(step, extra=f"loss {float(terms['total']):.4f}", force=last)
    writer.flush()
    if start >= steps and eval_dataset is not None:
        evaluation = _evaluate_and_log(segmenter, eval_dataset, grid_batches,
                                       num_classes_reported, writer, steps, stage)
    checkpoints.mark_stage_done(stage_dir)
    return evaluation


def _input_size_softmax(logits: tf.Tensor, image: tf.Tensor) -> tf.Tensor:
    """Class probabilities at the input size: what D_seg sees (as in the peers); float32."""
    return tf.nn.softmax(images.resize_logits(tf.cast(logits, tf.float32), tf.shape(image)[1:3]))


def _evaluate_and_log(segmenter: keras.Model, eval_dataset: tf.data.Dataset,
                      grid_batches: list[dict], num_classes_reported: int,
                      writer: tf.summary.SummaryWriter, step: int, stage: str) -> Evaluation:
    """Target-val mIoU and per-class IoU to TensorBoard, plus prediction grids."""
    evaluation = evaluate_segmenter(segmenter, eval_dataset,
                                    num_classes_reported=num_classes_reported)
    with writer.as_default(step=step):
        tf.summary.scalar("eval/mIoU", evaluation["mIoU"])
        for name, iou in evaluation["per_class_iou"].items():
            tf.summary.scalar(f"eval_iou/{name.replace(' ', '_')}", iou)
        if grid_batches:
            tf.summary.image("predictions", prediction_grids(segmenter, grid_batches),
                             max_outputs=len(grid_batches))
    writer.flush()
    logging.info("[%s] step %d target-val mIoU%d %.2f", stage, step,
                 evaluation["num_classes"], evaluation["mIoU"])
    return evaluation


def prediction_grids(segmenter: keras.Model, batches: list[dict]) -> tf.Tensor:
    """uint8 [N, H, 3W, 3]: image | colourised prediction | colourised ground truth.

    One row per batch (its first example) at the label's size; rows of other sizes are
    resized to the first one's.
    """
    rows = []
    for batch in batches:
        image, label = batch["image"][:1], batch["label"][:1]
        size = tf.shape(label)[1:3]
        logits = images.resize_logits(segmenter(image, training=False), size)
        prediction = tf.argmax(logits, axis=-1, output_type=tf.int32)
        picture = images.to_uint8(tf.image.resize(image, size, method="bilinear"))
        rows.append(tf.concat([picture, images.colorize(prediction), images.colorize(label)],
                              axis=2)[0])
    grid_size = tf.shape(rows[0])[:2]
    return tf.stack([tf.image.resize(row, grid_size, method="nearest") for row in rows])
