"""Translate a whole source dataset to disk with a trained F, in the GTA5 layout.

``python -m sait_tf.translate --run_dir DIR --round K --source_dataset gta5 --source_root ROOT``

OUT/images/<name>.png are the translated images x_{S->T} = G_T(E_S(x_S), M(x_S)) and
OUT/labels/<name>.png the source labels (``data/translated_set.py``), so the segmentation
stage reads OUT as a gta5 dataset with the same trainIds as the source. The work is
resumable: examples whose image and label files both exist are skipped, every file is
written under a temporary name and renamed, and OUT/DONE marks a finished set.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import keras
import numpy as np
import tensorflow as tf
from absl import app, flags, logging

from sait_tf import cli, images
from sait_tf import run_dir as run_dir_lib
from sait_tf.data import readers
from sait_tf.data.translated_set import is_translated, write_example
from sait_tf.models.translator import translate_pixels
from sait_tf.run_dir import RunDir, guide_stage
from sait_tf.runtime import files, preemption
from sait_tf.runtime.progress import Progress

TranslateFn = Callable[[tf.Tensor], tf.Tensor]


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
    if overwrite and files.is_done(out_root):
        os.remove(os.path.join(out_root, files.DONE_MARKER))
    if os.path.isdir(out_root):
        files.remove_stale_temporaries(out_root)
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
            preemption.check(f"after {written} of {len(examples)} examples translated into "
                             f"{out_root}")
    files.mark_done(out_root)
    logging.info("translate: wrote %d examples to %s", len(pending), out_root)
    return len(pending)


def make_translate_fn(segmenter: keras.Model, translator: keras.Model,
                      source_domain: str = "source", target_domain: str = "target") -> TranslateFn:
    """``models.translator.translate_pixels`` on RGB [0, 255] batches, as one tf.function."""

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
    def translate(pixels: tf.Tensor) -> tf.Tensor:
        return translate_pixels(segmenter, translator, pixels, source_domain, target_domain)

    return translate


def restore_models(run_dir: str, round_index: int) -> tuple[keras.Model, keras.Model]:
    """M and F of round ``round_index`` of ``run_dir``: F of ``round_KK_translator`` and the M
    that guided it (``run_dir.guide_stage``). Unfinished stages are reported before any
    model is built."""
    run = RunDir(run_dir)
    guide, translator_stage = guide_stage(round_index), run_dir_lib.translator_stage(round_index)
    run.require_done(guide, translator_stage)
    run.load_config()
    segmenter = run.restore_segmenter(guide)
    translator = run.restore_translator(translator_stage, segmenter.num_classes)
    logging.info("restored M from %s and F from %s", guide, translator_stage)
    return segmenter, translator


def run_source_resize(run_dir: str) -> tuple[int, int] | None:
    """The size the run trained and translated its source set at (RUN_DIR/run.json)."""
    run = RunDir(run_dir)
    if not os.path.isfile(run.file(run_dir_lib.FACTS_FILE)):
        raise FileNotFoundError(f"{run.file(run_dir_lib.FACTS_FILE)} does not exist (a run of "
                                "an older sait_tf): pass --resize HEIGHT,WIDTH")
    size = run.read_json(run_dir_lib.FACTS_FILE)["source"]["resize"]
    return tuple(size) if size else None


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    values = flags.FLAGS
    RunDir(values.run_dir).require_done(guide_stage(values.round),
                                        run_dir_lib.translator_stage(values.round))
    examples = readers.list_examples(values.source_dataset, values.source_root,
                                     split=values.source_split, list_file=values.list,
                                     labels_from=None)
    out = values.out or RunDir(values.run_dir).translated_dir(values.round)
    resize = cli.parse_size(values.resize, "resize") or run_source_resize(values.run_dir)
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
    flags.DEFINE_list("resize", None, "HEIGHT,WIDTH of the translated set (default: the size "
                      "the run trained at, from RUN_DIR/run.json)")
    flags.DEFINE_integer("batch_size", 1, "images per translation batch")
    flags.DEFINE_bool("overwrite", False, "translate again examples already written")
    flags.mark_flags_as_required(["run_dir", "round", "source_root"])


def run() -> None:
    """The ``sait-translate`` command; SIGTERM or Ctrl-C stops it after the current batch
    (the examples written are kept, and the same command continues)."""
    preemption.install_handlers()
    cli.run(main, define_flags)


if __name__ == "__main__":
    run()
