"""What a user finds in TensorBoard after `python -m sait_tf.train`, read with TensorBoard's own
reader, and the quiet start-up of the command (docs/tensorboard.md, sait_tf/__init__.py)."""

import copy
import glob
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.custom_scalar import metadata as custom_scalar_metadata
from tensorboard.util import tensor_util
from train_configs import (
    REPO,
    TINY_PAIR_AND_BATCHES,
    TINY_TRANSLATOR_AND_DISCRIMINATORS,
    write_demo_config,
)

from sait_tf import filter_start_up_log
from sait_tf.train import summaries

# A whole pipeline run read back from its event files (run with -m 'slow or not slow').
pytestmark = pytest.mark.slow

# One round plus the oracle on a 4 + 2 + 2 image pair at 32x64; every stage evaluates once.
TINY_RUN = f"""
{chr(10).join(TINY_PAIR_AND_BATCHES)}
run_pipeline.source_only_steps = 2
run_pipeline.oracle_steps = 2
run_pipeline.max_rounds = 1
run_pipeline.translator_steps = 2
run_pipeline.segmenter_steps = 2
run_pipeline.export = False
{chr(10).join(TINY_TRANSLATOR_AND_DISCRIMINATORS)}
"""
# Measured: the first stderr lines of `python -m sait_tf.train` with TF 2.21 on a CPU machine
# before the start-up was made quiet (timestamps shortened).
BANNER = """\
WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
I0000 00:00:1796175955.599493   32574 port.cc:153] oneDNN custom operations are on. You may \
see slightly different numerical results due to floating-point round-off errors from \
different computation orders. To turn them off, set the environment variable \
`TF_ENABLE_ONEDNN_OPTS=0`.
I0000 00:00:1796175955.600393   32574 cudart_stub.cc:31] Could not find cuda drivers on your \
machine, GPU will not be used.
I0000 00:00:1796175955.702567   32574 cpu_feature_guard.cc:227] This TensorFlow binary is \
optimized to use available CPU instructions in performance-critical operations.
To enable the following instructions: AVX2 AVX512F FMA, in other operations, rebuild \
TensorFlow with the appropriate compiler flags.
E0000 00:00:1796175961.629050   32574 cuda_platform.cc:52] failed call to cuInit: INTERNAL: \
CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)
"""
BANNER_MARKS = ("InitializeLog", "oneDNN", "cuda drivers", "cpu_feature_guard", "cuInit",
                "Path not found")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """The tiny run, once for the module, with TensorFlow's log level left to sait_tf."""
    folder = tmp_path_factory.mktemp("tensorboard")
    config = write_demo_config(folder / "tiny.gin", folder / "pair", TINY_RUN,
                               run_makes_pair=True)
    run_dir = str(folder / "run")
    env = {key: value for key, value in os.environ.items()
           if key not in ("TF_CPP_MIN_LOG_LEVEL", "SAIT_VERBOSE")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-m", "sait_tf.train", f"--gin_file={config}",
                             f"--run_dir={run_dir}"], cwd=folder, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(os.path.join(run_dir, "metrics.json")) as f:
        metrics = json.load(f)
    return {"dir": run_dir, "stderr": result.stderr, "metrics": metrics}


def _tensors(log_dir: str) -> dict[str, dict[int, object]]:
    """{tag: {step: value}} of every tensor summary in ``log_dir`` (scalars, text)."""
    accumulator = event_accumulator.EventAccumulator(
        log_dir, size_guidance={event_accumulator.TENSORS: 0})
    accumulator.Reload()
    found = {}
    for tag in accumulator.Tags()[event_accumulator.TENSORS]:
        events = accumulator.Tensors(tag)
        steps = [event.step for event in events]
        assert len(steps) == len(set(steps)), f"{tag}: steps written twice: {steps}"
        found[tag] = {event.step: tensor_util.make_ndarray(event.tensor_proto).tolist()
                      for event in events}
    return found


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else value


def test_the_start_up_prints_no_banner(run):
    head = "\n".join(run["stderr"].splitlines()[:15])
    for mark in BANNER_MARKS:
        assert mark not in run["stderr"], f"{mark!r} in the first lines:\n{head}"
    assert "run directory:" in run["stderr"].splitlines()[0]


def test_the_start_up_filter_applies_tf_cpp_min_log_level():
    cuinit = BANNER.splitlines(keepends=True)[-1]
    for level in (1, 2):  # cuInit is an ERROR, but a missing driver explains it
        assert filter_start_up_log(BANNER, level) == ""
        with_driver = BANNER.replace("Could not find cuda drivers", "Found cuda drivers")
        assert filter_start_up_log(with_driver, level) == cuinit
        assert filter_start_up_log("a Python warning\n", level) == "a Python warning\n"
    assert filter_start_up_log(BANNER, 3) == ""


def test_the_stages_log_the_losses_users_look_for(run):
    logs = os.path.join(run["dir"], "logs")
    translator = _tensors(os.path.join(logs, "round_01_translator"))
    assert {"loss/translator", "loss/discriminators"} <= set(translator)
    segmenter = _tensors(os.path.join(logs, "round_01_segmenter"))
    assert "loss/output_discriminator" in segmenter
    assert "loss/output_discriminator" not in _tensors(os.path.join(logs, "source_only"))


@pytest.mark.parametrize("stage, record", [
    ("source_only", "source_only"), ("oracle", "oracle"), ("round_01_segmenter", "round 1")])
