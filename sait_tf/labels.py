"""The one label table: Cityscapes classes, GTA5 and SYNTHIA mappings, reported subsets.

Every other module converts labels through the lookup tables defined here
(docs/facts.md s.1, from cityscapesScripts' ``cityscapesscripts/helpers/labels.py`` and
liyunsheng13/BDL ``data/synthia_dataset.py``). Ignored pixels carry ``IGNORE_INDEX``.
"""

from __future__ import annotations

import numpy as np

IGNORE_INDEX = 255
NUM_CLASSES = 19

# Cityscapes labelId -> (name as cityscapesScripts spells it, colour RGB), labelIds 0..33.
CITYSCAPES_LABELS: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("unlabeled", (0, 0, 0)),
    ("ego vehicle", (0, 0, 0)),
    ("rectification border", (0, 0, 0)),
    ("out of roi", (0, 0, 0)),
    ("static", (0, 0, 0)),
    ("dynamic", (111, 74, 0)),
    ("ground", (81, 0, 81)),
    ("road", (128, 64, 128)),
    ("sidewalk", (244, 35, 232)),
    ("parking", (250, 170, 160)),
    ("rail track", (230, 150, 140)),
    ("building", (70, 70, 70)),
    ("wall", (102, 102, 156)),
    ("fence", (190, 153, 153)),
    ("guard rail", (180, 165, 180)),
    ("bridge", (150, 100, 100)),
    ("tunnel", (150, 120, 90)),
    ("pole", (153, 153, 153)),
    ("polegroup", (153, 153, 153)),
    ("traffic light", (250, 170, 30)),
    ("traffic sign", (220, 220, 0)),
    ("vegetation", (107, 142, 35)),
    ("terrain", (152, 251, 152)),
    ("sky", (70, 130, 180)),
    ("person", (220, 20, 60)),
    ("rider", (255, 0, 0)),
    ("car", (0, 0, 142)),
    ("truck", (0, 0, 70)),
    ("bus", (0, 60, 100)),
    ("caravan", (0, 0, 90)),
    ("trailer", (0, 0, 110)),
    ("train", (0, 80, 100)),
    ("motorcycle", (0, 0, 230)),
    ("bicycle", (119, 11, 32)),
)
NUM_LABEL_IDS = len(CITYSCAPES_LABELS)

# trainId -> Cityscapes labelId for the 19 evaluated classes.
TRAIN_ID_TO_LABEL_ID: tuple[int, ...] = (
    7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
CLASS_NAMES: tuple[str, ...] = tuple(CITYSCAPES_LABELS[i][0] for i in TRAIN_ID_TO_LABEL_ID)
PALETTE = np.array([CITYSCAPES_LABELS[i][1] for i in TRAIN_ID_TO_LABEL_ID], dtype=np.uint8)

# SYNTHIA class id (first channel of the 16-bit GT/LABELS png) -> trainId.
SYNTHIA_ID_TO_TRAIN_ID: dict[int, int] = {
    3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 1: 10,
    10: 11, 17: 12, 8: 13, 19: 15, 12: 17, 11: 18}
NUM_SYNTHIA_IDS = 23  # SYNTHIA-RAND-CITYSCAPES uses ids 0..22.

# Reported class subsets (trainIds): mIoU19, mIoU16 (SYNTHIA, FCN8s), mIoU13 (SYNTHIA, DeepLabV2).
CLASS_SUBSETS: dict[int, tuple[int, ...]] = {
    19: tuple(range(19)),
    16: (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18),
    13: (0, 1, 2, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18),
}


def _lookup(mapping: dict[int, int], size: int = 256) -> np.ndarray:
    table = np.full(size, IGNORE_INDEX, dtype=np.uint8)
    for src, dst in mapping.items():
        table[src] = dst
    return table


# uint8 lookup tables of 256 entries; index with the raw label value.
LABEL_ID_TO_TRAIN_ID = _lookup({lid: tid for tid, lid in enumerate(TRAIN_ID_TO_LABEL_ID)})
SYNTHIA_TO_TRAIN_ID = _lookup(SYNTHIA_ID_TO_TRAIN_ID)
TRAIN_ID_TO_LABEL_ID_TABLE = _lookup(dict(enumerate(TRAIN_ID_TO_LABEL_ID)))
TRAIN_ID_TO_LABEL_ID_TABLE[IGNORE_INDEX] = 0  # ignored pixels are written as "unlabeled"

# Colours of every labelId, the palette of GTA5 label PNGs (index = labelId).
LABEL_ID_PALETTE = np.zeros((256, 3), dtype=np.uint8)
LABEL_ID_PALETTE[:NUM_LABEL_IDS] = [colour for _, colour in CITYSCAPES_LABELS]

# Raw label values each dataset is known to use; anything else is reported by the scan.
KNOWN_RAW_VALUES: dict[str, frozenset[int]] = {
    "gta5": frozenset(range(NUM_LABEL_IDS)),
    "cityscapes": frozenset(range(NUM_LABEL_IDS)) | {255},  # 255 = license plate (-1)
    "synthia": frozenset(range(NUM_SYNTHIA_IDS)),
    "trainid": frozenset(range(NUM_CLASSES)) | {IGNORE_INDEX},
}


def raw_to_train_ids(raw: np.ndarray, dataset: str) -> np.ndarray:
    """Maps raw label values of ``dataset`` to trainIds (unknown values become ignore)."""
    if dataset in ("gta5", "cityscapes"):
        table = LABEL_ID_TO_TRAIN_ID
    elif dataset == "synthia":
        table = SYNTHIA_TO_TRAIN_ID
    elif dataset == "trainid":
        table = np.arange(256, dtype=np.uint8)
        table[NUM_CLASSES:] = IGNORE_INDEX
    else:
        raise ValueError(
            f"unknown dataset {dataset!r}; expected gta5, synthia, cityscapes or trainid")
    return table[np.clip(raw, 0, 255).astype(np.int64)]


def class_names(num_classes: int = NUM_CLASSES) -> tuple[str, ...]:
    """Names of the classes in the reported subset of ``num_classes`` (19, 16 or 13)."""
    if num_classes not in CLASS_SUBSETS:
        raise ValueError(f"num_classes must be one of {sorted(CLASS_SUBSETS)}, got {num_classes}")
    return tuple(CLASS_NAMES[i] for i in CLASS_SUBSETS[num_classes])
