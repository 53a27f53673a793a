"""Translate a whole source dataset to disk with a trained F, in the GTA5 layout.

``python -m sait_tf.translate --run_dir DIR --round K --source_dataset gta5 --source_root ROOT``

OUT/images/<name>.png are the translated images x_{S->T} = G_T(E_S(x_S), M(x_S)) and
OUT/labels/<name>.png the source labels as GTA5 palette PNGs (index = Cityscapes labelId), so
the segmentation stage reads OUT as a gta5 dataset with the same trainIds as the source.
The work is resumable: examples whose image and label files both exist are skipped, every
file is written under a temporary name and renamed, and OUT/DONE marks a finished set.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Sequence

import gin
import keras
import numpy as np
import tensorflow as tf
from absl import app, flags, logging
from PIL import Image

from sait_tf import images, labels
from sait_tf.cli import parse_size
from sait_tf.data import readers
from sait_tf.models import build_segmenter
from sait_tf.models.translator import build_translator
from sait_tf.train import checkpoints
from sait_tf.train.progress import Progress

TranslateFn = Callable[[tf.Tensor], tf.Tensor]
_LABEL_PALETTE = labels.LABEL_ID_PALETTE.reshape(-1).tolist()


def output_paths(out_root: str, name: str) -> tuple[str, str]:
    """(OUT/images/<name>.png, OUT/labels/<name>.png); Cityscapes names make subfolders."""
    if os.path.isabs(name) or ".." in name.split("/"):
        raise ValueError(f"example name {name!r} would leave {out_root!r}")
    return (os.path.join(out_root, "images", f"{name}.png"),
            os.path.join(out_root, "labels", f"{name}.png"))


def is_translated(out_root: str, name: str) -> bool:
    """True when both files of ``name`` exist (a killed write leaves only a temporary file)."""
    return all(os.path.isfile(path) for path in output_paths(out_root, name))


def write_example(out_root: str, name: str, pixels: np.ndarray, train_ids: np.ndarray) -> None:
    """Writes uint8 RGB ``pixels`` [H, W, 3] and trainIds [H, W] (label second)."""
    image_path, label_path = output_paths(out_root, name)
    images.write_png(image_path, pixels)
    label = Image.fromarray(labels.TRAIN_ID_TO_LABEL_ID_TABLE[train_ids])
    label.putpalette(_LABEL_PALETTE)
    images.write_png(label_path, label)


def translate_dataset(translate_fn: TranslateFn, examples: Sequence[readers.Example],
                      out_root: str, *, resize: tuple[int, int] | None = None,
                      batch_size: int = 1, overwrite: bool = False) -> int:
    """Translates ``examples`` into ``out_root`` (GTA5 layout); returns how many it wrote.

    ``translate_fn`` maps float32 RGB [0, 255] batches [B, H, W, 3] to the same range and
    shape. ``resize`` (H, W) applies to images (as the run's reader resizes them) and labels
    (nearest). Examples already written are skipped unless ``overwrite``; batches larger
    than 1 need ``resize`` when the images differ in size.
    """
    if not examples:
        raise ValueError("translate_dataset got no examples")
    unlabelled = [ex.name for ex in examples if ex.label is None]
    if unlabelled:
        raise ValueError(f"translate_dataset needs labelled examples; {len(unlabelled)} have "
                         f"no label, e.g. {unlabelled[0]!r}")
    if overwrite and os.path.exists(os.path.join(out_root, "DONE")):
        os.remove(os.path.join(out_root, "DONE"))
    pending = [ex for ex in examples if overwrite or not is_translated(out_root, ex.name)]
    done = len(examples) - len(pending)
    if done:
        logging.info("translate: %d of %d examples already in %s", done, len(examples), out_root)
    if pending:
        # Explicit arguments override the run's gin bindings: no crop, flip or shuffle here.
        dataset = readers.make_dataset(pending, resize=resize, crop=None, flip=False,
                                       shuffle=False, repeat=False, batch_size=batch_size,
                                       seed=0, drop_remainder=False)
        progress = Progress("translate", total=len(examples), start=done)
        written = done
        for batch in dataset:
            translated = translate_fn(batch["image"])
            if translated.shape != batch["image"].shape:
                raise ValueError(f"translate_fn returned shape {translated.shape} for images of "
                                 f"shape {batch['image'].shape}")
            pixels = images.to_uint8(translated).numpy()
            train_ids = batch["label"].numpy().astype(np.uint8)
            for name, image, ids in zip(batch["name"].numpy(), pixels, train_ids, strict=True):
                write_example(out_root, name.decode(), image, ids)
                written += 1
            progress.update(written)
    checkpoints.mark_stage_done(out_root)
    logging.info("translate: wrote %d examples to %s", len(pending), out_root)
    return len(pending)


def make_translate_fn(segmenter: keras.Model, translator: keras.Model,
                      source_domain: str = "source", target_domain: str = "target") -> TranslateFn:
    """x_{A->B} = G_B(E_A(x_A), M(x_A)) on RGB [0, 255] batches, as one tf.function.

    M sees the image in its own range and F in [-1, 1]; a translator without SPADE guidance
    (``conditioned`` False, Table 3's IN rows) skips M.
    """

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
    def translate(pixels: tf.Tensor) -> tf.Tensor:
        logits = segmenter(pixels, training=False) if translator.conditioned else None
        translated = translator.translate(images.pixels_to_unit(pixels), logits, source_domain,
                                          target_domain, training=False)
        return images.unit_to_pixels(translated)

    return translate


def stage_names(round_index: int) -> tuple[str, str]:
    """(segmenter stage, translator stage) of round ``round_index``.

    The round's F was trained with the segmenter of the round before as guidance:
    ``source_only`` for round 1, ``round_{K-1}_segmenter`` after.
    """
    if round_index < 1:
        raise ValueError(f"--round must be >= 1, got {round_index}")
    segmenter = "source_only" if round_index == 1 else f"round_{round_index - 1:02d}_segmenter"
    return segmenter, f"round_{round_index:02d}_translator"


def load_run_config(run_dir: str) -> None:
    """Parses RUN_DIR/config.gin, so builders get the run's sizes and architecture.

    The modules whose configurables the pipeline calls are imported first: bindings of
    configurables gin does not know yet would be skipped silently.
    """
    config = os.path.join(run_dir, "config.gin")
    if not os.path.isfile(config):
        raise FileNotFoundError(f"run directory {run_dir!r} has no config.gin")
    importlib.import_module("sait_tf.train.pipeline")
    gin.parse_config_file(config, skip_unknown=True)


def finished_stage_dirs(run_dir: str, round_index: int) -> tuple[str, str]:
    """Checkpoint folders of round ``round_index``'s M and F; raises unless both finished."""
    stage_dirs = tuple(os.path.join(run_dir, "checkpoints", stage)
                       for stage in stage_names(round_index))
    for stage_dir in stage_dirs:
        if not checkpoints.is_stage_done(stage_dir):
            raise FileNotFoundError(f"stage {os.path.basename(stage_dir)} of {run_dir!r} has "
                                    f"not finished: no DONE marker in {stage_dir}")
    return stage_dirs


def restore_models(run_dir: str, round_index: int) -> tuple[keras.Model, keras.Model]:
    """M and F of round ``round_index`` of ``run_dir`` (after ``load_run_config``)."""
    segmenter_dir, translator_dir = finished_stage_dirs(run_dir, round_index)
    segmenter, translator = build_segmenter(), build_translator()
    translator.build()  # creates the variables of E_S, E_T, G_S and G_T before the restore
    checkpoints.restore_for_inference(segmenter_dir, segmenter=segmenter)
    checkpoints.restore_for_inference(translator_dir, translator=translator)
    logging.info("restored M from %s and F from %s", segmenter_dir, translator_dir)
    return segmenter, translator


def _run_source_resize() -> tuple[int, int] | None:
    """The run's ``run_pipeline.source_resize`` (the size the pipeline translates at)."""
    try:
        value = gin.query_parameter("run_pipeline.source_resize")
    except ValueError:
        return None
    return tuple(value) if value is not None else None


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    values = flags.FLAGS
    finished_stage_dirs(values.run_dir, values.round)
    examples = readers.list_examples(values.source_dataset, values.source_root,
                                     split=values.source_split, list_file=values.list,
                                     labels_from=None)
    out = values.out or os.path.join(values.run_dir, "translated", f"round_{values.round:02d}")
    load_run_config(values.run_dir)
    resize = parse_size(values.resize, "resize") or _run_source_resize()
    segmenter, translator = restore_models(values.run_dir, values.round)
    logging.info("translating %d %s examples at %s into %s", len(examples),
                 values.source_dataset, resize or "their own size", out)
    translate_dataset(make_translate_fn(segmenter, translator), examples, out, resize=resize,
                      batch_size=values.batch_size, overwrite=values.overwrite)


def define_flags() -> None:
    """Flags of ``python -m sait_tf.translate`` (defined only when run as a program)."""
    flags.DEFINE_string("run_dir", None, "run directory written by python -m sait_tf.train")
    flags.DEFINE_integer("round", None, "round K: F from checkpoints/round_KK_translator")
    flags.DEFINE_enum("source_dataset", "gta5", list(readers.DATASETS), "source dataset")
    flags.DEFINE_string("source_root", None, "source dataset root")
    flags.DEFINE_string("source_split", "train", "Cityscapes split (gta5/synthia have none)")
    flags.DEFINE_string("list", None, "optional list file selecting the source images")
    flags.DEFINE_string("out", None, "output root (default RUN_DIR/translated/round_KK)")
    flags.DEFINE_list("resize", None, "HEIGHT,WIDTH of the translated set (default: the run's "
                      "run_pipeline.source_resize, else each image's own size)")
    flags.DEFINE_integer("batch_size", 1, "images per translation batch")
    flags.DEFINE_bool("overwrite", False, "translate again examples already written")
    flags.mark_flags_as_required(["run_dir", "round", "source_root"])


if __name__ == "__main__":
    define_flags()
    app.run(main)
