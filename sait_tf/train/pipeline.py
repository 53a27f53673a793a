"""The main job: source-only M, the oracle, then rounds of pixel- and feature-level alignment.

Round 0 trains M on the source (or loads converted weights); the oracle trains a second M on
the labelled target. Each round then (paper Sec. 4, "Bidirectional learning"):
  1. trains F with M fixed,                        checkpoints/round_NN_translator
  2. translates the whole source set with F,       translated/round_NN (GTA5 layout)
  3. makes target pseudo-labels with M (Eq. 9),    pseudo_labels/round_NN
  4. trains M with L_seg + L_SSL + L_adv (Eq. 7),  checkpoints/round_NN_segmenter
  5. evaluates M on target val,
and the rounds stop when the target mIoU has not improved for ``patience`` rounds or after
``max_rounds``. Every step is idempotent (DONE markers, skipped existing files, metrics of
finished stages kept in metrics.json), so the same command resumes a killed run.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import gin
import keras
import tensorflow as tf
from absl import logging

from sait_tf import images, labels
from sait_tf.data import readers, scan, synthetic
from sait_tf.evaluate import evaluate_segmenter, evaluation_dataset
from sait_tf.export import export_models
from sait_tf.models import build_segmenter
from sait_tf.models.discriminators import OutputDiscriminator
from sait_tf.models.patch_discriminator import build_patch_discriminator
from sait_tf.models.translator import build_translator
from sait_tf.train import checkpoints
from sait_tf.train.distribute import make_strategy, set_precision
from sait_tf.train.pseudo_labels import generate_pseudo_labels
from sait_tf.train.segmentation import train_segmenter
from sait_tf.train.translation import train_translator
from sait_tf.translate import make_translate_fn, translate_dataset
from sait_tf.visualize import overview_grid

SOURCE_ONLY = "source_only"
ORACLE = "oracle"
METRICS_FILE = "metrics.json"
FINAL_FILE = "final.json"
CONFIG_FILE = "config.gin"
OVERVIEW_FILE = "overview.png"


def round_name(round_index: int) -> str:
    return f"round_{round_index:02d}"


def write_json_atomically(path: str, value: Any) -> None:
    """Writes ``value`` as JSON to a temporary file and renames it over ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1)
    os.replace(tmp, path)


class OperativeConfigWriter:
    """Writes RUN_DIR/config.gin and a TensorBoard text summary (RUN_DIR/logs/config).

    Gin's operative config lists only the configurables called so far, so the pipeline
    rewrites it after every stage; each rewrite is one more step of the text summary.
    """

    def __init__(self, run_dir: str) -> None:
        self.path = os.path.join(run_dir, CONFIG_FILE)
        self.writer = tf.summary.create_file_writer(os.path.join(run_dir, "logs", "config"))
        self.step = 0

    def write(self) -> None:
        config = gin.operative_config_str()
        with open(self.path + ".tmp", "w") as f:
            f.write(config)
        os.replace(self.path + ".tmp", self.path)
        with self.writer.as_default():
            markdown = "\n".join("    " + line for line in config.splitlines())
            tf.summary.text("operative_config", markdown, step=self.step)
        self.writer.flush()
        self.step += 1


class RunState:
    """metrics.json of a run directory, loaded when present and saved after every change."""

    def __init__(self, run_dir: str) -> None:
        self.path = os.path.join(run_dir, METRICS_FILE)
        self.metrics: dict[str, Any] = {"rounds": [], "wall_time_s": {}}
        if os.path.exists(self.path):
            with open(self.path) as f:
                self.metrics.update(json.load(f))

    def save(self) -> None:
        write_json_atomically(self.path, self.metrics)

    def timed(self, stage: str, work: Callable[..., Any], *args, **kwargs) -> Any:
        """Runs ``work(*args, **kwargs)``; records its wall time unless an earlier run
        finished ``stage``."""
        started = time.monotonic()
        result = work(*args, **kwargs)
        if stage not in self.metrics["wall_time_s"]:
            self.metrics["wall_time_s"][stage] = round(time.monotonic() - started, 1)
            self.save()
        return result


def _has_labels(examples: Sequence[readers.Example]) -> bool:
    return all(ex.label is not None and os.path.isfile(ex.label) for ex in examples)


def _without_labels(examples: Sequence[readers.Example]) -> list[readers.Example]:
    return [ex._replace(label=None) for ex in examples]


