"""Runs the headline demo on embedded pairs of several seeds and prints the result table.

    python tools/demo_seeds.py --out_dir runs/demo_seeds --seeds 0 1 [--gin_file gin/demo.gin]
        [--gin_param BINDING ...]

For each seed it runs the main job (``python -m sait_tf.train``) in OUT_DIR/seed_N with the
pair generated into OUT_DIR/pair_seed_N (``ensure_synthetic_pair.seed = N``), logs to
OUT_DIR/seed_N.log, and prints one row per seed: target-val mIoU of source-only, each round
and the oracle, the share of the source-only -> oracle gap the final model closes, and the
wall time. A finished seed is not run again (the job resumes or returns at once), so the
command can be re-run after a kill.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def demo_command(gin_file: str, run_dir: str, pair_root: str, seed: int,
                 gin_params: list[str], pair_binding: str = "ensure_synthetic_pair.seed"
                 ) -> list[str]:
    """The main job's command line with ``pair_binding = seed`` (the pair's seed, or another
    of ``ensure_synthetic_pair``'s parameters); the pair root moves with it."""
    bindings = [f"{pair_binding} = {seed}",
                f"run_pipeline.synthetic_pair_root = '{pair_root}'",
                f"SOURCE_ROOT = '{pair_root}/source'",
                f"TARGET_ROOT = '{pair_root}/target'", *gin_params]
    return [sys.executable, "-m", "sait_tf.train", f"--gin_file={gin_file}",
            f"--run_dir={run_dir}", *(f"--gin_param={b}" for b in bindings)]


def gap_closed(metrics: dict) -> float | None:
    """(final - source-only) / (oracle - source-only) of target-val mIoU; None without oracle."""
    if "oracle" not in metrics:
        return None
    source_only = metrics["source_only"]["mIoU"]
    gap = metrics["oracle"]["mIoU"] - source_only
    return (metrics["final"]["mIoU"] - source_only) / gap if gap > 0 else None


def table_rows(results: dict[int, dict]) -> list[str]:
    """Markdown rows: seed, source-only, rounds, oracle, gap closed, wall time."""
    max_rounds = max((len(m["rounds"]) for m in results.values()), default=0)
    header = (["seed", "source-only"] + [f"round {i}" for i in range(1, max_rounds + 1)]
              + ["oracle", "final", "gap closed", "wall time"])
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for seed, metrics in sorted(results.items()):
        rounds = [f"{r['mIoU']:.1f}" for r in metrics["rounds"]]
        rounds += ["-"] * (max_rounds - len(rounds))
        closed = gap_closed(metrics)
        oracle = metrics.get("oracle", {}).get("mIoU")
        cells = ([str(seed), f"{metrics['source_only']['mIoU']:.1f}", *rounds,
                  "-" if oracle is None else f"{oracle:.1f}", f"{metrics['final']['mIoU']:.1f}",
                  "-" if closed is None else f"{100 * closed:.0f}%",
                  f"{sum(metrics['wall_time_s'].values()) / 60:.1f} min"])
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def run_demo(name: str, command: list[str], run_dir: str, log_path: str) -> dict:
    """Runs (or resumes) one demo ``command``, logging to ``log_path``; returns the run's
    metrics.json. Exits naming ``name`` and the log when the demo fails."""
    print(f"{name}: {' '.join(command)}\n  log: {log_path}", flush=True)
    started = time.monotonic()
    with open(log_path, "a") as log:
        returncode = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT)
    if returncode != 0:
        sys.exit(f"{name}: the demo exited with {returncode}; see {log_path}")
    print(f"{name}: finished in {time.monotonic() - started:.0f} s", flush=True)
    with open(os.path.join(run_dir, "metrics.json")) as f:
        return json.load(f)


def run_seed(args: argparse.Namespace, seed: int) -> dict:
    """Runs (or resumes) one seed's demo and returns its metrics.json."""
    run_dir = os.path.join(args.out_dir, f"seed_{seed}")
    pair_root = os.path.join(args.out_dir, f"pair_seed_{seed}")
    command = demo_command(args.gin_file, run_dir, pair_root, seed, args.gin_param)
    return run_demo(f"seed {seed}", command, run_dir,
                    os.path.join(args.out_dir, f"seed_{seed}.log"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out_dir", required=True, help="one run directory per seed goes here")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--gin_file", default="gin/demo.gin")
    parser.add_argument("--gin_param", action="append", default=[],
                        help="extra gin binding for every seed (repeatable)")
    args = parser.parse_args()
    if not os.path.isfile(args.gin_file):
        sys.exit(f"--gin_file {args.gin_file} does not exist")
    os.makedirs(args.out_dir, exist_ok=True)
    results = {seed: run_seed(args, seed) for seed in args.seeds}
    print("\n".join(table_rows(results)))


if __name__ == "__main__":
    main()
