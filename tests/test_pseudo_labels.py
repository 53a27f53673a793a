"""Pseudo-labels Y_T^SSL (Eq. 9): known logits -> exact labels, median variant, files, resume."""

import os

import fixture_trees
import keras
import numpy as np
import tensorflow as tf
from PIL import Image

from sait_tf.data import readers
from sait_tf.runtime import files
from sait_tf.train import pseudo_labels as pl


def _logits_for(probabilities: list[list[float]]) -> tf.Tensor:
    """[1, 1, N, C] logits whose softmax is ``probabilities`` (rows sum to 1)."""
    return tf.math.log(tf.constant([[probabilities]], tf.float32))


def test_fixed_threshold_known_logits():
    logits = _logits_for([[0.95, 0.03, 0.02],   # confident road
                          [0.85, 0.10, 0.05],   # below 0.9: ignored
                          [0.01, 0.02, 0.97],   # confident class 2
                          [0.05, 0.91, 0.04],   # just above 0.9
                          [0.34, 0.33, 0.33]])  # uncertain
    confidence, prediction = pl.confidences_and_argmax(logits, (1, 5))
    got = pl.apply_thresholds(confidence, prediction, np.full(3, 0.9))
    np.testing.assert_array_equal(got, [[[0, 255, 2, 1, 255]]])


def test_probabilities_are_upsampled_after_the_softmax_as_in_bdl():
    """Two output pixels, p(class 0) 0.99 and 0.8, up-sampled to three: the middle pixel's
    confidence is the mean probability 0.895 (BDL's SSL.py), below 0.9; the softmax of the
    mean logits would be 0.952 and keep it."""
    logits = _logits_for([[0.99, 0.01], [0.8, 0.2]])
    confidence, prediction = pl.confidences_and_argmax(logits, (1, 3))
    np.testing.assert_allclose(confidence, [[[0.99, 0.895, 0.8]]], rtol=1e-6)
    np.testing.assert_array_equal(prediction, [[[0, 0, 0]]])
    got = pl.apply_thresholds(confidence, prediction, np.full(2, 0.9))
    np.testing.assert_array_equal(got, [[[0, 255, 255]]])


def test_class_median_thresholds_capped_at_th_ssl():
    # Class 0 confidences 0.5, 0.6, 0.95: median 0.6 keeps 0.6 and 0.95, drops 0.5.
    # Class 1 confidences 0.92, 0.95, 0.97, 0.99: median (rank 2) 0.97, capped at 0.9: all kept.
    probs = [[0.5, 0.4, 0.1], [0.6, 0.3, 0.1], [0.95, 0.04, 0.01],
             [0.04, 0.92, 0.04], [0.02, 0.95, 0.03], [0.01, 0.97, 0.02], [0.005, 0.99, 0.005]]
    confidence, prediction = pl.confidences_and_argmax(_logits_for(probs), (1, 7))
    histogram = pl.confidence_histogram(confidence, prediction, num_classes=3)
    thresholds = pl.class_median_thresholds(histogram, th_ssl=0.9)
    np.testing.assert_allclose(thresholds, [0.6, 0.9, 0.9], atol=2 / pl.HISTOGRAM_BINS)
    assert thresholds[0] <= confidence[0, 0, 1]  # the median pixel itself is kept
    got = pl.apply_thresholds(confidence, prediction, thresholds)
    np.testing.assert_array_equal(got, [[[255, 0, 0, 1, 1, 1, 1]]])


def _pixel_segmenter() -> keras.Model:
    """Logits = (RGB - 128) / 32: the class is the brightest channel, confidence from the gap.

    On the fixture's random pixels about a third reach 0.9 and the class medians are near 0.8.
    """
    inputs = keras.Input((None, None, 3))
    model = keras.Model(inputs, keras.layers.Rescaling(1 / 32, offset=-4.0)(inputs))
    model.num_classes = 3  # as build_segmenter's models have it
    return model


def _reference(image: np.ndarray, class_median: bool, all_images: list[np.ndarray]) -> np.ndarray:
    """Eq. 9 in float64 numpy with exact per-class medians (rank n // 2)."""
    def softmax(img):
        logits = (img.astype(np.float64) - 128) / 32
        e = np.exp(logits - logits.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    thresholds = np.full(3, 0.9)
    if class_median:
        probs = np.concatenate([softmax(img).reshape(-1, 3) for img in all_images])
        conf, pred = probs.max(-1), probs.argmax(-1)
        for cls in range(3):
            values = np.sort(conf[pred == cls])
            if len(values):
                thresholds[cls] = min(values[len(values) // 2], 0.9)
    probs = softmax(image)
    conf, pred = probs.max(-1), probs.argmax(-1)
    return np.where(conf >= thresholds[pred], pred, 255).astype(np.uint8)


def _tree(tmp_path) -> list[readers.Example]:
    root = str(tmp_path / "cityscapes")
    fixture_trees.make_cityscapes_tree(root, splits=("train",), size=(16, 24))
    return readers.list_examples("cityscapes", root, "train")


def _read(out_dir: str, example: readers.Example) -> np.ndarray:
    return np.asarray(Image.open(os.path.join(out_dir, f"{example.name}.png")))


def test_generate_writes_exact_labels_and_resumes(tmp_path):
    examples = _tree(tmp_path)
    out_dir = str(tmp_path / "pl")
    assert pl.generate_pseudo_labels(_pixel_segmenter(), examples, out_dir) == len(examples)
    images = [np.asarray(Image.open(ex.image)) for ex in examples]
    for example, image in zip(examples, images, strict=True):
        np.testing.assert_array_equal(_read(out_dir, example), _reference(image, False, images))
    assert files.is_done(out_dir)
    assert {ex.name for ex in readers.list_examples(
        "cityscapes", str(tmp_path / "cityscapes"), "train", labels_from=out_dir)} == {
            ex.name for ex in examples}

    # Done: nothing is rewritten. Interrupted (no DONE, one file missing): only it is written.
    assert pl.generate_pseudo_labels(_pixel_segmenter(), examples, out_dir) == 0
    os.remove(os.path.join(out_dir, "DONE"))
    os.remove(os.path.join(out_dir, f"{examples[1].name}.png"))
    assert pl.generate_pseudo_labels(_pixel_segmenter(), examples, out_dir) == 1
    np.testing.assert_array_equal(_read(out_dir, examples[1]),
                                  _reference(images[1], False, images))


def test_generate_class_median_variant_and_resize(tmp_path):
    examples = _tree(tmp_path)
    out_dir = str(tmp_path / "pl_median")
    pl.generate_pseudo_labels(_pixel_segmenter(), examples, out_dir, class_median=True)
    images = [np.asarray(Image.open(ex.image)) for ex in examples]
    for example, image in zip(examples, images, strict=True):
        got = _read(out_dir, example)
        np.testing.assert_array_equal(got, _reference(image, True, images))
        assert np.sum(got != 255) > np.sum(_reference(image, False, images) != 255)
    assert os.path.exists(os.path.join(out_dir, pl.THRESHOLDS_FILE))

    resized_dir = str(tmp_path / "pl_resized")
    pl.generate_pseudo_labels(_pixel_segmenter(), examples, resized_dir, resize=(8, 12))
    assert _read(resized_dir, examples[0]).shape == (8, 12)
