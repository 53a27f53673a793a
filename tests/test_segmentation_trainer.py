"""Segmentation trainer on tiny random data: losses, learning, resume, DONE, adversarial term."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from sait_tf.runtime import checkpoints, files
from sait_tf.train import optimizers, step_guard
from sait_tf.train import segmentation as seg

NUM_CLASSES = 4
SIZE = 8


def _segmenter(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0)(inputs)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="features")(x)
    logits = keras.layers.Conv2D(NUM_CLASSES, 1, name="classifier")(x)
    model = keras.Model(inputs, logits)
    model.num_classes = NUM_CLASSES  # as build_segmenter's models have it
    return model


def _discriminator(seed: int = 1) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((None, None, NUM_CLASSES)),
        keras.layers.Conv2D(4, 4, strides=2, padding="same", name="d_conv"),
        keras.layers.LeakyReLU(0.2),
        keras.layers.Conv2D(1, 4, strides=2, padding="same", name="d_logits"),
    ])


def _fixed_batch(seed: int, with_labels: bool = True) -> tf.data.Dataset:
    """One fixed batch, repeated by the trainer: the data order cannot matter on resume."""
    rng = np.random.default_rng(seed)
    element = {"image": rng.uniform(0, 255, (2, SIZE, SIZE, 3)).astype(np.float32)}
    if with_labels:  # learnable: the class is given by the red and green channels
        image = element["image"]
        label = (2 * (image[..., 0] > 127) + (image[..., 1] > 127)).astype(np.int32)
        label[:, 0, :] = 255
        element["label"] = label
    return tf.data.Dataset.from_tensors(element)


def _sgd(total_steps: int) -> optimizers.GroupedOptimizer:
    return optimizers.deeplabv2_optimizer(total_steps, learning_rate=0.05)


def _weights(*models: keras.Model) -> list[np.ndarray]:
    return [w.copy() for model in models for w in model.get_weights()]


def _adaptation_run(tmp_path, name, steps, segmenter, discriminator, **kwargs):
    return seg.train_segmenter(
        segmenter, str(tmp_path / name), str(tmp_path / "logs" / name), steps,
        source_dataset=_fixed_batch(1), target_dataset=_fixed_batch(2),
        output_discriminator=discriminator, optimizer_factory=_sgd, **kwargs)


def test_source_only_loss_decreases_on_a_fixed_batch(tmp_path):
    model = _segmenter()
    data = _fixed_batch(1)
    batch = next(iter(data))
    loss_before = float(seg.losses.segmentation_cross_entropy(model(batch["image"]),
                                                              batch["label"]))
    seg.train_segmenter(model, str(tmp_path / "source_only"), str(tmp_path / "logs"), 30,
                        source_dataset=data, optimizer_factory=_sgd)
    loss_after = float(seg.losses.segmentation_cross_entropy(model(batch["image"]),
                                                             batch["label"]))
    assert np.isfinite(loss_after)
    assert loss_after < 0.8 * loss_before
    assert files.is_done(str(tmp_path / "source_only"))
    assert tf.io.gfile.glob(str(tmp_path / "logs" / "events.out.tfevents.*"))


def test_resume_equals_uninterrupted_run(tmp_path, monkeypatch):
    uninterrupted_m, uninterrupted_d = _segmenter(), _discriminator()
    _adaptation_run(tmp_path, "straight", 6, uninterrupted_m, uninterrupted_d)

    real_save = checkpoints.StageCheckpoint.save

    def save_then_die(self, step):
        path = real_save(self, step)
        if step == 3:
            raise KeyboardInterrupt("killed")
        return path

    monkeypatch.setattr(checkpoints.StageCheckpoint, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        _adaptation_run(tmp_path, "killed", 6, _segmenter(), _discriminator(),
                        checkpoint_every=3)
    assert not files.is_done(str(tmp_path / "killed"))
    monkeypatch.setattr(checkpoints.StageCheckpoint, "save", real_save)

    # A new process: fresh models with other weights, restored from the step-3 checkpoint.
    resumed_m, resumed_d = _segmenter(seed=7), _discriminator(seed=8)
    _adaptation_run(tmp_path, "killed", 6, resumed_m, resumed_d)
    for got, want in zip(_weights(resumed_m, resumed_d),
                         _weights(uninterrupted_m, uninterrupted_d), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_done_stage_returns_at_once_with_the_trained_weights(tmp_path, monkeypatch):
    trained = _segmenter()
    stage = str(tmp_path / "stage")
    seg.train_segmenter(trained, stage, str(tmp_path / "logs"), 3,
                        source_dataset=_fixed_batch(1), optimizer_factory=_sgd)

    def no_training(*args, **kwargs):
        raise AssertionError("a finished stage must not train again")

    monkeypatch.setattr(step_guard, "apply_if_finite", no_training)
    fresh = _segmenter(seed=5)
    result = seg.train_segmenter(fresh, stage, str(tmp_path / "logs"), 3,
                                 source_dataset=_fixed_batch(1), optimizer_factory=_sgd)
    assert result is None
    for got, want in zip(_weights(fresh), _weights(trained), strict=True):
        np.testing.assert_array_equal(got, want)


def test_adversarial_term_moves_the_segmenter_and_trains_the_discriminator(tmp_path):
    """With lambda_seg = lambda_ssl = 0 only L_adv reaches M, and D learns the domains."""
    model, discriminator = _segmenter(), _discriminator()
    source = _fixed_batch(1, with_labels=True)
    target = _fixed_batch(2, with_labels=False)
    m_before, d_before = _weights(model), _weights(discriminator)

    def d_loss() -> float:
        probs = {name: seg._input_size_softmax(model(batch["image"]), batch["image"])
                 for name, batch in (("s", next(iter(source))), ("t", next(iter(target))))}
        return float(0.5 * seg.losses.binary_cross_entropy_with_logits(
            discriminator(probs["s"]), seg.SOURCE_DOMAIN) + 0.5 *
            seg.losses.binary_cross_entropy_with_logits(discriminator(probs["t"]),
                                                        seg.TARGET_DOMAIN))

    loss_before = d_loss()
    seg.train_segmenter(
        model, str(tmp_path / "adv"), str(tmp_path / "logs"), 20, source_dataset=source,
        target_unlabeled_dataset=target, output_discriminator=discriminator, lambda_seg=0.0,
        lambda_adv=1.0, optimizer_factory=_sgd,
        discriminator_optimizer_factory=lambda steps: optimizers.discriminator_optimizer(
            steps, learning_rate=1e-2))
    assert any(not np.allclose(a, b) for a, b in zip(_weights(model), m_before, strict=True))
    assert any(not np.allclose(a, b) for a, b in zip(_weights(discriminator), d_before,
                                                         strict=True))
    assert d_loss() < loss_before


def test_a_non_finite_step_leaves_the_weights_untouched(tmp_path):
    model = _segmenter()
    before = _weights(model)
    bad = _fixed_batch(1).map(lambda e: {**e, "image": e["image"] * np.nan})
    seg.train_segmenter(model, str(tmp_path / "nan"), str(tmp_path / "logs"), 2,
                        source_dataset=bad, optimizer_factory=_sgd)
    for got, want in zip(_weights(model), before, strict=True):
        np.testing.assert_array_equal(got, want)


def test_rejects_unlabelled_source(tmp_path):
    with pytest.raises(ValueError, match="source_dataset has no labels"):
        seg.train_segmenter(_segmenter(), str(tmp_path / "s"), str(tmp_path / "l"), 2,
                            source_dataset=_fixed_batch(1, with_labels=False))