@gin.configurable(denylist=["run_dir"])
def run_pipeline(
    run_dir: str,
    source_dataset: str = "gta5",
    target_dataset: str = "cityscapes",
    source_root: str = gin.REQUIRED,
    target_root: str = gin.REQUIRED,
    synthetic_pair_root: str | None = None,
    source_list: str | None = None,
    target_train_list: str | None = None,
    target_val_list: str | None = None,
    source_resize: tuple[int, int] | None = (720, 1280),
    target_resize: tuple[int, int] | None = (512, 1024),
    source_crop: tuple[int, int] | None = (512, 1024),
    translator_crop: tuple[int, int] | None = (512, 512),
    flip: bool = False,
    batch_size: int = 1,
    translator_batch_size: int = 1,
    on_size_mismatch: str = "error",
    init_weights: str | None = None,
    source_only_steps: int = 120000,
    oracle_steps: int = 0,
    max_rounds: int = 3,
    translator_steps: int = 1000000,
    segmenter_steps: int = 120000,
    patience: int = 1,
    adversarial: bool = True,
    output_discriminator_width: int = 64,
    num_classes_reported: int = labels.NUM_CLASSES,
    seed: int = 0,
    export: bool = True,
) -> dict:
    """Runs (or resumes) the whole method in ``run_dir``; returns the metrics.

    Sizes are (height, width). ``source_resize``/``target_resize`` are the training
    resolutions (also of the translated set and of the pseudo-labels, and the input size at
    evaluation, where predictions are upsampled to the full label size); ``source_crop``
    crops the source-side images of M's stages, ``translator_crop`` both domains for F.
    ``synthetic_pair_root`` generates the embedded pair there first (the demo).
    ``init_weights`` (a ``.weights.h5`` from ``sait_tf.tools.convert_torch``) starts M; with
    ``source_only_steps=0`` it is the source-only model. ``oracle_steps=0`` skips the oracle.
    Every stage trains under the strategy of ``make_strategy`` (gin) in the precision of
    ``set_precision``; ``batch_size`` and ``translator_batch_size`` are global batches.
    """
    _check_settings(source_only_steps, init_weights, max_rounds, patience)
    _check_run_dir(run_dir)
    started = time.monotonic()
    strategy = make_strategy()
    _check_batch_sizes(strategy.num_replicas_in_sync, batch_size=batch_size,
                       translator_batch_size=translator_batch_size)
    set_precision()
    if synthetic_pair_root:
        synthetic.ensure_synthetic_pair(synthetic_pair_root)

    source_examples = readers.list_examples(source_dataset, source_root, "train", source_list)
    target_train = readers.list_examples(target_dataset, target_root, "train", target_train_list)
    target_val = readers.list_examples(target_dataset, target_root, "val", target_val_list)
    run_oracle = oracle_steps > 0 and _has_labels(target_train)
    if oracle_steps > 0 and not run_oracle:
        logging.warning("oracle skipped: the target train split of %s has no labels", target_root)
    if not run_oracle:
        target_train = _without_labels(target_train)
    source_examples = scan.scan_examples(source_examples,
                                         on_size_mismatch=on_size_mismatch).examples
    target_train = scan.scan_examples(target_train, on_size_mismatch=on_size_mismatch).examples
    target_val = scan.scan_examples(target_val).examples

    def train_data(examples, resize, crop, batch, offset):
        return readers.make_dataset(examples, resize=resize, crop=crop, flip=flip, shuffle=True,
                                    repeat=True, batch_size=batch, seed=seed + offset,
                                    drop_remainder=True)

    def load_init(model: keras.Model) -> keras.Model:
        if init_weights:
            _load_init_weights(model, init_weights)
        return model

    val_data = evaluation_dataset(target_val, input_size=target_resize)
    with strategy.scope():
        segmenter = load_init(build_segmenter())
    config_writer = OperativeConfigWriter(run_dir)
    config_writer.write()
    state = RunState(run_dir)
    metrics = state.metrics

    def timed(stage: str, work: Callable[..., Any], *args, **kwargs) -> Any:
        """``state.timed``; a file that tf.data fails to decode mid-stage gets named."""
        try:
            return state.timed(stage, work, *args, **kwargs)
        except tf.errors.InvalidArgumentError as error:
            _name_undecodable_file(error, source_examples, target_train, target_val)

    def stage_dirs(stage: str) -> tuple[str, str]:
        return (os.path.join(run_dir, "checkpoints", stage),
                os.path.join(run_dir, "logs", stage))

    def train_stage(model: keras.Model, stage: str, steps: int, **datasets) -> dict | None:
        result = timed(stage, train_segmenter, model, *stage_dirs(stage), steps,
                             eval_dataset=val_data, num_classes_reported=num_classes_reported,
                             strategy=strategy, **datasets)
        config_writer.write()
        return result

    def record(key: str, model: keras.Model, result: dict | None) -> None:
        """Keeps the metrics of finished stages; evaluates only when the trainer did not."""
        if key not in metrics:
            metrics[key] = result or evaluate_segmenter(model, val_data, num_classes_reported)
            state.save()

    # Round 0: source-only M.
    if source_only_steps > 0:
        result = train_stage(segmenter, SOURCE_ONLY, source_only_steps, source_dataset=train_data(
            source_examples, source_resize, source_crop, batch_size, 0))
    else:
        _checkpoint_loaded_weights(segmenter, stage_dirs(SOURCE_ONLY)[0])
        result = None
    record(SOURCE_ONLY, segmenter, result)
    logging.info("source-only target-val mIoU %.2f", metrics[SOURCE_ONLY]["mIoU"])

    if run_oracle:
        with strategy.scope():
            oracle = load_init(build_segmenter())
        result = train_stage(oracle, ORACLE, oracle_steps, source_dataset=train_data(
            target_train, target_resize, None, batch_size, 1))
        record(ORACLE, oracle, result)
        del oracle
        target_train = _without_labels(target_train)

    best = {"round": 0, "segmenter_stage": SOURCE_ONLY, "translator_stage": None,
            **metrics[SOURCE_ONLY]}
    translator = None
    if max_rounds > 0:
        with strategy.scope():
            translator = build_translator()
            discriminators = {domain: build_patch_discriminator()
                              for domain in ("source", "target")}
    rounds_without_gain = 0
    for round_index in range(1, max_rounds + 1):
        name = round_name(round_index)
        translator_stage, segmenter_stage = f"{name}_translator", f"{name}_segmenter"
        timed(
            translator_stage, train_translator, segmenter, translator, discriminators,
            train_data(source_examples, source_resize, translator_crop, translator_batch_size, 2),
            train_data(target_train, target_resize, translator_crop, translator_batch_size, 3),
            *stage_dirs(translator_stage), translator_steps, strategy=strategy)
        translated_dir = os.path.join(run_dir, "translated", name)
        timed(f"{name}_translate", translate_dataset,
                    make_translate_fn(segmenter, translator), source_examples, translated_dir,
                    resize=source_resize)
        pseudo_label_dir = os.path.join(run_dir, "pseudo_labels", name)
        timed(f"{name}_pseudo_labels", generate_pseudo_labels, segmenter, target_train,
                    pseudo_label_dir, resize=target_resize)
        translated = readers.list_examples("gta5", translated_dir)
        pseudo_labelled = readers.list_examples(target_dataset, target_root, "train",
                                                target_train_list, labels_from=pseudo_label_dir)
        with strategy.scope():
            discriminator = (OutputDiscriminator(width=output_discriminator_width)
                             if adversarial else None)
        result = train_stage(
            segmenter, segmenter_stage, segmenter_steps,
            source_dataset=train_data(translated, None, source_crop, batch_size, 4),
            target_dataset=train_data(pseudo_labelled, target_resize, None, batch_size, 5),
            output_discriminator=discriminator)
        if len(metrics["rounds"]) < round_index:
            evaluation = result or evaluate_segmenter(segmenter, val_data, num_classes_reported)
            metrics["rounds"].append({"round": round_index, "segmenter_stage": segmenter_stage,
                                      "translator_stage": translator_stage, **evaluation})
            state.save()
        record = metrics["rounds"][round_index - 1]
        logging.info("round %d target-val mIoU %.2f (best so far %.2f)", round_index,
                     record["mIoU"], best["mIoU"])
        if record["mIoU"] > best["mIoU"]:
            best, rounds_without_gain = record, 0
        else:
            rounds_without_gain += 1
            if rounds_without_gain >= patience:
                logging.info("target mIoU did not improve for %d round(s): stopping", patience)
                break

    metrics["final"] = best
    state.save()
    write_json_atomically(os.path.join(run_dir, FINAL_FILE),
                          {"segmenter_stage": best["segmenter_stage"],
                           "translator_stage": best["translator_stage"]})
    if export:
        timed("export", _export, run_dir, segmenter, translator, best)
    _write_overview(run_dir, segmenter, best, len(metrics["rounds"]), source_examples, val_data)
    config_writer.write()
    logging.info("done in %.0f s: final target-val mIoU%d %.2f (%s); metrics in %s",
                 time.monotonic() - started, best["num_classes"], best["mIoU"],
                 best["segmenter_stage"], state.path)
    return metrics


