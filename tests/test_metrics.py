"""Hand-computed confusion matrices and IoUs (sait_tf.metrics)."""

import math

import numpy as np
import pytest
import tensorflow as tf

from sait_tf import labels
from sait_tf.metrics import ConfusionMatrix, confusion_counts

VOID = labels.IGNORE_INDEX

# Eight pixels; trainIds 0 road, 1 sidewalk, 2 building, 3 wall, 9 terrain.
#   p0 gt 0 / pred 0     TP road
#   p1 gt 0 / pred 1     FN road, FP sidewalk
#   p2 gt 1 / pred 1     TP sidewalk
#   p3 gt 1 / pred void  FN sidewalk (a void prediction is not ignored)
#   p4 gt void / pred 0  ignored (no FP for road)
#   p5 gt 2 / pred 0     FN building, FP road
#   p6 gt 0 / pred 3     FN road, FP wall (wall never in GT: IoU 0, not NaN)
#   p7 gt 9 / pred 9     TP terrain
GT = np.array([[0, 0, 1, 1], [VOID, 2, 0, 9]])
PRED = np.array([[0, 1, 1, VOID], [0, 0, 3, 9]])
# road 1/(1+1+2), sidewalk 1/(1+1+1), building 0/1, wall 0/1, terrain 1/1; others NaN.
EXPECTED_IOU = {0: 1 / 4, 1: 1 / 3, 2: 0.0, 3: 0.0, 9: 1.0}


def _filled() -> ConfusionMatrix:
    matrix = ConfusionMatrix()
    matrix.update(GT, PRED)
    return matrix


def test_confusion_matrix_counts_void_predictions_in_the_extra_column():
    matrix = _filled().matrix
    assert matrix.shape == (19, 20)
    assert matrix.sum() == 7  # the ignored ground-truth pixel is not counted
    assert matrix[1, 19] == 1 and matrix[0, 3] == 1 and matrix[2, 0] == 1
    assert matrix[:, 0].sum() == 2  # road predicted on p0 and p5, not on the ignored p4


def test_per_class_iou_by_hand():
    iou = _filled().per_class_iou()
    for train_id in range(19):
        if train_id in EXPECTED_IOU:
            assert iou[train_id] == pytest.approx(EXPECTED_IOU[train_id], abs=1e-15)
        else:
            assert math.isnan(iou[train_id]), train_id


@pytest.mark.parametrize("reported, expected", [
    (19, (1 / 4 + 1 / 3 + 0 + 0 + 1) / 5),  # terrain counts
    (16, (1 / 4 + 1 / 3 + 0 + 0) / 4),      # no terrain
    (13, (1 / 4 + 1 / 3 + 0) / 3),          # no terrain, no wall
])
def test_mean_iou_over_the_reported_subsets(reported, expected):
    assert _filled().mean_iou(reported) == pytest.approx(expected, abs=1e-15)


def test_to_json_uses_cityscapes_names_and_percent():
    result = _filled().to_json(13)
    assert result["num_classes"] == 13
    assert result["mIoU"] == pytest.approx(100 * 7 / 36, abs=1e-12)
    per_class = result["per_class_iou"]
    assert list(per_class) == list(labels.class_names(13))
    assert "wall" not in per_class and "terrain" not in per_class
    assert per_class["road"] == pytest.approx(25.0)
    assert per_class["sidewalk"] == pytest.approx(100 / 3)
    assert per_class["building"] == 0.0
    assert math.isnan(per_class["traffic light"])


def test_updates_accumulate_over_the_split_not_per_image():
    matrix = ConfusionMatrix()
    matrix.update(np.array([0, 0]), np.array([0, 0]))  # image IoU of road: 1
    matrix.update(np.array([0, 1]), np.array([1, 1]))  # image IoU of road: 0
    # Split-level road: TP 2, FN 1 -> 2/3 (a per-image mean would give 1/2).
    assert matrix.per_class_iou()[0] == pytest.approx(2 / 3)
    assert matrix.per_class_iou()[1] == pytest.approx(1 / 2)


def test_empty_matrix_has_nan_miou():
    assert math.isnan(ConfusionMatrix().mean_iou())


@pytest.mark.parametrize("gt, pred, message", [
    (np.zeros((2, 3)), np.zeros((3, 2)), "shape"),
    (np.array([19]), np.array([0]), "ground truth contains value 19"),
    (np.array([0]), np.array([254]), "prediction contains value 254"),
])
def test_update_rejects_wrong_inputs(gt, pred, message):
    with pytest.raises(ValueError, match=message):
        ConfusionMatrix().update(gt, pred)


def test_subsets_need_nineteen_classes():
    with pytest.raises(ValueError, match="13-class subset"):
        ConfusionMatrix(num_classes=5).mean_iou(13)
    with pytest.raises(ValueError, match="num_classes_reported"):
        ConfusionMatrix().to_json(18)


def test_in_graph_counts_equal_the_numpy_matrix():
    rng = np.random.default_rng(3)
    values = list(range(19)) + [VOID]
    gt = rng.choice(values, size=(2, 17, 23)).astype(np.int32)
    pred = rng.choice(values, size=(2, 17, 23)).astype(np.int32)
    reference = ConfusionMatrix()
    reference.update(gt, pred)
    counts = tf.function(confusion_counts)(tf.constant(gt), tf.constant(pred))
    assert counts.dtype == tf.int64
    accumulated = ConfusionMatrix()
    accumulated.add_counts(counts)
    np.testing.assert_array_equal(accumulated.matrix, reference.matrix)
    np.testing.assert_array_equal(confusion_counts(GT, PRED).numpy(), _filled().matrix)
