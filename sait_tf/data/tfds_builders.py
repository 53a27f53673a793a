"""TFDS builders for GTA5 and SYNTHIA-RAND-CITYSCAPES from the user's copy (manual_dir).

Optional path: ``readers.make_dataset`` reads the folders directly. The builders store the
RGB image and the trainId label (uint8 [H, W, 1], 255 = ignore) under one "train" split
(neither set has an official split; use TFDS slicing such as "train[:90%]"). Nothing is
downloaded. Cityscapes has TFDS's own ``cityscapes`` builder (labelIds, not trainIds).
"""

from __future__ import annotations

from collections.abc import Iterator

from sait_tf.data import readers, scan

try:
    import importlib_resources  # noqa: F401  (tensorflow-datasets needs it, does not declare it)
    import tensorflow_datasets as tfds
except ImportError as error:
    raise ImportError(f"sait_tf.data.tfds_builders needs the optional extra tfds ({error}): "
                      'pip install sait_tf[tfds] (in a clone: pip install -e ".[tfds]")'
                      ) from error

_MANUAL_INSTRUCTIONS = """\
Place your copy of the dataset in `manual_dir` ({layout}) and pass it with
`tfds.download.DownloadConfig(manual_dir=...)`; nothing is downloaded.
"""


class _ManualDirBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared generation: list and scan the manual_dir, then store image + trainId label."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Image and trainId label from a manual_dir."}
    DATASET = ""
    DESCRIPTION = ""

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.DESCRIPTION,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "label": tfds.features.Image(shape=(None, None, 1)),
                "name": tfds.features.Text(),
            }),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        examples = readers.list_examples(self.DATASET, str(dl_manager.manual_dir))
        report = scan.scan_examples(examples, on_size_mismatch="skip")
        return {"train": self._generate_examples(report.examples)}

    def _generate_examples(self, examples: list[readers.Example]) -> Iterator[tuple[str, dict]]:
        for example in examples:
            yield example.name, {
                "image": example.image,
                "label": readers.read_train_ids(example.label, example.label_format)[..., None],
                "name": example.name,
            }


class Gta5(_ManualDirBuilder):
    """GTA5 (Richter et al. 2016), 24,966 frames; labels mapped to Cityscapes trainIds."""

    DATASET = "gta5"
    DESCRIPTION = "GTA5 frames with Cityscapes trainId labels."
    MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_INSTRUCTIONS.format(
        layout="images/00001.png, labels/00001.png")


class SynthiaRandCityscapes(_ManualDirBuilder):
    """SYNTHIA-RAND-CITYSCAPES, 9,400 frames; labels mapped to Cityscapes trainIds."""

    DATASET = "synthia"
    DESCRIPTION = "SYNTHIA-RAND-CITYSCAPES frames with Cityscapes trainId labels."
    MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_INSTRUCTIONS.format(
        layout="RGB/0000000.png, GT/LABELS/0000000.png")
