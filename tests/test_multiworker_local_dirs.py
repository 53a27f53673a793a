"""Two `python -m sait_tf.train` workers under MultiWorkerMirroredStrategy, each with its own
run directory (as on two machines): the chief's holds the result, equal to one process's
(tests/multiworker_runs.py)."""

from __future__ import annotations

import os

import pytest
from multiworker_runs import (
    MULTI_WORKER,
    NUM_SOURCE,
    NUM_TARGET_TRAIN,
    assert_same_results,
    files_laid_out,
    finish,
    shard_writes,
    start,
)

pytestmark = pytest.mark.slow


def test_two_workers_with_local_run_directories(tiny_run_config, one_process_run, tmp_path):
    """Each worker has its own directory (as on two machines): the chief's is the result,
    the other worker's is left empty; there, every worker writes all offline files."""
    run_dirs = [str(tmp_path / "chief"), str(tmp_path / "other")]
    logs = [str(tmp_path / "worker_0.log"), str(tmp_path / "worker_1.log")]
    outputs = finish(start(tiny_run_config, run_dirs, logs, MULTI_WORKER), logs)
    assert_same_results(run_dirs[0], one_process_run, tiny_run_config, tmp_path)
    assert files_laid_out(run_dirs[0]) == files_laid_out(one_process_run)
    assert os.listdir(run_dirs[1]) == []
    staging = os.path.join(run_dirs[1], ".worker_tmp", "worker_1")
    assert shard_writes(outputs[1]) == [
        (str(NUM_SOURCE), os.path.join(staging, "translated", "round_01")),
        (str(NUM_TARGET_TRAIN), os.path.join(staging, "pseudo_labels", "round_01"))]
