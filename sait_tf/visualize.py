"""Pictures people look at: M's prediction grids (TensorBoard) and the run's overview.png.

``RUN_DIR/overview.png`` (written by the pipeline after export) has one row per example:
source image | F's translation of it (from the translated set on disk) | target-val image |
the final segmenter's colourised prediction | the colourised ground truth. Source and target
columns come from different scenes: the method never sees a source/target pair of one scene.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import keras
import numpy as np
import tensorflow as tf
from PIL import Image

from sait_tf import images
from sait_tf.data import readers
from sait_tf.data.translated_set import output_paths

GAP = 2  # white pixels between cells


def _fit(image: np.ndarray, size: tuple[int, int], nearest: bool) -> np.ndarray:
    """``image`` resized to (height, width); nearest for label colours, bilinear for photos."""
    if image.shape[:2] == size:
        return image
    method = Image.NEAREST if nearest else Image.BILINEAR
    return np.asarray(Image.fromarray(image).resize((size[1], size[0]), method))


def _spaced(cells: Sequence[np.ndarray], axis: int) -> np.ndarray:
    """Concatenates cells along ``axis`` with white gaps between them."""
    shape = list(cells[0].shape)
    shape[axis] = GAP
    gap = np.full(shape, 255, np.uint8)
    parts = [part for cell in cells for part in (cell, gap)][:-1]
    return np.concatenate(parts, axis=axis)


def prediction_grids(segmenter: keras.Model, batches: list[dict]) -> tf.Tensor:
    """uint8 [N, H, 3W, 3]: image | colourised prediction | colourised ground truth.

    One row per batch (its first example) at the label's size; rows of other sizes are
    resized to the first one's.
    """
    rows = []
    for batch in batches:
        image, label = batch["image"][:1], batch["label"][:1]
        size = tf.shape(label)[1:3]
        logits = images.resize_logits(segmenter(image, training=False), size)
        prediction = tf.argmax(logits, axis=-1, output_type=tf.int32)
        picture = images.to_uint8(tf.image.resize(image, size, method="bilinear"))
        rows.append(tf.concat([picture, images.colorize(prediction), images.colorize(label)],
                              axis=2)[0])
    grid_size = tf.shape(rows[0])[:2]
    return tf.stack([tf.image.resize(row, grid_size, method="nearest") for row in rows])


def overview_grid(segmenter: keras.Model, source_examples: Sequence[readers.Example],
                  translated_dir: str | None, val_batches: Iterable[dict],
                  num_rows: int = 4, cell_height: int = 192) -> np.ndarray:
    """uint8 RGB grid, one row per example (columns in the module docstring).

    ``val_batches`` yield {"image", "label"} as ``evaluate.evaluation_dataset`` does. Without
    ``translated_dir`` (no round ran) the translation column is left out. Every cell is
    ``cell_height`` pixels high with the target label's aspect ratio.
    """
    batches = list(val_batches)[:num_rows]
    if not batches or not source_examples:
        raise ValueError("overview_grid: needs at least one source example and one val batch")
    target_rows = prediction_grids(segmenter, batches).numpy()
    label_width = target_rows.shape[2] // 3
    size = (cell_height, max(1, round(cell_height * label_width / target_rows.shape[1])))
    rows = []
    for index, target_row in enumerate(target_rows):
        source = source_examples[index % len(source_examples)]
        photos = [source.image]
        if translated_dir is not None:
            photos.append(output_paths(translated_dir, source.name)[0])
        cells = [_fit(np.asarray(Image.open(path).convert("RGB")), size, nearest=False)
                 for path in photos]
        columns = [target_row[:, i * label_width:(i + 1) * label_width] for i in range(3)]
        cells += [_fit(column, size, nearest=i > 0) for i, column in enumerate(columns)]
        rows.append(_spaced(cells, axis=1))
    return _spaced(rows, axis=0)
