"""A non-finite loss never updates weights, on one device and under MirroredStrategy."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from sait_tf.train.step_guard import DivergenceError, NonFiniteCounter, apply_if_finite


def _two_cpu_strategy():
    # tests/conftest.py splits the CPU into two logical devices. Reducing through one device
    # keeps this test independent of the collective-op keys earlier strategies in the same
    # process have used.
    return tf.distribute.MirroredStrategy(
        ["/cpu:0", "/cpu:1"], cross_device_ops=tf.distribute.ReductionToOneDevice())


@pytest.mark.parametrize("distributed", [False, True])
def test_nan_loss_skips_update_and_finite_loss_applies(distributed):
    strategy = _two_cpu_strategy() if distributed else tf.distribute.get_strategy()
    with strategy.scope():
        model = keras.Sequential([keras.layers.Dense(2)])
        model.build((None, 3))
        optimizer = keras.optimizers.Adam(0.1)
        optimizer.build(model.trainable_variables)

    @tf.function
    def step(x, factor):
        def replica_step(x):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(model(x) ** 2) * factor
            grads = tape.gradient(loss, model.trainable_variables)
            return apply_if_finite(optimizer, grads, model.trainable_variables, loss)

        return strategy.run(replica_step, args=(x,))

    batches = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensors(tf.ones((4, 3))))
    x = next(iter(batches))
    before = [w.copy() for w in model.get_weights()]
    applied = strategy.experimental_local_results(step(x, tf.constant(1.0)))[0]
    after_good = [w.copy() for w in model.get_weights()]
    assert bool(applied)
    assert not np.allclose(before[0], after_good[0])

    applied = strategy.experimental_local_results(step(x, tf.constant(float("nan"))))[0]
    assert not bool(applied)
    for good, now in zip(after_good, model.get_weights(), strict=True):
        np.testing.assert_array_equal(good, now)
    assert int(optimizer.iterations.numpy()) == 1


def test_counter_raises_after_consecutive_skips_only():
    counter = NonFiniteCounter("unit", max_consecutive=3)
    for step, applied in enumerate([False, False, True, False, False]):
        counter.update(applied, step)
    assert counter.total == 4 and counter.consecutive == 2
    with pytest.raises(DivergenceError, match=r"\[unit\] 3 consecutive non-finite steps"):
        counter.update(False, 5)
