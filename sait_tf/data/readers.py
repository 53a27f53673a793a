"""Dataset readers: list the examples of GTA5, SYNTHIA and Cityscapes trees, build tf.data.

Layouts (docs/facts.md s.1, "Layouts on disk"):
  gta5        ROOT/images/NAME.png, ROOT/labels/NAME.png (palette PNG, index = labelId)
  synthia     ROOT/RGB/NAME.png, ROOT/GT/LABELS/NAME.png (16-bit, class id in channel 0)
  cityscapes  ROOT/leftImg8bit/SPLIT/CITY/NAME_leftImg8bit.png,
              ROOT/gtFine/SPLIT/CITY/NAME_gtFine_labelIds.png (8-bit labelIds)
Every label format is mapped to int32 trainIds (255 = ignore) through the tables of
``sait_tf.labels``.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from typing import NamedTuple

import gin
import numpy as np
import tensorflow as tf
from PIL import Image

from sait_tf import labels

DATASETS = ("gta5", "synthia", "cityscapes")
LABEL_FORMATS = ("gta5", "synthia", "cityscapes", "trainid")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
CITYSCAPES_IMAGE_SUFFIX = "_leftImg8bit"
CITYSCAPES_LABEL_SUFFIX = "_gtFine_labelIds.png"

# Folder of images and of labels relative to ROOT for the datasets without split folders.
_FOLDER_LAYOUTS = {
    "gta5": ("images", "labels"),
    "synthia": ("RGB", os.path.join("GT", "LABELS")),
}
# Raw label value -> trainId, 256 entries per label format (values above 255 are clipped to
# 255, which every table maps to the ignore index).
_TRAIN_ID_TABLES = {
    "gta5": labels.LABEL_ID_TO_TRAIN_ID,
    "cityscapes": labels.LABEL_ID_TO_TRAIN_ID,
    "synthia": labels.SYNTHIA_TO_TRAIN_ID,
    "trainid": labels.raw_to_train_ids(np.arange(256), "trainid"),
}


class Example(NamedTuple):
    """One image and its label file.

    ``name`` is the matching key: the file stem for gta5/synthia ("00001"), "CITY/CITY_SEQ_FRAME"
    for Cityscapes. ``label`` is None when the split has no labels (Cityscapes test).
    """

    image: str
    label: str | None
    name: str
    label_format: str


def list_examples(dataset: str, root: str, split: str = "train", list_file: str | None = None,
                  labels_from: str | None = None) -> list[Example]:
    """Lists the examples of ``dataset`` under ``root``, sorted by name.

    GTA5 and SYNTHIA have no split folders: ``split`` is ignored and subsets are selected with
    ``list_file`` (one relative path per line, e.g. "00001.png" or "images/00001.png").
    Cityscapes reads ``leftImg8bit/SPLIT``; its list files hold paths relative to
    ``leftImg8bit/SPLIT`` or to ``root``. ``labels_from`` is a directory of trainId PNGs at
    ``<name>.png`` (pseudo-labels) that replaces the dataset's labels.

    Without a list file, label files that have no image are listed too (with the image path
    they would need) so that ``scan_examples`` reports them; listed images must exist.
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{dataset} root {root!r} is not a directory")
    if labels_from is not None and not os.path.isdir(labels_from):
        raise FileNotFoundError(f"labels_from {labels_from!r} is not a directory")
    if dataset == "cityscapes":
        examples = _cityscapes_examples(root, split, list_file, labels_from is None)
    else:
        examples = _folder_examples(dataset, root, list_file, labels_from is None)
    if labels_from is not None:
        examples = [ex._replace(label=os.path.join(labels_from, f"{ex.name}.png"),
                                label_format="trainid") for ex in examples]
    return sorted(examples, key=lambda ex: ex.name)


def _read_list_file(list_file: str) -> list[tuple[int, str]]:
    if not os.path.isfile(list_file):
        raise FileNotFoundError(f"list_file {list_file!r} does not exist")
    with open(list_file) as f:
        entries = [(number, line.strip()) for number, line in enumerate(f, start=1)]
    entries = [(number, entry) for number, entry in entries
               if entry and not entry.startswith("#")]
    if not entries:
        raise ValueError(f"list_file {list_file!r} lists no files")
    return entries


def _resolve_entry(list_file: str, number: int, entry: str, bases: Sequence[str]) -> str:
    candidates = [os.path.join(base, entry) for base in bases]
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(f"{list_file}:{number}: {entry!r} does not exist "
                            f"(tried {', '.join(candidates)})")


