"""The embedded synthetic pair: determinism, on-disk layouts (GTA5, SYNTHIA, Cityscapes) read by
the real readers, classes, domain gap, layout parity, cameras."""

import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from sait_tf import labels
from sait_tf.data import readers, scan, synthetic

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
    camera = synthetic.EMBEDDED_CAMERA
    for label_id, (colour, _, _) in synthetic.STYLES["source"].class_looks.items():
        assert target[label_id][0] == synthetic.camera_response(
            colour, camera.hue_degrees, camera.gamma, camera.gains)


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


@pytest.mark.slow
def test_command_line(tmp_path):
    out = str(tmp_path / "cli")
    result = subprocess.run(
        [sys.executable, "-m", "sait_tf.data.synthetic", f"--out={out}", "--seed=2",
         "--num_source=2", "--num_target_train=1", "--num_target_val=1", "--height=32",
         "--width=48", "--source_layout=synthia", "--source_height=40", "--camera_seed=3"],
        capture_output=True, text=True, timeout=600,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(synthetic.__file__)))))
    assert result.returncode == 0, result.stderr
    image = Image.open(os.path.join(out, "source", "RGB", "0000001.png"))
    assert image.size == (48, 40)
    np.testing.assert_array_equal(
        np.array(image), synthetic.sample_example(2, "source", "train", 1, (40, 48))[0])
    target = Image.open(os.path.join(out, "target", "leftImg8bit", "val", "renderdorf",
                                     "renderdorf_000000_000019_leftImg8bit.png"))
    np.testing.assert_array_equal(np.array(target), synthetic.sample_example(
        2, "target", "val", 0, (32, 48), synthetic.Camera.random(3))[0])


# ---------------------------------------------------------------------------------------------
# SYNTHIA layout, per-domain sizes, cameras.

# SYNTHIA-RAND-CITYSCAPES class ids (docs/facts.md; BDL data/synthia_dataset.py) of the
# labelIds the layouts draw; terrain is SYNTHIA's 16, which no benchmark subset keeps.
SYNTHIA_IDS = {synthetic.ROAD: 3, synthetic.SIDEWALK: 4, synthetic.BUILDING: 2, synthetic.WALL: 21,
               synthetic.FENCE: 5, synthetic.POLE: 7, synthetic.TRAFFIC_SIGN: 9,
               synthetic.VEGETATION: 6, synthetic.TERRAIN: 16, synthetic.SKY: 1,
               synthetic.PERSON: 10, synthetic.CAR: 8}


def _png_header(path):
    """(bit depth, colour type) of a PNG, read from its IHDR chunk."""
    with open(path, "rb") as f:
        head = f.read(26)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return head[24], head[25]


@pytest.fixture(scope="module")
def synthia_pair(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("synthia") / "pair")
    synthetic.generate_pair(out, seed=5, num_source=6, num_target_train=2, num_target_val=2,
                            size=(32, 64), source_layout="synthia", source_size=(38, 70))
    return out


def test_synthia_tree_is_in_the_dataset_layout_with_16_bit_labels(synthia_pair):
    root = os.path.join(synthia_pair, "source")
    names = [f"{i:07d}.png" for i in range(6)]
    assert sorted(os.listdir(root)) == ["GT", "RGB"]
    assert sorted(os.listdir(os.path.join(root, "RGB"))) == names
    assert sorted(os.listdir(os.path.join(root, "GT", "LABELS"))) == names
    label_path = os.path.join(root, "GT", "LABELS", "0000004.png")
    assert _png_header(label_path) == (16, 2)  # 16-bit RGB, as the dataset ships its labels
    raw = tf.io.decode_png(tf.io.read_file(label_path), dtype=tf.uint16).numpy()
    layout = synthetic.sample_example(5, "source", "train", 4, (38, 70))[1]
    assert raw.shape == (38, 70, 3)
    expected = np.zeros((38, 70), np.uint16)
    for label_id, synthia_id in SYNTHIA_IDS.items():
        expected[layout == label_id] = synthia_id
    np.testing.assert_array_equal(raw[..., 0], expected)  # the class id is the first channel
    assert not raw[..., 1:].any()
    image = Image.open(os.path.join(root, "RGB", "0000004.png"))
    assert (image.mode, image.size) == ("RGB", (70, 38))


