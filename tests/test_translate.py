"""Translating a source set to disk: exact images and labels, resumability, M + F composition,
and the command line on a tiny run directory."""

import os
import subprocess
import sys

import fixture_trees
import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from sait_tf import images, labels, translate
from sait_tf.data import readers, translated_set
from sait_tf.models.translator import build_translator
from sait_tf.run_dir import RunDir, guide_stage, translator_stage
from sait_tf.runtime import checkpoints, files

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def invert(pixels):
    return 255.0 - pixels


class CountingTranslation:
    """255 - x, counting calls; raises after ``fail_after`` calls (a kill mid-run)."""

    def __init__(self, fail_after=None):
        self.calls, self.fail_after = 0, fail_after

    def __call__(self, pixels):
        if self.fail_after is not None and self.calls == self.fail_after:
            raise RuntimeError("killed")
        self.calls += 1
        return invert(pixels)


def _read_rgb(path):
    return np.asarray(Image.open(path).convert("RGB"))


def _all_files(root):
    return sorted(os.path.relpath(os.path.join(folder, name), root)
                  for folder, _, names in os.walk(root) for name in names)


def _train_ids_as_read(root, resize=None):
    """trainIds of a gta5 tree as the segmentation stage reads it."""
    dataset = readers.make_dataset(readers.list_examples("gta5", root), resize=resize)
    return [batch["label"][0].numpy() for batch in dataset]


def test_translated_gta5_set_has_the_expected_images_and_the_same_train_ids(tmp_path):
    source, out = str(tmp_path / "gta5"), str(tmp_path / "out")
    expected_ids = fixture_trees.make_gta5_tree(source, num=3, seed=1)
    examples = readers.list_examples("gta5", source)
    assert translate.translate_dataset(invert, examples, out, batch_size=2) == 3

    assert _all_files(out) == ["DONE"] + [f"{d}/0000{i}.png" for d in ("images", "labels")
                                          for i in (1, 2, 3)]
    for example in examples:
        np.testing.assert_array_equal(_read_rgb(f"{out}/images/{example.name}.png"),
                                      255 - _read_rgb(example.image))
    read_back = _train_ids_as_read(out)
    for got, want in zip(read_back, expected_ids, strict=True):
        np.testing.assert_array_equal(got, want)
    assert any((ids == labels.IGNORE_INDEX).any() for ids in read_back)
    # GTA5 layout: palette PNG, index = labelId (ignore written as 0 "unlabeled"), GTA5 colours.
    label = Image.open(f"{out}/labels/00001.png")
    assert label.mode == "P"
    np.testing.assert_array_equal(
        np.asarray(label), np.where(expected_ids[0] == labels.IGNORE_INDEX, 0,
                                    np.asarray(labels.TRAIN_ID_TO_LABEL_ID_TABLE)[expected_ids[0]]))
    np.testing.assert_array_equal(np.asarray(label.getpalette()[:3 * labels.NUM_LABEL_IDS]),
                                  labels.LABEL_ID_PALETTE[:labels.NUM_LABEL_IDS].reshape(-1))


def test_resize_applies_to_images_and_labels_as_the_reader_does(tmp_path):
    source, out = str(tmp_path / "synthia"), str(tmp_path / "out")
    fixture_trees.make_synthia_tree(source, num=2, size=(24, 40), seed=2)
    examples = readers.list_examples("synthia", source)
    translate.translate_dataset(invert, examples, out, resize=(12, 20))
    reference = list(readers.make_dataset(examples, resize=(12, 20)))
    for batch, got_ids in zip(reference, _train_ids_as_read(out), strict=True):
        name = batch["name"][0].numpy().decode()
        np.testing.assert_array_equal(_read_rgb(f"{out}/images/{name}.png"),
                                      images.to_uint8(invert(batch["image"][0])).numpy())
        np.testing.assert_array_equal(got_ids, batch["label"][0].numpy())


