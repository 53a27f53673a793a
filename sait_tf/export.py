"""SavedModels of the segmenter M and the translator F in the TF Serving layout.

``python -m sait_tf.export --run_dir DIR [--export_base PATH]`` restores the models named in
``RUN_DIR/final.json`` and writes ``BASE/sait_segmenter/VERSION/`` and
``BASE/sait_translator/VERSION/``; training calls ``export_models`` when it finishes.
The served graphs hold only core TensorFlow ops, so stock ``tensorflow/serving`` loads them.
"""

from __future__ import annotations

import os
import shutil

import keras
import tensorflow as tf
from absl import flags, logging

from sait_tf import cli, images
from sait_tf.models import build_segmenter
from sait_tf.models.translator import build_translator, translate_pixels
from sait_tf.run_dir import RunDir

SEGMENTER_NAME = "sait_segmenter"
TRANSLATOR_NAME = "sait_translator"
ENCODED_SIGNATURE = "predict_encoded"
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
        """uint8 source images -> uint8 images translated to the target domain, x_{S->T}."""
        translated = translate_pixels(segmenter, translator, tf.cast(pixels, tf.float32))
        return {"translated": images.to_uint8(translated)}

    archive.add_endpoint("serving_default", translate_images, input_signature=[IMAGES_SPEC])
    return archive


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


def export_run(run_dir: str, export_base: str | None = None, version: int | None = None,
               segmenter: keras.Model | None = None,
               translator: keras.Model | None = None) -> dict[str, str]:
    """Exports the final models of a training run (default base RUN_DIR/export).

    The stages RUN_DIR/final.json names are restored into ``segmenter`` and ``translator``
    when given (the training job's own models), else into models built from RUN_DIR/config.gin
    (parsed into the global gin config, unknown configurables skipped).
    """
    run = RunDir(run_dir)
    final = run.read_final()
    if segmenter is None:
        run.load_config()
        segmenter = build_segmenter()
    run.restore(final["segmenter_stage"], segmenter=segmenter)
    if final.get("translator_stage"):
        if translator is None:
            translator = build_translator(segmenter.num_classes)
            translator.build()
        run.restore(final["translator_stage"], translator=translator)
    else:
        translator = None
    return export_models(segmenter, translator, export_base or run.export_dir, version)


FLAGS = flags.FLAGS


def _define_flags() -> None:
    flags.DEFINE_string("run_dir", None, "Training run directory (config.gin, final.json).")
    flags.DEFINE_string("export_base", None, "TF Serving model base path; default RUN_DIR/export.")
    flags.mark_flag_as_required("run_dir")


def main(argv: list[str]) -> None:
    del argv
    for name, path in export_run(FLAGS.run_dir, FLAGS.export_base).items():
        print(f"{name}: {path}")


def run() -> None:
    """The ``sait-export`` command."""
    cli.run(main, _define_flags)


if __name__ == "__main__":
    run()
