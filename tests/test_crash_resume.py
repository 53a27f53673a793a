"""SIGKILL at four stages of `python -m sait_tf.train`, the same command again after each.

One run is killed while F trains, while the source set is translated, while M trains and
while the models are exported; each rerun must continue from that stage's last checkpoint
or last complete file, and the run must end with the artifacts of an uninterrupted run made
alongside: every stage DONE, complete metrics.json and final.json, the export, every
translated image and pseudo-label complete, and no temporary file left.
"""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image
from train_configs import REPO, TINY_TRANSLATOR_AND_DISCRIMINATORS, write_demo_config

from sait_tf import labels
from sait_tf.data.synthetic import generate_pair

# Killed and restarted training processes (run with -m 'slow or not slow').
pytestmark = pytest.mark.slow

NUM_SOURCE, NUM_TARGET_TRAIN, NUM_TARGET_VAL = 8, 4, 4
SIZE = (32, 64)
# The source set is translated at 8x the generated size, so that translating it lasts long
# enough to be killed halfway; M and F train on crops of the generated size.
TRANSLATED_SIZE = (256, 512)
STEPS = 6  # F and M; a checkpoint every 2 steps
STAGES = ("source_only", "round_01_translator", "round_01_segmenter")
WALL_TIME_KEYS = {*STAGES, "round_01_translate", "round_01_pseudo_labels", "export"}
TIMEOUT_S = 600


def _config(tmp_path) -> str:
    pair = str(tmp_path / "pair")
    generate_pair(pair, num_source=NUM_SOURCE, num_target_train=NUM_TARGET_TRAIN,
                  num_target_val=NUM_TARGET_VAL, size=SIZE)
    return write_demo_config(tmp_path / "tiny.gin", pair, f"""
source_domain.resize = {TRANSLATED_SIZE}
source_domain.crop = {SIZE}
run_pipeline.translator_crop = {SIZE}
run_pipeline.batch_size = 2
run_pipeline.translator_batch_size = 1
run_pipeline.source_only_steps = 2
run_pipeline.oracle_steps = 0
run_pipeline.max_rounds = 1
run_pipeline.translator_steps = {STEPS}
run_pipeline.segmenter_steps = {STEPS}
train_segmenter.eval_every = {STEPS}
train_segmenter.checkpoint_every = 2
train_translator.checkpoint_every = 2
train_translator.log_images_every = {STEPS}""", *TINY_TRANSLATOR_AND_DISCRIMINATORS)


def _start(config: str, run_dir: str, log_path: str) -> subprocess.Popen:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
    with open(log_path, "w") as log:
        return subprocess.Popen([sys.executable, "-m", "sait_tf.train", f"--gin_file={config}",
                                 f"--run_dir={run_dir}"], stdout=log, stderr=subprocess.STDOUT,
                                env=env)


def _tail(log_path: str) -> str:
    with open(log_path) as f:
        return f.read()[-3000:]


def _kill_when(config: str, run_dir: str, log_path: str, ready: Callable[[], bool]) -> None:
    """Runs the command and SIGKILLs it as soon as ``ready()``; fails if it ends first."""
    process = _start(config, run_dir, log_path)
    deadline = time.monotonic() + TIMEOUT_S
    while not ready():
        assert process.poll() is None, f"the run ended before the kill:\n{_tail(log_path)}"
        assert time.monotonic() < deadline, _tail(log_path)
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL


def _done(run_dir: str, *parts: str) -> bool:
    return os.path.exists(os.path.join(run_dir, *parts, "DONE"))


def _in_progress(run_dir: str, *parts: str, started: str) -> bool:
    """``started`` exists under RUN_DIR/parts and the stage has no DONE marker yet."""
    return (bool(glob.glob(os.path.join(run_dir, *parts, started)))
            and not _done(run_dir, *parts))


