"""The start-up scan: each dataset problem fails with a message naming the file."""

import logging
import os

import fixture_trees
import numpy as np
import pytest
from PIL import Image

from sait_tf.data import readers, scan


def _gta5(tmp_path, num=3, **kwargs):
    root = str(tmp_path / "gta5")
    fixture_trees.make_gta5_tree(root, num=num, **kwargs)
    return root


def _scan(root, dataset="gta5", **kwargs):
    return scan.scan_examples(readers.list_examples(dataset, root), **kwargs)


def test_clean_tree_report(tmp_path):
    root = _gta5(tmp_path, num=3)
    report = _scan(root)
    assert report.num_examples == 3 and report.skipped == [] and report.num_decoded == 3
    assert report.image_sizes == {(24, 40): 3}
    raw = np.concatenate([np.asarray(Image.open(os.path.join(root, "labels", f))).ravel()
                          for f in sorted(os.listdir(os.path.join(root, "labels")))])
    values, counts = np.unique(raw, return_counts=True)
    assert report.label_value_counts == dict(zip(values.tolist(), counts.tolist(), strict=True))
    assert "3 examples (skipped 0)" in report.summary() and "24x40: 3" in report.summary()


def test_synthia_and_cityscapes_trees_pass(tmp_path):
    fixture_trees.make_synthia_tree(str(tmp_path / "syn"), num=2)
    report = _scan(str(tmp_path / "syn"), "synthia")
    assert max(report.label_value_counts) == 22  # channel 0, not the instance ids (>= 256)
    fixture_trees.make_cityscapes_tree(str(tmp_path / "cs"), splits=("val",))
    report = scan.scan_examples(readers.list_examples("cityscapes", str(tmp_path / "cs"), "val"))
    assert report.num_examples == 4 and 255 in report.label_value_counts


def test_empty_example_list_fails():
    with pytest.raises(scan.DatasetError, match="no examples"):
        scan.scan_examples([])


def test_image_without_label(tmp_path):
    root = _gta5(tmp_path)
    os.remove(os.path.join(root, "labels", "00002.png"))
    with pytest.raises(scan.DatasetError, match=r"images/00002.png has no label \(expected "
                                                r".*labels/00002.png\)"):
        _scan(root)


def test_label_without_image(tmp_path):
    root = _gta5(tmp_path)
    os.remove(os.path.join(root, "images", "00003.png"))
    with pytest.raises(scan.DatasetError, match=r"label .*labels/00003.png has no image"):
        _scan(root)
    fixture_trees.make_cityscapes_tree(str(tmp_path / "cs"), splits=("train",))
    os.remove(str(tmp_path / "cs" / "leftImg8bit" / "train" / "bochum" /
                  "bochum_000000_000019_leftImg8bit.png"))
    with pytest.raises(scan.DatasetError,
                       match=r"bochum_000000_000019_gtFine_labelIds.png has no image"):
        scan.scan_examples(readers.list_examples("cityscapes", str(tmp_path / "cs")))


def test_size_mismatch_error_and_skip(tmp_path, caplog):
    root = _gta5(tmp_path, num=4)
    fixture_trees.write_gta5_label(os.path.join(root, "labels", "00002.png"),
                                   np.full((20, 40), 7, np.uint8))
    with pytest.raises(scan.DatasetError,
                       match=r"images/00002.png is 24x40 \(HxW\) but label .*labels/00002.png "
                             r"is 20x40 \(1 pairs differ"):
        _scan(root)
    with caplog.at_level(logging.WARNING):
        report = _scan(root, on_size_mismatch="skip")
    assert report.skipped == ["00002"]
    assert [ex.name for ex in report.examples] == ["00001", "00003", "00004"]
    assert "skipping 1 of 4 examples" in caplog.text
    with pytest.raises(ValueError, match="on_size_mismatch"):
        _scan(root, on_size_mismatch="ignore")


def test_truncated_png(tmp_path):
    root = _gta5(tmp_path)
    path = os.path.join(root, "images", "00003.png")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(scan.DatasetError, match=r"images/00003.png: truncated PNG"):
        _scan(root, max_decode=0)


def test_corrupt_png_body_is_caught_by_the_decode_sample(tmp_path):
    root = _gta5(tmp_path, num=5)
    path = os.path.join(root, "images", "00004.png")
    data = bytearray(open(path, "rb").read())
    data[60:120] = bytes(60)  # inside the image data; header and IEND stay intact
    open(path, "wb").write(bytes(data))
    assert _scan(root, max_decode=0).num_decoded == 0  # headers only: not detected
    assert _scan(root, max_decode=3).num_decoded == 3  # decodes examples 1, 3, 5 ...
    with pytest.raises(scan.DatasetError,
                       match=r"images/00004.png: cannot be decoded \(Invalid PNG data"):
        _scan(root)  # ... and the default decodes every example of a small set


def test_non_image_file_with_png_name(tmp_path):
    root = _gta5(tmp_path)
    open(os.path.join(root, "labels", "00001.png"), "w").write("<html>not found</html>")
    with pytest.raises(scan.DatasetError, match=r"labels/00001.png: not a PNG or JPEG file"):
        _scan(root)
    open(os.path.join(root, "labels", "00001.png"), "w").close()
    with pytest.raises(scan.DatasetError, match=r"labels/00001.png: an empty file"):
        _scan(root)


def test_unknown_label_values(tmp_path):
    root = _gta5(tmp_path)
    label = np.zeros((24, 40), np.uint8)
    label[3, 4], label[5, 6] = 40, 200
    fixture_trees.write_gta5_label(os.path.join(root, "labels", "00002.png"), label)
    with pytest.raises(scan.DatasetError,
                       match=r"labels/00002.png: values \[40, 200\] are not gta5 label values"):
        _scan(root)
    report = _scan(root, check_values=False)
    assert report.label_value_counts[40] == 1 and report.label_value_counts[200] == 1

    fixture_trees.make_synthia_tree(str(tmp_path / "syn"), num=2)
    class_ids = np.full((24, 40), 30, np.uint16)
    fixture_trees.write_synthia_label(str(tmp_path / "syn" / "GT" / "LABELS" / "0000001.png"),
                                      class_ids, np.zeros((24, 40), np.uint16))
    with pytest.raises(scan.DatasetError, match=r"0000001.png: values \[30\] are not synthia"):
        _scan(str(tmp_path / "syn"), "synthia")


def test_colour_label_is_rejected_by_its_header(tmp_path):
    root = _gta5(tmp_path)
    colours = np.zeros((24, 40, 3), np.uint8)
    Image.fromarray(colours).save(os.path.join(root, "labels", "00001.png"))
    with pytest.raises(scan.DatasetError, match=r"labels/00001.png: gta5 labels must be 8-bit "
                                                r"palette PNGs .* this is a 8-bit RGB PNG"):
        _scan(root)


def test_pseudo_labels_may_be_smaller_with_the_same_aspect_ratio(tmp_path):
    fixture_trees.make_cityscapes_tree(str(tmp_path / "cs"), splits=("train",))
    names = fixture_trees.cityscapes_names()
    fixture_trees.make_trainid_dir(str(tmp_path / "pseudo"), names, size=(12, 20))
    examples = readers.list_examples("cityscapes", str(tmp_path / "cs"),
                                     labels_from=str(tmp_path / "pseudo"))
    assert scan.scan_examples(examples).num_examples == 4
    fixture_trees.make_trainid_dir(str(tmp_path / "pseudo"), names[:1], size=(12, 12))
    with pytest.raises(scan.DatasetError, match=r"aachen_000000_000019.png is 12x12"):
        scan.scan_examples(examples)
