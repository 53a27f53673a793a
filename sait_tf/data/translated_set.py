"""The translated source set on disk, in the GTA5 layout, so it reads back as a gta5 dataset.

OUT/images/<name>.png are translated images and OUT/labels/<name>.png the source labels as
GTA5 palette PNGs (index = Cityscapes labelId), so the segmentation stage reads OUT with
``readers.list_examples("gta5", OUT)`` and gets the source's trainIds. The label is written
second, so an example counts as written only when both files exist.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from sait_tf import images, labels

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
