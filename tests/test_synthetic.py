"""The embedded synthetic pair: determinism, on-disk layouts, classes, domain gap, layout parity."""

import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from sait_tf import labels
from sait_tf.data import synthetic

TINY = {"num_source": 3, "num_target_train": 2, "num_target_val": 2, "size": (32, 64)}


def _read_tree(root):
    files = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, root)] = f.read()
    return files


def _train_ids(path):
    return labels.LABEL_ID_TO_TRAIN_ID[np.array(Image.open(path))]


@pytest.fixture(scope="module")
def pair_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("synthetic") / "pair")
    synthetic.generate_pair(out, seed=0, num_source=24, num_target_train=16, num_target_val=8)
    return out


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path):
    synthetic.generate_pair(str(tmp_path / "a"), seed=3, **TINY)
    synthetic.generate_pair(str(tmp_path / "b"), seed=3, **TINY)
    synthetic.generate_pair(str(tmp_path / "c"), seed=4, **TINY)
    a, b, c = (_read_tree(str(tmp_path / n)) for n in "abc")
    assert len(a) == 2 * 3 + 2 * 4 + 1  # images + labels of each set, plus the manifest
    assert a == b
    assert a.keys() == c.keys()
    images = [k for k in a if k.endswith(".png")]
    assert all(a[k] != c[k] for k in images)


def test_source_is_in_the_gta5_layout(pair_dir):
    root = os.path.join(pair_dir, "source")
    assert sorted(os.listdir(os.path.join(root, "images"))) == [
        f"{i:05d}.png" for i in range(1, 25)]
    assert sorted(os.listdir(os.path.join(root, "labels"))) == sorted(
        os.listdir(os.path.join(root, "images")))
    image = Image.open(os.path.join(root, "images", "00007.png"))
    label = Image.open(os.path.join(root, "labels", "00007.png"))
    assert (image.mode, image.size) == ("RGB", (128, 64))
    assert (label.mode, label.size) == ("P", (128, 64))
    palette = np.array(label.getpalette()[:768], np.uint8).reshape(256, 3)
    np.testing.assert_array_equal(palette, labels.LABEL_ID_PALETTE)
    # The palette index is the labelId: the file holds exactly what sample_example draws.
    expected_image, expected_layout = synthetic.sample_example(0, "source", "train", 6)
    np.testing.assert_array_equal(np.array(label), expected_layout)
    np.testing.assert_array_equal(np.array(image), expected_image)


def test_target_is_in_the_cityscapes_layout(pair_dir):
    root = os.path.join(pair_dir, "target")
    for split, count, cities in (("train", 16, synthetic.TRAIN_CITIES),
                                 ("val", 8, synthetic.VAL_CITIES)):
        assert sorted(os.listdir(os.path.join(root, "leftImg8bit", split))) == sorted(cities)
        stems = []
        for city in cities:
            names = os.listdir(os.path.join(root, "leftImg8bit", split, city))
            for name in names:
                match = re.fullmatch(rf"({city}_\d{{6}}_000019)_leftImg8bit\.png", name)
                assert match, name
                stems.append((city, match.group(1)))
        assert len(stems) == count
        for city, stem in stems:
            label_path = os.path.join(root, "gtFine", split, city, f"{stem}_gtFine_labelIds.png")
            image = Image.open(os.path.join(root, "leftImg8bit", split, city,
                                            f"{stem}_leftImg8bit.png"))
            label = Image.open(label_path)
            assert (image.mode, label.mode) == ("RGB", "L")
            assert image.size == label.size == (128, 64)
    assert not set(synthetic.TRAIN_CITIES) & set(synthetic.VAL_CITIES)
    label = np.array(Image.open(os.path.join(
        root, "gtFine", "val", "renderdorf", "renderdorf_000003_000019_gtFine_labelIds.png")))
    np.testing.assert_array_equal(label, synthetic.sample_example(0, "target", "val", 3)[1])


def test_each_domain_has_many_classes_and_some_void(pair_dir):
    source = [os.path.join(pair_dir, "source", "labels", n)
              for n in os.listdir(os.path.join(pair_dir, "source", "labels"))]
    target = [os.path.join(folder, n) for folder, _, names in
              os.walk(os.path.join(pair_dir, "target", "gtFine")) for n in names]
    for paths in (source, target):
        raw = np.stack([np.array(Image.open(p)) for p in paths])
        train_ids = set(np.unique(labels.LABEL_ID_TO_TRAIN_ID[raw]).tolist()) - {255}
        assert len(train_ids) >= 8, train_ids
        assert train_ids <= set(synthetic.DRAWN_TRAIN_IDS)
        assert set(np.unique(raw).tolist()) <= set(synthetic.DRAWN_LABEL_IDS) | set(
            synthetic.VOID_LABEL_IDS)
        assert 0 < np.isin(raw, synthetic.VOID_LABEL_IDS).mean() < 0.1