def test_cityscapes_names_become_subfolders(tmp_path):
    source, out = str(tmp_path / "cityscapes"), str(tmp_path / "out")
    expected_ids = fixture_trees.make_cityscapes_tree(source, splits=("train",), per_city=1)
    examples = readers.list_examples("cityscapes", source, "train")
    translate.translate_dataset(invert, examples, out)
    for example, want in zip(examples, expected_ids, strict=True):
        image_path, label_path = translated_set.output_paths(out, example.name)
        assert image_path == f"{out}/images/{example.name}.png" and "/" in example.name
        np.testing.assert_array_equal(_read_rgb(image_path), 255 - _read_rgb(example.image))
        np.testing.assert_array_equal(readers.read_train_ids(label_path, "gta5"), want)


def test_a_killed_run_resumes_with_only_the_missing_examples(tmp_path):
    source, out = str(tmp_path / "gta5"), str(tmp_path / "out")
    fixture_trees.make_gta5_tree(source, num=5, seed=3)
    examples = readers.list_examples("gta5", source)
    first = CountingTranslation(fail_after=2)
    with pytest.raises(RuntimeError, match="killed"):
        translate.translate_dataset(first, examples, out)
    assert not files.is_done(out)
    written = [translated_set.is_translated(out, ex.name) for ex in examples]
    assert written == [True, True] + [False] * 3
    # What a kill during writing leaves: a temporary file, and an image without its label.
    with open(f"{out}/images/.00003.png.tmp", "wb") as f:
        f.write(b"\x89PNG truncated")
    Image.fromarray(np.zeros((24, 40, 3), np.uint8)).save(f"{out}/images/00004.png")
    assert not translated_set.is_translated(out, "00003")
    assert not translated_set.is_translated(out, "00004")

    second = CountingTranslation()
    assert translate.translate_dataset(second, examples, out) == 3
    assert second.calls == 3
    assert files.is_done(out)
    assert not [name for name in _all_files(out) if name.endswith(".tmp")]
    for example in examples:
        np.testing.assert_array_equal(_read_rgb(f"{out}/images/{example.name}.png"),
                                      255 - _read_rgb(example.image))

    third = CountingTranslation()
    assert translate.translate_dataset(third, examples, out) == 0 and third.calls == 0
    again = CountingTranslation()
    assert translate.translate_dataset(again, examples, out, overwrite=True, batch_size=2) == 5
    assert again.calls == 3


def test_bad_inputs_fail_before_any_work(tmp_path):
    source = str(tmp_path / "gta5")
    fixture_trees.make_gta5_tree(source, num=1)
    examples = readers.list_examples("gta5", source)
    with pytest.raises(ValueError, match="no label"):
        translate.translate_dataset(invert, [examples[0]._replace(label=None)], str(tmp_path))
    with pytest.raises(ValueError, match="returned shape"):
        translate.translate_dataset(lambda x: x[:, :8], examples, str(tmp_path / "out"))
    with pytest.raises(ValueError, match="would leave"):
        translated_set.output_paths(str(tmp_path), "../escape")


def test_stage_names_follow_the_rounds():
    assert (guide_stage(1), translator_stage(1)) == (
        "source_only", "round_01_translator")
    assert (guide_stage(3), translator_stage(3)) == (
        "round_02_segmenter", "round_03_translator")
    with pytest.raises(ValueError, match="rounds are numbered from 1"):
        guide_stage(0)


def _tiny_models(residual_norm="spade"):
    segmenter = keras.Sequential([keras.Input((None, None, 3)), keras.layers.Conv2D(19, 1)])
    translator = build_translator(19, dim=4, num_downsamplings=1, num_residual_blocks=1,
                                  spade_hidden=4, residual_norm=residual_norm)
    return segmenter, translator