def _check_settings(source_only_steps: int, init_weights: str | None, max_rounds: int,
                    patience: int) -> None:
    """Settings errors, raised before any work."""
    if source_only_steps <= 0 and not init_weights:
        raise ValueError("run_pipeline: source_only_steps is 0 and init_weights is None; "
                         "train M on the source or give converted weights")
    if init_weights and not os.path.isfile(init_weights):
        raise FileNotFoundError(f"run_pipeline.init_weights: {init_weights} does not exist")
    if max_rounds < 0 or patience < 1:
        raise ValueError(f"run_pipeline: max_rounds must be >= 0 and patience >= 1, got "
                         f"{max_rounds} and {patience}")


def _check_batch_sizes(replicas: int, **batch_sizes: int) -> None:
    """Every replica needs the same share of each global batch."""
    for name, size in batch_sizes.items():
        if size % replicas:
            raise ValueError(f"run_pipeline.{name}: {size} does not split evenly over the "
                             f"{replicas} replicas of make_strategy; use a multiple of {replicas}")


def _name_undecodable_file(error: tf.errors.InvalidArgumentError,
                           *example_lists: Sequence[readers.Example]) -> NoReturn:
    """Raises the scan's error naming the file behind ``error``, else ``error`` itself.

    The start-up scan reads every header but decodes only a sample, and tf.data's decode
    errors name no file ("Invalid PNG data, size 1147"). Decoding everything once, when a
    stage has already stopped on such an error, finds the file to replace before resuming.
    """
    logging.error("stopped on %s; decoding every example to name the file",
                  " ".join(str(error.message).split())[:200])
    for examples in example_lists:
        scan.scan_examples(examples, max_decode=len(examples))
    raise error