def test_per_class_mean_colours_differ_strongly_between_domains():
    source = synthetic.domain_class_colors("source")
    target = synthetic.domain_class_colors("target")
    drawn = ~np.isnan(source[:, 0])
    np.testing.assert_array_equal(drawn, ~np.isnan(target[:, 0]))
    assert sorted(np.flatnonzero(drawn).tolist()) == sorted(synthetic.DRAWN_TRAIN_IDS)
    distance = np.linalg.norm(source[drawn] - target[drawn], axis=1)
    assert distance.mean() > 60.0 and distance.min() > 15.0, distance.round()
    # Colour alone misleads: most target classes are nearest to another class's source colour.
    drawn_ids = np.flatnonzero(drawn)
    nearest = [drawn_ids[np.argmin(np.linalg.norm(source[drawn] - target[c], axis=1))]
               for c in drawn_ids]
    assert sum(int(n == c) for n, c in zip(nearest, drawn_ids, strict=True)) <= 4


def test_camera_response_turns_hue_about_grey_then_applies_gamma_and_gains():
    assert synthetic.camera_response((200, 40, 90), 0.0, 1.0, (1.0, 1.0, 1.0)) == (200, 40, 90)
    # A third of a turn about the grey axis moves red to green and green to blue.
    assert synthetic.camera_response((255, 0, 0), 120.0, 1.0, (1.0, 1.0, 1.0)) == (0, 255, 0)
    assert synthetic.camera_response((0, 255, 0), 120.0, 1.0, (1.0, 1.0, 1.0)) == (0, 0, 255)
    # Greys keep their hue; gamma 2 maps 0.5 to 0.25 before the gains.
    assert synthetic.camera_response((128, 128, 128), 45.0, 2.0, (1.0, 1.5, 0.5)) == (64, 96, 32)
    target = synthetic.STYLES["target"].class_looks
    for label_id, (colour, _, _) in synthetic.STYLES["source"].class_looks.items():
        assert target[label_id][0] == synthetic.camera_response(colour)


def test_domain_class_colors_match_the_written_images(pair_dir):
    for domain, image_paths in (
            ("source", [os.path.join(pair_dir, "source", "images", f"{i:05d}.png")
                        for i in range(1, 25)]),
            ("target", [os.path.join(folder, n) for folder, _, names in os.walk(
                os.path.join(pair_dir, "target", "leftImg8bit", "train")) for n in names])):
        sums, counts = np.zeros((19, 3)), np.zeros(19)
        for path in image_paths:
            if domain == "source":
                label_path = path.replace(os.sep + "images" + os.sep, os.sep + "labels" + os.sep)
            else:
                label_path = path.replace("leftImg8bit", "gtFine", 1).replace(
                    "_leftImg8bit.png", "_gtFine_labelIds.png")
            image = np.array(Image.open(path), np.float64)
            train_ids = _train_ids(label_path)
            for c in range(19):
                sums[c] += image[train_ids == c].sum(axis=0)
                counts[c] += (train_ids == c).sum()
        present = counts > 500
        measured = sums[present] / counts[present, None]
        expected = synthetic.domain_class_colors(domain)[present]
        assert np.linalg.norm(measured - expected, axis=1).max() < 30.0


def test_label_layouts_follow_one_distribution_in_both_domains():
    height, width, n = 32, 64, 150
    frequencies = {}
    for domain in synthetic.DOMAINS:
        counts = np.zeros((height, 20))
        for i in range(n):
            train_ids = labels.LABEL_ID_TO_TRAIN_ID[
                synthetic.sample_example(7, domain, "train", i, (height, width))[1]]
            classes = np.minimum(train_ids, 19).astype(np.int64)
            counts += np.stack([np.bincount(row, minlength=20) for row in classes])
        frequencies[domain] = counts / (n * width)
    difference = np.abs(frequencies["source"] - frequencies["target"])
    assert difference.mean() < 0.02 and difference.max() < 0.2
    # The scene has its structure: sky only at the top, road only at the bottom.
    sky, road = 10, 0
    assert frequencies["source"][0, sky] > 0.5 and frequencies["source"][-1, sky] == 0
    assert frequencies["source"][-1, road] > 0.3 and frequencies["source"][0, road] == 0


