"""Image quality of translated images: FID and Inception Score (paper Sec. 4.3, Table 4).

``python -m sait_tf.quality --translated DIR --reference DIR --inception_weights FILE``

InceptionV3 is ``keras.applications.InceptionV3`` with ImageNet weights read from a file the
user supplies; nothing is downloaded at run time. See docs/image_quality.md.
"""

from __future__ import annotations

import json
import os

import numpy as np
import tensorflow as tf
from absl import flags

from sait_tf import cli, images
from sait_tf.runtime import files
from sait_tf.runtime.progress import Progress

INCEPTION_SIZE = (299, 299)
INCEPTION_WEIGHTS_FILE = "inception_v3_weights_tf_dim_ordering_tf_kernels.h5"
INCEPTION_WEIGHTS_URL = (
    "https://storage.googleapis.com/tensorflow/keras-applications/inception_v3/"
    + INCEPTION_WEIGHTS_FILE)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


def _symmetric_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric PSD matrix through its eigen-decomposition."""
    eigenvalues, eigenvectors = np.linalg.eigh(matrix)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray,
                     mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), the FID.

    d^2 = ||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr(sqrtm(S1 S2)).

    S1 S2 is not symmetric, and a general ``sqrtm`` of it turns complex or unstable when the
    covariances are singular (fewer images than the 2048 feature dimensions, the usual case).
    The trace only needs the eigenvalues: S1 S2 = A (A S2) with A = sqrt(S1), and A S2 A
    = (A S2) A has the same eigenvalues. A S2 A is symmetric PSD, so its eigenvalues are real
    and non-negative (up to round-off, clipped at 0) and Tr(sqrtm(S1 S2)) is the sum of their
    square roots.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics have different shapes: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    sqrt_sigma1 = _symmetric_sqrt(sigma1)
    middle = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
    middle = (middle + middle.T) / 2.0  # remove the round-off asymmetry before eigvalsh
    trace_sqrt_product = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(middle), 0.0, None)))
    diff = mu1 - mu2
    distance = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product
    return float(max(distance, 0.0))


def activation_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of features [N, D], the Gaussian FID fits."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"need features of shape [N >= 2, D], got {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def inception_score(probabilities: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """IS = exp(E_x KL(p(y|x) || p(y))), mean and std over ``splits`` disjoint parts.

    ``probabilities`` are softmax outputs [N, K]; 0 log 0 counts as 0.
    """
    probabilities = np.asarray(probabilities, np.float64)
    if probabilities.ndim != 2 or probabilities.shape[0] < splits or splits < 1:
        raise ValueError(f"need probabilities [N >= splits, K] with splits >= 1; got shape "
                         f"{probabilities.shape} and splits={splits}")
    scores = []
    for part in np.array_split(probabilities, splits):
        marginal = part.mean(axis=0, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = part * (np.log(part) - np.log(marginal))
        kl = np.sum(np.where(part > 0, terms, 0.0), axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def _to_inception_size(pixels: tf.Tensor) -> tf.Tensor:
    return tf.image.resize(tf.cast(pixels, tf.float32), INCEPTION_SIZE, method="bilinear")


class InceptionFeatures:
    """pool3 features (2048-d average pool) and class probabilities of InceptionV3.

    Images are float RGB [0, 255] of any size; they are resized to 299x299 (bilinear) and
    scaled to [-1, 1], InceptionV3's preprocessing.
    """

    def __init__(self, weights_path: str) -> None:
        import keras

        if not os.path.isfile(weights_path):
            raise FileNotFoundError(
                f"InceptionV3 weights file not found: {weights_path!r}. Expected the Keras "
                f"ImageNet weights with the classifier, {INCEPTION_WEIGHTS_FILE} "
                f"(from {INCEPTION_WEIGHTS_URL}); see docs/image_quality.md.")
        model = keras.applications.InceptionV3(weights=None, include_top=True)
        try:
            model.load_weights(weights_path)
        except (ValueError, KeyError, OSError) as error:
            raise ValueError(
                f"{weights_path!r} does not hold InceptionV3 weights with the classifier "
                f"(expected {INCEPTION_WEIGHTS_FILE}, not the _notop file): {error}") from error
        self.model = keras.Model(model.inputs, [model.get_layer("avg_pool").output,
                                                model.get_layer("predictions").output])

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
    def __call__(self, pixels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """[B, H, W, 3] RGB [0, 255] -> (pool3 [B, 2048], probabilities [B, 1000])."""
        pool3, probabilities = self.model(
            images.pixels_to_unit(_to_inception_size(pixels)), training=False)
        return pool3, probabilities


def list_image_files(directory: str) -> list[str]:
    """PNG/JPEG files under ``directory`` (recursively), sorted.

    A translated tree in the GTA5 layout (``images/`` and ``labels/``) contributes only its
    ``images/``: label PNGs are not images to score.
    """
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"image directory not found: {directory!r}")
    images_dir = os.path.join(directory, "images")
    if os.path.isdir(images_dir) and os.path.isdir(os.path.join(directory, "labels")):
        directory = images_dir
    files = sorted(os.path.join(root, name)
                   for root, _, names in os.walk(directory) for name in names
                   if name.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise FileNotFoundError(f"no {'/'.join(IMAGE_EXTENSIONS)} images under {directory!r}")
    return files


def _directory_dataset(directory: str, batch_size: int) -> tf.data.Dataset:
    def load(path):
        image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        return _to_inception_size(image)

    files = list_image_files(directory)
    return (tf.data.Dataset.from_tensor_slices(files)
            .map(load, num_parallel_calls=tf.data.AUTOTUNE)
            .batch(batch_size).prefetch(tf.data.AUTOTUNE))


def _as_image_batches(images_or_dir: str | tf.data.Dataset, batch_size: int) -> tf.data.Dataset:
    """A directory, or a finite dataset of image batches (or of {"image": ...} dicts)."""
    if isinstance(images_or_dir, (str, os.PathLike)):
        return _directory_dataset(os.fspath(images_or_dir), batch_size)
    cardinality = int(images_or_dir.cardinality())
    if cardinality < 0:
        raise ValueError("the image dataset must be finite with a known cardinality (no "
                         "repeat(); use dataset.apply(tf.data.experimental.assert_cardinality"
                         "(num_batches)) if needed)")
    if isinstance(images_or_dir.element_spec, dict):
        return images_or_dir.map(lambda batch: batch["image"])
    return images_or_dir


def _features(inception: InceptionFeatures, batches: tf.data.Dataset,
              stage: str) -> tuple[np.ndarray, np.ndarray]:
    progress = Progress(stage, total=int(batches.cardinality()))
    pool3, probabilities = [], []
    for step, batch in enumerate(batches, start=1):
        features, probs = inception(tf.cast(batch, tf.float32))
        pool3.append(features.numpy())
        probabilities.append(probs.numpy())
        progress.update(step)
    return np.concatenate(pool3), np.concatenate(probabilities)


def compute_fid_is(images_a: str | tf.data.Dataset, images_b_dir: str, weights_path: str,
                   batch_size: int = 16, is_splits: int = 10) -> dict:
    """FID between ``images_a`` and the images in ``images_b_dir``; IS of ``images_a``.

    ``images_a`` (the translated images) is a directory or a finite tf.data.Dataset of float
    RGB [0, 255] batches; ``images_b_dir`` is the reference (the target training set).
    The IS uses min(is_splits, number of images) splits.
    """
    batches_a = _as_image_batches(images_a, batch_size)
    batches_b = _directory_dataset(images_b_dir, batch_size)
    inception = InceptionFeatures(weights_path)
    pool3_a, probabilities_a = _features(inception, batches_a, "quality/translated")
    pool3_b, _ = _features(inception, batches_b, "quality/reference")
    splits = min(is_splits, len(probabilities_a))
    is_mean, is_std = inception_score(probabilities_a, splits=splits)
    return {
        "fid": frechet_distance(*activation_statistics(pool3_a),
                                *activation_statistics(pool3_b)),
        "inception_score": is_mean,
        "inception_score_std": is_std,
        "inception_score_splits": splits,
        "num_translated": int(len(pool3_a)),
        "num_reference": int(len(pool3_b)),
    }


def main(argv: list[str]) -> None:
    del argv
    values = flags.FLAGS
    result = compute_fid_is(values.translated, values.reference, values.inception_weights,
                            batch_size=values.batch_size, is_splits=values.is_splits)
    text = json.dumps(result, indent=2)
    print(text)
    if values.output:
        files.write_text_atomically(values.output, text + "\n")


def _define_flags() -> None:
    flags.DEFINE_string("translated", None, "directory of translated images (a translated "
                        "GTA5-layout tree contributes its images/)")
    flags.DEFINE_string("reference", None, "directory of reference images, e.g. "
                        "CITYSCAPES/leftImg8bit/train")
    flags.DEFINE_string("inception_weights", None, f"path of {INCEPTION_WEIGHTS_FILE}")
    flags.DEFINE_string("output", None, "optional JSON file for the results")
    flags.DEFINE_integer("batch_size", 16, "images per InceptionV3 batch")
    flags.DEFINE_integer("is_splits", 10, "splits of the Inception Score")
    flags.mark_flags_as_required(["translated", "reference", "inception_weights"])


def run() -> None:
    """``python -m sait_tf.quality``."""
    cli.run(main, _define_flags)


if __name__ == "__main__":
    run()
