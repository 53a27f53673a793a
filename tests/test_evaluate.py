"""sait_tf.evaluate: equality with cityscapesScripts, hand-computed in-process evaluation."""

import glob
import json
import math
import os
import subprocess
import sys

import gin
import keras
import numpy as np
import pytest
import tensorflow as tf
from absl import app, flags
from fixture_trees import make_cityscapes_tree, make_gta5_tree, write_gray8
from PIL import Image

from sait_tf import evaluate, images, labels
from sait_tf.data import readers
from sait_tf.metrics import ConfusionMatrix

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_LABEL_ID, BUS_LABEL_ID = 31, 28
SIZE = (32, 48)


def _assert_same_result(result: dict, expected: dict) -> None:
    assert result["num_classes"] == expected["num_classes"]
    assert result["mIoU"] == pytest.approx(expected["mIoU"], abs=1e-10, nan_ok=True)
    assert result["per_class_iou"] == pytest.approx(expected["per_class_iou"], abs=1e-10,
                                                    nan_ok=True)


def _parsed_flags(*args: str) -> flags.FlagValues:
    values = flags.FlagValues()
    evaluate.define_flags(values)
    values(["evaluate", *args])
    return values


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sait_tf.evaluate", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture
def cityscapes(tmp_path):
    """A Cityscapes val tree, labelId predictions with void ids, and the GT copy for
    cityscapesScripts (which stops on the license-plate value 255: there it is 0, another
    ignored id, so both evaluate the same pixels).

    No ground-truth pixel is train (never predicted either: NaN) or bus (predicted: IoU 0).
    """
    root, pred_dir, cs_root = tmp_path / "cityscapes", tmp_path / "results", tmp_path / "cs"
    make_cityscapes_tree(str(root), splits=("val",), size=SIZE)
    rng = np.random.default_rng(7)
    for gt_path in sorted(glob.glob(str(root / "gtFine/val/*/*_gtFine_labelIds.png"))):
        gt = np.asarray(Image.open(gt_path)).copy()
        gt[gt == TRAIN_LABEL_ID] = 7
        gt[gt == BUS_LABEL_ID] = 8
        write_gray8(gt_path, gt)
        write_gray8(gt_path.replace(str(root), str(cs_root)), np.where(gt == 255, 0, gt))
        guess = rng.integers(0, labels.NUM_LABEL_IDS, size=gt.shape)  # void ids 0..6 included
        pred = np.where((rng.random(gt.shape) < 0.5) & (gt != 255), gt, guess)
        pred[pred == TRAIN_LABEL_ID] = 0
        city, base = gt_path.split(os.sep)[-2], os.path.basename(gt_path)[:-len(
            "_gtFine_labelIds.png")]
        write_gray8(str(pred_dir / city / f"{base}_leftImg8bit.png"), pred)
    return root, pred_dir, cs_root


def _cityscapes_scripts(monkeypatch, cs_root, pred_dir) -> dict:
    """evalPixelLevelSemanticLabeling.evaluateImgLists on every gtFine/val label."""
    monkeypatch.setenv("CITYSCAPES_DATASET", str(cs_root))
    monkeypatch.setenv("CITYSCAPES_RESULTS", str(pred_dir))
    cs_eval = pytest.importorskip("cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling")

    settings = {"quiet": True, "JSONOutput": False, "evalInstLevelScore": False,
                "evalPixelAccuracy": False, "colorized": False, "predictionPath": None,
                "predictionWalk": None, "evalLabels": []}
    for name, value in settings.items():
        monkeypatch.setattr(cs_eval.args, name, value)
    ground_truth = sorted(glob.glob(str(cs_root / "gtFine/val/*/*_gtFine_labelIds.png")))
    predictions = [cs_eval.getPrediction(cs_eval.args, gt) for gt in ground_truth]
    return cs_eval.evaluateImgLists(predictions, ground_truth, cs_eval.args)


