"""The checkpoint helper saves every variable, including layers kept in Python lists, and
falls back from a damaged checkpoint to the newest intact one."""

import logging
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from sait_tf.runtime import checkpoints, files


class _SumOfBranches(keras.layers.Layer):
    """Holds its sub-layers in a list, which tf.train.Checkpoint alone does not follow."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.branches = [keras.layers.Dense(3, name=f"branch_{i}") for i in range(2)]

    def call(self, x):
        return self.branches[0](x) + self.branches[1](x)


def _model():
    inputs = keras.Input((4,))
    return keras.Model(inputs, _SumOfBranches(name="classifier")(inputs))


def test_resume_restores_list_held_layers_and_optimizer_state(tmp_path):
    model = _model()
    optimizer = keras.optimizers.Adam(0.1)
    ckpt = checkpoints.StageCheckpoint(
        str(tmp_path), optimizers={"optimizer": (optimizer, model.trainable_variables)},
        segmenter=model)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(model(tf.ones((2, 4))) ** 2)
    optimizer.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
    ckpt.save(5)

    fresh, fresh_optimizer = _model(), keras.optimizers.Adam(0.1)
    resumed = checkpoints.StageCheckpoint(
        str(tmp_path), optimizers={"optimizer": (fresh_optimizer, fresh.trainable_variables)},
        segmenter=fresh)
    assert resumed.restore_latest() == 5
    for saved, restored in zip(model.get_weights(), fresh.get_weights(), strict=True):
        np.testing.assert_array_equal(saved, restored)
    assert int(fresh_optimizer.iterations.numpy()) == 1
    for saved, restored in zip(optimizer.variables, fresh_optimizer.variables, strict=True):
        np.testing.assert_array_equal(saved.numpy(), restored.numpy())


def test_restore_for_inference_takes_only_the_named_model(tmp_path):
    model = _model()
    optimizer = keras.optimizers.SGD(0.1)
    checkpoints.StageCheckpoint(
        str(tmp_path), optimizers={"optimizer": (optimizer, model.trainable_variables)},
        segmenter=model).save(1)
    fresh = _model()
    checkpoints.restore_for_inference(str(tmp_path), segmenter=fresh)
    x = tf.ones((1, 4))
    np.testing.assert_allclose(fresh(x).numpy(), model(x).numpy())


def test_stage_done_marker(tmp_path):
    stage = str(tmp_path / "stage")
    assert not files.is_done(stage)
    files.mark_done(stage)
    assert files.is_done(stage)


def test_restoring_into_a_model_of_other_shape_fails(tmp_path):
    model = _model()
    checkpoints.StageCheckpoint(str(tmp_path), segmenter=model).save(1)
    inputs = keras.Input((4,))
    other = keras.Model(inputs, keras.layers.Dense(5)(keras.layers.Dense(3)(inputs)))
    with pytest.raises((ValueError, AssertionError)):
        checkpoints.restore_for_inference(str(tmp_path), segmenter=other)


def _damage(path: str, how: str) -> None:
    """Truncates ``path`` to half, or flips bytes in its middle."""
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        if how == "truncate":
            f.truncate(size // 2)
        else:
            f.seek(size // 2)
            f.write(bytes(255 - b for b in f.read(8)))
            f.seek(size // 2)


def _two_saves(stage: str) -> tuple[keras.Model, list[np.ndarray]]:
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(64)])
    ckpt = checkpoints.StageCheckpoint(stage, model=model)
    ckpt.save(1)
    first = [v.numpy().copy() for v in model.variables]
    for v in model.variables:
        v.assign(v + 1.0)
    ckpt.save(2)
    return model, first


@pytest.mark.parametrize("how", ["truncate", "corrupt"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path, caplog, how):
    stage = str(tmp_path / "stage")
    model, first = _two_saves(stage)
    _damage(os.path.join(stage, "ckpt-2.data-00000-of-00001"), how)
    restored = keras.Sequential([keras.Input((3,)), keras.layers.Dense(64)])
    with caplog.at_level(logging.WARNING):
        step = checkpoints.StageCheckpoint(stage, model=restored).restore_latest()
    assert step == 1
    for want, got in zip(first, restored.variables, strict=True):
        np.testing.assert_array_equal(want, got.numpy())
    assert "ckpt-2" in caplog.text and "damaged" in caplog.text
    inference = keras.Sequential([keras.Input((3,)), keras.layers.Dense(64)])
    assert checkpoints.restore_for_inference(stage, model=inference).endswith("ckpt-1")


def test_no_intact_checkpoint_is_one_error_naming_the_stage(tmp_path):
    stage = str(tmp_path / "round_01_translator")
    _two_saves(stage)
    for number in (1, 2):
        _damage(os.path.join(stage, f"ckpt-{number}.data-00000-of-00001"), "truncate")
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(64)])
    with pytest.raises(ValueError, match="no intact checkpoint in .*round_01_translator"):
        checkpoints.StageCheckpoint(stage, model=model).restore_latest()
