"""Start-up scan of a dataset: fail fast, naming the file and the problem, before training.

Passes, each over the examples ``list_examples`` returned:
  1. every image has its label and every label its image (files exist);
  2. the header of EVERY file (PNG: the first 33 bytes and the closing IEND chunk; JPEG: its
     header through Pillow): a PNG/JPEG at all, not truncated, label bit depth and colour type
     fit the label format, image and label sizes agree;
  3. a full decode of a bounded, evenly spaced sample (``max_decode``, default
     ``DEFAULT_MAX_DECODE``) with the same decoders as ``make_dataset``; the raw label values
     must be known to the label format (``sait_tf.labels.KNOWN_RAW_VALUES``).
Passes 1-2 read a few bytes per file, so 25k GTA5 pairs take seconds.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
import struct
from collections.abc import Sequence

import gin
import numpy as np
import tensorflow as tf
from absl import logging
from PIL import Image

from sait_tf import labels
from sait_tf.data import readers
from sait_tf.runtime.progress import Progress

DEFAULT_MAX_DECODE = 32

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"
_JPEG_SIGNATURE = b"\xff\xd8\xff"
_PNG_COLOR_TYPES = {0: "grayscale", 2: "RGB", 3: "palette", 4: "grayscale+alpha", 6: "RGBA"}
# (bit depth, PNG colour type) each label format may use, and how to say it.
_LABEL_PNG_KINDS = {
    "gta5": ({(8, 3), (8, 0)}, "8-bit palette PNGs whose index is the labelId"),
    "synthia": ({(16, 0), (16, 2), (16, 4), (16, 6)}, "16-bit PNGs with the class id in channel 0"),
    "cityscapes": ({(8, 0)}, "8-bit grayscale PNGs of labelIds"),
    "trainid": ({(8, 0)}, "8-bit grayscale PNGs of trainIds"),
}


class DatasetError(ValueError):
    """A dataset problem found by the scan; the message names the file."""


@dataclasses.dataclass
class ScanReport:
    """What the scan saw. ``examples`` are the usable examples (after skipping)."""

    examples: list[readers.Example]
    image_sizes: dict[tuple[int, int], int]  # (height, width) -> number of images
    label_value_counts: dict[int, int]  # raw label value -> pixels, over the decoded labels
    num_decoded: int
    skipped: list[str]

    @property
    def num_examples(self) -> int:
        return len(self.examples)

    def summary(self) -> str:
        sizes = ", ".join(f"{h}x{w}: {n}" for (h, w), n in sorted(self.image_sizes.items()))
        total = sum(self.label_value_counts.values()) or 1
        frequent = sorted(self.label_value_counts.items(), key=lambda kv: -kv[1])[:8]
        values = ", ".join(f"{v}: {100 * n / total:.1f}%" for v, n in frequent)
        return (f"{self.num_examples} examples (skipped {len(self.skipped)}); "
                f"image sizes (HxW) {sizes}; {self.num_decoded} fully decoded; "
                f"most frequent raw label values {values or 'none decoded'}")


@dataclasses.dataclass(frozen=True)
class _Header:
    kind: str  # "png" or "jpeg"
    height: int
    width: int
    bit_depth: int = 8
    color_type: int = -1  # PNG colour type, -1 for JPEG


def _fail(problems: Sequence[str]) -> None:
    if problems:
        more = f" ({len(problems) - 1} more problems of this kind)" if len(problems) > 1 else ""
        raise DatasetError(problems[0] + more)


def _read_header(path: str) -> _Header:
    """Parses the size and pixel format from the file's first bytes; raises DatasetError."""
    with open(path, "rb") as f:
        head = f.read(33)
        if head.startswith(_PNG_SIGNATURE):
            if len(head) < 33 or head[12:16] != b"IHDR":
                raise DatasetError(f"{path}: truncated or corrupt PNG (no IHDR header)")
            f.seek(-len(_PNG_IEND), os.SEEK_END)
            if f.read() != _PNG_IEND:
                raise DatasetError(f"{path}: truncated PNG (the file does not end with IEND)")
            width, height, bit_depth, color_type = struct.unpack(">IIBB", head[16:26])
            return _Header("png", height, width, bit_depth, color_type)
    if head.startswith(_JPEG_SIGNATURE):
        try:
            with Image.open(path) as image:
                width, height = image.size
        except (OSError, SyntaxError) as error:
            raise DatasetError(f"{path}: corrupt JPEG header ({error})") from None
        return _Header("jpeg", height, width)
    what = "an empty file" if not head else "not a PNG or JPEG file"
    raise DatasetError(f"{path}: {what} (first bytes {head[:8]!r})")


def _check_label_kind(path: str, header: _Header, label_format: str) -> str | None:
    allowed, description = _LABEL_PNG_KINDS[label_format]
    if header.kind == "png" and (header.bit_depth, header.color_type) in allowed:
        return None
    found = ("a JPEG" if header.kind == "jpeg" else
             f"a {header.bit_depth}-bit {_PNG_COLOR_TYPES.get(header.color_type, '?')} PNG")
    return f"{path}: {label_format} labels must be {description}, this is {found}"


def _sizes_agree(image: _Header, label: _Header, label_format: str) -> bool:
    """Equal sizes; trainId pseudo-labels may be stored smaller with the same aspect ratio."""
    if (image.height, image.width) == (label.height, label.width):
        return True
    return label_format == "trainid" and image.width * label.height == label.width * image.height


