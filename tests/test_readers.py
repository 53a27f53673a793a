"""Readers on small trees in the real layouts: labels, list files, augmentation, determinism."""

import os

import fixture_trees
import gin
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from sait_tf.data import readers


def _one_batch(examples, **kwargs):
    return next(iter(readers.make_dataset(examples, batch_size=len(examples), **kwargs)))


def _stack_png(paths):
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths]).astype(np.float32)


def test_gta5_palette_index_is_the_label_id(tmp_path):
    expected = fixture_trees.make_gta5_tree(str(tmp_path), num=3)
    examples = readers.list_examples("gta5", str(tmp_path))
    assert [ex.name for ex in examples] == ["00001", "00002", "00003"]
    assert examples[0] == readers.Example(str(tmp_path / "images" / "00001.png"),
                                          str(tmp_path / "labels" / "00001.png"), "00001", "gta5")
    batch = _one_batch(examples)
    assert batch["label"].dtype == tf.int32
    np.testing.assert_array_equal(batch["label"].numpy(), np.stack(expected))
    # raw labelIds 17 pole, 18 polegroup (same colour), 7 road, 0 void, 26 car, 33 bicycle, 3 void
    np.testing.assert_array_equal(batch["label"].numpy()[:, 0, :7],
                                  np.tile([5, 255, 0, 255, 13, 18, 255], (3, 1)))
    np.testing.assert_array_equal(batch["image"].numpy(), _stack_png(ex.image for ex in examples))
    assert batch["name"].numpy().tolist() == [b"00001", b"00002", b"00003"]


def test_synthia_class_id_is_the_first_channel(tmp_path):
    expected = fixture_trees.make_synthia_tree(str(tmp_path), num=2, seed=4)
    examples = readers.list_examples("synthia", str(tmp_path))
    assert [ex.name for ex in examples] == ["0000000", "0000001"]
    labels = _one_batch(examples)["label"].numpy()
    np.testing.assert_array_equal(labels, np.stack(expected))
    # SYNTHIA ids 0 void, 3 road, 7 pole, 13 void, 22 void, 8 car, 1 sky
    np.testing.assert_array_equal(labels[:, 0, :7], np.tile([255, 0, 5, 255, 255, 13, 10], (2, 1)))


def test_cityscapes_void_ids_map_to_ignore(tmp_path):
    expected = fixture_trees.make_cityscapes_tree(str(tmp_path), splits=("train", "val"))
    examples = readers.list_examples("cityscapes", str(tmp_path), split="val")
    assert [ex.name for ex in examples] == fixture_trees.cityscapes_names()
    assert examples[0].name == "aachen/aachen_000000_000019"
    assert examples[0].label == str(tmp_path / "gtFine" / "val" / "aachen" /
                                    "aachen_000000_000019_gtFine_labelIds.png")
    labels = _one_batch(examples)["label"].numpy()
    np.testing.assert_array_equal(labels, np.stack(expected[4:]))
    # labelIds 0, 1, 4 void, 255 license plate, 7 road, 17 pole, 26 car, 33 bicycle
    np.testing.assert_array_equal(labels[:, 0, :8],
                                  np.tile([255, 255, 255, 255, 0, 5, 13, 18], (4, 1)))


def test_cityscapes_test_split_has_no_labels(tmp_path):
    fixture_trees.make_cityscapes_tree(str(tmp_path), splits=("test",), per_city=1)
    examples = readers.list_examples("cityscapes", str(tmp_path), split="test")
    assert [ex.label for ex in examples] == [None, None]
    assert set(_one_batch(examples)) == {"image", "name"}


def test_list_files_select_and_resolve_entries(tmp_path):
    root = tmp_path / "gta5"
    fixture_trees.make_gta5_tree(str(root), num=4)
    list_file = tmp_path / "subset.txt"
    list_file.write_text("00004.png\n\nimages/00002.png\n")
    examples = readers.list_examples("gta5", str(root), list_file=str(list_file))
    assert [(ex.name, os.path.basename(ex.label)) for ex in examples] == [
        ("00002", "00002.png"), ("00004", "00004.png")]

    list_file.write_text("00001.png\n00009.png\n")
    with pytest.raises(FileNotFoundError, match=r"subset.txt:2: '00009.png'"):
        readers.list_examples("gta5", str(root), list_file=str(list_file))
    list_file.write_text("00001.png\nimages/00001.png\n")
    with pytest.raises(ValueError, match="'00001' more than once"):
        readers.list_examples("gta5", str(root), list_file=str(list_file))


