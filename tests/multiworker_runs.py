"""The distributed whole-pipeline tests' runs (tests/test_multiworker_*.py,
tests/test_mirrored_pipeline.py): two local `python -m sait_tf.train` processes under
MultiWorkerMirroredStrategy (loopback ports, TF_CONFIG each, one CPU each), or
MirroredStrategy over the two logical CPUs of conftest.py in the test's process.

Each run trains, on a tiny pair, M on the source, one round (F, the translated source set, the
pseudo-labels, M adapted) and exports. Every stage's checkpoint must equal that of one process
training the same stage on the same inputs, within the float32 summation-order differences
of an all-reduce (``assert_same_stage``); the offline outputs and the mIoU must match those
of the whole one-process run (``shared_reference``, made once per test session).
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from train_configs import (
    REPO,
    TINY_PAIR_AND_BATCHES,
    TINY_TRANSLATOR_AND_DISCRIMINATORS,
    write_demo_config,
)

from sait_tf import run_dir as layout
from sait_tf.data.synthetic import generate_pair
from sait_tf.runtime.workers import free_loopback_ports

SOURCE_ONLY, TRANSLATOR, SEGMENTER = (layout.SOURCE_ONLY, layout.translator_stage(1),
                                      layout.segmenter_stage(1))
NUM_SOURCE, NUM_TARGET_TRAIN = 4, 2  # train_configs.TINY_PAIR_AND_BATCHES
# A stage on several replicas differs from the same stage in one process by float32
# summation order only (each replica's gradient, then their all-reduce, against one sum over
# the batch). Largest differences measured (two workers, two logical CPUs): weights and
# model state 1.2e-7, optimiser state 4.2e-5 relative (Adam's moments of F).
MODEL_RTOL, MODEL_ATOL = 1e-5, 1e-6
OPTIMIZER_RTOL, OPTIMIZER_ATOL = 1e-4, 1e-5
TIMEOUT_S = 3600  # generous: a loaded CI machine is slow, never wrong
# Global batches of 2: one example per worker (or logical CPU) and step. Adam's epsilon at 1
# makes each update follow the gradient's value: with the default 1e-8 the first update is
# learning_rate * sign(gradient), so a gradient element within rounding of zero moves its
# weight by a whole step either way, and Adam's update hides a wrongly scaled gradient.
# F trains one step: its first step starts from the same weights in both runs and agrees to
# summation order; the tiny F's gradient at the second step, taken at weights that already
# differ by rounding, moved F's Adam moments by 2e-3 relative (measured on a 2-core AMD EPYC
# without AVX-512), a hundred times the first step's difference. M's stages keep two steps.
SCHEDULE = """
run_pipeline.translator_batch_size = 2
run_pipeline.source_only_steps = 2
run_pipeline.oracle_steps = 0
run_pipeline.max_rounds = 1
run_pipeline.translator_steps = 1
run_pipeline.segmenter_steps = 2
train_segmenter.eval_every = 1000
train_translator.log_images_every = 1000
adam.epsilon = 1.0"""
MULTI_WORKER = "make_strategy.kind = 'multi_worker'"


@contextlib.contextmanager
def _session_folder(tmp_path_factory: pytest.TempPathFactory, name: str):
    """Yields (folder, made): one folder per test session, shared by the pytest-xdist workers
    (their temporary roots have one parent), held under an exclusive lock; ``made`` tells
    whether an earlier holder finished it (its DONE file exists)."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    folder = root / name
    folder.mkdir(exist_ok=True)
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield folder, (folder / "DONE").exists()
        (folder / "DONE").touch()


