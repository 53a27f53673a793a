"""Trainer of the segmentation network M: source-only, oracle and feature-level adaptation.

One step serves the three uses (paper Sec. 3.4, Eq. 7):
  L = lambda_seg * L_seg(X_S->T, Y_S) + lambda_SSL * L_SSL(X_T, Y_T^SSL)
      + lambda_adv * L_adv(D_seg(softmax(M(X_T))) -> source)
Source-only and oracle training pass only ``source_dataset`` (the oracle's "source" is the
labelled target). D_seg is trained on detached softmax outputs with BCE, source = 0 and
target = 1, as the peers do (wasidennis/AdaptSegNet ``train_gta2cityscapes_multi.py``,
liyunsheng13/BDL ``BDL.py``). The trainer knows no architecture: the optimiser recipe comes
from ``optimizer_factory`` (gin).
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
from sait_tf.train import distribute, loop, summaries
from sait_tf.train.optimizers import (
    GroupedOptimizer,
    discriminator_optimizer,
    loss_scaled,
    segmentation_optimizer,
)
from sait_tf.visualize import prediction_grids

SOURCE_DOMAIN = 0.0
TARGET_DOMAIN = 1.0

Evaluation = dict  # {"mIoU", "per_class_iou", "num_classes"} from sait_tf.evaluate


class SegmentationStep:
    """The per-replica update of M (Eq. 7) and, with an output discriminator, of D_seg.

    ``batch`` is a dict of streams {"source", "target", "unlabeled"}, each {"image", "label"};
    the streams present decide the terms. Losses are float32 and each is weighted by this
    replica's share of its global count (examples or labelled pixels), so the all-reduced
    update is that of one device on the whole batch.
    """

    def __init__(self, segmenter: keras.Model, steps: int,
                 output_discriminator: keras.Model | None, lambda_seg: float,
                 lambda_ssl: float, lambda_adv: float,
                 optimizer_factory: Callable[[int], GroupedOptimizer],
                 discriminator_optimizer_factory: Callable[[int], GroupedOptimizer]) -> None:
        self.segmenter = segmenter
        self.discriminator = output_discriminator
        self.lambdas = {"seg": lambda_seg, "ssl": lambda_ssl, "adv": lambda_adv}
        self.variables = segmenter.trainable_variables
        self.optimizer = loss_scaled(optimizer_factory(steps), segmenter, self.variables)
        self.optimizers = self.optimizer.checkpoint_items("segmenter_optimizer", self.variables)
        self.trackables = {"segmenter": segmenter}
        self.guarded = ["segmenter"]
        if output_discriminator is not None:
            output_discriminator(tf.zeros([1, 32, 32, segmenter.num_classes]))
            self.d_variables = output_discriminator.trainable_variables
            self.d_optimizer = loss_scaled(discriminator_optimizer_factory(steps),
                                           output_discriminator, self.d_variables)
            self.optimizers.update(self.d_optimizer.checkpoint_items(
                "output_discriminator_optimizer", self.d_variables))
            self.trackables["output_discriminator"] = output_discriminator
            self.guarded.append("output_discriminator")

    def replica_step(self, batch: dict) -> dict[str, tf.Tensor]:
        """M's update on Eq. 7's terms, then D_seg's update.

        The gradient is taken one stream at a time, as BDL calls ``backward`` once per
        domain: L_seg on the source, then L_SSL and L_adv on the target (L_adv on the
        "unlabeled" stream when there is one), each stream's pass starting after the previous
        stream's gradient, so only one pass of M is kept for the backward pass at a time.
        The update is that of one tape over all terms.
        """
        share = {name: distribute.replica_share(tf.shape(stream["image"])[0])
                 for name, stream in batch.items()}
        target_stream = "unlabeled" if "unlabeled" in batch else "target"
        adversarial = self.discriminator is not None
        terms, probs = {}, {}
        total = scaled = tf.constant(0.0)
        grads = None
        for stream in ("source", "target", "unlabeled"):
            if stream not in batch or (stream == "unlabeled" and not adversarial):
                continue
            with tf.GradientTape() as tape:
                after = [] if grads is None else [g for g in grads if g is not None]
                with tf.control_dependencies(after):
                    image = tf.identity(batch[stream]["image"])
                logits = self.segmenter(image, training=True)
                stream_scaled = tf.constant(0.0)
                if stream != "unlabeled":
                    term = "seg" if stream == "source" else "ssl"
                    label = batch[stream]["label"]
                    terms[term] = losses.segmentation_cross_entropy(logits, label)
                    labelled = tf.math.count_nonzero(label != labels.IGNORE_INDEX)
                    total += self.lambdas[term] * terms[term]
                    stream_scaled += (self.lambdas[term] * terms[term]
                                      * distribute.replica_share(labelled))
                if stream != "unlabeled" or adversarial:
                    probs[stream] = _input_size_softmax(logits, image)
                if adversarial and stream == target_stream:
                    terms["adv"] = losses.binary_cross_entropy_with_logits(
                        self.discriminator(probs[stream], training=True), SOURCE_DOMAIN)
                    total += self.lambdas["adv"] * terms["adv"]
                    stream_scaled += self.lambdas["adv"] * terms["adv"] * share[target_stream]
                grads_of = distribute.scale_loss(self.optimizer, stream_scaled)
            stream_grads = tape.gradient(grads_of, self.variables)
            grads = stream_grads if grads is None else [
                loop.add_gradients(a, b) for a, b in zip(grads, stream_grads, strict=True)]
            scaled += stream_scaled
        terms["total"] = total
        terms["segmenter_applied"] = distribute.apply_gradients(self.optimizer, grads,
                                                                self.variables, scaled)
        if adversarial:
            probs["target"] = probs[target_stream]
            terms.update(self._discriminator_update(probs, share, target_stream))
        return terms

    def _discriminator_update(self, probs: dict, share: dict, target_stream: str) -> dict:
        """D_seg on detached probabilities: source -> 0, target -> 1 (BCE, halved)."""
        with tf.GradientTape() as tape:
            loss = scaled = 0.0
            for domain, label, stream in (("source", SOURCE_DOMAIN, "source"),
                                          ("target", TARGET_DOMAIN, target_stream)):
                logits = self.discriminator(tf.stop_gradient(probs[domain]), training=True)
                term = 0.5 * losses.binary_cross_entropy_with_logits(logits, label)
                loss += term
                scaled += term * share[stream]
            grads_of = distribute.scale_loss(self.d_optimizer, scaled)
        grads = tape.gradient(grads_of, self.d_variables)
        applied = distribute.apply_gradients(self.d_optimizer, grads, self.d_variables, scaled)
        return {"output_discriminator": loss, "output_discriminator_applied": applied}

    def learning_rates(self) -> dict[str, float]:
        rates = {f"segmenter_{name}": value
                 for name, value in self.optimizer.learning_rates().items()}
        if self.discriminator is not None:
            rates.update({f"output_discriminator_{name}": value
                          for name, value in self.d_optimizer.learning_rates().items()})
        return rates

    def progress_text(self, results: dict[str, tf.Tensor]) -> str:
        return f"loss {float(results['total']):.4f}"


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
    """Trains ``segmenter`` for ``steps`` updates in ``stage_dir`` (``loop.run_stage``).

    Datasets yield batches {"image" float32 RGB [0, 255], "label" int32 trainIds}.
    ``source_dataset`` gives L_seg, ``target_dataset`` (images with pseudo-labels) L_SSL,
    and with ``output_discriminator`` the adversarial term uses the images of
    ``target_unlabeled_dataset`` (default: those of ``target_dataset``). Returns the
    evaluation on ``eval_dataset`` at the last step; None without one, or when the stage
    was already done (then only the segmenter's weights are restored). Batch sizes are
    global under ``strategy``; float16 models train with loss-scaled optimisers.
    """
    streams = {name: dataset for name, dataset in (
        ("source", source_dataset), ("target", target_dataset),
        ("unlabeled", target_unlabeled_dataset if output_discriminator is not None else None))
        if dataset is not None}
    if "source" not in streams and "target" not in streams:
        raise ValueError("train_segmenter: give source_dataset and/or target_dataset")
    for name in ("source", "target"):
        if name in streams:
            _require_labels(streams[name], f"{name}_dataset")
    if output_discriminator is not None and not (
            "source" in streams and ("target" in streams or "unlabeled" in streams)):
        raise ValueError("train_segmenter: output_discriminator needs source_dataset and target "
                         "images (target_dataset or target_unlabeled_dataset)")
    evaluations = []
    triggers = []
    if eval_dataset is not None:
        grid_batches = list(eval_dataset.take(num_grid_images))

        def evaluate(step: int, writer: tf.summary.SummaryWriter) -> None:
            evaluations.append(_evaluate_and_log(segmenter, eval_dataset, grid_batches,
                                                 num_classes_reported, writer, step, stage_dir))

        triggers.append(loop.Trigger(eval_every, evaluate, "eval"))
    zipped = tf.data.Dataset.zip({name: dataset.map(_image_and_label)
                                  for name, dataset in streams.items()})
    trained = loop.run_stage(
        stage_dir, log_dir, steps, zipped, inference_models={"segmenter": segmenter},
        make_step=lambda: SegmentationStep(
            segmenter, steps, output_discriminator, lambda_seg, lambda_ssl, lambda_adv,
            optimizer_factory, discriminator_optimizer_factory),
        configurable="train_segmenter", strategy=strategy, checkpoint_every=checkpoint_every,
        summary_every=summary_every, triggers=triggers, jit_compile=jit_compile)
    return evaluations[-1] if trained and evaluations else None


def _input_size_softmax(logits: tf.Tensor, image: tf.Tensor) -> tf.Tensor:
    """Class probabilities at the input size: what D_seg sees (as in the peers); float32."""
    return tf.nn.softmax(images.resize_logits(tf.cast(logits, tf.float32), tf.shape(image)[1:3]))


def _evaluate_and_log(segmenter: keras.Model, eval_dataset: tf.data.Dataset,
                      grid_batches: list[dict], num_classes_reported: int,
                      writer: tf.summary.SummaryWriter, step: int, stage_dir: str) -> Evaluation:
    """Target-val mIoU, per-class IoU and its table to TensorBoard
    (``summaries.write_evaluation``), plus prediction grids."""
    evaluation = evaluate_segmenter(segmenter, eval_dataset,
                                    num_classes_reported=num_classes_reported)
    with writer.as_default(step=step):
        summaries.write_evaluation(evaluation, step)
        if grid_batches:
            tf.summary.image("predictions", prediction_grids(segmenter, grid_batches),
                             max_outputs=len(grid_batches))
    writer.flush()
    logging.info("[%s] step %d target-val mIoU%d %.2f", os.path.basename(stage_dir), step,
                 evaluation["num_classes"], evaluation["mIoU"])
    return evaluation