def test_synthia_tree_is_read_by_the_real_readers_with_correct_train_ids(synthia_pair):
    root = os.path.join(synthia_pair, "source")
    examples = readers.list_examples("synthia", root)
    assert [ex.name for ex in examples] == [f"{i:07d}" for i in range(6)]
    report = scan.scan_examples(examples)
    assert report.num_examples == 6 and report.image_sizes == {(38, 70): 6}
    assert set(report.label_value_counts) <= set(SYNTHIA_IDS.values()) | {0}
    batch = next(iter(readers.make_dataset(examples, batch_size=6)))
    expected = []
    for index in range(6):
        layout = synthetic.sample_example(5, "source", "train", index, (38, 70))[1]
        train_ids = labels.LABEL_ID_TO_TRAIN_ID[layout].copy()
        train_ids[layout == synthetic.TERRAIN] = labels.IGNORE_INDEX  # SYNTHIA has no terrain
        expected.append(train_ids)
    np.testing.assert_array_equal(batch["label"].numpy(), np.stack(expected))
    present = set(np.unique(batch["label"].numpy()).tolist()) - {labels.IGNORE_INDEX}
    assert len(present) >= 8 and present <= set(labels.SYNTHIA_ID_TO_TRAIN_ID.values())
    assert batch["image"].shape == (6, 38, 70, 3)
    # The target keeps its own size and the Cityscapes layout.
    target = readers.list_examples("cityscapes", os.path.join(synthia_pair, "target"), "val")
    assert scan.scan_examples(target).image_sizes == {(32, 64): 2}


def test_gta5_source_can_have_its_own_size(tmp_path):
    manifest = synthetic.generate_pair(str(tmp_path / "p"), seed=1, num_source=2,
                                       num_target_train=1, num_target_val=1, size=(32, 64),
                                       source_size=(40, 72))
    assert (manifest["size"], manifest["source_size"]) == ([32, 64], [40, 72])
    source = readers.list_examples("gta5", str(tmp_path / "p" / "source"))
    assert scan.scan_examples(source).image_sizes == {(40, 72): 2}
    target = readers.list_examples("cityscapes", str(tmp_path / "p" / "target"), "train")
    assert scan.scan_examples(target).image_sizes == {(32, 64): 1}
    with pytest.raises(ValueError, match="source_size"):
        synthetic.generate_pair(str(tmp_path / "q"), source_size=(8, 64))
    with pytest.raises(ValueError, match="source_layout"):
        synthetic.generate_pair(str(tmp_path / "q"), source_layout="cityscapes")
    assert not os.path.exists(tmp_path / "q")