def shared_config(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny run's gin file; the pair exists before the workers start (they only read it)."""
    with _session_folder(tmp_path_factory, "multiworker_config") as (root, made):
        if not made:
            generate_pair(str(root / "pair"), num_source=NUM_SOURCE,
                          num_target_train=NUM_TARGET_TRAIN, num_target_val=2, size=(32, 64))
            write_demo_config(root / "tiny.gin", root / "pair", *TINY_PAIR_AND_BATCHES,
                              SCHEDULE, *TINY_TRANSLATOR_AND_DISCRIMINATORS)
    return str(root / "tiny.gin")


def shared_reference(config: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The same run in one process on one device, made once for all the test files."""
    with _session_folder(tmp_path_factory, "multiworker_reference") as (root, made):
        run_dir, log = str(root / "run"), str(root / "log")
        if not made:
            shutil.rmtree(run_dir, ignore_errors=True)
            finish(start(config, [run_dir], [log]), [log])
    return run_dir


def start(config: str, run_dirs: list[str], logs: list[str], *gin_params: str,
           flags: tuple[str, ...] = ()) -> list[subprocess.Popen]:
    """One `python -m sait_tf.train` per run directory; several form a cluster on loopback."""
    ports = free_loopback_ports(len(run_dirs))
    processes = []
    for index, (run_dir, log) in enumerate(zip(run_dirs, logs, strict=True)):
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="",
                   PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
        env.pop("TF_CONFIG", None)
        if len(run_dirs) > 1:
            env["TF_CONFIG"] = json.dumps({
                "cluster": {"worker": [f"localhost:{port}" for port in ports]},
                "task": {"type": "worker", "index": index}})
        with open(log, "a") as out:
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "sait_tf.train", f"--gin_file={config}",
                 f"--run_dir={run_dir}", *(f"--gin_param={param}" for param in gin_params),
                 *flags],
                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT))
    return processes


def finish(processes: list[subprocess.Popen], logs: list[str]) -> list[str]:
    """Waits for every process; returns their logs, failing with the log of one that failed."""
    for process, log in zip(processes, logs, strict=True):
        try:
            process.wait(timeout=TIMEOUT_S)
        finally:
            for other in processes:
                if other.poll() is None and process.returncode is None:
                    other.kill()
        assert process.returncode == 0, open(log).read()[-4000:]
    return [open(log).read() for log in logs]


STEPS = {SOURCE_ONLY: 2, TRANSLATOR: 1, SEGMENTER: 2}  # as in SCHEDULE


def _weights(run_dir: str, stage: str) -> dict[str, np.ndarray]:
    """Every tensor of the stage's final checkpoint (models, optimiser state, step)."""
    path = tf.train.latest_checkpoint(os.path.join(run_dir, "checkpoints", stage))
    assert path and path.endswith(f"ckpt-{STEPS[stage]}"), path
    reader = tf.train.load_checkpoint(path)
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if name != "_CHECKPOINTABLE_OBJECT_GRAPH"}


def assert_same_stage(run_dir: str, reference: str, stage: str) -> None:
    """Every tensor of the stage's final checkpoints equal, to summation order."""
    got, want = _weights(run_dir, stage), _weights(reference, stage)
    assert got.keys() == want.keys() and len(got) > 10
    for name, value in want.items():
        optimizer = "optimizer" in name.split("/")[0]  # e.g. segmenter_optimizer_all/...
        np.testing.assert_allclose(
            got[name], value, err_msg=f"{stage}: {name}",
            rtol=OPTIMIZER_RTOL if optimizer else MODEL_RTOL,
            atol=OPTIMIZER_ATOL if optimizer else MODEL_ATOL)


def _rerun_trained_stages(run_dir: str, config: str, root) -> str:
    """F's and M's stages of round 1 redone by one process on a copy of ``run_dir``: the copy
    keeps the source-only M, the translated set and the pseudo-labels (the offline stages
    skip their finished folders), so each redone stage reads the run's own inputs.

    A stage's inputs are the earlier stages' results, which differ between the runs by
    rounding: M by ~1e-8 after the source stage, a few translated pixels by one grey level
    (a value on a rounding boundary). The networks amplify such differences beyond the
    summation order (a ReLU input within rounding of zero passes its gradient or not), so
    these stages are compared with this same-input rerun; the whole one-process run is the
    reference of the source stage, the offline files and the mIoU.
    """
    copy = str(root / "rerun")
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns(".worker_tmp"))
    redone = layout.RunDir(copy)
    for stage in (TRANSLATOR, SEGMENTER):
        shutil.rmtree(redone.checkpoint_dir(stage))
    log = str(root / "rerun.log")
    output = finish(start(config, [copy], [log], flags=("--accept_config_change",)), [log])[0]
    assert "translate: wrote 0 examples" in output, output[-3000:]
    return copy


def assert_same_results(run_dir: str, reference: str, config: str, root) -> None:
    """``run_dir``'s stages equal the one-process runs' (``assert_same_stage``), its offline
    files and mIoU the reference's."""
    assert_same_stage(run_dir, reference, SOURCE_ONLY)
    rerun = _rerun_trained_stages(run_dir, config, root)
    for stage in (TRANSLATOR, SEGMENTER):
        assert_same_stage(run_dir, rerun, stage)
    for folder in ("translated/round_01/images", "pseudo_labels/round_01"):
        got = sorted(glob.glob(os.path.join(run_dir, folder, "**", "*.png"), recursive=True))
        want = sorted(glob.glob(os.path.join(reference, folder, "**", "*.png"), recursive=True))
        assert [os.path.relpath(p, run_dir) for p in got] == [
            os.path.relpath(p, reference) for p in want]
        for a, b in zip(got, want, strict=True):
            difference = np.abs(np.asarray(Image.open(a), np.int16)
                                - np.asarray(Image.open(b), np.int16))
            # Translations may round the other way; a pseudo-label near a threshold may flip.
            assert (difference <= 1).mean() > 0.99 if "translated" in folder else \
                (difference == 0).mean() > 0.99, a
    metrics = [json.load(open(os.path.join(d, "metrics.json"))) for d in (run_dir, reference)]
    for key in ("source_only", "final"):
        assert metrics[0][key]["mIoU"] == pytest.approx(metrics[1][key]["mIoU"], abs=0.05)


def files_laid_out(run_dir: str) -> set[str]:
    """The run's files, event files named by their folder (their names hold host and pid)."""
    found = set()
    for root, _, names in os.walk(run_dir):
        for name in names:
            path = os.path.relpath(os.path.join(root, name), run_dir)
            found.add(re.sub(r"events\.out\.tfevents\..*", "events", path))
    return found


def shard_writes(log: str) -> list[tuple[str, str]]:
    """(count, folder) of the translated files and pseudo-labels a worker wrote."""
    return (re.findall(r"translate: wrote (\d+) examples to (\S+)", log)
            + re.findall(r"pseudo-labels: (\d+) files in (\S+),", log))