def test_cityscapes_list_file_relative_to_split_or_root(tmp_path):
    expected = fixture_trees.make_cityscapes_tree(str(tmp_path / "cs"), splits=("train",))
    list_file = tmp_path / "train.txt"
    list_file.write_text("bochum/bochum_000000_000020_leftImg8bit.png\n"
                         "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png\n")
    examples = readers.list_examples("cityscapes", str(tmp_path / "cs"), "train",
                                     list_file=str(list_file))
    assert [ex.name for ex in examples] == ["aachen/aachen_000000_000019",
                                            "bochum/bochum_000000_000020"]
    np.testing.assert_array_equal(_one_batch(examples)["label"].numpy(),
                                  np.stack([expected[0], expected[3]]))


def test_labels_from_replaces_labels_with_train_ids(tmp_path):
    fixture_trees.make_cityscapes_tree(str(tmp_path / "cs"), splits=("train",))
    names = fixture_trees.cityscapes_names()
    pseudo = fixture_trees.make_trainid_dir(str(tmp_path / "pseudo"), names, seed=7)
    examples = readers.list_examples("cityscapes", str(tmp_path / "cs"), "train",
                                     labels_from=str(tmp_path / "pseudo"))
    assert {ex.label_format for ex in examples} == {"trainid"}
    assert examples[1].label == str(tmp_path / "pseudo" / "aachen" /
                                    "aachen_000000_000020.png")
    np.testing.assert_array_equal(_one_batch(examples)["label"].numpy(), np.stack(pseudo))


def test_listing_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        readers.list_examples("gta5", str(tmp_path / "nowhere"))
    (tmp_path / "labels").mkdir()
    with pytest.raises(FileNotFoundError, match=r"images"):
        readers.list_examples("gta5", str(tmp_path))
    (tmp_path / "images").mkdir()
    with pytest.raises(ValueError, match=r"no images .* found in .*images"):
        readers.list_examples("gta5", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"leftImg8bit/val"):
        readers.list_examples("cityscapes", str(tmp_path), split="val")
    (tmp_path / "leftImg8bit" / "val" / "aachen").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"no Cityscapes images .*leftImg8bit/val"):
        readers.list_examples("cityscapes", str(tmp_path), split="val")
    with pytest.raises(ValueError, match="'kitti'"):
        readers.list_examples("kitti", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="labels_from .*pseudo"):
        readers.list_examples("gta5", str(tmp_path), labels_from=str(tmp_path / "pseudo"))


def test_resize_uses_nearest_for_labels_and_clips_bicubic_images(tmp_path):
    expected = np.stack(fixture_trees.make_gta5_tree(str(tmp_path), num=2, size=(24, 40)))
    examples = readers.list_examples("gta5", str(tmp_path))
    batch = _one_batch(examples, resize=(48, 80))
    labels = batch["label"].numpy()
    # Exact 2x nearest upsampling repeats every label pixel in a 2x2 block.
    for dy in (0, 1):
        for dx in (0, 1):
            np.testing.assert_array_equal(labels[:, dy::2, dx::2], expected)
    images = batch["image"].numpy()
    assert images.shape == (2, 48, 80, 3) and images.min() == 0.0 and images.max() == 255.0
    halved = _one_batch(examples, resize=(12, 20), image_resize_method="bilinear")
    assert set(np.unique(halved["label"].numpy())) <= set(np.unique(expected))


def _windows(batch):
    """(top, left, flipped) of each cropped position image (R = row, G = column)."""
    windows = []
    for image in batch["image"].numpy().astype(int):
        rows, cols = image[..., 0], image[..., 1]
        flipped = cols[0, 0] > cols[0, -1]
        width = cols.shape[1]
        left = cols[0, -1] if flipped else cols[0, 0]
        np.testing.assert_array_equal(rows, rows[0, 0] + np.arange(rows.shape[0])[:, None]
                                      + 0 * cols)
        step = -1 if flipped else 1
        np.testing.assert_array_equal(cols[0], left + np.arange(width)[::step])
        windows.append((rows[0, 0], left, flipped))
    return windows


