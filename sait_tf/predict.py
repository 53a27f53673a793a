"""Segment image files and folders with a trained segmenter M, without a server.

    python -m sait_tf.predict --saved_model EXPORT/sait_segmenter/VERSION \\
        --input leftImg8bit/val --out_dir predictions [--batch_size 4] [--overwrite]
    python -m sait_tf.predict --run_dir RUN_DIR --input frame.png --input more_frames/

Each ``--input`` (or positional argument) is an image file or a folder searched recursively
for .png/.jpg/.jpeg. For every image, OUT_DIR mirrors its path under its input folder and
gets ``<stem>_trainIds.png`` (uint8 Cityscapes trainIds), ``<stem>_color.png`` (the Cityscapes
palette) and ``<stem>_overlay.png`` (the image blended with the colours). ``--run_dir`` uses
the run's newest export, else restores the segmenter RUN_DIR/final.json names. Images whose
three outputs exist are skipped unless ``--overwrite``; files are written atomically, so a
killed run is resumed by running it again. See docs/serving.md.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

import numpy as np
import tensorflow as tf
from absl import flags, logging
from PIL import Image

from sait_tf import cli, export, images
from sait_tf.run_dir import RunDir
from sait_tf.runtime.progress import Progress

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# Output kind -> the suffix that replaces the image's extension.
OUTPUT_SUFFIXES = {"trainIds": "_trainIds.png", "color": "_color.png", "overlay": "_overlay.png"}

# uint8 RGB [B, H, W, 3] -> at least ``labels`` (int32 trainIds) and ``color`` (uint8 RGB).
Segment = Callable[[tf.Tensor], Mapping[str, tf.Tensor]]
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class InputImage:
    """An image file and its path relative to the input folder it was found in."""

    path: str
    relative: str

    @property
    def stem(self) -> str:
        """The relative path without its extension, the base of the output names."""
        return os.path.splitext(self.relative)[0]


def find_images(inputs: Sequence[str], exclude: Sequence[str | None] = ()) -> list[InputImage]:
    """The image files of ``inputs`` (files, or folders searched recursively, in sorted order).

    Folders in ``exclude`` (the output folders) are not searched. Raises FileNotFoundError for a
    missing input and ValueError for an excluded input folder, a folder without images, or two
    images whose outputs would share a name.
    """
    skipped = {os.path.realpath(path) for path in exclude if path}
    found: list[InputImage] = []
    for given in inputs:
        if os.path.isfile(given):
            found.append(InputImage(given, os.path.basename(given)))
            continue
        if not os.path.isdir(given):
            raise FileNotFoundError(f"no such image file or folder: {given}")
        if os.path.realpath(given) in skipped:
            raise ValueError(f"{given} is both an input and an output folder")
        in_folder = []
        for root, folders, names in os.walk(given):
            folders[:] = sorted(f for f in folders
                                if os.path.realpath(os.path.join(root, f)) not in skipped)
            in_folder += [InputImage(os.path.join(root, name),
                                     os.path.relpath(os.path.join(root, name), given))
                          for name in sorted(names) if name.lower().endswith(IMAGE_SUFFIXES)]
        if not in_folder:
            raise ValueError(f"no .png, .jpg or .jpeg images in {given} (searched recursively)")
        found += in_folder
    by_stem: dict[str, InputImage] = {}
    for image in found:
        other = by_stem.setdefault(image.stem, image)
        if other is not image:
            raise ValueError(f"{other.path} and {image.path} would write the same outputs "
                             f"({image.stem}*); give them in separate runs")
    return found


def image_size(path: str) -> tuple[int, int]:
    """(height, width) from the file's header; ValueError naming a file that is no image."""
    try:
        with Image.open(path) as image:
            width, height = image.size
    except (OSError, Image.DecompressionBombError) as error:
        raise ValueError(f"cannot read {path}: not a PNG or JPEG image ({error})") from error
    return height, width


def read_image(path: str) -> np.ndarray:
    """uint8 RGB [H, W, 3], decoded as the served ``predict_encoded`` signature decodes."""
    with open(path, "rb") as f:
        encoded = f.read()
    try:
        return export.decode_batch(tf.constant([encoded]))[0].numpy()
    except tf.errors.InvalidArgumentError as error:
        raise ValueError(f"cannot decode {path}: the file is damaged or truncated") from error


def batches_by_size(items: Sequence[T], sizes: Sequence[tuple[int, int]],
                    batch_size: int) -> list[list[T]]:
    """``items`` in batches of at most ``batch_size`` whose ``sizes`` are equal, in the order
    each size first appears."""
    groups: dict[tuple[int, int], list[T]] = {}
    for item, size in zip(items, sizes, strict=True):
        groups.setdefault(size, []).append(item)
    return [group[start:start + batch_size] for group in groups.values()
            for start in range(0, len(group), batch_size)]


def output_paths(out_dir: str, image: InputImage) -> dict[str, str]:
    """{output kind: path} of ``image``'s outputs (see ``OUTPUT_SUFFIXES``)."""
    return {kind: os.path.join(out_dir, image.stem + suffix)
            for kind, suffix in OUTPUT_SUFFIXES.items()}


def overlay(pixels: tf.Tensor, color: tf.Tensor, alpha: float) -> tf.Tensor:
    """uint8 ``pixels`` blended with uint8 ``color``: (1 - alpha) * pixels + alpha * color."""
    blend = (1.0 - alpha) * tf.cast(pixels, tf.float32) + alpha * tf.cast(color, tf.float32)
    return images.to_uint8(blend)


