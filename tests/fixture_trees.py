"""Small dataset trees in the real on-disk layouts (REFERENCE.md section 1).

Each ``make_*_tree`` function writes a deterministic tree (from ``seed``) under ``root`` and
returns the trainId label arrays (numpy uint8, HxW) of the examples it wrote, in the order
``sait_tf.data.readers.list_examples`` returns them. The raw labels always contain the values
that catch wrong readers: GTA5 pole (17) and polegroup (18), which share a palette colour;
Cityscapes void ids (0, 1, 4) and the license plate value 255; SYNTHIA instance ids above 255
in the channels after the class channel.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from sait_tf import labels

DEFAULT_SIZE = (24, 40)

# Raw values every generated label map contains (written into its first row).
GTA5_REQUIRED_IDS = (17, 18, 7, 0, 26, 33, 3)
CITYSCAPES_REQUIRED_IDS = (0, 1, 4, 255, 7, 17, 26, 33)
SYNTHIA_REQUIRED_IDS = (0, 3, 7, 13, 22, 8, 1)


def make_image(rng: np.random.Generator, size: tuple[int, int], index: int,
               position_images: bool) -> np.ndarray:
    """An RGB uint8 image; with ``position_images`` R = row, G = column, B = example index."""
    height, width = size
    if not position_images:
        return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    if height > 256 or width > 256:
        raise ValueError(f"position images need height and width <= 256, got {size}")
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    return np.stack([rows, cols, np.full_like(rows, index % 256)], axis=-1).astype(np.uint8)


def _raw_labels(rng: np.random.Generator, size: tuple[int, int], values: Sequence[int],
                required: Sequence[int]) -> np.ndarray:
    raw = rng.choice(np.asarray(values), size=size)
    count = min(len(required), size[1])
    raw[0, :count] = required[:count]
    return raw


def _write_rgb(path: str, image: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(image).save(path)


def write_gta5_label(path: str, label_ids: np.ndarray) -> None:
    """Writes a GTA5 label: palette PNG whose index is the labelId."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image = Image.fromarray(label_ids.astype(np.uint8))
    image.putpalette(labels.LABEL_ID_PALETTE.reshape(-1).tolist())
    image.save(path)


def write_synthia_label(path: str, class_ids: np.ndarray, instance_ids: np.ndarray) -> None:
    """Writes a SYNTHIA label: 16-bit 3-channel PNG, class id in the first (R) channel.

    Pillow cannot write 16-bit RGB PNGs, so this uses ``tf.io.encode_png``.
    """
    import tensorflow as tf

    os.makedirs(os.path.dirname(path), exist_ok=True)
    stacked = np.stack([class_ids, instance_ids, instance_ids[::-1]], axis=-1).astype(np.uint16)
    tf.io.write_file(path, tf.io.encode_png(tf.constant(stacked)))


def write_gray8(path: str, values: np.ndarray) -> None:
    """Writes an 8-bit single-channel PNG (Cityscapes labelIds, trainId pseudo-labels)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(values.astype(np.uint8)).save(path)


def make_gta5_tree(root: str, num: int = 3, size: tuple[int, int] = DEFAULT_SIZE,
                   seed: int = 0, position_images: bool = False) -> list[np.ndarray]:
    """ROOT/images/00001.png (RGB) and ROOT/labels/00001.png (palette, index = labelId)."""
    rng = np.random.default_rng(seed)
    train_ids = []
    for index in range(num):
        name = f"{index + 1:05d}.png"
        _write_rgb(os.path.join(root, "images", name), make_image(rng, size, index,
                                                                   position_images))
        raw = _raw_labels(rng, size, range(labels.NUM_LABEL_IDS), GTA5_REQUIRED_IDS)
        write_gta5_label(os.path.join(root, "labels", name), raw)
        train_ids.append(labels.LABEL_ID_TO_TRAIN_ID[raw])
    return train_ids


def make_synthia_tree(root: str, num: int = 3, size: tuple[int, int] = DEFAULT_SIZE,
                      seed: int = 0, position_images: bool = False) -> list[np.ndarray]:
    """ROOT/RGB/0000000.png and ROOT/GT/LABELS/0000000.png (16-bit, class in channel 0)."""
    rng = np.random.default_rng(seed)
    train_ids = []
    for index in range(num):
        name = f"{index:07d}.png"
        _write_rgb(os.path.join(root, "RGB", name), make_image(rng, size, index,
                                                                position_images))
        raw = _raw_labels(rng, size, range(labels.NUM_SYNTHIA_IDS), SYNTHIA_REQUIRED_IDS)
        instances = rng.integers(256, 65536, size=size)
        write_synthia_label(os.path.join(root, "GT", "LABELS", name), raw, instances)
        train_ids.append(labels.SYNTHIA_TO_TRAIN_ID[raw])
    return train_ids


def cityscapes_names(cities: Sequence[str] = ("aachen", "bochum"),
                     per_city: int = 2) -> list[str]:
    """Example names ``CITY/CITY_000000_0000NN`` the Cityscapes fixture writes, sorted."""
    return sorted(f"{city}/{city}_000000_{19 + k:06d}" for city in cities
                  for k in range(per_city))


def make_cityscapes_tree(root: str, splits: Sequence[str] = ("train", "val"),
                         cities: Sequence[str] = ("aachen", "bochum"), per_city: int = 2,
                         size: tuple[int, int] = DEFAULT_SIZE, seed: int = 0,
                         position_images: bool = False) -> list[np.ndarray]:
    """ROOT/leftImg8bit/SPLIT/CITY/*_leftImg8bit.png and ROOT/gtFine/SPLIT/CITY/*_labelIds.png.

    Every split gets the same cities and frames. The returned trainIds are the concatenation
    over ``splits`` in the given order; a "test" split gets images only (no labels, nothing
    returned for it), as in the real set where test labels are withheld.
    """
    rng = np.random.default_rng(seed)
    raw_values = list(range(labels.NUM_LABEL_IDS)) + [255]
    train_ids = []
    for split in splits:
        for index, name in enumerate(cityscapes_names(cities, per_city)):
            _write_rgb(os.path.join(root, "leftImg8bit", split, f"{name}_leftImg8bit.png"),
                       make_image(rng, size, index, position_images))
            if split == "test":
                continue
            raw = _raw_labels(rng, size, raw_values, CITYSCAPES_REQUIRED_IDS)
            write_gray8(os.path.join(root, "gtFine", split, f"{name}_gtFine_labelIds.png"), raw)
            train_ids.append(labels.LABEL_ID_TO_TRAIN_ID[raw])
    return train_ids


def make_trainid_dir(root: str, names: Sequence[str], size: tuple[int, int] = DEFAULT_SIZE,
                     seed: int = 0) -> list[np.ndarray]:
    """Pseudo-label directory: trainId PNGs at ROOT/<name>.png (values 0..18 and 255)."""
    rng = np.random.default_rng(seed)
    values = list(range(labels.NUM_CLASSES)) + [labels.IGNORE_INDEX]
    written = []
    for name in names:
        train_ids = rng.choice(np.asarray(values), size=size).astype(np.uint8)
        write_gray8(os.path.join(root, f"{name}.png"), train_ids)
        written.append(train_ids)
    return written
