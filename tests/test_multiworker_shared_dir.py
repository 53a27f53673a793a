"""Two `python -m sait_tf.train` workers under MultiWorkerMirroredStrategy sharing one run
directory: one set of results, equal to one process's (tests/multiworker_runs.py), and a
killed worker's job resumed by the same command."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
from multiworker_runs import (
    MULTI_WORKER,
    NUM_SOURCE,
    NUM_TARGET_TRAIN,
    TIMEOUT_S,
    assert_same_results,
    files_laid_out,
    finish,
    shard_writes,
    start,
)

pytestmark = pytest.mark.slow


def test_two_workers_sharing_a_run_directory_write_one_result_and_resume(
        tiny_run_config, one_process_run, tmp_path):
    run_dir = str(tmp_path / "run")
    logs = [str(tmp_path / "worker_0.log"), str(tmp_path / "worker_1.log")]
    workers = start(tiny_run_config, [run_dir, run_dir], logs, MULTI_WORKER)
    deadline = time.monotonic() + TIMEOUT_S
    while not os.path.exists(os.path.join(run_dir, "checkpoints", "source_only", "DONE")):
        assert all(w.poll() is None for w in workers), open(logs[0]).read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.2)
    workers[1].send_signal(signal.SIGKILL)
    workers[1].wait()
    try:  # worker 0 waits for it in the next collective, or fails: the cluster is broken
        workers[0].wait(timeout=30)
    except subprocess.TimeoutExpired:
        workers[0].kill()
        workers[0].wait()
    assert not os.path.exists(os.path.join(run_dir, "final.json"))

    outputs = finish(start(tiny_run_config, [run_dir, run_dir], logs, MULTI_WORKER), logs)
    assert "[source_only] already done" in outputs[0].split("run directory:")[-1]
    assert_same_results(run_dir, one_process_run, tiny_run_config, tmp_path)
    # One set of results, laid out as one process's; the workers' folders are gone.
    assert files_laid_out(run_dir) == files_laid_out(one_process_run)
    assert not os.path.exists(os.path.join(run_dir, ".worker_tmp"))
    # Each worker wrote its half of the offline files into its own temporary folder; the
    # chief moved them into place.
    for index, output in enumerate(outputs):
        staging = os.path.join(run_dir, ".worker_tmp", f"worker_{index}")
        assert shard_writes(output.split("run directory:")[-1]) == [
            (str(NUM_SOURCE // 2), os.path.join(staging, "translated", "round_01")),
            (str(NUM_TARGET_TRAIN // 2), os.path.join(staging, "pseudo_labels", "round_01"))]
