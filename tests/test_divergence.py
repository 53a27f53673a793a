"""Non-finite losses: the step is skipped and counted, K in a row stop the run, the last good
checkpoint stays restorable."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import gin
import numpy as np
import pytest
import tensorflow as tf
from train_configs import REPO, SOURCE_ONLY_RUN, write_demo_config

from sait_tf.data.synthetic import generate_pair
from sait_tf.models import build_segmenter
from sait_tf.runtime import checkpoints, files
from sait_tf.train.optimizers import adam_optimizer
from sait_tf.train.segmentation import train_segmenter
from sait_tf.train.step_guard import DivergenceError

SIZE = (16, 32)
TINY_DEEPLAB = {"blocks": (1, 1, 1, 1), "width_multiplier": 0.125}
MAX_CONSECUTIVE = 3
GOOD_STEPS = 2  # the first batches are finite, every later one holds a NaN


def _tiny_segmenter():
    segmenter = build_segmenter("deeplabv2", 19, **TINY_DEEPLAB)
    segmenter(tf.zeros((1, *SIZE, 3)))
    return segmenter


def _dataset_with_nan_after(good: int, total: int) -> tf.data.Dataset:
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (total, *SIZE, 3)).astype(np.float32)
    images[good:, 3, 5, 1] = np.nan  # one pixel is enough
    label_ids = rng.integers(0, 19, (total, *SIZE)).astype(np.int32)
    return tf.data.Dataset.from_tensor_slices({"image": images, "label": label_ids}).batch(1)


def _checkpoint_values(path: str, entry: str, count: int) -> list[np.ndarray]:
    reader = tf.train.load_checkpoint(path)
    return [reader.get_tensor(f"{entry}/ordered/v{index:05d}/.ATTRIBUTES/VARIABLE_VALUE")
            for index in range(count)]


def _scalars(log_dir: str, tag: str) -> dict[int, float]:
    """Step -> value of the scalar summary ``tag`` over every event file of ``log_dir``."""
    values = {}
    for path in glob.glob(os.path.join(log_dir, "events.out.tfevents.*")):
        for record in tf.data.TFRecordDataset(path):
            event = tf.compat.v1.Event.FromString(record.numpy())
            for value in event.summary.value:
                if value.tag == tag:
                    values[event.step] = float(tf.make_ndarray(value.tensor))
    return values


@pytest.fixture
def max_consecutive():
    gin.parse_config(f"NonFiniteCounter.max_consecutive = {MAX_CONSECUTIVE}")
    try:
        yield MAX_CONSECUTIVE
    finally:
        gin.clear_config()


def test_nan_steps_are_skipped_counted_and_stop_the_stage(tmp_path, max_consecutive):
    stage_dir, log_dir = str(tmp_path / "checkpoints" / "m"), str(tmp_path / "logs" / "m")
    segmenter = _tiny_segmenter()
    initial = [v.numpy().copy() for v in segmenter.variables]
    diverged_at = GOOD_STEPS + max_consecutive

    with pytest.raises(DivergenceError) as raised:
        train_segmenter(segmenter, stage_dir, log_dir, steps=20,
                        source_dataset=_dataset_with_nan_after(GOOD_STEPS, 20),
                        optimizer_factory=adam_optimizer, checkpoint_every=2, summary_every=1)
    message = str(raised.value).splitlines()[0]
    assert message.startswith(f"[m/segmenter] {max_consecutive} consecutive non-finite steps up "
                              f"to step {diverged_at}; stopped. The last good checkpoint is kept")

    # Steps 1-2 updated M (ckpt-2); steps 3-5 changed nothing, and ckpt-4 holds the same.
    count = len(segmenter.variables)
    after_good_steps = _checkpoint_values(os.path.join(stage_dir, "ckpt-2"), "segmenter", count)
    assert any(not np.array_equal(a, b) for a, b in zip(initial, after_good_steps, strict=True))
    for now, good in zip(segmenter.variables, after_good_steps, strict=True):
        np.testing.assert_array_equal(now.numpy(), good)
    assert tf.train.latest_checkpoint(stage_dir).endswith("ckpt-4")
    for saved, good in zip(_checkpoint_values(os.path.join(stage_dir, "ckpt-4"), "segmenter",
                                              count), after_good_steps, strict=True):
        np.testing.assert_array_equal(saved, good)

    # TensorBoard counts the skipped steps, including those of the step that stopped the run.
    assert _scalars(log_dir, "skipped_steps/segmenter") == {1: 0, 2: 0, 3: 1, 4: 2, 5: 3}
    losses = _scalars(log_dir, "loss/total")
    assert np.isfinite([losses[1], losses[2]]).all() and np.isnan(losses[3])

    # The last good checkpoint restores; the stage is not marked finished.
    restored = _tiny_segmenter()
    assert checkpoints.restore_for_inference(stage_dir, segmenter=restored).endswith("ckpt-4")
    for value, good in zip(restored.variables, after_good_steps, strict=True):
        np.testing.assert_array_equal(value.numpy(), good)
    assert not files.is_done(stage_dir)


@pytest.mark.slow
def test_the_main_job_stops_with_one_clear_line(tmp_path):
    """A learning rate of 1e30 makes the loss infinite after the first update."""
    pair = str(tmp_path / "pair")
    generate_pair(pair, num_source=2, num_target_train=1, num_target_val=1, size=SIZE)
    config = write_demo_config(tmp_path / "diverging.gin", pair, *SOURCE_ONLY_RUN,
                               "run_pipeline.source_only_steps = 10",
                               "adam_optimizer.learning_rate = 1e30",
                               "train_segmenter.checkpoint_every = 1",
                               "train_segmenter.summary_every = 1",
                               "NonFiniteCounter.max_consecutive = 2")
    run_dir = tmp_path / "run"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-m", "sait_tf.train", f"--gin_file={config}",
                             f"--run_dir={run_dir}"], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    error = [line for line in result.stderr.splitlines() if line.strip()][-1]
    assert error.startswith("error: [source_only/segmenter] 2 consecutive non-finite steps up "
                            "to step 3; stopped. The last good checkpoint is kept"), error
    stage_dir = str(run_dir / "checkpoints" / "source_only")
    assert tf.train.latest_checkpoint(stage_dir).endswith("ckpt-2")
    assert not files.is_done(stage_dir)
    assert _scalars(str(run_dir / "logs" / "source_only"), "skipped_steps/segmenter") == {
        1: 0.0, 2: 1.0, 3: 2.0}
