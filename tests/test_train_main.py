"""`python -m sait_tf.train`: gin errors, a tiny end-to-end run and its resume after a kill."""

import glob
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from train_configs import (
    REPO,
    TINY_PAIR_AND_BATCHES,
    TINY_TRANSLATOR_AND_DISCRIMINATORS,
    write_demo_config,
)

from sait_tf import labels

# The real command end to end, killed and resumed (run with -m 'slow or not slow').
pytestmark = pytest.mark.slow

STAGES = ("source_only", "oracle", "round_01_translator", "round_01_segmenter",
          "round_02_translator", "round_02_segmenter")
NUM_SOURCE, NUM_TARGET_TRAIN, NUM_TARGET_VAL = 4, 2, 2  # train_configs.TINY_PAIR_AND_BATCHES


def _train(tmp_path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "sait_tf.train", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)


def test_bad_binding_exits_at_once_with_gins_message(tmp_path):
    run_dir = tmp_path / "run"
    result = _train(tmp_path, f"--gin_file={REPO}/gin/demo.gin",
                    "--gin_param=run_pipeline.no_such_knob = 3", f"--run_dir={run_dir}")
    assert result.returncode != 0
    assert "no_such_knob" in result.stderr and "run_pipeline" in result.stderr
    assert not run_dir.exists()
    assert not (tmp_path / "data").exists()  # the demo pair was not generated either


def _tiny_config(tmp_path) -> str:
    """demo.gin with a 4 + 2 + 2 image pair at 32x64, tiny networks, a few steps, two rounds."""
    return write_demo_config(tmp_path / "tiny.gin", tmp_path / "pair", *TINY_PAIR_AND_BATCHES, """
run_pipeline.source_only_steps = 3
run_pipeline.oracle_steps = 2
run_pipeline.max_rounds = 2
run_pipeline.patience = 2
run_pipeline.translator_steps = 2
run_pipeline.segmenter_steps = 3
train_segmenter.eval_every = 2""", *TINY_TRANSLATOR_AND_DISCRIMINATORS, run_makes_pair=True)


def _mtimes(run_dir, *folders: str) -> dict[str, float]:
    """Modification times of the files (DONE markers aside) under ``folders``."""
    files = [f for folder in folders
             for f in glob.glob(os.path.join(run_dir, folder, "**", "*"), recursive=True)]
    return {f: os.path.getmtime(f) for f in files
            if os.path.isfile(f) and os.path.basename(f) != "DONE"}


def _check_metrics(run_dir) -> dict:
    with open(os.path.join(run_dir, "metrics.json")) as f:
        metrics = json.load(f)
    assert set(metrics) == {"source_only", "oracle", "rounds", "final", "wall_time_s"}
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    for evaluation in (metrics["oracle"], *metrics["rounds"]):
        # Strict JSON: an undefined IoU is null.
        ious = [math.nan if iou is None else iou for iou in evaluation["per_class_iou"].values()]
        assert list(evaluation["per_class_iou"]) == list(labels.CLASS_NAMES)
        assert math.isclose(evaluation["mIoU"], np.nanmean(ious), rel_tol=1e-9)
    candidates = [metrics["source_only"]["mIoU"]] + [r["mIoU"] for r in metrics["rounds"]]
    assert metrics["final"]["mIoU"] == max(candidates)
    best_round = candidates.index(max(candidates))  # the first of equal values is kept
    expected = ("source_only", None) if best_round == 0 else (
        f"round_0{best_round}_segmenter", f"round_0{best_round}_translator")
    with open(os.path.join(run_dir, "final.json")) as f:
        assert json.load(f) == {"segmenter_stage": expected[0], "translator_stage": expected[1]}
    assert set(metrics["wall_time_s"]) >= {*STAGES, "round_01_translate",
                                           "round_02_pseudo_labels", "export"}
    return metrics


