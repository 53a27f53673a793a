"""A run resumed at a stage boundary ends with the weights of an uninterrupted run.

Every stage seeds its randomness from the run's seed and its own name, and a finished
translator stage gives back F and D_S, D_T, so a job restarted after round 1's translator
stage trains round 1's segmenter and round 2 exactly as the job that never stopped did.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from train_configs import REPO, TINY_TRANSLATOR_AND_DISCRIMINATORS, write_demo_config

from sait_tf.data.synthetic import generate_pair

# Two whole pipeline runs, one interrupted (run with -m 'slow or not slow').
pytestmark = pytest.mark.slow

REDONE = ("checkpoints/round_01_segmenter", "checkpoints/round_02_translator",
          "checkpoints/round_02_segmenter", "translated", "pseudo_labels", "export",
          "final.json", "overview.png")


def _train(config: str, run_dir: str) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-m", "sait_tf.train", f"--gin_file={config}",
                             f"--run_dir={run_dir}"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]


def _variables(run_dir: str, stage: str) -> dict[str, np.ndarray]:
    path = tf.train.latest_checkpoint(os.path.join(run_dir, "checkpoints", stage))
    return {name: tf.train.load_variable(path, name) for name, _ in tf.train.list_variables(path)
            if name != "_CHECKPOINTABLE_OBJECT_GRAPH"}


def test_resumed_after_round_1_translator_ends_like_the_uninterrupted_run(tmp_path):
    pair = str(tmp_path / "pair")
    generate_pair(pair, num_source=4, num_target_train=2, num_target_val=2, size=(32, 64))
    config = write_demo_config(tmp_path / "tiny.gin", pair, """
run_pipeline.batch_size = 2
run_pipeline.translator_batch_size = 1
run_pipeline.source_only_steps = 3
run_pipeline.oracle_steps = 0
run_pipeline.max_rounds = 2
run_pipeline.patience = 2
run_pipeline.translator_steps = 3
run_pipeline.segmenter_steps = 3
run_pipeline.export = False""", *TINY_TRANSLATOR_AND_DISCRIMINATORS)
    uninterrupted, resumed = str(tmp_path / "uninterrupted"), str(tmp_path / "resumed")
    _train(config, uninterrupted)

    # What a job stopped right after round 1's translator stage leaves.
    shutil.copytree(uninterrupted, resumed)
    for path in REDONE:
        target = os.path.join(resumed, path)
        if os.path.isdir(target):
            shutil.rmtree(target)
        elif os.path.exists(target):
            os.remove(target)
    with open(os.path.join(resumed, "metrics.json")) as f:
        metrics = json.load(f)
    metrics["rounds"] = []
    metrics.pop("final")
    with open(os.path.join(resumed, "metrics.json"), "w") as f:
        json.dump(metrics, f)
    _train(config, resumed)

    for stage in ("round_01_segmenter", "round_02_translator", "round_02_segmenter"):
        want, got = _variables(uninterrupted, stage), _variables(resumed, stage)
        assert got.keys() == want.keys()
        assert any("discriminator" in name for name in want), stage
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6,
                                       err_msg=f"{stage}: {name}")