def test_each_evaluation_logs_the_iou_of_the_classes_present(run, stage, record):
    evaluation = (run["metrics"]["rounds"][0] if record == "round 1"
                  else run["metrics"][record])
    tensors = _tensors(os.path.join(run["dir"], "logs", stage))
    assert math.isclose(tensors["eval/mIoU"][2], evaluation["mIoU"], rel_tol=1e-5)
    defined = {name: iou for name, iou in evaluation["per_class_iou"].items() if iou is not None}
    logged = {tag.removeprefix("eval_iou/"): values[2] for tag, values in tensors.items()
              if tag.startswith("eval_iou/")}
    assert logged.keys() == {name.replace(" ", "_") for name in defined}
    for name, iou in defined.items():
        assert math.isclose(logged[name.replace(" ", "_")], iou, rel_tol=1e-5)
    table = _text(tensors["eval/per_class_iou"][2])
    assert all(f"| {name} | {iou:.2f} |" in table for name, iou in defined.items())


def test_an_evaluation_skips_the_classes_without_an_iou(tmp_path):
    evaluation = {"mIoU": 50.0, "num_classes": 19,
                  "per_class_iou": {"road": 60.0, "traffic light": 40.0, "train": math.nan}}
    writer = tf.summary.create_file_writer(str(tmp_path))
    with writer.as_default():
        summaries.write_evaluation(evaluation, step=7)
    writer.close()
    tensors = _tensors(str(tmp_path))
    assert {tag for tag in tensors if tag.startswith("eval_iou/")} == {
        "eval_iou/road", "eval_iou/traffic_light"}
    table = _text(tensors["eval/per_class_iou"][7])
    assert "| traffic light | 40.00 |" in table and "| train |" not in table
    assert "absent from labels and predictions): train" in table


def _check_pipeline_run(log_dir: str, metrics: dict) -> None:
    """pipeline/* against metrics.json: x = 0 source-only, x = k round k."""
    tensors = _tensors(log_dir)
    source_only, oracle = metrics["source_only"]["mIoU"], metrics["oracle"]["mIoU"]
    rounds = {record["round"]: record["mIoU"] for record in metrics["rounds"]}
    expected = {0: source_only, **rounds}
    np.testing.assert_allclose([tensors["pipeline/mIoU"][x] for x in expected],
                               list(expected.values()), rtol=1e-5)
    assert tensors["pipeline/mIoU"].keys() == expected.keys()
    for tag, value in (("pipeline/source_only", source_only), ("pipeline/oracle", oracle)):
        assert tensors[tag].keys() == expected.keys()
        np.testing.assert_allclose(list(tensors[tag].values()), value, rtol=1e-5)
    if oracle > source_only:
        gap = {x: 100 * (miou - source_only) / (oracle - source_only)
               for x, miou in expected.items()}
        assert tensors["pipeline/gap_closed"].keys() == gap.keys()
        np.testing.assert_allclose([tensors["pipeline/gap_closed"][x] for x in gap],
                                   list(gap.values()), rtol=1e-4, atol=1e-4)
        assert tensors["pipeline/gap_closed_by_oracle"] == dict.fromkeys(gap, 100.0)
    else:
        assert "pipeline/gap_closed" not in tensors
        assert "pipeline/gap_closed_by_oracle" not in tensors
    table = _text(tensors["pipeline/stages"][max(expected)])
    assert table.startswith("| stage | target-val mIoU19 | gap closed (%) |")
    assert f"| oracle | {oracle:.2f} |" in table
    for record in metrics["rounds"]:
        assert f"| {record['segmenter_stage']}" in table
    assert custom_scalar_metadata.CONFIG_SUMMARY_TAG in tensors


def test_the_pipeline_run_compares_the_rounds_with_source_only_and_oracle(run, tmp_path):
    metrics = run["metrics"]
    log_dir = str(tmp_path / "pipeline")
    summaries.write_pipeline_summary(log_dir, metrics)
    _check_pipeline_run(log_dir, metrics)
    # The same with an oracle above the source-only M (a two-step oracle may be below it).
    better_oracle = copy.deepcopy(metrics)
    better_oracle["oracle"]["mIoU"] = metrics["source_only"]["mIoU"] + 10.0
    summaries.write_pipeline_summary(log_dir, better_oracle)
    _check_pipeline_run(log_dir, better_oracle)


def test_rewriting_the_pipeline_run_keeps_one_point_per_round(run, tmp_path):
    """As after every stage of a resumed run: the source-only stage, then the oracle, then
    round 1, then the final record; one event file, one point per step and tag."""
    metrics, log_dir = run["metrics"], str(tmp_path / "pipeline")
    partial = {"rounds": [], "wall_time_s": {}}
    summaries.write_pipeline_summary(log_dir, partial)
    assert not os.path.exists(log_dir)  # nothing before the source-only evaluation
    for key in ("source_only", "oracle", "rounds", "final"):
        partial[key] = metrics[key]
        summaries.write_pipeline_summary(log_dir, partial)
        summaries.write_pipeline_summary(log_dir, partial)
    assert len(glob.glob(os.path.join(log_dir, "events.out.tfevents.*"))) == 1
    _check_pipeline_run(log_dir, metrics)
    final = metrics["final"]["segmenter_stage"]
    assert f"| {final} (final) |" in _text(_tensors(log_dir)["pipeline/stages"][1])


def test_the_job_writes_the_pipeline_run(run):
    # Passes once pipeline.py calls summaries.write_pipeline_summary after each change of
    # metrics.json (Job.save_metrics); the lead wires that call.
    log_dir = os.path.join(run["dir"], "logs", summaries.PIPELINE_RUN)
    assert glob.glob(os.path.join(log_dir, "events.out.tfevents.*"))
    _check_pipeline_run(log_dir, run["metrics"])
