"""FID and IS: known answers on statistics, and the InceptionV3 feature path end to end."""

import os

import numpy as np
import pytest
from PIL import Image

from sait_tf import quality


def _random_orthogonal(dim, rng):
    q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    return q


def test_frechet_distance_of_identical_statistics_is_zero():
    rng = np.random.default_rng(1)
    features = rng.normal(size=(50, 6)) @ rng.normal(size=(6, 6))
    mu, sigma = quality.activation_statistics(features)
    assert quality.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_of_diagonal_gaussians_has_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    # ||mu1 - mu2||^2 = 1 + 0 + 6.25; sum (sqrt a - sqrt b)^2 = 4 + 1 + 0.
    expected = 7.25 + 5.0
    assert quality.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected)


def test_frechet_distance_of_rotated_commuting_covariances():
    """S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T commute: the distance is the diagonal one."""
    rng = np.random.default_rng(2)
    q = _random_orthogonal(5, rng)
    a, b = rng.uniform(0.1, 3.0, size=5), rng.uniform(0.1, 3.0, size=5)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    actual = quality.frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert actual == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("singular", [False, True])
def test_frechet_distance_of_non_commuting_2x2_covariances(singular):
    """For 2x2, Tr sqrtm(S1 S2) = sqrt(Tr(S1 S2) + 2 sqrt(det S1 det S2))."""
    sigma1 = np.array([[1.0, 1.0], [1.0, 1.0]]) if singular else np.array([[2.0, 0.5], [0.5, 1.0]])
    sigma2 = np.array([[1.0, -0.3], [-0.3, 3.0]])
    assert not np.allclose(sigma1 @ sigma2, sigma2 @ sigma1)
    trace_sqrt = np.sqrt(np.trace(sigma1 @ sigma2)
                         + 2.0 * np.sqrt(np.linalg.det(sigma1) * np.linalg.det(sigma2)
                                         if not singular else 0.0))
    mu1, mu2 = np.array([1.0, 2.0]), np.array([0.0, 0.0])
    expected = 5.0 + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt
    assert quality.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="different shapes"):
        quality.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def test_activation_statistics_are_mean_and_unbiased_covariance():
    features = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]])
    mu, sigma = quality.activation_statistics(features)
    np.testing.assert_allclose(mu, [1.0, 1.0])
    np.testing.assert_allclose(sigma, [[4.0 / 3.0, 0.0], [0.0, 4.0 / 3.0]])


def test_inception_score_of_uniform_predictions_is_one():
    mean, std = quality.inception_score(np.full((20, 7), 1.0 / 7.0), splits=4)
    assert mean == pytest.approx(1.0)
    assert std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_of_confident_distinct_predictions_is_the_class_count():
    num_classes = 5
    probabilities = np.tile(np.eye(num_classes), (10, 1))  # each split sees every class once
    mean, std = quality.inception_score(probabilities, splits=10)
    assert mean == pytest.approx(num_classes)
    assert std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_hand_computed_mixture_and_split_spread():
    # p(y) = [0.75, 0.25]; KL = log(4/3) and 0.5 log(2/3) + 0.5 log 2.
    expected = np.exp((np.log(4.0 / 3.0) + 0.5 * np.log(2.0 / 3.0) + 0.5 * np.log(2.0)) / 2.0)
    mean, _ = quality.inception_score(np.array([[1.0, 0.0], [0.5, 0.5]]), splits=1)
    assert mean == pytest.approx(expected)
    # Split 1: two distinct one-hot predictions (IS 2); split 2: uniform (IS 1).
    mean, std = quality.inception_score(
        np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.5, 0.5]]), splits=2)
    assert (mean, std) == (pytest.approx(1.5), pytest.approx(0.5))


def test_inception_score_needs_at_least_one_image_per_split():
    with pytest.raises(ValueError, match="splits=10"):
        quality.inception_score(np.full((3, 2), 0.5), splits=10)


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """Random-weight InceptionV3 saved in the legacy .h5 layout of the Keras ImageNet file."""
    import keras

    keras.utils.set_random_seed(3)
    path = tmp_path_factory.mktemp("inception") / quality.INCEPTION_WEIGHTS_FILE
    keras.applications.InceptionV3(weights=None, include_top=True).save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def inception(inception_weights):
    return quality.InceptionFeatures(inception_weights)


def _write_images(directory, arrays):
    os.makedirs(directory, exist_ok=True)
    for i, array in enumerate(arrays):
        Image.fromarray(array).save(os.path.join(directory, f"{i:03d}.png"))


