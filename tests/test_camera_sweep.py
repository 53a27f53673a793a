"""tools/camera_sweep.py on made-up metrics: the gap closed, the rows, the table, the command."""

import importlib.util
import json
import os
import sys

import pytest

from sait_tf.data import synthetic

_TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")
_TOOL = os.path.join(_TOOLS, "camera_sweep.py")
sys.path.insert(0, _TOOLS)  # as when the script runs: it imports its sibling demo_seeds
_spec = importlib.util.spec_from_file_location("camera_sweep", _TOOL)
camera_sweep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(camera_sweep)


def _metrics(source_only, rounds, oracle, final_round):
    records = [{"round": i, "segmenter_stage": f"round_{i:02d}_segmenter", "mIoU": miou}
               for i, miou in enumerate(rounds, start=1)]
    final = records[final_round - 1] if final_round else {"round": 0, "mIoU": source_only}
    metrics = {"source_only": {"mIoU": source_only, "num_classes": 19}, "rounds": records,
               "final": final, "wall_time_s": {"source_only": 30.0, "round_01_translator": 330.0}}
    if oracle is not None:
        metrics["oracle"] = {"mIoU": oracle}
    return metrics


def test_gap_closed_is_the_final_models_share_of_the_oracle_gap():
    # Round 2 is worse than round 1 and the final model is round 1's.
    metrics = _metrics(30.0, [45.0, 40.0], 50.0, final_round=1)
    assert camera_sweep.gap_closed(metrics) == pytest.approx(75.0)
    assert camera_sweep.gap_closed(_metrics(30.0, [28.0], 50.0, final_round=0)) == 0.0
    assert camera_sweep.gap_closed(_metrics(30.0, [45.0], None, final_round=1)) is None
    assert camera_sweep.gap_closed(_metrics(30.0, [45.0], 29.0, final_round=1)) is None


def test_rows_and_table_carry_the_camera_and_the_numbers(tmp_path):
    rows = [camera_sweep.result_row(2, _metrics(30.0, [45.0, 48.0], 50.0, final_round=2)),
            camera_sweep.result_row(5, _metrics(20.0, [24.0], 60.0, final_round=1))]
    camera = synthetic.Camera.random(2)
    assert rows[0]["camera"] == camera.to_json()
    assert (rows[0]["gap_closed"], rows[1]["gap_closed"]) == (pytest.approx(90.0), 10.0)
    assert rows[0]["wall_time_min"] == 6.0
    lines = camera_sweep.table(rows).splitlines()
    assert len(lines) == 4
    assert lines[0].startswith("| camera seed | hue (deg) | gamma | gains R/G/B |")
    assert "| round 1 | round 2 | oracle | final | gap closed |" in lines[0]
    cells = [cell.strip() for cell in lines[2].strip("|").split("|")]
    assert cells[0] == "2" and cells[1] == f"{camera.hue_degrees:.0f}"
    assert cells[6:] == ["30.0", "45.0", "48.0", "50.0", "48.0", "90.0%", "6.0 min"]
    assert lines[3].split("|")[8:10] == [" 24.0 ", " - "]  # a run that stopped after round 1
    camera_sweep.write_report(str(tmp_path), rows)
    with open(tmp_path / "camera_sweep.json") as f:
        assert json.load(f)[1]["camera_seed"] == 5
    assert (tmp_path / "camera_sweep.md").read_text() == camera_sweep.table(rows)


def test_demo_command_moves_the_pair_with_the_camera():
    command = camera_sweep.demo_command("gin/demo.gin", "out/cam3", "out/pair_cam3", 3,
                                        ["run_pipeline.max_rounds = 1"])
    assert command[1:5] == ["-m", "sait_tf.train", "--gin_file=gin/demo.gin",
                            "--run_dir=out/cam3"]
    assert command[5:] == [
        "--gin_param=ensure_synthetic_pair.camera_seed = 3",
        "--gin_param=run_pipeline.synthetic_pair_root = 'out/pair_cam3'",
        "--gin_param=SOURCE_ROOT = 'out/pair_cam3/source'",
        "--gin_param=TARGET_ROOT = 'out/pair_cam3/target'",
        "--gin_param=run_pipeline.max_rounds = 1"]