def _artifacts(run_dir: str) -> set[str]:
    """Relative paths of every file; event files (one per process) by folder only."""
    found = set()
    for folder, _, files in os.walk(run_dir):
        for name in files:
            relative = os.path.relpath(os.path.join(folder, name), run_dir)
            if name.startswith("events.out.tfevents."):
                relative = os.path.join(os.path.dirname(relative), "events.out.tfevents.*")
            found.add(relative)
    return found


def _check_complete(run_dir: str) -> dict:
    """The finished run directory; returns metrics.json."""
    for stage in STAGES:
        assert _done(run_dir, "checkpoints", stage), stage
    for folder in ("translated/round_01", "pseudo_labels/round_01", "export"):
        assert _done(run_dir, folder), folder
    leftovers = [path for path in _artifacts(run_dir) | {
        os.path.relpath(folder, run_dir) for folder, _, _ in os.walk(run_dir)}
        if ".tmp" in path or "_temp" in path]
    assert leftovers == []

    # Every translated image and pseudo-label is there and decodes completely.
    for kind, size, count in (("images", TRANSLATED_SIZE, NUM_SOURCE),
                              ("labels", TRANSLATED_SIZE, NUM_SOURCE)):
        files = sorted(glob.glob(os.path.join(run_dir, "translated", "round_01", kind, "*.png")))
        assert len(files) == count
        for path in files:
            with Image.open(path) as image:
                image.load()
                assert image.size == size[::-1]
    pseudo = glob.glob(os.path.join(run_dir, "pseudo_labels", "round_01", "*", "*.png"))
    assert len(pseudo) == NUM_TARGET_TRAIN
    for path in pseudo:
        values = np.asarray(Image.open(path))
        assert values.shape == SIZE
        assert set(np.unique(values).tolist()) <= {*range(labels.NUM_CLASSES), 255}

    with open(os.path.join(run_dir, "metrics.json")) as f:
        metrics = json.load(f)
    assert set(metrics) == {"source_only", "rounds", "final", "wall_time_s"}
    assert set(metrics["wall_time_s"]) == WALL_TIME_KEYS
    assert [r["round"] for r in metrics["rounds"]] == [1]
    for evaluation in (metrics["source_only"], metrics["rounds"][0], metrics["final"]):
        assert list(evaluation["per_class_iou"]) == list(labels.CLASS_NAMES)
        assert evaluation["num_classes"] == labels.NUM_CLASSES
    assert metrics["final"]["mIoU"] == max(metrics["source_only"]["mIoU"],
                                           metrics["rounds"][0]["mIoU"])
    with open(os.path.join(run_dir, "final.json")) as f:
        final = json.load(f)
    assert final == {"segmenter_stage": metrics["final"]["segmenter_stage"],
                     "translator_stage": metrics["final"]["translator_stage"]}

    models = sorted(os.listdir(os.path.join(run_dir, "export")))
    expected = ["DONE", "sait_segmenter"] + (["sait_translator"] if final["translator_stage"]
                                             else [])
    assert models == expected
    for model in expected[1:]:
        assert os.listdir(os.path.join(run_dir, "export", model)) == ["1"]
        assert os.path.isfile(os.path.join(run_dir, "export", model, "1", "saved_model.pb"))
    for stage in STAGES:
        with open(os.path.join(run_dir, "checkpoints", stage, "checkpoint")) as f:
            newest = f.readline()
        assert newest.strip().endswith(f'ckpt-{2 if stage == "source_only" else STEPS}"')
    return metrics


def _without_translator_export(artifacts: set[str]) -> set[str]:
    """The export holds F only when round 1 beat the source-only M; training noise decides."""
    return {path for path in artifacts if not path.startswith("export/sait_translator/")}


def _assert_resumed(log: str, stage: str) -> None:
    """The log shows ``stage`` restored from a checkpoint before its last, then going on."""
    resumed = re.findall(rf"{stage}/ckpt-(\d+) at step (\d+)", log)
    assert len(resumed) == 1 and resumed[0][0] == resumed[0][1], resumed
    step = int(resumed[0][0])
    assert 2 <= step < STEPS
    assert f"[{stage}] step {step + 1}/{STEPS}" in log
    assert f"[{stage}] step 1/" not in log