def test_cli_equals_cityscapes_scripts(cityscapes, monkeypatch, tmp_path):
    root, pred_dir, cs_root = cityscapes
    reference = _cityscapes_scripts(monkeypatch, cs_root, pred_dir)
    output = tmp_path / "out" / "eval.json"
    run = _run_cli("--dataset=cityscapes", f"--root={root}", "--split=val",
                   f"--pred_dir={pred_dir}", f"--output={output}")
    assert run.returncode == 0, run.stderr[-3000:]
    with open(output) as f:
        ours = json.load(f)
    assert ours["num_classes"] == 19
    assert list(ours["per_class_iou"]) == list(labels.class_names(19))
    for name, iou in ours["per_class_iou"].items():
        theirs = reference["classScores"][name]
        if math.isnan(theirs):
            assert iou is None, name  # strict JSON: an undefined IoU is null
        else:
            assert iou / 100 == pytest.approx(theirs, abs=1e-12), name
    assert ours["per_class_iou"]["train"] is None
    assert ours["per_class_iou"]["bus"] == 0.0
    assert ours["mIoU"] / 100 == pytest.approx(reference["averageScoreClasses"], abs=1e-12)

    # The 16 and 13 subsets are the mean of cityscapesScripts' IoUs over those classes.
    examples = readers.list_examples("cityscapes", str(root), split="val")
    for reported in (16, 13):
        subset = evaluate.evaluate_prediction_dir(examples, str(pred_dir), "cityscapes",
                                                  reported)
        expected = np.nanmean([reference["classScores"][n] for n in labels.class_names(reported)])
        assert subset["mIoU"] / 100 == pytest.approx(expected, abs=1e-12)


def test_void_predictions_count_as_false_negatives(cityscapes):
    root, pred_dir, _ = cityscapes
    examples = readers.list_examples("cityscapes", str(root), split="val")
    predictions = evaluate.match_predictions(examples, str(pred_dir), "cityscapes")
    with_void, void_ignored = ConfusionMatrix(), ConfusionMatrix()
    for example, prediction in zip(examples, predictions, strict=True):
        gt = readers.read_train_ids(example.label, example.label_format)
        pred = evaluate.read_prediction(prediction)
        assert (pred == labels.IGNORE_INDEX).any()
        with_void.update(gt, pred)
        void_ignored.update(np.where(pred == labels.IGNORE_INDEX, labels.IGNORE_INDEX, gt), pred)
    result = evaluate.evaluate_prediction_dir(examples, str(pred_dir), "cityscapes")
    assert result["mIoU"] == pytest.approx(100 * with_void.mean_iou(), abs=1e-12)
    assert result["mIoU"] < 100 * void_ignored.mean_iou() - 1.0


def test_missing_duplicate_and_mis_sized_predictions_name_the_files(cityscapes):
    root, pred_dir, _ = cityscapes
    examples = readers.list_examples("cityscapes", str(root), split="val")
    first = evaluate.match_predictions(examples, str(pred_dir), "cityscapes")[0]

    duplicate = pred_dir / "extra" / os.path.basename(first).replace("_leftImg8bit", "_x")
    duplicate.parent.mkdir()
    duplicate.write_bytes(open(first, "rb").read())
    with pytest.raises(ValueError, match="found 2 predictions") as error:
        evaluate.evaluate_prediction_dir(examples, str(pred_dir), "cityscapes")
    assert examples[0].label in str(error.value) and str(duplicate) in str(error.value)
    duplicate.unlink()

    write_gray8(first, np.zeros((SIZE[0], SIZE[1] + 1)))
    with pytest.raises(ValueError, match="49x32 .WxH. but ground truth") as error:
        evaluate.evaluate_prediction_dir(examples, str(pred_dir), "cityscapes")
    assert first in str(error.value) and examples[0].label in str(error.value)

    os.remove(first)
    with pytest.raises(FileNotFoundError, match="no prediction for ground truth") as error:
        evaluate.evaluate_prediction_dir(examples, str(pred_dir), "cityscapes")
    assert examples[0].label in str(error.value)
    assert "aachen_000000_000019*.png" in str(error.value)