def test_render_is_a_function_of_layout_domain_and_rng():
    layout = synthetic.sample_example(0, "source", "train", 0)[1]
    first = synthetic.render(layout, "target", np.random.default_rng(5))
    again = synthetic.render(layout, "target", np.random.default_rng(5))
    source = synthetic.render(layout, "source", np.random.default_rng(5))
    assert first.dtype == np.uint8 and first.shape == layout.shape + (3,)
    np.testing.assert_array_equal(first, again)
    assert np.abs(first.astype(int) - source).mean() > 20
    with pytest.raises(ValueError, match="domain"):
        synthetic.render(layout, "real", np.random.default_rng(5))


def test_ensure_synthetic_pair_generates_once_and_checks_parameters(tmp_path):
    root = str(tmp_path / "pair")
    os.makedirs(root + ".tmp/source")  # left by an interrupted run
    source_root, target_root = synthetic.ensure_synthetic_pair(root, seed=1, **TINY)
    assert (source_root, target_root) == (os.path.join(root, "source"),
                                          os.path.join(root, "target"))
    assert not os.path.exists(root + ".tmp")
    marker = os.path.join(source_root, "images", "00001.png")
    before = os.stat(marker).st_mtime_ns
    assert synthetic.ensure_synthetic_pair(root, seed=1, **TINY) == (source_root, target_root)
    assert os.stat(marker).st_mtime_ns == before
    with pytest.raises(ValueError, match="seed"):
        synthetic.ensure_synthetic_pair(root, seed=2, **TINY)
    # A pair drawn by an older appearance model has another (or no) version in its manifest.
    manifest_path = os.path.join(root, synthetic.MANIFEST_NAME)
    with open(manifest_path) as f:
        manifest = json.load(f)
    del manifest["appearance_version"]
    with open(manifest_path, "w") as f:
        json.dump(manifest, f)
    with pytest.raises(ValueError, match="appearance_version"):
        synthetic.ensure_synthetic_pair(root, seed=1, **TINY)
    os.makedirs(tmp_path / "other")
    with pytest.raises(ValueError, match="synthetic.json"):
        synthetic.ensure_synthetic_pair(str(tmp_path / "other"))


def test_invalid_arguments_are_rejected_before_writing(tmp_path):
    with pytest.raises(ValueError, match="num_source"):
        synthetic.generate_pair(str(tmp_path / "x"), num_source=-1)
    with pytest.raises(ValueError, match="size"):
        synthetic.generate_pair(str(tmp_path / "x"), size=(8, 8))
    assert not os.path.exists(tmp_path / "x")
    synthetic.generate_pair(str(tmp_path / "y"), **TINY)
    with pytest.raises(ValueError, match="already exists"):
        synthetic.generate_pair(str(tmp_path / "y"), **TINY)


def test_save_preview_grid_size(tmp_path):
    out = str(tmp_path / "preview.png")
    synthetic.save_preview(out, seed=0, num_examples=3, size=(32, 64), zoom=2)
    image = Image.open(out)
    assert image.mode == "RGB"
    # 4 columns of 64 px and 3 rows of 32 px, separated by 2-px gaps, doubled.
    assert image.size == ((4 * 64 + 3 * 2) * 2, (3 * 32 + 2 * 2) * 2)


def test_small_pair_generates_quickly(tmp_path):
    start = time.monotonic()
    synthetic.generate_pair(str(tmp_path / "p"), num_source=20, num_target_train=10,
                            num_target_val=10)
    assert time.monotonic() - start < 10.0


def test_command_line(tmp_path):
    out = str(tmp_path / "cli")
    result = subprocess.run(
        [sys.executable, "-m", "sait_tf.data.synthetic", f"--out={out}", "--seed=2",
         "--num_source=2", "--num_target_train=1", "--num_target_val=1", "--height=32",
         "--width=48"], capture_output=True, text=True, timeout=120,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(synthetic.__file__)))))
    assert result.returncode == 0, result.stderr
    image = Image.open(os.path.join(out, "source", "images", "00002.png"))
    assert image.size == (48, 32)
    np.testing.assert_array_equal(
        np.array(image), synthetic.sample_example(2, "source", "train", 1, (32, 48))[0])