def test_killed_four_times_ends_like_an_uninterrupted_run(tmp_path):
    config = _config(tmp_path)
    reference_dir, run_dir = str(tmp_path / "reference"), str(tmp_path / "run")
    reference = _start(config, reference_dir, str(tmp_path / "reference.log"))
    logs = [str(tmp_path / f"run_{attempt}.log") for attempt in range(5)]

    _kill_when(config, run_dir, logs[0], lambda: _in_progress(
        run_dir, "checkpoints", "round_01_translator", started="checkpoint"))
    # An example is complete once its label (written after its image) is there.
    _kill_when(config, run_dir, logs[1], lambda: _in_progress(
        run_dir, "translated", "round_01", started="labels/*.png"))
    _kill_when(config, run_dir, logs[2], lambda: _in_progress(
        run_dir, "checkpoints", "round_01_segmenter", started="checkpoint"))
    _kill_when(config, run_dir, logs[3], lambda: _in_progress(
        run_dir, "export", started="sait_segmenter"))
    last = _start(config, run_dir, logs[4])
    assert last.wait(TIMEOUT_S) == 0, _tail(logs[4])
    assert reference.wait(TIMEOUT_S) == 0, _tail(str(tmp_path / "reference.log"))

    texts = []
    for path in logs:
        with open(path) as f:
            texts.append(f.read())
    # Each rerun continued where the kill stopped it and redid no finished stage.
    _assert_resumed(texts[1], "round_01_translator")
    assert "[source_only] step" not in "".join(texts[1:])
    translated_before = [int(line.split("translate: ")[1].split()[0])
                         for line in texts[2].splitlines() if "examples already in" in line]
    assert len(translated_before) == 1 and 1 <= translated_before[0] < NUM_SOURCE
    assert "[round_01_translator] step" not in "".join(texts[2:])
    _assert_resumed(texts[3], "round_01_segmenter")
    assert "[round_01_segmenter] step" not in texts[4]
    assert "exported sait_segmenter version 1" in texts[4]

    metrics = _check_complete(run_dir)
    reference_metrics = _check_complete(reference_dir)
    assert set(metrics["rounds"][0]) == set(reference_metrics["rounds"][0])
    assert (_without_translator_export(_artifacts(run_dir))
            == _without_translator_export(_artifacts(reference_dir)))


def test_a_save_killed_halfway_leaves_nothing_behind(tmp_path):
    """TensorFlow's temporaries of a killed save are removed; the last complete one restores."""
    import keras

    from sait_tf.runtime import checkpoints

    stage_dir = str(tmp_path / "stage")
    model = keras.Sequential([keras.layers.Dense(2)])
    model.build((None, 3))
    checkpoints.StageCheckpoint(stage_dir, model=model).save(2)
    saved = [w.copy() for w in model.get_weights()]
    # What a kill during the save of step 4 leaves: shards and a state file, both temporary.
    os.makedirs(os.path.join(stage_dir, "ckpt-4_temp"))
    with open(os.path.join(stage_dir, "ckpt-4_temp", "part-00000-of-00001.index"), "wb") as f:
        f.write(b"\x00" * 7)
    with open(os.path.join(stage_dir, "checkpoint.tmp0123abcd"), "w") as f:
        f.write('model_checkpoint_path: "ckpt-4"\n')
    model.set_weights([w + 1 for w in saved])

    resumed = checkpoints.StageCheckpoint(stage_dir, model=model)
    assert sorted(os.listdir(stage_dir)) == ["checkpoint", "ckpt-2.data-00000-of-00001",
                                             "ckpt-2.index"]
    assert resumed.restore_latest() == 2
    for now, expected in zip(model.get_weights(), saved, strict=True):
        np.testing.assert_array_equal(now, expected)