def _check_overview(run_dir, pair) -> None:
    """overview.png: one row per val image, five 192-pixel-high cells; the last is the truth."""
    overview = np.asarray(Image.open(os.path.join(run_dir, "overview.png")))
    cell_h, cell_w, gap = 192, 384, 2  # the 32x64 pair enlarged 6 times
    assert overview.shape == (NUM_TARGET_VAL * (cell_h + gap) - gap, 5 * (cell_w + gap) - gap, 3)
    truths = sorted(glob.glob(os.path.join(pair, "target", "gtFine", "val", "*", "*.png")))
    for row, truth_path in enumerate(truths):
        train_ids = labels.LABEL_ID_TO_TRAIN_ID[np.asarray(Image.open(truth_path))]
        colours = np.zeros((256, 3), np.uint8)
        colours[:labels.NUM_CLASSES] = labels.PALETTE
        expected = colours[train_ids].repeat(6, axis=0).repeat(6, axis=1)
        top, left = row * (cell_h + gap), 4 * (cell_w + gap)
        np.testing.assert_array_equal(overview[top:top + cell_h, left:left + cell_w], expected)


def test_end_to_end_run_then_resume_after_a_kill(tmp_path):
    config, run_dir = _tiny_config(tmp_path), str(tmp_path / "run")
    command = (f"--gin_file={config}", f"--run_dir={run_dir}")
    result = _train(tmp_path, *command)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[source_only] step 3/3" in result.stderr  # progress lines

    config_text = open(os.path.join(run_dir, "config.gin")).read().replace("\\\n    ", "")
    for binding in (f"SOURCE_ROOT = '{tmp_path}/pair/source'", "train_segmenter.lambda_adv",
                    "run_pipeline.segmenter_steps = 3", "build_segmenter.width_multiplier"):
        assert binding in config_text
    for stage in STAGES:
        assert os.path.exists(os.path.join(run_dir, "checkpoints", stage, "DONE"))
        assert glob.glob(os.path.join(run_dir, "logs", stage, "events.out.tfevents.*"))
    assert glob.glob(os.path.join(run_dir, "logs", "config", "events.out.tfevents.*"))
    assert len(glob.glob(os.path.join(run_dir, "translated", "round_01", "images", "*.png"))) \
        == NUM_SOURCE
    pseudo = glob.glob(os.path.join(run_dir, "pseudo_labels", "round_01", "*", "*.png"))
    assert len(pseudo) == NUM_TARGET_TRAIN
    values = np.unique(np.concatenate([np.asarray(Image.open(p)).ravel() for p in pseudo]))
    assert set(values.tolist()) <= set(range(labels.NUM_CLASSES)) | {labels.IGNORE_INDEX}
    assert glob.glob(os.path.join(run_dir, "export", "sait_segmenter", "1", "saved_model.pb"))
    metrics = _check_metrics(run_dir)
    _check_overview(run_dir, tmp_path / "pair")

    # A kill during round 2's segmenter stage: its checkpoints, the round's metrics, final.json,
    # the export and the overview are missing. Round 1's mIoU gets a sentinel: it must be kept.
    finished = _mtimes(run_dir, "checkpoints/source_only", "checkpoints/oracle",
                       "checkpoints/round_01_translator", "checkpoints/round_01_segmenter",
                       "checkpoints/round_02_translator", "translated", "pseudo_labels")
    for path in glob.glob(os.path.join(run_dir, "checkpoints", "round_02_segmenter", "*")):
        os.remove(path)
    for path in ("final.json", "export/DONE", "overview.png"):
        os.remove(os.path.join(run_dir, path))
    round_1 = metrics["rounds"][0]
    round_1["mIoU"] = 12.345
    round_1["per_class_iou"] = {name: None if iou is None else 12.345
                                for name, iou in round_1["per_class_iou"].items()}
    del metrics["final"], metrics["rounds"][1]
    with open(os.path.join(run_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f)

    result = _train(tmp_path, *command)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[round_02_segmenter] step 3/3" in result.stderr
    for stage in ("source_only", "oracle", "round_01_translator", "round_01_segmenter",
                  "round_02_translator"):
        assert f"[{stage}] step" not in result.stderr
    assert _mtimes(run_dir, "checkpoints/source_only", "checkpoints/oracle",
                   "checkpoints/round_01_translator", "checkpoints/round_01_segmenter",
                   "checkpoints/round_02_translator", "translated", "pseudo_labels") == finished
    resumed = _check_metrics(run_dir)
    assert resumed["rounds"][0]["mIoU"] == 12.345
    assert os.path.exists(os.path.join(run_dir, "checkpoints", "round_02_segmenter", "DONE"))
    _check_overview(run_dir, tmp_path / "pair")