def load_saved_model(path: str) -> Segment:
    """The ``serving_default`` of an exported segmenter (``BASE/sait_segmenter/VERSION``, or
    ``BASE/sait_segmenter`` for its newest version)."""
    if not os.path.isfile(os.path.join(path, "saved_model.pb")):
        newest = export.next_version(path) - 1
        if not newest:
            raise FileNotFoundError(f"{path} holds no saved_model.pb (nor VERSION/saved_model.pb)")
        path = os.path.join(path, str(newest))
    loaded = tf.saved_model.load(path)
    serving = loaded.signatures.get("serving_default")
    outputs = set(serving.structured_outputs) if serving else set()
    if not {"labels", "color"} <= outputs:
        raise ValueError(f"{path}: not an exported segmenter (its serving_default returns "
                         f"{sorted(outputs)}, not labels and color)")
    logging.info("segmenting with the SavedModel %s", path)

    def segment(pixels: tf.Tensor) -> Mapping[str, tf.Tensor]:
        # Through ``loaded``, which owns the variables: it must live as long as ``segment``.
        return loaded.signatures["serving_default"](images=pixels)

    return segment


def load_run(run_dir: str) -> Segment:
    """The final segmenter of a training run: its newest export, else the stage that
    RUN_DIR/final.json names, restored from its checkpoint."""
    run = RunDir(run_dir)
    model_dir = os.path.join(run.export_dir, export.SEGMENTER_NAME)
    if export.next_version(model_dir) > 1:
        return load_saved_model(model_dir)
    stage = run.read_final()["segmenter_stage"]
    run.load_config()
    segmenter = run.restore_segmenter(stage)
    logging.info("segmenting with M of stage %s of %s (no export)", stage, run_dir)
    return tf.function(lambda pixels: export.segment_pixels(segmenter, pixels),
                       input_signature=[export.IMAGES_SPEC])


def segment_batches(segment: Segment, batches: Sequence[Sequence[InputImage]], out_dir: str,
                    overlay_alpha: float, progress: Progress) -> None:
    """Segments each batch (images of one size) and writes the outputs of its images."""
    done = progress.start
    for batch in batches:
        pixels = tf.constant(np.stack([read_image(image.path) for image in batch]))
        outputs = segment(pixels)
        blended = overlay(pixels, outputs["color"], overlay_alpha).numpy()
        train_ids = outputs["labels"].numpy().astype(np.uint8)
        color = outputs["color"].numpy()
        for index, image in enumerate(batch):
            paths = output_paths(out_dir, image)
            images.write_png(paths["trainIds"], train_ids[index])
            images.write_png(paths["color"], color[index])
            images.write_png(paths["overlay"], blended[index])
        done += len(batch)
        progress.update(done, extra=f"{pixels.shape[1]}x{pixels.shape[2]}")


def predict_files(inputs: Sequence[str], out_dir: str, *, saved_model: str | None = None,
                  run_dir: str | None = None, batch_size: int = 4, overlay_alpha: float = 0.5,
                  overwrite: bool = False) -> int:
    """The program: segments the images of ``inputs`` into ``out_dir`` with exactly one of
    ``saved_model`` and ``run_dir``; returns how many images it segmented."""
    if bool(saved_model) == bool(run_dir):
        raise ValueError("give exactly one of --saved_model and --run_dir")
    if not inputs:
        raise ValueError("give at least one --input image file or folder")
    found = find_images(inputs, exclude=[out_dir])
    todo = [image for image in found if overwrite
            or not all(map(os.path.isfile, output_paths(out_dir, image).values()))]
    if len(todo) < len(found):
        logging.info("predict: %d of %d images already segmented in %s (--overwrite redoes "
                     "them)", len(found) - len(todo), len(found), out_dir)
    if todo:
        # Every file that is no image is named before the model loads.
        sizes = [image_size(image.path) for image in todo]
        segment = load_saved_model(saved_model) if saved_model else load_run(run_dir)
        progress = Progress("predict", total=len(found), start=len(found) - len(todo))
        segment_batches(segment, batches_by_size(todo, sizes, batch_size), out_dir,
                        overlay_alpha, progress)
    return len(todo)


def define_flags() -> None:
    """Flags of ``python -m sait_tf.predict`` (defined only when run as a program)."""
    flags.DEFINE_string("saved_model", None,
                        "exported segmenter: BASE/sait_segmenter/VERSION (or its parent)")
    flags.DEFINE_string("run_dir", None, "training run: its newest export, else the final "
                        "segmenter's checkpoint")
    flags.DEFINE_multi_string("input", [], "image file or folder (searched recursively); "
                              "repeatable, positional arguments count too")
    flags.DEFINE_string("out_dir", None, "output folder, mirroring the input folders")
    flags.DEFINE_integer("batch_size", 4, "images of equal size per batch", lower_bound=1)
    flags.DEFINE_float("overlay_alpha", 0.5, "weight of the colours in <stem>_overlay.png",
                       lower_bound=0.0, upper_bound=1.0)
    flags.DEFINE_bool("overwrite", False, "segment again images whose outputs exist")
    flags.mark_flag_as_required("out_dir")


def main(argv: list[str]) -> None:
    values = flags.FLAGS
    count = predict_files([*values.input, *argv[1:]], values.out_dir,
                          saved_model=values.saved_model, run_dir=values.run_dir,
                          batch_size=values.batch_size, overlay_alpha=values.overlay_alpha,
                          overwrite=values.overwrite)
    print(f"segmented {count} images into {values.out_dir}")


def run() -> None:
    """The ``sait-predict`` console script: a user error ends it with one line ``error: ...``
    and exit status 1 (``cli.run``)."""
    cli.run(main, define_flags)


if __name__ == "__main__":
    run()