def test_translate_fn_feeds_m_pixels_and_f_unit_range_images():
    segmenter, translator = _tiny_models()
    pixels = tf.random.uniform([2, 8, 12, 3], 0.0, 255.0, seed=1)
    got = translate.make_translate_fn(segmenter, translator)(pixels)
    expected = images.unit_to_pixels(translator.translate(
        images.pixels_to_unit(pixels), segmenter(pixels), "source", "target"))
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-4, atol=1e-3)
    other_way = translate.make_translate_fn(segmenter, translator, "target", "source")(pixels)
    assert np.abs(other_way.numpy() - got.numpy()).max() > 1.0
    wrong_guidance = images.unit_to_pixels(translator.translate(
        images.pixels_to_unit(pixels), segmenter(images.pixels_to_unit(pixels)),
        "source", "target"))
    assert np.abs(wrong_guidance.numpy() - got.numpy()).max() > 1e-2


def test_translate_fn_of_an_unguided_translator_does_not_run_m():
    _, translator = _tiny_models(residual_norm="in")

    def segmenter(pixels, training=False):
        raise AssertionError("M must not run for an IN translator")

    # Not a constant image: instance norm of a flat map amplifies round-off, which differs
    # between the traced and the eager call once oneDNN fuses the traced graph's ops.
    pixels = tf.random.stateless_uniform([1, 8, 8, 3], seed=(3, 4), maxval=255.0)
    got = translate.make_translate_fn(segmenter, translator)(pixels)
    expected = images.unit_to_pixels(translator.translate(
        images.pixels_to_unit(pixels), None, "source", "target"))
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-4, atol=1e-3)


RUN_CONFIG = """
build_segmenter.arch = 'fcn8s'
build_segmenter.width_multiplier = 0.03125
build_translator.dim = 4
build_translator.num_downsamplings = 1
build_translator.num_residual_blocks = 1
build_translator.spade_hidden = 4
unknown_configurable.value = 1
"""


@pytest.mark.slow
def test_command_line_restores_the_round_and_translates_at_the_run_size(tmp_path):
    """A run directory with round 2's F and round 1's M: the CLI output equals in-process
    translation with the same weights, at the source size the run recorded in run.json."""
    from sait_tf.models import build_segmenter

    run_dir, source, out = (str(tmp_path / d) for d in ("run", "gta5", "out"))
    fixture_trees.make_gta5_tree(source, num=2, seed=4)
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, "config.gin"), "w") as f:
        f.write(RUN_CONFIG)
    with open(os.path.join(run_dir, "run.json"), "w") as f:
        f.write('{"source": {"resize": [16, 24]}}')
    segmenter = build_segmenter("fcn8s", width_multiplier=0.03125)
    translator = build_translator(segmenter.num_classes, dim=4, num_downsamplings=1,
                                  num_residual_blocks=1, spade_hidden=4)
    translator.build()
    translate_fn = translate.make_translate_fn(segmenter, translator)
    examples = readers.list_examples("gta5", source)
    expected = [images.to_uint8(translate_fn(batch["image"]))[0].numpy()
                for batch in readers.make_dataset(examples, resize=(16, 24))]
    for stage, trackables in (("round_01_segmenter", {"segmenter": segmenter}),
                              ("round_02_translator", {"translator": translator})):
        stage_dir = os.path.join(run_dir, "checkpoints", stage)
        checkpoints.StageCheckpoint(stage_dir, **trackables).save(7)
        files.mark_done(stage_dir)

    command = [sys.executable, "-m", "sait_tf.translate", f"--run_dir={run_dir}", "--round=2",
               "--source_dataset=gta5", f"--source_root={source}", f"--out={out}"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    for example, want in zip(examples, expected, strict=True):
        got = _read_rgb(f"{out}/images/{example.name}.png")
        assert got.shape == (16, 24, 3)
        np.testing.assert_allclose(got, want, atol=1)
    assert files.is_done(out)


def test_unfinished_stages_are_reported_before_any_model_is_built(tmp_path):
    files.mark_done(str(tmp_path / "checkpoints" / "source_only"))
    with pytest.raises(FileNotFoundError, match="round_01_translator"):
        translate.restore_models(str(tmp_path), 1)
    with pytest.raises(FileNotFoundError, match="has no config.gin"):
        RunDir(str(tmp_path)).load_config()
