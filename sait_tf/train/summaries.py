"""TensorBoard summaries of evaluations and of the whole job (docs/tensorboard.md).

``write_evaluation`` logs one target-val evaluation in a stage's run: ``eval/mIoU``,
``eval_iou/<class>`` for every class whose IoU is defined (present in the evaluation set's
labels or in the predictions) and the text table ``eval/per_class_iou``.

``write_pipeline_summary`` writes the run ``RUN_DIR/logs/pipeline`` from metrics.json's record,
with the round index as the step (0 = source-only, K = round K): ``pipeline/mIoU``, the
constant reference lines ``pipeline/source_only`` and ``pipeline/oracle``, and
``pipeline/gap_closed``, the percentage of the source-only-to-oracle gap a round closed
(0 at step 0; only with an oracle better than the source-only M), beside the constant
``pipeline/gap_closed_by_oracle`` (100): with that reference in its chart, TensorBoard's
"ignore outliers" scaling cannot clip a curve of two or three points to a flat line. The text table
``pipeline/stages`` lists every stage and a Custom Scalars layout draws the mIoU and its
references in one chart. Each call rewrites the whole history into a fresh event file and
then deletes the older ones, so calling it after every stage of a resumed run leaves one
point per step.
"""

from __future__ import annotations

import glob
import math
import os
from collections.abc import Sequence

import tensorflow as tf
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.custom_scalar import summary as custom_scalar

from sait_tf import run_dir as layout

PIPELINE_RUN = "pipeline"
"""The pipeline's run: ``RunDir.log_dir(PIPELINE_RUN)``."""

_EVENT_FILES = "events.out.tfevents.*"
_LAYOUT = layout_pb2.Layout(category=[layout_pb2.Category(title="pipeline", chart=[
    layout_pb2.Chart(title="target-val mIoU per round (0 = source-only)",
                     multiline=layout_pb2.MultilineChartContent(
                         tag=[r"^pipeline/(mIoU|source_only|oracle)$"])),
    layout_pb2.Chart(title="gap closed (% of oracle - source-only)",
                     multiline=layout_pb2.MultilineChartContent(
                         tag=[r"^pipeline/gap_closed(_by_oracle)?$"])),
])])


def is_defined(iou: float | None) -> bool:
    """An IoU (or mIoU) is defined unless null in metrics.json or NaN from the evaluation."""
    return iou is not None and not math.isnan(iou)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table, as TensorBoard's text dashboard renders it."""
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def _percent(value: float | None) -> str:
    return f"{value:.2f}" if is_defined(value) else "-"


def write_evaluation(evaluation: dict, step: int) -> None:
    """Writes ``evaluation`` (``sait_tf.evaluate.evaluate_segmenter``'s {"mIoU",
    "per_class_iou", "num_classes"}) to the default writer at ``step``."""
    tf.summary.scalar("eval/mIoU", evaluation["mIoU"], step=step)
    per_class = evaluation["per_class_iou"]
    present = {name: iou for name, iou in per_class.items() if is_defined(iou)}
    for name, iou in present.items():
        tf.summary.scalar(f"eval_iou/{name.replace(' ', '_')}", iou, step=step)
    text = markdown_table(("class", "IoU (%)"),
                          [(name, _percent(iou)) for name, iou in present.items()])
    absent = [name for name in per_class if name not in present]
    text = (f"mIoU{evaluation['num_classes']} {_percent(evaluation['mIoU'])} over the "
            f"{len(present)} classes with a defined IoU\n\n{text}")
    if absent:
        text += f"\n\nNo IoU (absent from labels and predictions): {', '.join(absent)}"
    tf.summary.text("eval/per_class_iou", text, step=step)


def pipeline_points(metrics: dict) -> dict[int, dict[str, float]]:
    """The pipeline's scalars as {round index: {tag: value}}; empty before the source-only
    stage is evaluated."""
    source_only = metrics.get(layout.SOURCE_ONLY, {}).get("mIoU")
    if not is_defined(source_only):
        return {}
    oracle = metrics.get(layout.ORACLE, {}).get("mIoU")
    curve = {0: source_only, **{record["round"]: record["mIoU"]
                                for record in metrics.get("rounds", [])
                                if is_defined(record["mIoU"])}}
    points = {}
    for step, miou in curve.items():
        points[step] = {"pipeline/mIoU": miou, "pipeline/source_only": source_only}
        if is_defined(oracle):
            points[step]["pipeline/oracle"] = oracle
            if oracle > source_only:
                points[step]["pipeline/gap_closed"] = (100.0 * (miou - source_only)
                                                       / (oracle - source_only))
                points[step]["pipeline/gap_closed_by_oracle"] = 100.0
    return points


def _stages_table(metrics: dict, points: dict[int, dict[str, float]]) -> str:
    """Stage, mIoU and gap closed of the source-only M, each round and the oracle."""
    final_stage = metrics.get("final", {}).get("segmenter_stage")
    stages = [(0, layout.SOURCE_ONLY, metrics[layout.SOURCE_ONLY]["mIoU"])]
    stages += [(record["round"], record["segmenter_stage"], record["mIoU"])
               for record in metrics.get("rounds", [])]
    rows = [(stage + (" (final)" if stage == final_stage else ""), _percent(miou),
             _percent(points.get(step, {}).get("pipeline/gap_closed")))
            for step, stage, miou in stages]
    if layout.ORACLE in metrics:
        closes_gap = "pipeline/gap_closed" in points[0]
        rows.append((layout.ORACLE, _percent(metrics[layout.ORACLE]["mIoU"]),
                     _percent(100.0 if closes_gap else None)))
    num_classes = metrics[layout.SOURCE_ONLY]["num_classes"]
    return markdown_table(("stage", f"target-val mIoU{num_classes}", "gap closed (%)"), rows)


def write_pipeline_summary(log_dir: str, metrics: dict) -> None:
    """Rewrites the pipeline run in ``log_dir`` from ``metrics`` (the module docstring); call
    it after every change of metrics.json. Nothing before the source-only evaluation."""
    points = pipeline_points(metrics)
    if not points:
        return
    older = glob.glob(os.path.join(log_dir, _EVENT_FILES))
    writer = tf.summary.create_file_writer(log_dir)
    with writer.as_default():
        tf.summary.experimental.write_raw_pb(
            custom_scalar.pb(_LAYOUT).SerializeToString(), step=0)
        for step, scalars in sorted(points.items()):
            for tag, value in scalars.items():
                tf.summary.scalar(tag, value, step=step)
        tf.summary.text("pipeline/stages", _stages_table(metrics, points), step=max(points))
    writer.close()
    for path in older:
        os.remove(path)