def test_crop_and_flip_are_identical_for_image_and_label(tmp_path):
    expected = fixture_trees.make_gta5_tree(str(tmp_path), num=3, position_images=True)
    examples = readers.list_examples("gta5", str(tmp_path))
    dataset = readers.make_dataset(examples, crop=(10, 16), flip=True, shuffle=True,
                                   repeat=True, batch_size=3, seed=11)
    seen = set()
    for batch in dataset.take(6):
        for window, name, image, label in zip(_windows(batch), batch["name"].numpy(),
                                              batch["image"].numpy(), batch["label"].numpy(),
                                              strict=True):
            top, left, flipped = window
            index = int(name.decode()) - 1
            assert image[0, 0, 2] == index
            want = expected[index][top:top + 10, left:left + 16]
            np.testing.assert_array_equal(label, want[:, ::-1] if flipped else want)
            seen.add(window)
    assert {w[2] for w in seen} == {False, True}
    assert len({w[:2] for w in seen}) > 3


def test_same_seed_same_stream_and_every_epoch_is_a_permutation(tmp_path):
    fixture_trees.make_gta5_tree(str(tmp_path), num=5, position_images=True)
    examples = readers.list_examples("gta5", str(tmp_path))

    def stream(seed):
        dataset = readers.make_dataset(examples, crop=(8, 8), flip=True, shuffle=True,
                                       repeat=True, seed=seed)
        items = [(b["name"].numpy()[0], _windows(b)[0]) for b in dataset.take(15)]
        return [name for name, _ in items], items

    names, first = stream(5)
    assert stream(5)[1] == first
    assert stream(6)[1] != first
    for epoch in range(3):
        assert sorted(names[5 * epoch:5 * epoch + 5]) == [b"00001", b"00002", b"00003",
                                                          b"00004", b"00005"]
    assert names[:5] != names[5:10] or names[5:10] != names[10:]


def test_labels_only_when_every_example_has_one_and_sizes_checked(tmp_path):
    fixture_trees.make_gta5_tree(str(tmp_path), num=2)
    examples = readers.list_examples("gta5", str(tmp_path))
    mixed = [examples[0], examples[1]._replace(label=None)]
    assert set(_one_batch(mixed)) == {"image", "name"}
    fixture_trees.write_gta5_label(examples[1].label, np.zeros((20, 40), np.uint8))
    with pytest.raises(tf.errors.InvalidArgumentError, match="sizes differ for.*00002"):
        _one_batch(examples)
    assert _one_batch(examples, resize=(12, 20))["label"].shape == (2, 12, 20)


def test_make_dataset_rejects_bad_parameters(tmp_path):
    fixture_trees.make_gta5_tree(str(tmp_path), num=1)
    examples = readers.list_examples("gta5", str(tmp_path))
    with pytest.raises(ValueError, match=r"crop \(30, 30\) is larger than resize"):
        readers.make_dataset(examples, resize=(20, 20), crop=(30, 30))
    with pytest.raises(ValueError, match="image_resize_method"):
        readers.make_dataset(examples, image_resize_method="area")
    with pytest.raises(tf.errors.InvalidArgumentError, match="larger than image"):
        _one_batch(examples, crop=(30, 30))


def test_gin_binds_only_the_make_dataset_parameters_no_caller_passes(tmp_path):
    """The pipeline passes sizes, crops and batches itself (source_domain, run_pipeline), so a
    binding of them would be ignored: gin refuses it. The resize method is the user's."""
    fixture_trees.make_gta5_tree(str(tmp_path), num=1)
    examples = readers.list_examples("gta5", str(tmp_path))
    try:
        with pytest.raises(ValueError, match="crop"):
            gin.parse_config(["make_dataset.crop = (6, 10)"])
        gin.parse_config(["make_dataset.image_resize_method = 'area'"])
        with pytest.raises(ValueError, match="image_resize_method must be"):
            readers.make_dataset(examples)
    finally:
        gin.clear_config()


def test_tfds_gta5_builder_reads_manual_dir(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets", reason="needs the tfds extra")

    from sait_tf.data import tfds_builders

    expected = fixture_trees.make_gta5_tree(str(tmp_path / "manual"), num=2, seed=3)
    builder = tfds_builders.Gta5(data_dir=str(tmp_path / "tfds"))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(tmp_path / "manual")))
    assert builder.info.splits["train"].num_examples == 2
    examples = {ex["name"].numpy(): ex for ex in builder.as_dataset(split="train")}
    np.testing.assert_array_equal(examples[b"00002"]["label"].numpy()[..., 0], expected[1])
    np.testing.assert_array_equal(
        examples[b"00002"]["image"].numpy(),
        np.asarray(Image.open(tmp_path / "manual" / "images" / "00002.png")))
