"""The paper-scale dry run (sait_tf/tools/paper_scale.py) on tiny images and networks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from train_configs import REPO, TINY_TRANSLATOR_AND_DISCRIMINATORS

from sait_tf.tools import paper_scale

# The paper config's sizes and networks shrunk to a quick run; the tool's own bindings
# (data, weights, schedule) come before these.
TINY = (
    "source_domain.resize = (64, 128)",
    "target_domain.resize = (64, 128)",
    "run_pipeline.translator_crop = (64, 64)",
    "build_segmenter.blocks = (1, 1, 1, 1)",
    "build_segmenter.width_multiplier = 0.125",
    *TINY_TRANSLATOR_AND_DISCRIMINATORS,
)


def _tool(tmp_path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "sait_tf.tools.paper_scale",
                           f"--out_dir={tmp_path / 'out'}", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)


def test_a_missing_config_is_refused_by_name(tmp_path):
    result = _tool(tmp_path, "--config=gin/gta5_deeplabv2.gin", "--config=gin/no_such.gin")
    assert result.returncode == 1
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line == "error: --config gin/no_such.gin does not exist"
    assert not os.path.exists(tmp_path / "out" / "gta5_deeplabv2")


@pytest.mark.slow
def test_every_stage_has_step_times_and_memory(tmp_path):
    result = _tool(tmp_path, "--config=gin/gta5_deeplabv2.gin", "--steps=3", "--images=3",
                   "--target_size=64,128", "--source_size=48,96", "--min_free_gb=0",
                   *(f"--gin_param={binding}" for binding in TINY))
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "out" / "paper_scale.json") as f:
        record = json.load(f)["configs"]["gin/gta5_deeplabv2.gin"]
    stages = record["stages"]
    assert list(stages) == list(paper_scale.STAGES)
    expected_steps = {"source_only": 3, "translator": 3, "translate": 3, "pseudo_labels": 3,
                      "segmenter": 3, "evaluate": 3, "export": 1}
    assert {kind: stage["steps"] for kind, stage in stages.items()} == expected_steps
    for kind, stage in stages.items():
        assert stage["s_per_step"] > 0, kind
        assert stage["s_per_step"] <= stage["seconds"], kind
        # A TensorFlow process holds far more than 100 MB, and this one far less than 20 GB.
        assert 0.1 < stage["peak_rss_gb"] < 20, kind
    assert record["peak_rss_gb"] == max(stage["peak_rss_gb"] for stage in stages.values())
    assert stages[record["peak_stage"]]["peak_rss_gb"] == record["peak_rss_gb"]
    assert record["source"]["dataset"] == "gta5" and record["source"]["image_size"] == [48, 96]
    assert record["paper_schedule"]["segmenter_steps"] == 120000
    assert record["paper_schedule"]["source_only_steps"] == 0
    with open(os.path.join(record["run_dir"], "run.json")) as f:
        facts = json.load(f)
    assert facts["source"]["resize"] == [64, 128]
    table = (tmp_path / "out" / "paper_scale.md").read_text()
    assert "| gta5_deeplabv2 | segmenter | 3 |" in table


def test_memory_peaks_are_assigned_to_the_windows_they_overlap():
    samples = [(1.0, 5), (2.0, 9), (3.0, 4), (4.0, 7)]
    assert paper_scale.peak_in(samples, [(0.0, 1.5)], since=0.0) == 9
    assert paper_scale.peak_in(samples, [(2.2, 2.8)], since=0.0) == 4
    assert paper_scale.peak_in(samples, [(0.2, 0.8), (3.5, 3.9)], since=0.0) == 7
    assert paper_scale.peak_in(samples, [(5.0, 6.0)], since=0.0) is None


def test_progress_rate_excludes_the_first_step_and_keeps_the_last_loop():
    lines = [(10.0, "I1202 04:15:09.000000 1 progress.py:43] [evaluate] step 1/3  ? it/s"),
             (11.0, "I1202 04:15:13.000000 1 progress.py:43] [evaluate] step 3/3  0.5 it/s"),
             (20.0, "I1202 04:15:20.500000 1 progress.py:43] [evaluate] step 1/4  ? it/s"),
             (21.0, "I1202 04:15:21.000000 1 progress.py:43] [translate] step 2/4  ? it/s"),
             (22.0, "I1202 04:15:26.500000 1 progress.py:43] [evaluate] step 4/4  0.5 it/s")]
    assert paper_scale.progress_rate(lines, "evaluate", (0.0, 15.0), 2026) == (3, 2.0)
    assert paper_scale.progress_rate(lines, "evaluate", (0.0, 30.0), 2026) == (4, 2.0)
    assert paper_scale.progress_rate(lines, "translate", (0.0, 30.0), 2026) == (4, None)