@pytest.fixture(scope="module")
def image_dirs(tmp_path_factory):
    rng = np.random.default_rng(4)
    root = tmp_path_factory.mktemp("images")
    noise = [rng.integers(0, 256, size=(24, 40, 3), dtype=np.uint8) for _ in range(4)]
    flat = [np.full((24, 40, 3), (30 * i, 200, 90), dtype=np.uint8) for i in range(4)]
    _write_images(root / "a", noise)
    _write_images(root / "b", flat)
    return str(root / "a"), str(root / "b"), noise


@pytest.mark.slow
def test_features_are_pool3_and_softmax_of_the_loaded_weights_with_inception_preprocessing(
        inception_weights, inception, image_dirs):
    """Reference: a separately built InceptionV3 (another random init) loading the same file,
    fed with Keras' own InceptionV3 preprocessing after a bilinear resize to 299x299."""
    import keras
    import tensorflow as tf

    _, _, noise = image_dirs
    pixels = np.stack(noise[:2]).astype(np.float32)
    reference = keras.applications.InceptionV3(weights=None, include_top=True)
    reference.load_weights(inception_weights)
    pool3_model = keras.Model(reference.inputs, reference.get_layer("avg_pool").output)
    unit = keras.applications.inception_v3.preprocess_input(
        tf.image.resize(pixels, (299, 299), method="bilinear").numpy())
    pool3, probabilities = inception(pixels)
    np.testing.assert_allclose(pool3.numpy(), pool3_model.predict(unit, verbose=0),
                               rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(probabilities.numpy(), reference.predict(unit, verbose=0),
                               rtol=1e-4)
    assert pool3.shape == (2, 2048)


@pytest.mark.slow
def test_fid_of_a_set_with_itself_is_zero_and_with_another_set_positive(
        inception_weights, inception, image_dirs):
    import tensorflow as tf

    dir_a, dir_b, noise = image_dirs
    # The translated set as a dataset of dict batches at the original size, the reference as
    # files resized while loading: the same images must give the same features.
    dataset = tf.data.Dataset.from_tensor_slices(
        {"image": np.stack(noise).astype(np.float32)}).batch(3)
    same = quality.compute_fid_is(dataset, dir_a, inception_weights, batch_size=3)
    assert same["fid"] == 0.0
    assert (same["num_translated"], same["num_reference"], same["inception_score_splits"]) == (
        4, 4, 4)
    pool3_b, _ = inception(np.stack([np.asarray(Image.open(os.path.join(dir_b, name)))
                                     for name in sorted(os.listdir(dir_b))]).astype(np.float32))
    pool3_a, probabilities_a = inception(np.stack(noise).astype(np.float32))
    different = quality.frechet_distance(*quality.activation_statistics(pool3_a.numpy()),
                                         *quality.activation_statistics(pool3_b.numpy()))
    assert different > 0.0
    assert same["inception_score"] == pytest.approx(
        quality.inception_score(probabilities_a.numpy(), splits=4)[0], rel=1e-5)


def test_missing_weights_file_raises_naming_the_path(tmp_path, image_dirs):
    missing = str(tmp_path / "nowhere" / "inception.h5")
    with pytest.raises(FileNotFoundError, match="nowhere/inception.h5") as error:
        quality.InceptionFeatures(missing)
    assert quality.INCEPTION_WEIGHTS_FILE in str(error.value)


def test_wrong_weights_file_raises_naming_the_path(tmp_path):
    import keras

    wrong = str(tmp_path / "wrong.h5")
    keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]).save(wrong)
    with pytest.raises(ValueError, match="wrong.h5"):
        quality.InceptionFeatures(wrong)


def test_unknown_image_directory_and_infinite_dataset_are_rejected(tmp_path):
    import tensorflow as tf

    with pytest.raises(FileNotFoundError, match="missing_dir"):
        quality.list_image_files(str(tmp_path / "missing_dir"))
    with pytest.raises(FileNotFoundError, match="no .png"):
        quality.list_image_files(str(tmp_path))
    with pytest.raises(ValueError, match="finite"):
        quality.compute_fid_is(tf.data.Dataset.from_tensors(np.zeros((1, 8, 8, 3))).repeat(),
                               str(tmp_path), "unused.h5")


def test_translated_tree_contributes_only_its_images(tmp_path):
    _write_images(tmp_path / "images", [np.zeros((4, 4, 3), np.uint8)])
    _write_images(tmp_path / "labels", [np.zeros((4, 4, 3), np.uint8)] * 2)
    assert quality.list_image_files(str(tmp_path)) == [str(tmp_path / "images" / "000.png")]
