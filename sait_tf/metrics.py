"""Confusion matrix, per-class IoU and mIoU over the 19/16/13 reported classes.

The numbers equal cityscapesScripts' ``evalPixelLevelSemanticLabeling``
(``cityscapesscripts/evaluation/evalPixelLevelSemanticLabeling.py``; docs/facts.md s.1,
"Evaluation protocol"): one confusion matrix over the whole split,
IoU = TP / (TP + FP + FN) per class, mIoU = mean over the classes whose IoU is defined.
Ground-truth pixels with ``labels.IGNORE_INDEX`` are skipped; a *prediction* of
``IGNORE_INDEX`` (a void labelId in a result PNG) is kept as a false negative of the
ground-truth class, as cityscapesScripts does.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from sait_tf import labels


def _check_reported(num_classes: int, num_classes_reported: int) -> tuple[int, ...]:
    if num_classes_reported not in labels.CLASS_SUBSETS:
        raise ValueError(f"num_classes_reported must be one of {sorted(labels.CLASS_SUBSETS)}, "
                         f"got {num_classes_reported}")
    subset = labels.CLASS_SUBSETS[num_classes_reported]
    if max(subset) >= num_classes:
        raise ValueError(f"the {num_classes_reported}-class subset needs trainIds up to "
                         f"{max(subset)}, but the confusion matrix has {num_classes} classes")
    return subset


class ConfusionMatrix:
    """Pixel counts ``matrix[gt, pred]`` accumulated over a split.

    ``matrix`` has ``num_classes + 1`` columns: the last one counts pixels predicted as void
    (``IGNORE_INDEX``), which are false negatives of their ground-truth class and false
    positives of no class.
    """

    def __init__(self, num_classes: int = labels.NUM_CLASSES) -> None:
        if not 0 < num_classes < labels.IGNORE_INDEX:
            raise ValueError(f"num_classes must be in 1..{labels.IGNORE_INDEX - 1}, "
                             f"got {num_classes}")
        self.num_classes = num_classes
        self.matrix = np.zeros((num_classes, num_classes + 1), dtype=np.int64)

    def update(self, gt_train_ids: np.ndarray, pred_train_ids: np.ndarray) -> None:
        """Adds one image (or a batch) of trainIds; the arrays must have the same shape."""
        gt = np.asarray(gt_train_ids)
        pred = np.asarray(pred_train_ids)
        if gt.shape != pred.shape:
            raise ValueError(f"ground truth shape {gt.shape} != prediction shape {pred.shape}")
        classes, ignore = self.num_classes, labels.IGNORE_INDEX
        for which, values in (("ground truth", gt), ("prediction", pred)):
            if values.dtype != np.uint8 and values.size and (values.min() < 0
                                                             or values.max() > 255):
                bad = values[(values < 0) | (values > 255)]
                raise ValueError(f"{which} contains value {int(bad[0])}; trainIds must be in "
                                 f"0..{classes - 1} or {ignore}")
        # One bincount over every (gt, pred) byte pair, then fold it to the matrix layout.
        joint = np.bincount(gt.reshape(-1).astype(np.intp) * 256 + pred.reshape(-1),
                            minlength=256 * 256).reshape(256, 256)
        for which, counts in (("ground truth", joint.sum(axis=1)),
                              ("prediction", joint.sum(axis=0))):
            bad = np.flatnonzero(counts[classes:ignore])
            if bad.size:
                raise ValueError(f"{which} contains value {int(bad[0]) + classes}; trainIds must "
                                 f"be in 0..{classes - 1} or {ignore}")
        self.matrix[:, :classes] += joint[:classes, :classes]
        self.matrix[:, classes] += joint[:classes, ignore]  # void predictions

    def add_counts(self, counts: np.ndarray | tf.Tensor) -> None:
        """Adds a ``[num_classes, num_classes + 1]`` count matrix, e.g. ``confusion_counts``."""
        counts = np.asarray(counts, dtype=np.int64)
        if counts.shape != self.matrix.shape:
            raise ValueError(f"counts shape {counts.shape} != confusion matrix shape "
                             f"{self.matrix.shape}")
        self.matrix += counts

    def per_class_iou(self) -> np.ndarray:
        """IoU per trainId; NaN where TP + FP + FN = 0 (class absent from GT and prediction)."""
        true_pos = np.diag(self.matrix[:, : self.num_classes]).astype(np.float64)
        false_neg = self.matrix.sum(axis=1) - true_pos
        false_pos = self.matrix[:, : self.num_classes].sum(axis=0) - true_pos
        union = true_pos + false_pos + false_neg
        iou = np.full(self.num_classes, np.nan)
        np.divide(true_pos, union, out=iou, where=union > 0)
        return iou

    def mean_iou(self, num_classes_reported: int = labels.NUM_CLASSES) -> float:
        """Mean of the defined IoUs over the reported subset (19, 16 or 13 classes)."""
        subset = _check_reported(self.num_classes, num_classes_reported)
        iou = self.per_class_iou()[list(subset)]
        defined = iou[~np.isnan(iou)]
        return float(defined.mean()) if defined.size else math.nan

    def to_json(self, num_classes_reported: int = labels.NUM_CLASSES) -> dict:
        """``{"mIoU": %, "per_class_iou": {cityscapesScripts name: % or NaN}, "num_classes"}``."""
        subset = _check_reported(self.num_classes, num_classes_reported)
        iou = self.per_class_iou()
        names = labels.class_names(num_classes_reported)
        return {
            "mIoU": 100.0 * self.mean_iou(num_classes_reported),
            "per_class_iou": {name: 100.0 * float(iou[train_id])
                              for name, train_id in zip(names, subset, strict=True)},
            "num_classes": num_classes_reported,
        }


def confusion_counts(gt_train_ids: tf.Tensor, pred_train_ids: tf.Tensor,
                     num_classes: int = labels.NUM_CLASSES) -> tf.Tensor:
    """In-graph ``[num_classes, num_classes + 1]`` int64 counts, the layout of ``ConfusionMatrix``.

    Ground truth outside ``0..num_classes-1`` (the ignore index) is dropped; predictions outside
    it go to the void column. Sum these over batches (and replicas) and pass the sum to
    ``ConfusionMatrix.add_counts``.
    """
    gt = tf.reshape(tf.cast(gt_train_ids, tf.int64), [-1])
    pred = tf.reshape(tf.cast(pred_train_ids, tf.int64), [-1])
    columns = num_classes + 1
    pred = tf.where((pred >= 0) & (pred < num_classes), pred, num_classes)
    # Ignored (or out-of-range) ground truth goes to an extra row that is dropped below.
    gt = tf.where((gt >= 0) & (gt < num_classes), gt, num_classes)
    counts = tf.math.bincount(gt * columns + pred, minlength=(num_classes + 1) * columns,
                              maxlength=(num_classes + 1) * columns, dtype=tf.int64)
    return tf.reshape(counts, [num_classes + 1, columns])[:num_classes]