def test_prediction_that_is_no_label_id_is_rejected(tmp_path):
    path = str(tmp_path / "p.png")
    write_gray8(path, np.array([[7, 34]]))
    with pytest.raises(ValueError, match="p.png contains 34"):
        evaluate.read_prediction(path)


def test_gta5_predictions_match_by_image_file_name(tmp_path):
    root, pred_dir = tmp_path / "gta5", tmp_path / "pred"
    ground_truth = make_gta5_tree(str(root), num=3, size=(8, 12))
    rng = np.random.default_rng(1)
    expected = ConfusionMatrix()
    for index, gt in enumerate(ground_truth, start=1):
        pred = rng.integers(0, labels.NUM_LABEL_IDS, size=gt.shape)
        write_gray8(str(pred_dir / ("nested" if index == 2 else "") / f"{index:05d}.png"), pred)
        expected.update(gt, labels.LABEL_ID_TO_TRAIN_ID[pred])
    examples = readers.list_examples("gta5", str(root))
    result = evaluate.evaluate_prediction_dir(examples, str(pred_dir), "gta5")
    _assert_same_result(result, expected.to_json())


class HalfResolutionOneHot(keras.Model):
    """Logits at half resolution: one-hot of the red channel (a trainId) of every 2nd pixel."""

    def call(self, image):
        return 10.0 * tf.one_hot(tf.cast(image[:, ::2, ::2, 0], tf.int32), labels.NUM_CLASSES)


# Predictions are 2x2 blocks; the bilinearly upsampled one-hot logits keep each block's class.
PRED_BLOCKS = np.array([[[0, 1], [2, 0]], [[1, 1], [0, 2]]])
GROUND_TRUTH = np.array([
    [[0, 0, 1, 1], [0, 0, 1, 255], [2, 2, 0, 0], [2, 1, 0, 0]],
    [[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 2, 2], [0, 0, 2, 2]],
])
# road TP 12 FN 2 FP 0; sidewalk TP 9 FN 1 FP 2; building TP 7 FN 0 FP 1 (255 ignored).
EXPECTED_IOU = {"road": 12 / 14, "sidewalk": 9 / 12, "building": 7 / 8}


def _block_dataset() -> tf.data.Dataset:
    predicted = PRED_BLOCKS.repeat(2, axis=1).repeat(2, axis=2)
    image = np.zeros((*predicted.shape, 3), np.float32)
    image[..., 0] = predicted
    return tf.data.Dataset.from_tensor_slices({
        "image": image, "label": GROUND_TRUTH.astype(np.int32), "name": ["a", "sub/b"]}).batch(2)


def _assert_block_result(result: dict) -> None:
    assert result["mIoU"] == pytest.approx(100 * sum(EXPECTED_IOU.values()) / 3, abs=1e-10)
    for name, iou in EXPECTED_IOU.items():
        assert result["per_class_iou"][name] == pytest.approx(100 * iou, abs=1e-10)
    assert math.isnan(result["per_class_iou"]["wall"])


def test_evaluate_segmenter_by_hand_and_written_predictions(tmp_path):
    pred_dir, color_dir = tmp_path / "pred", tmp_path / "color"
    model = HalfResolutionOneHot()
    result = evaluate.evaluate_segmenter(model, _block_dataset(),
                                         colorized_dir=str(color_dir),
                                         prediction_dir=str(pred_dir))
    # The logits are up-sampled to the label size (align_corners, as the peers) before the
    # argmax; the numbers are those of that prediction against the ground truth.
    image = next(iter(_block_dataset()))["image"]
    predicted = tf.argmax(images.resize_logits(model(image), GROUND_TRUTH.shape[1:]),
                          axis=-1).numpy()
    assert (predicted != PRED_BLOCKS.repeat(2, axis=1).repeat(2, axis=2)).mean() < 0.25
    expected = ConfusionMatrix()
    expected.update(GROUND_TRUTH, predicted)
    _assert_same_result(result, expected.to_json())
    for name, train_ids in zip(["a", "sub/b"], predicted, strict=True):
        written = np.asarray(Image.open(pred_dir / f"{name}.png"))
        np.testing.assert_array_equal(written, np.take(labels.TRAIN_ID_TO_LABEL_ID, train_ids))
        colours = np.asarray(Image.open(color_dir / f"{name}.png"))
        np.testing.assert_array_equal(colours, labels.PALETTE[train_ids])

    # The written labelId PNGs evaluate to the same numbers in --pred_dir mode.
    examples = []
    for name, gt in zip(["a", "sub/b"], GROUND_TRUTH, strict=True):
        write_gray8(str(tmp_path / "gt" / f"{name}.png"), gt)
        examples.append(readers.Example("", str(tmp_path / "gt" / f"{name}.png"),
                                        name.split("/")[-1], "trainid"))
    _assert_same_result(evaluate.evaluate_prediction_dir(examples, str(pred_dir), "gta5"), result)


