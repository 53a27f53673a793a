"""A training job on a shared cluster: one job per run directory, pre-emption by SIGTERM or
Ctrl-C, a changed configuration on resume, damaged records and settings checked up front.

The jobs are real `python -m sait_tf.train` processes on a tiny synthetic pair; the signals
are real signals.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time

import gin
import pytest
from train_configs import REPO, SOURCE_ONLY_RUN, write_demo_config

from sait_tf import cli
from sait_tf.data.synthetic import generate_pair
from sait_tf.train import pipeline, settings

# Real training processes, signals and restarts: minutes (run with -m 'slow or not slow').
pytestmark = pytest.mark.slow

TIMEOUT_S = 300


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
    env.pop("SAIT_VERBOSE", None)
    return env


def _config(tmp_path, steps: int) -> str:
    """A source-only job of ``steps`` batch-1 steps with a checkpoint only at its end, so any
    other checkpoint is the one pre-emption wrote; a summary every step."""
    pair = str(tmp_path / "pair")
    if not os.path.isdir(pair):
        generate_pair(pair, num_source=4, num_target_train=2, num_target_val=2, size=(32, 64))
    return write_demo_config(tmp_path / f"job_{steps}.gin", pair, *SOURCE_ONLY_RUN,
                             f"run_pipeline.source_only_steps = {steps}",
                             "train_segmenter.checkpoint_every = 100000",
                             "train_segmenter.eval_every = 100000",
                             "train_segmenter.summary_every = 1")


def _command(config: str, run_dir: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "sait_tf.train", f"--gin_file={config}",
            f"--run_dir={run_dir}", *extra]


def _start(config: str, run_dir: str, log: str) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(_command(config, run_dir), cwd=REPO, env=_env(), stdout=out,
                                stderr=subprocess.STDOUT, text=True)


def _wait_for_training(run_dir: str, process: subprocess.Popen) -> None:
    """Returns once the job has written a summary of a training step (its event file grew)."""
    logs = os.path.join(run_dir, "logs", "source_only")
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        assert process.poll() is None, "the job ended before it could be stopped"
        events = [os.path.join(logs, f) for f in os.listdir(logs)] if os.path.isdir(logs) else []
        if any(os.path.getsize(f) > 2000 for f in events):
            return
        time.sleep(0.2)
    raise AssertionError("the job never reached its first training steps")


def _run(*command: str, cwd: str = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(list(command), cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=TIMEOUT_S)


def _snapshot(run_dir: str) -> dict[str, tuple[float, int]]:
    """(mtime, size) of every file of the run but the lock."""
    found = {}
    for root, _, names in os.walk(run_dir):
        for name in names:
            path = os.path.join(root, name)
            if name != ".lock":
                found[os.path.relpath(path, run_dir)] = (os.path.getmtime(path),
                                                         os.path.getsize(path))
    return found


def _stopped_step(output: str, signame: str) -> int:
    lines = [line for line in output.splitlines() if line.strip()]
    assert "Traceback" not in output, output[-3000:]
    match = re.fullmatch(rf"sait_tf: stopped by {signame} after step (\d+)/\d+ of source_only "
                         r"\(checkpoint saved\); run the same command again to resume",
                         lines[-1])
    assert match, lines[-3:]
    return int(match.group(1))


def test_one_job_per_run_dir_preemption_and_a_changed_config(tmp_path):
    config, run_dir = _config(tmp_path, 3000), str(tmp_path / "run")
    first = _start(config, run_dir, str(tmp_path / "first.log"))
    _wait_for_training(run_dir, first)

    second = _run(*_command(config, run_dir))
    assert second.returncode == 1
    assert second.stderr.strip().splitlines()[-1] == (
        f"error: {run_dir} is in use by process {first.pid} on host {os.uname().nodename} "
        f"(since {json.load(open(os.path.join(run_dir, '.lock')))['started']}); wait for it "
        "to end, stop it, or use another --run_dir")
    assert "Traceback" not in second.stderr

    first.send_signal(signal.SIGTERM)
    assert first.wait(TIMEOUT_S) == 128 + signal.SIGTERM
    step = _stopped_step(open(tmp_path / "first.log").read(), "SIGTERM")
    assert 1 <= step < 3000
    assert os.path.isfile(os.path.join(run_dir, "checkpoints", "source_only",
                                       f"ckpt-{step}.index"))

    # A rerun with another step count is refused before it changes anything.
    before = _snapshot(run_dir)
    shorter = _command(_config(tmp_path, step + 3), run_dir)
    refused = _run(*shorter)
    assert refused.returncode == 1, refused.stderr[-2000:]
    last = refused.stderr.strip().splitlines()[-1]
    assert "1 binding(s) differ: run_pipeline.source_only_steps: 3000 -> " in last, last
    assert "--accept_config_change" in last
    assert _snapshot(run_dir) == before

    # Accepted, the change is recorded and the job resumes at the step it stopped at.
    resumed = _run(*shorter, "--accept_config_change")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert re.search(rf"Resumed \S+ckpt-{step} at step {step}\b", resumed.stderr)
    changes = json.load(open(os.path.join(run_dir, "config_changes.json")))
    assert changes[0]["differences"] == [
        f"run_pipeline.source_only_steps: 3000 -> {step + 3}"]
    assert os.path.isfile(os.path.join(run_dir, "checkpoints", "source_only", "DONE"))

    # Damaged records: one line naming the file and what to do.
    with open(os.path.join(run_dir, "metrics.json"), "w") as f:
        f.write('{"source_only": {"mIoU": 1')
    damaged = _run(*shorter)
    assert damaged.returncode == 1
    assert damaged.stderr.strip().splitlines()[-1].startswith(
        f"error: {run_dir}/metrics.json is damaged (")
    assert "delete it and run the training command again" in damaged.stderr
    with open(os.path.join(run_dir, "final.json"), "w") as f:
        f.write("{")
    exported = _run(sys.executable, "-m", "sait_tf.export", f"--run_dir={run_dir}")
    assert exported.returncode == 1 and "Traceback" not in exported.stderr
    assert exported.stderr.strip().splitlines()[-1].startswith(
        f"error: {run_dir}/final.json is damaged (")


def test_ctrl_c_saves_and_the_same_command_resumes(tmp_path):
    config, run_dir = _config(tmp_path, 400), str(tmp_path / "run")
    job = _start(config, run_dir, str(tmp_path / "job.log"))
    _wait_for_training(run_dir, job)
    job.send_signal(signal.SIGINT)
    assert job.wait(TIMEOUT_S) == 128 + signal.SIGINT
    step = _stopped_step(open(tmp_path / "job.log").read(), "SIGINT")
    again = _run(*_command(config, run_dir))
    assert again.returncode == 0, again.stderr[-3000:]
    assert re.search(rf"Resumed \S+ckpt-{step} at step {step}\b", again.stderr)
    assert f"[source_only] step {step + 1}/400" in again.stderr or step + 1 > 400
    metrics = json.load(open(os.path.join(run_dir, "metrics.json")))
    assert metrics["wall_time_s"]["source_only"] > 0


@pytest.mark.parametrize("binding, message", [
    ("run_pipeline.flip = 'no'", "binding run_pipeline.flip = 'no': expected bool"),
    ("run_pipeline.batch_size = '4'", "binding run_pipeline.batch_size = '4': expected int"),
    ("run_pipeline.segmenter_steps = 0", "binding run_pipeline.segmenter_steps = 0: must be >= 1"),
    ("train_segmenter.checkpoint_every = 0",
     "binding train_segmenter.checkpoint_every = 0: must be >= 1"),
    ("train_translator.generator_lr = -1.0",
     "binding train_translator.generator_lr = -1.0: must be > 0"),
    ("source_domain.crop = (0, 64)", "binding source_domain.crop = (0, 64): must be sides >= 1"),
    ("generate_pseudo_labels.th_ssl = 1.5",
     "binding generate_pseudo_labels.th_ssl = 1.5: must be in (0, 1]"),
])
def test_every_setting_is_checked_before_anything_is_written(tmp_path, binding, message):
    gin.clear_config()
    try:
        gin.parse_config([f"source_domain.root = '{tmp_path}/none'",
                          f"target_domain.root = '{tmp_path}/none'", binding])
        with pytest.raises(ValueError) as error:
            pipeline.run_pipeline(str(tmp_path / "run"))
    finally:
        gin.clear_config()
    assert cli.one_line(error.value) == message
    assert not (tmp_path / "run").exists()


def test_images_of_several_sizes_need_a_resize_or_crop_to_share_a_batch(tmp_path):
    from fixture_trees import make_cityscapes_tree, make_gta5_tree

    make_gta5_tree(str(tmp_path / "gta5"), num=2, size=(20, 30))
    make_gta5_tree(str(tmp_path / "other"), num=1, size=(24, 32))
    for folder in ("images", "labels"):
        os.rename(tmp_path / "other" / folder / "00001.png",
                  tmp_path / "gta5" / folder / "00009.png")
    make_cityscapes_tree(str(tmp_path / "cityscapes"))
    source = pipeline.DomainData("gta5", str(tmp_path / "gta5"))
    target = pipeline.DomainData("cityscapes", str(tmp_path / "cityscapes"), resize=(16, 32))
    schedule = pipeline.Schedule(1, 0, 0, 1, 1, 1, batch_size=2, translator_batch_size=1,
                                 translator_crop=None, flip=False, seed=0)
    with pytest.raises(ValueError, match=re.escape(
            "run_pipeline.batch_size = 2 batches source images of 2 sizes (20x30, 24x32) "
            "without resizing or cropping them: set source_domain.resize or "
            "source_domain.crop")):
        pipeline._list_and_scan(source, target, schedule, "error")
    examples = pipeline._list_and_scan(dataclasses.replace(source, crop=(16, 16)), target,
                                       schedule, "error")
    assert len(examples["source"]) == 3


def test_type_hints_decide_what_a_binding_may_be():
    assert settings.matches((1, 2), tuple[int, int] | None)
    assert not settings.matches((1, 2, 3), tuple[int, int] | None)
    assert settings.matches(None, tuple[int, int] | None)
    assert not settings.matches(True, int) and settings.matches(3, float)
    assert not settings.matches("no", bool)


COMMANDS = {
    "train": ([sys.executable, "-m", "sait_tf.train", "--gin_file={tmp}/empty.gin",
               "--run_dir={tmp}/run"], "source_domain"),
    "evaluate": ([sys.executable, "-m", "sait_tf.evaluate", "--dataset=cityscapes",
                  "--root={tmp}/none", "--pred_dir={tmp}/none", "--output={tmp}/m.json"],
                 "{tmp}/none"),
    "export": ([sys.executable, "-m", "sait_tf.export", "--run_dir={tmp}/none"],
               "{tmp}/none/final.json"),
    "translate": ([sys.executable, "-m", "sait_tf.translate", "--run_dir={tmp}/none",
                   "--round=1", "--source_root={tmp}/none"], "source_only"),
    "convert_torch": ([sys.executable, "-m", "sait_tf.tools.convert_torch", "--arch=fcn8s",
                       "--input={tmp}/none.pth", "--output={tmp}/w.weights.h5"],
                      "{tmp}/none.pth"),
    "synthetic": ([sys.executable, "-m", "sait_tf.data.synthetic", "--out={tmp}/empty.gin/x"],
                  "{tmp}/empty.gin"),
    "serve": ([sys.executable, "-m", "sait_tf.serving.server", "--model_base_path={tmp}/none",
               "--port=0"], "{tmp}/none"),
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_user_errors_of_every_command_are_one_line(tmp_path, command):
    (tmp_path / "empty.gin").write_text("")
    argv, named = COMMANDS[command]
    result = _run(*(arg.format(tmp=tmp_path) for arg in argv))
    assert result.returncode == 1, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(("error", "convert_torch: ")), last
    assert named.format(tmp=tmp_path) in last, last


def test_verbose_shows_the_traceback(tmp_path):
    result = _run(sys.executable, "-m", "sait_tf.export", f"--run_dir={tmp_path}/none",
                  "--verbose")
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "final.json" in result.stderr
