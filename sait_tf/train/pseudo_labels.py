"""Offline self-supervised pseudo-labels Y_T^SSL for the target training set (paper Eq. 9).

A pixel keeps M's argmax when its maximum probability reaches the class threshold, else it
is ignored (255). Thresholds are ``th_ssl`` (0.9, the paper) for every class, or, as a
widely used peer variant, per class the median confidence of the pixels predicted as that
class, capped at ``th_ssl``. The medians come from a per-class histogram of confidences
with ``2**16`` bins (exact to 1.5e-5 and light on memory for a whole dataset); the threshold
is the lower edge of the median's bin, so the median pixel itself is always kept.

Labels are trainId PNGs at ``OUT/<example name>.png``, each written to a temporary name and
renamed; existing files are skipped and ``OUT/DONE`` marks a complete set, so an
interrupted generation resumes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import gin
import keras
import numpy as np
import tensorflow as tf
from absl import logging

from sait_tf import images, labels
from sait_tf.data import readers
from sait_tf.runtime import files, preemption
from sait_tf.runtime.progress import Progress
from sait_tf.runtime.workers import Workers

HISTOGRAM_BINS = 2**16
THRESHOLDS_FILE = "thresholds.json"


def confidences_and_argmax(logits: tf.Tensor, size: tuple[int, int] | tf.Tensor
                           ) -> tuple[np.ndarray, np.ndarray]:
    """Max probability and argmax at ``size``: the softmax of NHWC ``logits`` at M's output
    resolution, up-sampled (bilinear, corners aligned), in BDL's order (liyunsheng13/BDL
    ``SSL.py``: ``softmax``, then ``upsample(..., align_corners=True)``). Interpolated
    probabilities are less confident near class boundaries than the softmax of interpolated
    logits, so the order decides which pixels reach ``th_ssl``."""
    probs = images.resize_logits(tf.nn.softmax(tf.cast(logits, tf.float32)), size)
    return (tf.reduce_max(probs, axis=-1).numpy(),
            tf.argmax(probs, axis=-1, output_type=tf.int32).numpy())


def apply_thresholds(confidence: np.ndarray, prediction: np.ndarray,
                     thresholds: np.ndarray) -> np.ndarray:
    """Eq. 9: the predicted trainId where ``confidence >= thresholds[class]``, else 255."""
    keep = confidence >= np.asarray(thresholds, np.float64)[prediction]
    return np.where(keep, prediction, labels.IGNORE_INDEX).astype(np.uint8)


def confidence_histogram(confidence: np.ndarray, prediction: np.ndarray,
                         num_classes: int) -> np.ndarray:
    """int64 [num_classes, HISTOGRAM_BINS]: counts of confidences per predicted class."""
    bins = np.minimum(np.floor(confidence.astype(np.float64) * HISTOGRAM_BINS),
                      HISTOGRAM_BINS - 1).astype(np.int64)
    flat = prediction.astype(np.int64).ravel() * HISTOGRAM_BINS + bins.ravel()
    return np.bincount(flat, minlength=num_classes * HISTOGRAM_BINS).reshape(
        num_classes, HISTOGRAM_BINS)


def class_median_thresholds(histogram: np.ndarray, th_ssl: float) -> np.ndarray:
    """Per class min(median confidence, ``th_ssl``); ``th_ssl`` for classes never predicted.

    The median is the element of rank ``n // 2`` (0-based, ascending), taken at its bin's
    lower edge.
    """
    thresholds = np.full(histogram.shape[0], th_ssl, np.float64)
    for cls, counts in enumerate(histogram):
        total = counts.sum()
        if total:
            median_bin = int(np.searchsorted(np.cumsum(counts), total // 2 + 1))
            thresholds[cls] = min(median_bin / HISTOGRAM_BINS, th_ssl)
    return thresholds


def _predictions(segmenter: keras.Model, examples: Sequence[readers.Example],
                 resize: tuple[int, int] | None, batch_size: int, stage: str):
    """Yields (name, confidence [H, W], argmax [H, W]) at the (resized) image size."""
    dataset = readers.make_dataset([ex._replace(label=None) for ex in examples], resize=resize,
                                   batch_size=batch_size)
    predict = tf.function(lambda x: segmenter(x, training=False), reduce_retracing=True)
    progress = Progress(stage, len(examples))
    done = 0
    for batch in dataset:
        confidence, prediction = confidences_and_argmax(predict(batch["image"]),
                                                        tf.shape(batch["image"])[1:3])
        for name, conf, pred in zip(batch["name"].numpy(), confidence, prediction, strict=True):
            yield name.decode(), conf, pred
        done += len(confidence)
        progress.update(done)


def _median_thresholds(segmenter: keras.Model, examples: Sequence[readers.Example],
                       out_dir: str, resize: tuple[int, int] | None, batch_size: int,
                       th_ssl: float, workers: Workers) -> np.ndarray:
    """Thresholds of the class-median variant, computed once and kept in OUT/thresholds.json
    (the chief's, with several workers: each counts its ``examples``, the counts are summed)."""
    path = os.path.join(out_dir, THRESHOLDS_FILE)
    num_classes = segmenter.num_classes
    cached = None
    if os.path.exists(path):
        with open(path) as f:
            cached = np.asarray(json.load(f)["thresholds"], np.float64)
    if workers.chief_value(cached is not None):
        return workers.chief_value(cached if workers.is_chief else np.zeros(num_classes))
    histogram = np.zeros((num_classes, HISTOGRAM_BINS), np.int64)
    for _, confidence, prediction in _predictions(segmenter, examples, resize, batch_size,
                                                  "pseudo_labels/medians"):
        histogram += confidence_histogram(confidence, prediction, num_classes)
    thresholds = class_median_thresholds(workers.sum(histogram), th_ssl)
    if workers.is_chief:
        files.write_json_atomically(path, {"th_ssl": th_ssl, "thresholds": thresholds.tolist()})
    return thresholds


@gin.configurable(denylist=["segmenter", "examples", "out_dir", "resize"])
def generate_pseudo_labels(
    segmenter: keras.Model,
    examples: Sequence[readers.Example],
    out_dir: str,
    resize: tuple[int, int] | None = None,
    th_ssl: float = 0.9,
    class_median: bool = False,
    batch_size: int = 1,
) -> int:
    """Writes Y_T^SSL for ``examples`` (images resized to ``resize`` (H, W), the training
    resolution) to ``out_dir``; returns how many label files were written by this call.

    ``segmenter`` has ``num_classes`` logit channels (``build_segmenter``'s models do). In the
    scope of a multi-worker strategy each worker passes its share of the examples (the
    pipeline's sharding); the class medians are then those of all workers' examples."""
    workers = Workers.of()
    if not workers.sum(not files.is_done(out_dir)):
        return 0
    if os.path.isdir(out_dir):
        files.remove_stale_temporaries(out_dir)
    if class_median:
        thresholds = _median_thresholds(segmenter, examples, out_dir, resize, batch_size, th_ssl,
                                        workers)
    else:
        thresholds = np.full(segmenter.num_classes, th_ssl, np.float64)
    todo = [ex for ex in examples
            if not os.path.exists(os.path.join(out_dir, f"{ex.name}.png"))]
    kept = total = 0
    for name, confidence, prediction in (
            _predictions(segmenter, todo, resize, batch_size, "pseudo_labels") if todo else ()):
        label = apply_thresholds(confidence, prediction, thresholds)
        images.write_png(os.path.join(out_dir, f"{name}.png"), label)
        kept += int(np.sum(label != labels.IGNORE_INDEX))
        total += label.size
        preemption.check(f"after pseudo-label {name} in {out_dir}")
    if total:
        logging.info("pseudo-labels: %d files in %s, %.1f%% of their pixels labelled",
                     len(todo), out_dir, 100.0 * kept / total)
    files.mark_done(out_dir)
    return len(todo)
