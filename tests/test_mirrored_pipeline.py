"""The whole pipeline under MirroredStrategy over the two logical CPUs of conftest.py, in
this process: its results equal one process's on one device (tests/multiworker_runs.py)."""

from __future__ import annotations

import gin
import pytest
from multiworker_runs import (
    assert_same_results,
    files_laid_out,
)

from sait_tf.train.__main__ import parse_gin
from sait_tf.train.pipeline import run_pipeline

pytestmark = pytest.mark.slow


def test_mirrored_over_two_logical_cpus_equals_one_device(
        tiny_run_config, one_process_run, tmp_path):
    run_dir = str(tmp_path / "run")
    gin.clear_config()
    try:
        parse_gin([tiny_run_config], ["make_strategy.kind = 'mirrored'",
                             "make_strategy.devices = ['/cpu:0', '/cpu:1']"])
        run_pipeline(run_dir)
    finally:
        gin.clear_config()
    assert_same_results(run_dir, one_process_run, tiny_run_config, tmp_path)
    assert files_laid_out(run_dir) == files_laid_out(one_process_run)