def _image_files(directory: str) -> list[str]:
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"image folder {directory!r} does not exist")
    return sorted(f for f in os.listdir(directory)
                  if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))


def _check_unique(examples: list[Example], list_file: str) -> None:
    seen = set()
    for example in examples:
        if example.name in seen:
            raise ValueError(f"list_file {list_file!r} lists {example.name!r} more than once")
        seen.add(example.name)


def _folder_examples(dataset: str, root: str, list_file: str | None,
                     include_orphan_labels: bool) -> list[Example]:
    image_dir, label_dir = (os.path.join(root, d) for d in _FOLDER_LAYOUTS[dataset])

    def example(image_path: str) -> Example:
        name = os.path.splitext(os.path.basename(image_path))[0]
        return Example(image_path, os.path.join(label_dir, f"{name}.png"), name, dataset)

    if list_file is not None:
        examples = [example(_resolve_entry(list_file, number, entry, (root, image_dir)))
                    for number, entry in _read_list_file(list_file)]
        _check_unique(examples, list_file)
        return examples
    examples = [example(os.path.join(image_dir, f)) for f in _image_files(image_dir)]
    if not examples:
        raise ValueError(f"no images (*.png, *.jpg) found in {image_dir!r}")
    if include_orphan_labels and os.path.isdir(label_dir):
        names = {ex.name for ex in examples}
        for label_file in sorted(os.listdir(label_dir)):
            name, extension = os.path.splitext(label_file)
            if extension == ".png" and name not in names:
                examples.append(Example(os.path.join(image_dir, label_file),
                                        os.path.join(label_dir, label_file), name, dataset))
    return examples


def _cityscapes_example(root: str, image_path: str, with_labels: bool) -> Example:
    image_root = os.path.join(root, "leftImg8bit")
    relative = os.path.relpath(image_path, image_root).split(os.sep)
    stem = os.path.splitext(relative[-1])[0]
    if len(relative) != 3 or not stem.endswith(CITYSCAPES_IMAGE_SUFFIX):
        raise ValueError(f"{image_path!r} is not a Cityscapes image "
                         f"(expected {image_root}/SPLIT/CITY/CITY_SEQ_FRAME_leftImg8bit.png)")
    split, city = relative[0], relative[1]
    base = stem[: -len(CITYSCAPES_IMAGE_SUFFIX)]
    label = None
    if with_labels and split != "test":
        label = os.path.join(root, "gtFine", split, city, base + CITYSCAPES_LABEL_SUFFIX)
    return Example(image_path, label, f"{city}/{base}", "cityscapes")


def _cityscapes_examples(root: str, split: str, list_file: str | None,
                         include_labels: bool) -> list[Example]:
    split_dir = os.path.join(root, "leftImg8bit", split)
    if list_file is not None:
        examples = [
            _cityscapes_example(root, _resolve_entry(list_file, number, entry, (split_dir, root)),
                                include_labels)
            for number, entry in _read_list_file(list_file)]
        _check_unique(examples, list_file)
        return examples
    if not os.path.isdir(split_dir):
        raise FileNotFoundError(f"Cityscapes split folder {split_dir!r} does not exist")
    examples = []
    for city in sorted(os.listdir(split_dir)):
        city_dir = os.path.join(split_dir, city)
        if os.path.isdir(city_dir):
            examples += [_cityscapes_example(root, os.path.join(city_dir, f), include_labels)
                         for f in _image_files(city_dir)
                         if os.path.splitext(f)[0].endswith(CITYSCAPES_IMAGE_SUFFIX)]
    if not examples:
        raise ValueError(f"no Cityscapes images (*_leftImg8bit.png) found in {split_dir!r}")
    label_dir = os.path.join(root, "gtFine", split)
    if include_labels and split != "test" and os.path.isdir(label_dir):
        names = {ex.name for ex in examples}
        for city in sorted(os.listdir(label_dir)):
            city_dir = os.path.join(label_dir, city)
            if not os.path.isdir(city_dir):
                continue
            for label_file in sorted(os.listdir(city_dir)):
                if not label_file.endswith(CITYSCAPES_LABEL_SUFFIX):
                    continue
                base = label_file[: -len(CITYSCAPES_LABEL_SUFFIX)]
                if f"{city}/{base}" not in names:
                    image = os.path.join(split_dir, city, f"{base}{CITYSCAPES_IMAGE_SUFFIX}.png")
                    examples.append(Example(image, os.path.join(city_dir, label_file),
                                            f"{city}/{base}", "cityscapes"))
    return examples