def _check_files_exist(examples: Sequence[readers.Example]) -> None:
    problems = []
    for ex in examples:
        image_exists = os.path.isfile(ex.image)
        label_exists = ex.label is None or os.path.isfile(ex.label)
        if not image_exists and ex.label is not None and label_exists:
            problems.append(f"label {ex.label} has no image (expected {ex.image})")
        elif not image_exists:
            problems.append(f"image {ex.image} does not exist")
        elif not label_exists:
            problems.append(f"image {ex.image} has no label (expected {ex.label})")
    _fail(problems)


def _error_text(error: Exception) -> str:
    """The decoder's message on one line, without TensorFlow's node and op annotations."""
    text = re.sub(r"\{\{.*?\}\}|\[Op:.*", "", getattr(error, "message", str(error)))
    return " ".join(text.split())[:300]


def _decode(example: readers.Example, header: _Header, check_values: bool,
            value_counts: collections.Counter) -> None:
    """Fully decodes one example with the dataset's decoders and checks its label values."""
    try:
        image = readers.decode_image(tf.io.read_file(example.image))
    except (tf.errors.OpError, ValueError) as error:
        raise DatasetError(f"{example.image}: cannot be decoded ({_error_text(error)})") from None
    if tuple(image.shape[:2]) != (header.height, header.width):
        raise DatasetError(f"{example.image}: decodes to {tuple(image.shape[:2])}, its header "
                           f"says {(header.height, header.width)}")
    if example.label is None:
        return
    try:
        raw = readers.decode_raw_label(tf.io.read_file(example.label), example.label_format,
                                       example.label).numpy()
    except (tf.errors.OpError, ValueError) as error:
        raise DatasetError(f"{example.label}: cannot be decoded ({_error_text(error)})") from None
    counts = np.bincount(raw.ravel())
    present = np.flatnonzero(counts)
    value_counts.update(dict(zip(present.tolist(), counts[present].tolist(), strict=True)))
    if check_values:
        unknown = sorted(set(present.tolist()) - labels.KNOWN_RAW_VALUES[example.label_format])
        if unknown:
            shown = ", ".join(map(str, unknown[:10])) + (", ..." if len(unknown) > 10 else "")
            raise DatasetError(f"{example.label}: values [{shown}] are not "
                               f"{example.label_format} label values (the binding "
                               "scan_examples.check_values = False maps them to ignore "
                               "instead)")


def _sample(count: int, max_decode: int | None) -> list[int]:
    limit = DEFAULT_MAX_DECODE if max_decode is None else max_decode
    if limit < 0:
        raise ValueError(f"max_decode must be >= 0 or None, got {max_decode}")
    if limit >= count:
        return list(range(count))
    return sorted({int(i) for i in np.linspace(0, count - 1, limit).round()}) if limit else []


@gin.configurable(allowlist=["check_values", "max_decode"])
def scan_examples(examples: Sequence[readers.Example], *, check_values: bool = True,
                  max_decode: int | None = None,
                  on_size_mismatch: str = "error") -> ScanReport:
    """Checks ``examples`` and returns what it saw; raises DatasetError naming the file.

    ``max_decode``: examples fully decoded, evenly spaced (None = ``DEFAULT_MAX_DECODE``, all
    of a smaller set; 0 = headers only). ``check_values``: unknown raw label values are an
    error. ``on_size_mismatch``: "error" fails on the first image/label pair whose sizes
    differ, "skip" drops such pairs with a counted warning (the real GTA5 set has a few).
    """
    if on_size_mismatch not in ("error", "skip"):
        raise ValueError(f"on_size_mismatch must be 'error' or 'skip', got {on_size_mismatch!r}")
    if not examples:
        raise DatasetError("no examples to scan (empty split or list file?)")
    for ex in examples:
        if ex.label is not None and ex.label_format not in _LABEL_PNG_KINDS:
            raise ValueError(f"{ex.label}: unknown label_format {ex.label_format!r}")
    _check_files_exist(examples)

    progress = Progress("scan", len(examples))
    kept, headers, skipped, mismatches = [], [], [], []
    image_sizes: collections.Counter = collections.Counter()
    for step, ex in enumerate(examples, start=1):
        image_header = _read_header(ex.image)
        if ex.label is not None:
            label_header = _read_header(ex.label)
            _fail([p for p in [_check_label_kind(ex.label, label_header, ex.label_format)] if p])
            if not _sizes_agree(image_header, label_header, ex.label_format):
                mismatches.append(
                    f"image {ex.image} is {image_header.height}x{image_header.width} (HxW) but "
                    f"label {ex.label} is {label_header.height}x{label_header.width}")
                skipped.append(ex.name)
                continue
        kept.append(ex)
        headers.append(image_header)
        image_sizes[(image_header.height, image_header.width)] += 1
        progress.update(step)
    if mismatches and on_size_mismatch == "error":
        raise DatasetError(f"{mismatches[0]} ({len(mismatches)} pairs differ in size; "
                           "on_size_mismatch='skip' drops them)")
    if mismatches:
        logging.warning("scan: skipping %d of %d examples whose image and label sizes differ "
                        "(first: %s)", len(mismatches), len(examples), mismatches[0])
    if not kept:
        raise DatasetError(f"no usable examples left: all {len(examples)} were skipped")

    value_counts: collections.Counter = collections.Counter()
    sample = _sample(len(kept), max_decode)
    for index in sample:
        _decode(kept[index], headers[index], check_values, value_counts)
    report = ScanReport(kept, dict(image_sizes), dict(sorted(value_counts.items())),
                        len(sample), skipped)
    logging.info("scan: %s", report.summary())
    return report
