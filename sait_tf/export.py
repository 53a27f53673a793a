"""SavedModels of the segmenter M and the translator F in the TF Serving layout.

``python -m sait_tf.export --run_dir DIR [--export_base PATH]`` restores the models named in
``RUN_DIR/final.json`` and writes ``BASE/sait_segmenter/VERSION/`` and
``BASE/sait_translator/VERSION/``; training calls ``export_models`` when it finishes.
The served graphs hold only core TensorFlow ops, so stock ``tensorflow/serving`` loads them.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import gin
import keras
import tensorflow as tf
from absl import app, flags, logging

from sait_tf import images
from sait_tf.models import build_segmenter
from sait_tf.models.translator import DOMAINS, build_translator
from sait_tf.train import checkpoints

SEGMENTER_NAME = "sait_segmenter"
TRANSLATOR_NAME = "sait_translator"
ENCODED_SIGNATURE = "predict_encoded"
SOURCE_DOMAIN, TARGET_DOMAIN = DOMAINS
IMAGES_SPEC = tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")
ENCODED_SPEC = tf.TensorSpec([None], tf.string, name="image_bytes")


def segment_pixels(segmenter: keras.Model, pixels: tf.Tensor) -> dict[str, tf.Tensor]:
    """uint8 RGB [B, H, W, 3] -> ``labels``, ``confidence`` and ``color``, all at input size.

    The logits are upsampled bilinearly before the argmax, as in training and evaluation.
    """
    logits = segmenter(tf.cast(pixels, tf.float32), training=False)
    logits = images.resize_logits(logits, tf.shape(pixels)[1:3])
    labels = tf.argmax(logits, axis=-1, output_type=tf.int32)
    return {
        "labels": labels,
        "confidence": tf.reduce_max(tf.nn.softmax(logits, axis=-1), axis=-1),
        "color": images.colorize(labels),
    }


def decode_batch(image_bytes: tf.Tensor) -> tf.Tensor:
    """PNG or JPEG bytes [B] -> uint8 RGB [B, H, W, 3]; all images of a batch share one size."""

    def decode_one(encoded: tf.Tensor) -> tf.Tensor:
        decoded = tf.io.decode_image(encoded, channels=3, dtype=tf.uint8, expand_animations=False)
        return tf.ensure_shape(decoded, [None, None, 3])

    return tf.map_fn(
        decode_one, image_bytes, fn_output_signature=tf.TensorSpec([None, None, 3], tf.uint8)
    )


def translate_pixels(
    translator: keras.Model, segmenter: keras.Model, pixels: tf.Tensor
) -> tf.Tensor:
    """uint8 source images [B, H, W, 3] -> uint8 images translated to the target domain.

    x_{S->T} = G_T(E_S(x), M(x)) (paper Sec. 3.1) at the input's size: ``Translator.translate``
    mirror-pads sides that are not multiples of ``translator.size_multiple`` and crops back.
    """
    pixels = tf.cast(pixels, tf.float32)
    seg_logits = segmenter(pixels, training=False)
    translated = translator.translate(
        images.pixels_to_unit(pixels), seg_logits, SOURCE_DOMAIN, TARGET_DOMAIN
    )
    return images.to_uint8(images.unit_to_pixels(translated))


def next_version(*model_dirs: str) -> int:
    """One more than the largest integer version under any of ``model_dirs`` (1 if none)."""
    versions = [
        int(name)
        for model_dir in model_dirs
        if os.path.isdir(model_dir)
        for name in os.listdir(model_dir)
        if name.isdigit()
    ]
    return max(versions, default=0) + 1


def _write_atomically(archive: keras.export.ExportArchive, model_dir: str, version: int) -> str:
    """Writes to a hidden temporary directory, then renames it to ``model_dir/version``.

    TF Serving only loads directories named by an integer, so a killed export leaves at most
    an ignored ``.tmp-*`` directory, never a half-written version.
    """
    final = os.path.join(model_dir, str(version))
    if os.path.exists(final):
        raise FileExistsError(f"export version already exists: {final}")
    os.makedirs(model_dir, exist_ok=True)
    tmp = os.path.join(model_dir, f".tmp-{version}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    archive.write_out(tmp, verbose=False)
    os.replace(tmp, final)
    return final


def _segmenter_archive(segmenter: keras.Model) -> keras.export.ExportArchive:
    archive = keras.export.ExportArchive()

    def segment_images(pixels: tf.Tensor) -> dict[str, tf.Tensor]:
        return segment_pixels(segmenter, pixels)

    def segment_encoded(image_bytes: tf.Tensor) -> dict[str, tf.Tensor]:
        return segment_pixels(segmenter, decode_batch(image_bytes))

    archive.add_endpoint("serving_default", segment_images, input_signature=[IMAGES_SPEC])
    archive.add_endpoint(ENCODED_SIGNATURE, segment_encoded, input_signature=[ENCODED_SPEC])
    return archive


def _translator_archive(
    translator: keras.Model, segmenter: keras.Model
) -> keras.export.ExportArchive:
    archive = keras.export.ExportArchive()

    def translate_images(pixels: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"translated": translate_pixels(translator, segmenter, pixels)}

    archive.add_endpoint("serving_default", translate_images, input_signature=[IMAGES_SPEC])
    return archive


def build_translator_variables(translator: keras.Model) -> None:
    """Runs F once in both directions so that E_S, E_T, G_S and G_T own their variables.

    The first direction goes through ``__call__``, which also marks the Keras model built, as
    ``checkpoints`` requires before restoring (``translate`` alone does not).
    """
    side = 4 * translator.size_multiple
    x_unit = tf.zeros([1, side, side, 3])
    seg_logits = tf.zeros([1, side, side, translator.num_classes])
    translator((x_unit, seg_logits))
    translator.translate(x_unit, seg_logits, TARGET_DOMAIN, SOURCE_DOMAIN)


def export_models(
    segmenter: keras.Model,
    translator: keras.Model | None = None,
    export_base: str | None = None,
    version: int | None = None,
) -> dict[str, str]:
    """Writes ``export_base/sait_segmenter/VERSION`` (and ``sait_translator`` with F).

    Both models get the same ``version``, by default one more than the largest existing
    version of either. The translator's graph holds ``segmenter`` as M for its semantic
    guidance. Returns {model name: version directory}.

    The archives are not given the models with ``ExportArchive.track``: the endpoints
    capture the variables they use, and tracking the models as well would store every
    variable twice (a 340 MB instead of 170 MB DeepLabV2 export).
    """
    if not export_base:
        raise ValueError("export_models: export_base (the TF Serving model base path) is required")
    archives = {SEGMENTER_NAME: _segmenter_archive(segmenter)}
    if translator is not None:
        archives[TRANSLATOR_NAME] = _translator_archive(translator, segmenter)
    model_dirs = {name: os.path.join(export_base, name) for name in archives}
    if version is None:
        version = next_version(*model_dirs.values())
    written = {}
    for name, archive in archives.items():
        written[name] = _write_atomically(archive, model_dirs[name], version)
        logging.info("exported %s version %d to %s", name, version, written[name])
    return written


def _read_final(run_dir: str) -> dict:
    """RUN_DIR/final.json, checked: the stages it names must have checkpoints."""
    path = os.path.join(run_dir, "final.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist; is --run_dir a finished training run?")
    with open(path) as f:
        final = json.load(f)
    if not final.get("segmenter_stage"):
        raise ValueError(f"{path}: 'segmenter_stage' is missing")
    for key in ("segmenter_stage", "translator_stage"):
        stage = final.get(key)
        stage_dir = os.path.join(run_dir, "checkpoints", stage or "")
        if stage and tf.train.latest_checkpoint(stage_dir) is None:
            raise FileNotFoundError(f"{path}: {key} '{stage}' has no checkpoint in {stage_dir}")
    return final


def export_run(run_dir: str, export_base: str | None = None) -> dict[str, str]:
    """Restores the final models of a training run and exports them (default RUN_DIR/export).

    The models are built from RUN_DIR/config.gin (parsed into the global gin config, unknown
    configurables skipped) and restored from the stages RUN_DIR/final.json names.
    """
    config_path = os.path.join(run_dir, "config.gin")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path} does not exist; is --run_dir a training run?")
    final = _read_final(run_dir)
    gin.parse_config_file(config_path, skip_unknown=True)
    try:
        gin.query_parameter("build_segmenter.arch")
    except ValueError as e:
        raise ValueError(f"{config_path} binds no build_segmenter.arch") from e
    segmenter = build_segmenter()
    checkpoints.restore_for_inference(
        os.path.join(run_dir, "checkpoints", final["segmenter_stage"]), segmenter=segmenter
    )
    translator = None
    if final.get("translator_stage"):
        translator = build_translator()
        build_translator_variables(translator)
        checkpoints.restore_for_inference(
            os.path.join(run_dir, "checkpoints", final["translator_stage"]), translator=translator
        )
    return export_models(segmenter, translator, export_base or os.path.join(run_dir, "export"))


FLAGS = flags.FLAGS


def _define_flags() -> None:
    flags.DEFINE_string("run_dir", None, "Training run directory (config.gin, final.json).")
    flags.DEFINE_string("export_base", None, "TF Serving model base path; default RUN_DIR/export.")


def main(argv: list[str]) -> None:
    del argv
    try:
        written = export_run(FLAGS.run_dir, FLAGS.export_base)
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    for name, path in written.items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    _define_flags()
    flags.mark_flag_as_required("run_dir")
    app.run(main)