def test_evaluate_saved_model(tmp_path):
    class RedChannel(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8)])
        def serve(self, images):
            return {"labels": tf.cast(images[..., 0], tf.int32)}

    module = RedChannel()
    tf.saved_model.save(module, str(tmp_path / "sm"), signatures={"serving_default": module.serve})
    _assert_block_result(evaluate.evaluate_saved_model(str(tmp_path / "sm"), _block_dataset()))


def test_program_with_checkpoint_equals_in_process_evaluation(tmp_path):
    from sait_tf.models import build_segmenter
    from sait_tf.runtime.checkpoints import StageCheckpoint

    root = tmp_path / "cityscapes"
    make_cityscapes_tree(str(root), splits=("val",), size=SIZE, per_city=1)
    bindings = ["build_segmenter.arch='fcn8s'", "build_segmenter.width_multiplier=0.0625"]
    model = build_segmenter("fcn8s", width_multiplier=0.0625)
    rng = np.random.default_rng(0)
    for weight in model.weights:  # non-zero score layers, so a failed restore shows
        weight.assign(rng.normal(0.0, 0.1, weight.shape).astype(np.float32))
    StageCheckpoint(str(tmp_path / "stage"), segmenter=model).save(1)
    model.save_weights(str(tmp_path / "m.weights.h5"))
    examples = readers.list_examples("cityscapes", str(root), split="val")
    dataset = evaluate.evaluation_dataset(examples, (16, 24))
    expected = evaluate.evaluate_segmenter(model, dataset)
    untrained = evaluate.evaluate_segmenter(build_segmenter("fcn8s", width_multiplier=0.0625),
                                            dataset)
    assert expected["mIoU"] != pytest.approx(untrained["mIoU"])

    output = tmp_path / "eval.json"
    try:
        evaluate.evaluate_from_flags(_parsed_flags(
            "--dataset=cityscapes", f"--root={root}", f"--checkpoint={tmp_path / 'stage'}",
            "--input_size=16,24", f"--output={output}", *[f"--gin_param={b}" for b in bindings]))
        restored = evaluate.build_model_from_checkpoint(str(tmp_path / "m.weights.h5"))
    finally:
        gin.clear_config()
    with open(output) as f:
        _assert_same_result(json.load(f), expected)
    for original, loaded in zip(model.weights, restored.weights, strict=True):
        np.testing.assert_array_equal(original.numpy(), loaded.numpy())


@pytest.mark.parametrize("args, message", [
    (("--pred_dir=p", "--saved_model=s"), "exactly one of --pred_dir, --checkpoint"),
    (("--pred_dir=p", "--num_classes=18"), "--num_classes must be one of"),
    (("--pred_dir=p", "--input_size=4,4"), "--input_size applies only to --checkpoint"),
    (("--checkpoint=missing.weights.h5",), "neither a stage checkpoint directory"),
])
def test_flag_errors_before_any_work(args, message):
    with pytest.raises(app.UsageError, match=message):
        evaluate.check_flags(_parsed_flags("--dataset=cityscapes", "--root=r", "--output=o",
                                           *args))