def _palette_indices(data: bytes, path: bytes) -> np.ndarray:
    """Palette index of a GTA5 label (tf.io.decode_png would expand the palette to colours)."""
    # Eager tf.numpy_function passes 0-d object arrays, tf.data passes bytes.
    data, path = np.asarray(data).item(), np.asarray(path).item()
    with Image.open(io.BytesIO(data)) as image:
        if image.mode not in ("P", "L"):
            raise ValueError(f"{path.decode()}: GTA5 labels must be palette PNGs whose index is "
                             f"the labelId, got mode {image.mode}")
        return np.asarray(image, dtype=np.uint8)


def decode_raw_label(data: tf.Tensor, label_format: str, path: tf.Tensor | str = "") -> tf.Tensor:
    """Decodes the raw label values (labelIds, SYNTHIA ids or trainIds) as int32 [H, W]."""
    if label_format == "gta5":
        raw = tf.numpy_function(_palette_indices, [data, path], tf.uint8, stateful=False)
        raw.set_shape([None, None])
    elif label_format == "synthia":
        raw = tf.io.decode_png(data, dtype=tf.uint16)[..., 0]
    elif label_format in ("cityscapes", "trainid"):
        raw = tf.io.decode_png(data, channels=1)[..., 0]
    else:
        raise ValueError(f"unknown label_format {label_format!r}; "
                         f"expected one of {', '.join(LABEL_FORMATS)}")
    return tf.cast(raw, tf.int32)


def raw_to_train_ids(raw: tf.Tensor, label_format: str) -> tf.Tensor:
    """Maps raw label values to int32 trainIds (255 = ignore) with the tables of labels.py."""
    table = tf.constant(_TRAIN_ID_TABLES[label_format], dtype=tf.int32)
    return tf.gather(table, tf.clip_by_value(raw, 0, 255))


def decode_image(data: tf.Tensor) -> tf.Tensor:
    """Decodes a PNG or JPEG to float32 RGB [H, W, 3] in [0, 255]."""
    image = tf.io.decode_image(data, channels=3, expand_animations=False)
    return tf.cast(image, tf.float32)


def read_train_ids(path: str, label_format: str) -> np.ndarray:
    """Reads one label file as uint8 trainIds (eager; for tools and dataset builders)."""
    raw = decode_raw_label(tf.io.read_file(path), label_format, path)
    return raw_to_train_ids(raw, label_format).numpy().astype(np.uint8)


def _label_format(examples: Sequence[Example]) -> str | None:
    """The common label format, or None when some example has no label."""
    if any(ex.label is None for ex in examples):
        return None
    formats = {ex.label_format for ex in examples}
    if len(formats) != 1:
        raise ValueError(f"examples mix label formats {sorted(formats)}; "
                         "build one dataset per format")
    label_format = formats.pop()
    if label_format not in LABEL_FORMATS:
        raise ValueError(f"unknown label_format {label_format!r}; "
                         f"expected one of {', '.join(LABEL_FORMATS)}")
    return label_format


def _order(num_examples: int, shuffle: bool, repeat: bool, seed: int) -> tf.data.Dataset:
    """Example indices: each epoch a permutation derived from (seed, epoch) when shuffling."""
    if not repeat:
        one_epoch = tf.range(num_examples, dtype=tf.int64)
        if shuffle:
            one_epoch = tf.random.experimental.stateless_shuffle(
                one_epoch, seed=tf.constant([seed, 0], tf.int64))
        return tf.data.Dataset.from_tensor_slices(one_epoch)  # known length, for progress/ETA
    epochs = tf.data.Dataset.counter()
    if not shuffle:
        return epochs.flat_map(lambda _: tf.data.Dataset.range(num_examples))

    def permutation(epoch: tf.Tensor) -> tf.data.Dataset:
        order = tf.random.experimental.stateless_shuffle(
            tf.range(num_examples, dtype=tf.int64), seed=tf.stack([tf.constant(seed, tf.int64),
                                                                   epoch]))
        return tf.data.Dataset.from_tensor_slices(order)

    return epochs.flat_map(permutation)


