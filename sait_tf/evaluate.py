"""Semantic-segmentation evaluation equal to cityscapesScripts' evalPixelLevelSemanticLabeling.

``python -m sait_tf.evaluate --dataset cityscapes --root ROOT --output FILE.json`` with one of
  --pred_dir DIR      labelId PNGs in the cityscapesScripts result format;
  --checkpoint PATH   a ``.weights.h5`` file or a run's stage checkpoint directory, the
                      architecture from gin (``--gin_param="build_segmenter.arch='deeplabv2'"``);
  --saved_model PATH  a SavedModel whose ``serving_default`` maps ``images`` (uint8) to
                      ``labels`` (trainIds at the input size), as ``sait_tf.export`` writes.
The JSON is ``sait_tf.metrics.ConfusionMatrix.to_json``: mIoU and per-class IoU in percent.
Trainers call ``evaluate_segmenter`` in-process. See docs/evaluation.md.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Callable, Iterable, Sequence

import gin
import keras
import numpy as np
import tensorflow as tf
from absl import app, flags, logging
from PIL import Image

from sait_tf import cli, images, labels
from sait_tf.cli import parse_size
from sait_tf.data import readers, scan
from sait_tf.metrics import ConfusionMatrix, confusion_counts
from sait_tf.models import build_segmenter
from sait_tf.runtime import checkpoints, files
from sait_tf.runtime.progress import Progress
from sait_tf.runtime.workers import Workers

# The network is built on this input before restoring, so every variable exists.
_BUILD_INPUT_SHAPE = (1, 64, 64, 3)
# A checkpoint path ending like this is a Keras weights file; anything else a stage directory.
_KERAS_WEIGHTS_SUFFIX = ".weights.h5"

Predictor = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]


def evaluate_segmenter(model: keras.Model, dataset: Iterable[dict],
                       num_classes_reported: int = labels.NUM_CLASSES,
                       colorized_dir: str | None = None,
                       prediction_dir: str | None = None) -> dict:
    """mIoU of ``model`` over ``dataset`` (dicts "image" [B,H,W,3] RGB 0..255, "label", "name").

    Logits are upsampled bilinearly to the label size before the argmax. Optionally writes
    colourised predictions and labelId predictions (cityscapesScripts result format) at
    ``DIR/<name>.png``. Returns ``ConfusionMatrix.to_json(num_classes_reported)``.
    """

    @tf.function(reduce_retracing=True)
    def predict(image: tf.Tensor, label: tf.Tensor) -> tf.Tensor:
        logits = model(image, training=False)
        logits = images.resize_logits(logits, tf.shape(label)[1:3])
        return tf.argmax(logits, axis=-1, output_type=tf.int32)

    return _evaluate_batches(predict, dataset, num_classes_reported, colorized_dir,
                             prediction_dir)


def evaluate_saved_model(saved_model_dir: str, dataset: Iterable[dict],
                         num_classes_reported: int = labels.NUM_CLASSES,
                         colorized_dir: str | None = None,
                         prediction_dir: str | None = None) -> dict:
    """As ``evaluate_segmenter`` for a SavedModel (``serving_default``: images -> labels)."""
    loaded = tf.saved_model.load(saved_model_dir)
    if "serving_default" not in loaded.signatures:
        raise ValueError(f"{saved_model_dir}: SavedModel has no serving_default signature "
                         f"(it has {sorted(loaded.signatures)})")
    serving = loaded.signatures["serving_default"]

    def predict(image: tf.Tensor, label: tf.Tensor) -> tf.Tensor:
        outputs = serving(images=images.to_uint8(image))
        if "labels" not in outputs:
            raise ValueError(f"{saved_model_dir}: serving_default returns {sorted(outputs)}, "
                             "expected 'labels' (trainIds at the input size)")
        predicted = outputs["labels"]
        if predicted.shape != label.shape:
            raise ValueError(f"{saved_model_dir}: serving_default returned labels of shape "
                             f"{predicted.shape} for ground truth of shape {label.shape}")
        return predicted

    return _evaluate_batches(predict, dataset, num_classes_reported, colorized_dir,
                             prediction_dir)


_count_pixels = tf.function(confusion_counts, reduce_retracing=True)


def _evaluate_batches(predict: Predictor, dataset: Iterable[dict], num_classes_reported: int,
                      colorized_dir: str | None, prediction_dir: str | None) -> dict:
    """The confusion matrix of ``predict`` over ``dataset``. In the scope of a multi-worker
    strategy each worker takes batches ``index::count`` and the matrices are summed over
    the workers: every worker gets the mIoU of the whole dataset."""
    matrix = ConfusionMatrix()
    labels.class_names(num_classes_reported)  # raises on a wrong count before the work
    workers = Workers.of()
    if workers.count > 1:
        dataset = (dataset.shard(workers.count, workers.index)
                   if isinstance(dataset, tf.data.Dataset) else workers.shard(dataset))
    total = _num_batches(dataset)
    progress = Progress("evaluate", total or 0)
    step = 0
    for step, batch in enumerate(dataset, start=1):
        predicted = predict(batch["image"], batch["label"])
        matrix.add_counts(_count_pixels(batch["label"], predicted))
        if colorized_dir or prediction_dir:
            names = [name.decode() for name in batch["name"].numpy()]
            _write_predictions(names, predicted.numpy(), colorized_dir, prediction_dir)
        if total is not None:
            progress.update(step, extra=f"mIoU {100 * matrix.mean_iou(num_classes_reported):.2f}")
    if total is None:
        progress.update(step, extra=f"{step} batches", force=True)
    matrix.matrix = workers.sum(matrix.matrix)
    return matrix.to_json(num_classes_reported)


def _num_batches(dataset: Iterable[dict]) -> int | None:
    """Number of batches when the dataset knows it (for progress lines), else None."""
    if isinstance(dataset, tf.data.Dataset):
        cardinality = int(dataset.cardinality())
        return cardinality if cardinality >= 0 else None
    return len(dataset) if isinstance(dataset, Sequence) else None


def _write_predictions(names: Sequence[str], train_ids: np.ndarray, colorized_dir: str | None,
                       prediction_dir: str | None) -> None:
    for name, prediction in zip(names, train_ids, strict=True):
        if prediction_dir:
            label_ids = labels.TRAIN_ID_TO_LABEL_ID_TABLE[prediction.astype(np.uint8)]
            images.write_png(os.path.join(prediction_dir, f"{name}.png"), label_ids)
        if colorized_dir:
            colours = images.colorize(prediction).numpy()
            images.write_png(os.path.join(colorized_dir, f"{name}.png"), colours)


def _prediction_index(pred_dir: str) -> tuple[list[str], list[str]]:
    """Every ``*.png`` under ``pred_dir``: (file names, paths), sorted by file name."""
    found = sorted((filename, os.path.join(root, filename))
                   for root, _, filenames in os.walk(pred_dir)
                   for filename in filenames if filename.endswith(".png"))
    return [filename for filename, _ in found], [path for _, path in found]


def match_predictions(examples: Sequence[readers.Example], pred_dir: str,
                      dataset: str) -> list[str]:
    """The prediction file of each example, found in ``pred_dir`` recursively.

    Cityscapes: the file whose name starts with CITY_SEQ_FRAME and ends with ``.png`` (the
    cityscapesScripts rule); GTA5/SYNTHIA: the file named ``<name>.png`` (the image's name).
    Raises naming the ground-truth file when a prediction is missing or found twice.
    """
    if not os.path.isdir(pred_dir):
        raise FileNotFoundError(f"--pred_dir {pred_dir!r} is not a directory")
    filenames, paths = _prediction_index(pred_dir)
    matched = []
    for example in examples:
        if dataset == "cityscapes":
            prefix = example.name.split("/")[-1]
            pattern = f"{prefix}*.png"
            start = bisect.bisect_left(filenames, prefix)
            end = start
            while end < len(filenames) and filenames[end].startswith(prefix):
                end += 1
        else:
            pattern = f"{example.name}.png"
            start = bisect.bisect_left(filenames, pattern)
            end = bisect.bisect_right(filenames, pattern)
        if end == start:
            raise FileNotFoundError(f"no prediction for ground truth {example.label}: "
                                    f"expected a file {pattern} under {pred_dir}")
        if end - start > 1:
            raise ValueError(f"found {end - start} predictions for ground truth {example.label}: "
                             f"{', '.join(paths[start:end])}")
        matched.append(paths[start])
    return matched


def _check_prediction_files(examples: Sequence[readers.Example],
                            predictions: Sequence[str]) -> None:
    """Header check of every pair before any decoding: one channel, same size as the GT."""
    for example, prediction in zip(examples, predictions, strict=True):
        with Image.open(prediction) as pred_image, Image.open(example.label) as gt_image:
            if len(pred_image.getbands()) != 1:
                raise ValueError(f"prediction {prediction} has {len(pred_image.getbands())} "
                                 "channels; expected a single-channel PNG of labelIds")
            if pred_image.size != gt_image.size:
                raise ValueError(
                    f"prediction {prediction} is {pred_image.size[0]}x{pred_image.size[1]} "
                    f"(WxH) but ground truth {example.label} is "
                    f"{gt_image.size[0]}x{gt_image.size[1]}")


def read_prediction(path: str) -> np.ndarray:
    """A labelId prediction PNG as trainIds; void labelIds become 255 (counted as FN)."""
    with Image.open(path) as image:
        label_ids = np.asarray(image)
    if label_ids.size and int(label_ids.max()) >= labels.NUM_LABEL_IDS:
        raise ValueError(f"prediction {path} contains {int(label_ids.max())}, which is not a "
                         f"Cityscapes labelId (0..{labels.NUM_LABEL_IDS - 1}); "
                         "cityscapesScripts cannot evaluate it either")
    return labels.LABEL_ID_TO_TRAIN_ID[label_ids]


def evaluate_prediction_dir(examples: Sequence[readers.Example], pred_dir: str, dataset: str,
                            num_classes_reported: int = labels.NUM_CLASSES,
                            colorized_dir: str | None = None) -> dict:
    """mIoU of the labelId PNGs in ``pred_dir`` against the ground truth of ``examples``."""
    _require_labels(examples)
    matrix = ConfusionMatrix()
    labels.class_names(num_classes_reported)  # raises on a wrong count before the work
    predictions = match_predictions(examples, pred_dir, dataset)
    _check_prediction_files(examples, predictions)
    progress = Progress("evaluate", len(examples))
    for step, (example, prediction) in enumerate(zip(examples, predictions, strict=True), 1):
        predicted = read_prediction(prediction)
        matrix.update(readers.read_train_ids(example.label, example.label_format), predicted)
        if colorized_dir:
            _write_predictions([example.name], predicted[None], colorized_dir, None)
        progress.update(step, extra=f"mIoU {100 * matrix.mean_iou(num_classes_reported):.2f}")
    return matrix.to_json(num_classes_reported)


def _require_labels(examples: Sequence[readers.Example]) -> None:
    if not examples:
        raise ValueError("no examples to evaluate (empty split or list file?)")
    for example in examples:
        if example.label is None:
            raise ValueError(f"{example.image} has no ground truth (the Cityscapes test split "
                             "has none); evaluate the val split")
        if not os.path.isfile(example.label):
            raise FileNotFoundError(f"ground truth {example.label} does not exist")


def evaluation_dataset(examples: Sequence[readers.Example],
                       input_size: tuple[int, int] | None = None) -> tf.data.Dataset:
    """Batches of one example at full label size; ``input_size`` (H, W) resizes the images only.

    The peers feed Cityscapes at 1024x512 and compare the upsampled prediction with the
    2048x1024 ground truth; ``input_size=(512, 1024)`` reproduces that.
    """
    _require_labels(examples)
    fixed = {"crop": None, "flip": False, "shuffle": False, "repeat": False, "batch_size": 1,
             "drop_remainder": False}
    full_size = readers.make_dataset(examples, resize=None, **fixed)
    if input_size is not None:
        resized = readers.make_dataset(examples, resize=tuple(input_size), **fixed)
        full_size = tf.data.Dataset.zip(resized, full_size).map(
            lambda small, full: {"image": small["image"], "label": full["label"],
                                 "name": full["name"]})
    return full_size.apply(tf.data.experimental.assert_cardinality(len(examples)))


def build_model_from_checkpoint(checkpoint: str) -> keras.Model:
    """``build_segmenter()`` as gin configures it, with weights from ``checkpoint``."""
    try:
        gin.query_parameter("build_segmenter.arch")
    except ValueError as error:
        raise ValueError("--checkpoint needs the architecture: pass "
                         "--gin_param=\"build_segmenter.arch='deeplabv2'\" (or 'fcn8s') or a "
                         "--gin_file that binds build_segmenter.arch") from error
    model = build_segmenter()
    if not model.built:
        model(tf.zeros(_BUILD_INPUT_SHAPE))
    if checkpoint.endswith(_KERAS_WEIGHTS_SUFFIX):
        model.load_weights(checkpoint)
        logging.info("Loaded weights %s", checkpoint)
    else:
        restored = checkpoints.restore_for_inference(checkpoint, segmenter=model)
        logging.info("Restored segmenter from %s", restored)
    return model


def check_flags(values: flags.FlagValues) -> None:
    """Flag problems, raised before any data is read."""
    modes = [name for name in ("pred_dir", "checkpoint", "saved_model") if values[name].value]
    if len(modes) != 1:
        raise app.UsageError("pass exactly one of --pred_dir, --checkpoint, --saved_model"
                             + (f" (got {', '.join('--' + m for m in modes)})" if modes else ""))
    if values.num_classes not in labels.CLASS_SUBSETS:
        raise app.UsageError(f"--num_classes must be one of {sorted(labels.CLASS_SUBSETS)}, "
                             f"got {values.num_classes}")
    if values.input_size and not values.checkpoint:
        raise app.UsageError("--input_size applies only to --checkpoint (a SavedModel gets "
                             "images at the label size; --pred_dir has no images)")
    if values.checkpoint and not (os.path.isdir(values.checkpoint)
                                  or (os.path.isfile(values.checkpoint)
                                      and values.checkpoint.endswith(_KERAS_WEIGHTS_SUFFIX))):
        raise app.UsageError(f"--checkpoint {values.checkpoint!r} is neither a stage checkpoint "
                             f"directory nor a {_KERAS_WEIGHTS_SUFFIX} file")
    if values.saved_model and not os.path.isfile(
            os.path.join(values.saved_model, "saved_model.pb")):
        raise app.UsageError(f"--saved_model {values.saved_model!r} has no saved_model.pb")


def evaluate_from_flags(values: flags.FlagValues) -> dict:
    """The program on parsed flags: evaluates, writes ``--output`` and returns the result."""
    check_flags(values)
    input_size = parse_size(values.input_size, "input_size")
    examples = readers.list_examples(values.dataset, values.root, split=values.split,
                                     list_file=values.list)
    if values.pred_dir:
        result = evaluate_prediction_dir(examples, values.pred_dir, values.dataset,
                                         values.num_classes, values.color_dir)
    else:
        scan.scan_examples(examples, max_decode=0)
        if values.checkpoint:
            gin.parse_config_files_and_bindings(values.gin_file, values.gin_param)
            model = build_model_from_checkpoint(values.checkpoint)
            result = evaluate_segmenter(model, evaluation_dataset(examples, input_size),
                                        values.num_classes, values.color_dir)
        else:
            result = evaluate_saved_model(values.saved_model, evaluation_dataset(examples),
                                          values.num_classes, values.color_dir)
    files.write_json_atomically(values.output, result)
    logging.info("mIoU%d %.2f over %d images -> %s", result["num_classes"], result["mIoU"],
                 len(examples), values.output)
    return result


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    evaluate_from_flags(flags.FLAGS)


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Flags of ``python -m sait_tf.evaluate``; defined only when run as a program, so that
    trainers importing this module define none."""
    definitions = [
        (flags.DEFINE_enum, "dataset", None, "dataset of the ground truth",
         {"enum_values": list(readers.DATASETS)}),
        (flags.DEFINE_string, "root", None, "dataset root (holding gtFine/, labels/ or GT/)", {}),
        (flags.DEFINE_string, "split", "val", "Cityscapes split", {}),
        (flags.DEFINE_string, "list", None, "optional list file selecting the images", {}),
        (flags.DEFINE_string, "pred_dir", None,
         "labelId PNGs in the cityscapesScripts result format", {}),
        (flags.DEFINE_string, "checkpoint", None,
         "a .weights.h5 file or a stage checkpoint directory", {}),
        (flags.DEFINE_string, "saved_model", None,
         "SavedModel directory (serving_default: images -> labels)", {}),
        (flags.DEFINE_string, "output", None, "JSON file for the results", {}),
        (flags.DEFINE_integer, "num_classes", labels.NUM_CLASSES,
         "reported classes: 19, 16 or 13", {}),
        (flags.DEFINE_string, "color_dir", None, "optional folder for colourised predictions", {}),
        (flags.DEFINE_list, "input_size", None,
         "HEIGHT,WIDTH the images are resized to before the network (--checkpoint only), "
         "e.g. 512,1024; the labels stay at full size", {}),
        (flags.DEFINE_multi_string, "gin_file", [], "gin files configuring build_segmenter", {}),
        (flags.DEFINE_multi_string, "gin_param", [],
         "gin bindings, e.g. build_segmenter.arch='fcn8s'", {}),
    ]
    for define, name, default, help_text, extra in definitions:
        define(name, default, help=help_text, flag_values=flag_values, **extra)
    flags.mark_flags_as_required(["dataset", "root", "output"], flag_values=flag_values)

def run() -> None:
    """The ``sait-evaluate`` command."""
    cli.run(main, define_flags)


if __name__ == "__main__":
    run()