def _check_run_dir(run_dir: str) -> None:
    """Creates ``run_dir`` and writes a probe file in it, so an unusable directory fails before
    any work (``os.access`` is no test: it says yes to root on a read-only mount)."""
    probe = os.path.join(run_dir, f".write_test.{os.getpid()}.tmp")
    try:
        os.makedirs(run_dir, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok\n")
        os.remove(probe)
    except OSError as error:
        raise OSError(f"--run_dir {run_dir} is not a writable directory: "
                      f"{error.strerror or error}") from error


def _load_init_weights(segmenter: keras.Model, init_weights: str) -> None:
    """``segmenter.load_weights`` with an error that names the file and the network."""
    try:
        segmenter.load_weights(init_weights)
    except ValueError as error:
        # Keras: a summary line, then the first failing layer's message (with its values).
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        detail = lines[min(1, len(lines) - 1)].split(" Target variable:")[0][:200]
        raise ValueError(
            f"run_pipeline.init_weights {init_weights} does not fit the segmenter "
            f"({segmenter.name}, {segmenter.num_classes} classes; another architecture, "
            f"class count or size?): {detail}") from error


def _checkpoint_loaded_weights(segmenter: keras.Model, stage_dir: str) -> None:
    """Stores ``init_weights`` as the source-only stage, so every stage has a checkpoint."""
    if not checkpoints.is_stage_done(stage_dir):
        checkpoints.StageCheckpoint(stage_dir, segmenter=segmenter).save(0)
        checkpoints.mark_stage_done(stage_dir)


def _export(run_dir: str, segmenter: keras.Model, translator: keras.Model | None,
            best: dict) -> None:
    """Exports the best segmenter (and its round's translator) once to RUN_DIR/export."""
    export_dir = os.path.join(run_dir, "export")
    if checkpoints.is_stage_done(export_dir):
        return
    # A killed export leaves a temporary folder or a first model's version: start over, so a
    # resumed run ends with the same version 1 as an uninterrupted one.
    shutil.rmtree(export_dir, ignore_errors=True)
    checkpoints_dir = os.path.join(run_dir, "checkpoints")
    checkpoints.restore_for_inference(os.path.join(checkpoints_dir, best["segmenter_stage"]),
                                      segmenter=segmenter)
    if best["translator_stage"] is None:
        translator = None
    else:
        checkpoints.restore_for_inference(os.path.join(checkpoints_dir, best["translator_stage"]),
                                          translator=translator)
    export_models(segmenter, translator, export_dir, version=1)
    checkpoints.mark_stage_done(export_dir)


def _write_overview(run_dir: str, segmenter: keras.Model, best: dict, rounds_run: int,
                    source_examples: Sequence[readers.Example],
                    val_data: tf.data.Dataset) -> None:
    """RUN_DIR/overview.png: source, translation, target-val image, final prediction, truth.

    The translations are those of the final round, or of the last round run when the
    source-only model stayed best.
    """
    path = os.path.join(run_dir, OVERVIEW_FILE)
    if os.path.isfile(path):
        return
    checkpoints.restore_for_inference(
        os.path.join(run_dir, "checkpoints", best["segmenter_stage"]), segmenter=segmenter)
    shown_round = best["round"] or rounds_run
    translated_dir = (os.path.join(run_dir, "translated", round_name(shown_round))
                      if shown_round else None)
    images.write_png(path, overview_grid(segmenter, source_examples, translated_dir, val_data))
    logging.info("overview picture: %s", path)