def _random_crop(image: tf.Tensor, label: tf.Tensor | None, crop: tuple[int, int],
                 seed: tf.Tensor, name: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor | None]:
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    crop_h, crop_w = crop
    fits = tf.debugging.Assert(tf.logical_and(height >= crop_h, width >= crop_w),
                               ["crop", crop_h, crop_w, "is larger than image", name, height,
                                width])
    with tf.control_dependencies([fits]):
        top = tf.random.stateless_uniform([], seed, 0, height - crop_h + 1, dtype=tf.int32)
        left = tf.random.stateless_uniform([], seed + 1, 0, width - crop_w + 1, dtype=tf.int32)
    image = image[top:top + crop_h, left:left + crop_w]
    if label is not None:
        label = label[top:top + crop_h, left:left + crop_w]
    return image, label


@gin.configurable(allowlist=["image_resize_method", "num_parallel_calls"])
def make_dataset(examples: Sequence[Example], *, resize: tuple[int, int] | None = None,
                 crop: tuple[int, int] | None = None, flip: bool = False, shuffle: bool = False,
                 repeat: bool = False, batch_size: int = 1, seed: int | None = None,
                 image_resize_method: str = "bicubic", drop_remainder: bool = False,
                 num_parallel_calls: int = tf.data.AUTOTUNE) -> tf.data.Dataset:
    """tf.data over ``examples``: dicts of "image" float32 [B, H, W, 3] RGB 0..255,
    "label" int32 [B, H, W] trainIds (only when every example has a label), "name" string [B].

    Per example, in order: ``resize`` (H, W) (images bicubic with antialiasing and clipped to
    0..255, or bilinear; labels nearest), ``crop`` (h, w) at the same random place in image
    and label, ``flip`` the same random horizontal flip for both. The order and the random
    augmentations depend only on ``seed`` (a random seed is drawn when None). Without
    ``resize`` image and label must have the same size; with it both are resized to it
    independently (so pseudo-labels stored at a lower resolution fit), as the peers do.
    """
    if not examples:
        raise ValueError("make_dataset got no examples")
    if image_resize_method not in ("bicubic", "bilinear"):
        raise ValueError(f"image_resize_method must be 'bicubic' or 'bilinear', "
                         f"got {image_resize_method!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for param, value in (("resize", resize), ("crop", crop)):
        if value is not None and (len(value) != 2 or min(value) < 1):
            raise ValueError(f"{param} must be (height, width) of positive ints, got {value}")
    if resize is not None and crop is not None and (crop[0] > resize[0] or crop[1] > resize[1]):
        raise ValueError(f"crop {tuple(crop)} is larger than resize {tuple(resize)}")
    if seed is None:
        seed = int(np.random.default_rng().integers(2**31))
    label_format = _label_format(examples)
    image_paths = tf.constant([ex.image for ex in examples])
    label_paths = tf.constant([ex.label or "" for ex in examples])
    names = tf.constant([ex.name for ex in examples])

    def load(position: tf.Tensor, index: tf.Tensor) -> dict[str, tf.Tensor]:
        name = names[index]
        element_seed = tf.stack([tf.constant(seed, tf.int64), position])
        image = decode_image(tf.io.read_file(image_paths[index]))
        label = None
        if label_format is not None:
            label_path = label_paths[index]
            raw = decode_raw_label(tf.io.read_file(label_path), label_format, label_path)
            label = raw_to_train_ids(raw, label_format)
        if label is not None and resize is None:
            same_size = tf.debugging.Assert(
                tf.reduce_all(tf.shape(image)[:2] == tf.shape(label)),
                ["image and label sizes differ for", name, tf.shape(image), tf.shape(label)])
            with tf.control_dependencies([same_size]):
                label = tf.identity(label)
        if resize is not None:
            image = tf.image.resize(image, resize, method=image_resize_method, antialias=True)
            image = tf.clip_by_value(image, 0.0, 255.0)
            if label is not None:
                label = tf.image.resize(label[..., None], resize, method="nearest")[..., 0]
        if crop is not None:
            image, label = _random_crop(image, label, crop, element_seed, name)
        if flip:
            do_flip = tf.random.stateless_uniform([], element_seed + 2) < 0.5
            image = tf.cond(do_flip, lambda: image[:, ::-1], lambda: image)
            if label is not None:
                label = tf.cond(do_flip, lambda: label[:, ::-1], lambda: label)
        out_size = crop or resize or (None, None)
        image = tf.ensure_shape(image, [*out_size, 3])
        element = {"image": image, "name": name}
        if label is not None:
            element["label"] = tf.ensure_shape(label, out_size)
        return element

    dataset = _order(len(examples), shuffle, repeat, seed).enumerate()
    dataset = dataset.map(load, num_parallel_calls=num_parallel_calls, deterministic=True)
    dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
    return dataset.prefetch(tf.data.AUTOTUNE)
