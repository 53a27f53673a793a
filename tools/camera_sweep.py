"""Runs the headline demo on target cameras drawn at random and writes the result table.

    python tools/camera_sweep.py --out_dir runs/camera_sweep --camera_seeds 1 2 3
        [--gin_file gin/demo.gin] [--gin_param BINDING ...]

For each camera seed K it runs the main job (``python -m sait_tf.train``) in OUT_DIR/cam<K>
on the embedded pair painted through ``Camera.random(K)`` (``ensure_synthetic_pair.camera_seed
= K``, pair in OUT_DIR/pair_cam<K>), logs to OUT_DIR/cam<K>.log, and after every camera
rewrites OUT_DIR/camera_sweep.json and OUT_DIR/camera_sweep.md: the camera's parameters,
target-val mIoU of source-only, each round, the oracle and the final model, and the share of
the source-only -> oracle gap the final model closes (computed as the pipeline's TensorBoard
summary does). A finished camera is not run again (the job returns at once), so the command
can be re-run after a kill.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import demo_seeds  # the sibling script: tools/ is on sys.path when a script of it runs

from sait_tf.data import synthetic
from sait_tf.train import summaries


def demo_command(gin_file: str, run_dir: str, pair_root: str, camera_seed: int,
                 gin_params: list[str]) -> list[str]:
    """The main job's command line for one camera; the pair root moves with the camera."""
    return demo_seeds.demo_command(gin_file, run_dir, pair_root, camera_seed, gin_params,
                                   pair_binding="ensure_synthetic_pair.camera_seed")


def gap_closed(metrics: dict) -> float | None:
    """Percent of the source-only -> oracle gap the final model closes (metrics.json of a
    finished run); None without an oracle above source-only."""
    points = summaries.pipeline_points(metrics)
    return points.get(metrics["final"]["round"], {}).get("pipeline/gap_closed")


def result_row(camera_seed: int, metrics: dict) -> dict:
    """One camera's entry of camera_sweep.json: the camera and the run's numbers."""
    return {"camera_seed": camera_seed,
            "camera": synthetic.Camera.random(camera_seed).to_json(),
            "source_only": metrics["source_only"]["mIoU"],
            "rounds": [record["mIoU"] for record in metrics["rounds"]],
            "oracle": metrics.get("oracle", {}).get("mIoU"),
            "final": metrics["final"]["mIoU"],
            "gap_closed": gap_closed(metrics),
            "wall_time_min": round(sum(metrics["wall_time_s"].values()) / 60, 1)}


def _number(value: float | None, suffix: str = "") -> str:
    return "-" if value is None else f"{value:.1f}{suffix}"


def table(rows: list[dict]) -> str:
    """Markdown table of the sweep: one line per camera."""
    max_rounds = max((len(row["rounds"]) for row in rows), default=0)
    header = (["camera seed", "hue (deg)", "gamma", "gains R/G/B", "noise", "blur",
               "source-only"] + [f"round {i}" for i in range(1, max_rounds + 1)]
              + ["oracle", "final", "gap closed", "wall time"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        camera = row["camera"]
        rounds = [_number(v) for v in row["rounds"]] + ["-"] * (max_rounds - len(row["rounds"]))
        cells = [str(row["camera_seed"]), f"{camera['hue_degrees']:.0f}",
                 f"{camera['gamma']:.2f}", "/".join(f"{g:.2f}" for g in camera["gains"]),
                 f"{camera['noise_std']:.1f}", f"{camera['blur_sigma']:.2f}",
                 _number(row["source_only"]), *rounds, _number(row["oracle"]),
                 _number(row["final"]), _number(row["gap_closed"], "%"),
                 f"{row['wall_time_min']:.1f} min"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(out_dir: str, rows: list[dict]) -> None:
    """camera_sweep.json (every number and camera field) and camera_sweep.md (the table)."""
    with open(os.path.join(out_dir, "camera_sweep.json"), "w") as f:
        json.dump(rows, f, indent=1)
    with open(os.path.join(out_dir, "camera_sweep.md"), "w") as f:
        f.write(table(rows))


def run_camera(args: argparse.Namespace, camera_seed: int) -> dict:
    """Runs (or resumes) the demo on one camera and returns its metrics.json."""
    run_dir = os.path.join(args.out_dir, f"cam{camera_seed}")
    pair_root = os.path.join(args.out_dir, f"pair_cam{camera_seed}")
    command = demo_command(args.gin_file, run_dir, pair_root, camera_seed, args.gin_param)
    return demo_seeds.run_demo(f"camera {camera_seed}", command, run_dir,
                               os.path.join(args.out_dir, f"cam{camera_seed}.log"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out_dir", required=True,
                        help="one run directory and one pair per camera go here")
    parser.add_argument("--camera_seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--gin_file", default="gin/demo.gin")
    parser.add_argument("--gin_param", action="append", default=[],
                        help="extra gin binding for every camera (repeatable)")
    args = parser.parse_args()
    if not os.path.isfile(args.gin_file):
        sys.exit(f"--gin_file {args.gin_file} does not exist")
    if min(args.camera_seeds) < 0:
        sys.exit(f"--camera_seeds must be >= 0, got {args.camera_seeds}")
    os.makedirs(args.out_dir, exist_ok=True)
    rows = []
    for camera_seed in args.camera_seeds:
        rows.append(result_row(camera_seed, run_camera(args, camera_seed)))
        write_report(args.out_dir, rows)
    print(table(rows), end="")


if __name__ == "__main__":
    main()