def test_embedded_camera_default_is_unchanged():
    # Digest of what appearance version 2 drew before the camera became a parameter; numpy's
    # Generator streams and the drawing code decide it, the PNG encoder does not.
    digest = hashlib.sha256()
    for domain in synthetic.DOMAINS:
        for split in ("train", "val"):
            for index in range(3):
                image, layout = synthetic.sample_example(0, domain, split, index, (32, 64))
                digest.update(image.tobytes())
                digest.update(layout.tobytes())
    assert digest.hexdigest() == (
        "1cdeabfc1d92ba2992640e102ce5e0a170c21a97f8f24b27812a8354073c226e")
    assert synthetic.STYLES["target"] == synthetic.EMBEDDED_CAMERA.style()
    embedded = synthetic.sample_example(0, "target", "val", 1, (32, 64),
                                        synthetic.EMBEDDED_CAMERA)
    default = synthetic.sample_example(0, "target", "val", 1, (32, 64))
    for a, b in zip(embedded, default, strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_camera_repaints_the_target_only(tmp_path):
    camera = synthetic.Camera.random(1)
    synthetic.generate_pair(str(tmp_path / "embedded"), seed=2, **TINY)
    manifest = synthetic.generate_pair(str(tmp_path / "random"), seed=2, camera=camera, **TINY)
    assert manifest["camera"] == json.loads(json.dumps(dataclasses.asdict(camera)))
    embedded, other = _read_tree(str(tmp_path / "embedded")), _read_tree(str(tmp_path / "random"))
    assert embedded.keys() == other.keys()
    for key in embedded:
        if key.startswith("target") and "leftImg8bit" in key:
            assert embedded[key] != other[key], key
        elif key.endswith(".png"):  # source images, every label: the camera changes none
            assert embedded[key] == other[key], key
    looks = camera.style().class_looks
    source_car = synthetic.STYLES["source"].class_looks[synthetic.CAR][0]
    assert looks[synthetic.CAR][0] == synthetic.camera_response(
        source_car, camera.hue_degrees, camera.gamma, camera.gains)
    assert looks[synthetic.CAR][1:] == dict(
        (label_id, (name, amplitude)) for label_id, name, amplitude in camera.textures)[
        synthetic.CAR]
    colours = synthetic.domain_class_colors("target", 16, camera=camera)
    embedded_colours = synthetic.domain_class_colors("target", 16)
    drawn = list(synthetic.DRAWN_TRAIN_IDS)
    assert np.linalg.norm(colours[drawn] - embedded_colours[drawn], axis=1).mean() > 20


def test_random_cameras_are_deterministic_and_within_the_documented_ranges():
    assert synthetic.Camera.random(7) == synthetic.Camera.random(7)
    assert synthetic.Camera.random(7) != synthetic.Camera.random(8)
    ranges = synthetic.RANDOM_CAMERA_RANGES
    cameras = [synthetic.Camera.random(seed) for seed in range(300)]

    def spread(name, values):
        low, high = ranges[name]
        assert min(values) >= low and max(values) <= high, name
        # Uniform draws cover the range: a constant or a narrower range would not.
        assert min(values) < low + 0.1 * (high - low) and max(values) > high - 0.1 * (high - low)

    spread("hue_magnitude_degrees", [abs(c.hue_degrees) for c in cameras])
    assert 0.35 < np.mean([c.hue_degrees > 0 for c in cameras]) < 0.65
    spread("gamma", [c.gamma for c in cameras])
    spread("gain_red_blue", [c.gains[0] for c in cameras] + [c.gains[2] for c in cameras])
    assert {c.gains[1] for c in cameras} == {1.0}
    spread("colour_jitter", [c.colour_jitter for c in cameras])
    spread("brightness_low", [c.brightness[0] for c in cameras])
    spread("brightness_high", [c.brightness[1] for c in cameras])
    spread("tint_half_width", [round(c.tint[1] - 1.0, 3) for c in cameras])
    assert all(np.isclose(c.tint[0] + c.tint[1], 2.0) for c in cameras)
    spread("gradient_half_width", [c.gradient[1] for c in cameras])
    assert all(c.gradient[0] == -c.gradient[1] for c in cameras)
    spread("noise_std", [c.noise_std for c in cameras])
    spread("blur_sigma", [c.blur_sigma for c in cameras])
    spread("texture_amplitude", [a for c in cameras for _, _, a in c.textures])
    for camera in cameras:
        assert tuple(label_id for label_id, _, _ in camera.textures) == synthetic.DRAWN_LABEL_IDS
    names = [name for c in cameras for _, name, _ in c.textures]
    assert set(names) == set(synthetic.RANDOM_TEXTURES)
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(ValueError, match="seed"):
            synthetic.Camera.random(bad)
    textures = synthetic.EMBEDDED_CAMERA.textures
    with pytest.raises(ValueError, match="textures"):
        dataclasses.replace(synthetic.EMBEDDED_CAMERA, textures=textures[1:])
    with pytest.raises(ValueError, match="unknown textures"):
        dataclasses.replace(synthetic.EMBEDDED_CAMERA,
                            textures=((textures[0][0], "plaid", 0.1), *textures[1:]))


def test_ensure_synthetic_pair_records_layout_size_and_camera_and_refuses_others(tmp_path):
    root = str(tmp_path / "pair")
    params = dict(num_source=2, num_target_train=1, num_target_val=1, size=(32, 64))
    source_root, _ = synthetic.ensure_synthetic_pair(
        root, camera_seed=3, source_layout="synthia", source_size=(40, 64), **params)
    assert os.path.isfile(os.path.join(source_root, "GT", "LABELS", "0000001.png"))
    with open(os.path.join(root, synthetic.MANIFEST_NAME)) as f:
        manifest = json.load(f)
    assert (manifest["camera_seed"], manifest["source_layout"], manifest["source_size"]) == (
        3, "synthia", [40, 64])
    assert manifest["camera"] == synthetic.Camera.random(3).to_json()
    again = dict(camera_seed=3, source_layout="synthia", source_size=(40, 64), **params)
    assert synthetic.ensure_synthetic_pair(root, **again)[0] == source_root
    for change, name in ((dict(camera_seed=4), "camera_seed"), (dict(camera_seed=None), "camera"),
                         (dict(source_layout="gta5"), "source_layout"),
                         (dict(source_size=(32, 64)), "source_size")):
        with pytest.raises(ValueError, match=name):
            synthetic.ensure_synthetic_pair(root, **{**again, **change})
    with pytest.raises(ValueError, match="camera_seed"):
        synthetic.ensure_synthetic_pair(str(tmp_path / "x"), camera_seed=2.0)


def test_a_pair_from_before_the_camera_parameters_is_still_recognised(tmp_path):
    root = str(tmp_path / "pair")
    synthetic.ensure_synthetic_pair(root, **TINY)
    manifest_path = os.path.join(root, synthetic.MANIFEST_NAME)
    with open(manifest_path) as f:
        manifest = json.load(f)
    for key in ("source_layout", "source_size", "camera_seed", "camera"):
        del manifest[key]
    with open(manifest_path, "w") as f:
        json.dump(manifest, f)
    assert synthetic.ensure_synthetic_pair(root, **TINY)[0] == os.path.join(root, "source")
    with pytest.raises(ValueError, match="camera_seed"):
        synthetic.ensure_synthetic_pair(root, camera_seed=0, **TINY)
