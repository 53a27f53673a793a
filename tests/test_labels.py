"""The label table against the values in REFERENCE.md section 1."""

import numpy as np
import pytest

from sait_tf import labels


def test_cityscapes_train_ids_map_from_label_ids():
    raw = np.array([7, 8, 11, 17, 18, 23, 24, 26, 33, 0, 4, 255, 34])
    expected = np.array([0, 1, 2, 5, 255, 10, 11, 13, 18, 255, 255, 255, 255])
    np.testing.assert_array_equal(labels.raw_to_train_ids(raw, "cityscapes"), expected)
    np.testing.assert_array_equal(labels.raw_to_train_ids(raw, "gta5"), expected)


def test_synthia_ids_map_to_train_ids_and_missing_classes_are_ignored():
    raw = np.array([3, 4, 2, 21, 5, 7, 15, 9, 6, 1, 10, 17, 8, 19, 12, 11, 0, 13, 22, 300])
    expected = [0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18, 255, 255, 255, 255]
    np.testing.assert_array_equal(labels.raw_to_train_ids(raw, "synthia"), expected)
    assert not {9, 14, 16} & set(labels.SYNTHIA_ID_TO_TRAIN_ID.values())


def test_train_id_round_trip_and_palette():
    train_ids = np.arange(19)
    label_ids = labels.TRAIN_ID_TO_LABEL_ID_TABLE[train_ids]
    np.testing.assert_array_equal(labels.raw_to_train_ids(label_ids, "cityscapes"), train_ids)
    assert labels.TRAIN_ID_TO_LABEL_ID_TABLE[255] == 0
    assert labels.CLASS_NAMES[6] == "traffic light" and labels.CLASS_NAMES[17] == "motorcycle"
    assert tuple(labels.PALETTE[13]) == (0, 0, 142)
    np.testing.assert_array_equal(labels.LABEL_ID_PALETTE[list(labels.TRAIN_ID_TO_LABEL_ID)],
                                  labels.PALETTE)


def test_reported_subsets():
    assert len(labels.class_names(16)) == 16 and len(labels.class_names(13)) == 13
    assert "terrain" not in labels.class_names(16) and "wall" not in labels.class_names(13)
    assert labels.class_names(13)[3] == "traffic light"
    with pytest.raises(ValueError, match="num_classes"):
        labels.class_names(12)
