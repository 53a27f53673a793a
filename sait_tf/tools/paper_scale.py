"""Paper scale, dry run: every stage of the paper's configs at their full sizes, a few steps each.

    python -m sait_tf.tools.paper_scale --out_dir paper_scale

For each config (default: the four paper configs) the tool generates a synthetic pair in the
real layouts and sizes (``sait_tf.data.synthetic.generate_pair``: GTA5 1914x1052 palette
labels or SYNTHIA-RAND-CITYSCAPES 1280x760 16-bit labels, Cityscapes 2048x1024), writes a
randomly initialised segmenter of the config's architecture as its ``init_weights`` (nothing
is downloaded), and runs ``python -m sait_tf.train`` on it with the config's own models,
image sizes and crops; gin bindings on top of the config shrink only the schedules (one
round, ``--steps`` steps per trainer, ``--images`` images per set). While the run goes, the
tool samples the run's peak resident memory (``VmHWM`` of ``/proc/PID/status``, reset after
each reading through ``/proc/PID/clear_refs``, so a spike between two readings is not
missed) and assigns it to the stage running then (the ``stage k/N`` progress lines). The run
gets ``MALLOC_MMAP_THRESHOLD_=65536`` (``CHILD_ENV``), so a stage's RSS is what it holds,
not what earlier stages freed.

Seconds per step exclude the first step (tracing) and come from what the run records: the
trainers' TensorBoard losses (written every step here), the progress lines' timestamps of
the translation, pseudo-label and evaluation loops, and metrics.json's wall times. The
result goes to ``OUT_DIR/paper_scale.json`` (machine with CPU flags, per config per stage:
steps, seconds per step, peak RSS) and ``OUT_DIR/paper_scale.md`` (the table), rewritten
after every config; each run's log is ``OUT_DIR/<config>/train.log``.
"""

from __future__ import annotations

import dataclasses
import datetime
import inspect
import json
import multiprocessing
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

from absl import flags, logging

from sait_tf import cli
from sait_tf.data import synthetic
from sait_tf.runtime import files
from sait_tf.runtime.machine import cpu_flags, simd_flags

PAPER_CONFIGS = ("gin/gta5_deeplabv2.gin", "gin/gta5_fcn8s.gin", "gin/synthia_deeplabv2.gin",
                 "gin/synthia_fcn8s.gin")
# The real datasets' image sizes (height, width).
SOURCE_SIZES = {"gta5": (1052, 1914), "synthia": (760, 1280)}
CITYSCAPES_SIZE = (1024, 2048)
# The stages of a one-round run in order, with what one of their steps is.
STAGES = {
    "source_only": "M loaded from init_weights, stored as the source-only model and evaluated "
                   "on target val (s per val image)",
    "translator": "F's training: one D_S + D_T update and one F update (s per step)",
    "translate": "translation of the source set (s per image)",
    "pseudo_labels": "target pseudo-labels (s per image)",
    "segmenter": "M with L_seg + L_SSL + D_seg (s per step)",
    "evaluate": "M evaluated on target val at the end of its stage (s per image)",
    "export": "SavedModels of the best M (and its round's F), then overview.png (s per export)",
}
# Progress-line names of the loops timed from their log lines.
PROGRESS_NAMES = {"source_only": "evaluate", "translate": "translate",
                  "pseudo_labels": "pseudo_labels", "evaluate": "evaluate"}
GB = 1e9
# glibc keeps freed blocks below its mmap threshold (which grows to 32 MB) for reuse, so the
# RSS of a stage would include what earlier stages freed. Tensors of 64 KB and more are
# mapped and unmapped instead: RSS follows the memory that is alive. A user's setting wins.
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
_ABSL_TIME = re.compile(r"^[IWEF](\d\d)(\d\d) (\d\d):(\d\d):(\d\d)\.(\d+) ")
_STAGE_LINE = re.compile(r"\] stage \d+/\d+: (\S+?);")
_PROGRESS_LINE = re.compile(r"\] \[([^\]]+)\] step (\d+)/(\d+) ")
_EVALUATED_LINE = re.compile(r"\] \[(\S+)\] step \d+ target-val mIoU")


@dataclasses.dataclass
class Monitored:
    """A finished child process: its exit code, (time read, line) of its output, and memory
    samples (time, peak bytes since the previous sample); times are ``time.time()``."""

    exit_code: int
    started: float
    ended: float
    lines: list[tuple[float, str]]
    samples: list[tuple[float, int]]
    load_averages: list[float]
    memory_method: str


def stage_kind(stage: str) -> str:
    """``translator`` for the run directory's ``round_01_translator``; others unchanged."""
    return re.sub(r"^round_\d+_", "", stage)


def _status_bytes(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak(pid: int) -> bool:
    """Resets the process's VmHWM to its current RSS (Linux >= 4.0); False when refused."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run_monitored(command: Sequence[str], log_path: str, interval_s: float = 0.25,
                  **popen_kwargs) -> Monitored:
    """Runs ``command``, copying its output to ``log_path``, and samples its peak memory
    every ``interval_s``: VmHWM, then a reset of VmHWM, so each sample is the peak since the
    previous one. Where the reset is refused, samples are VmRSS (a lower bound)."""
    process = subprocess.Popen(list(command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, bufsize=1, **popen_kwargs)
    lines: list[tuple[float, str]] = []

    def read() -> None:
        with open(log_path, "w") as log:
            for line in process.stdout:
                lines.append((time.time(), line.rstrip("\n")))
                log.write(line)
                log.flush()

    reader = threading.Thread(target=read, daemon=True)
    started = time.time()
    reader.start()
    samples, load_averages = [], []
    resets = _reset_peak(process.pid)
    while process.poll() is None:
        peak = _status_bytes(process.pid, "VmHWM" if resets else "VmRSS")
        if peak is not None:
            samples.append((time.time(), peak))
            if resets:
                _reset_peak(process.pid)
        load_averages.append(os.getloadavg()[0])
        time.sleep(interval_s)
    reader.join()
    return Monitored(process.returncode, started, time.time(), lines, samples, load_averages,
                     "VmHWM, reset after every sample" if resets else "VmRSS samples")


def peak_in(samples: Sequence[tuple[float, int]], windows: Sequence[tuple[float, float]],
            since: float) -> int | None:
    """The largest sample whose interval (previous sample's time, its time] overlaps one of
    ``windows``; the first sample's interval starts at ``since``."""
    peaks, previous = [], since
    for moment, value in samples:
        if any(moment > start and previous < end for start, end in windows):
            peaks.append(value)
        previous = moment
    return max(peaks) if peaks else None


def absl_time(line: str, year: int) -> float | None:
    """The local time stamp of an absl log line (``I1202 04:15:01.680233 ...``) in seconds
    since the epoch; None for other lines."""
    match = _ABSL_TIME.match(line)
    if not match:
        return None
    month, day, hour, minute, second, fraction = match.groups()
    stamp = datetime.datetime(year, int(month), int(day), int(hour), int(minute), int(second))
    return stamp.timestamp() + float(f"0.{fraction}")


def progress_rate(lines: Sequence[tuple[float, str]], name: str,
                  window: tuple[float, float], year: int) -> tuple[int, float | None]:
    """(steps, seconds per step after the first) of the last ``[name] step i/n`` loop logged
    in ``window``: its first and last lines are always logged (``runtime.progress``)."""
    found = []
    for moment, line in lines:
        match = _PROGRESS_LINE.search(line)
        if match and match.group(1) == name and window[0] <= moment <= window[1]:
            step, total = int(match.group(2)), int(match.group(3))
            if found and step <= found[-1][0]:
                found = []  # a new loop of the same name starts
            found.append((step, total, absl_time(line, year)))
    if not found:
        return 0, None
    (first, _, first_time), (last, total, last_time) = found[0], found[-1]
    if last <= first or first_time is None or last_time is None:
        return total, None
    return total, (last_time - first_time) / (last - first)


def loss_times(log_dir: str) -> dict[int, float]:
    """{step: wall time of its first ``loss/*`` summary} in a stage's TensorBoard log."""
    from tensorboard.backend.event_processing import event_accumulator

    accumulator = event_accumulator.EventAccumulator(
        log_dir, size_guidance={event_accumulator.TENSORS: 0})
    accumulator.Reload()
    times: dict[int, float] = {}
    for tag in accumulator.Tags()[event_accumulator.TENSORS]:
        if tag.startswith("loss/"):
            for event in accumulator.Tensors(tag):
                times[event.step] = min(times.get(event.step, event.wall_time), event.wall_time)
    return times


def stage_results(monitored: Monitored, run_dir: str) -> dict[str, dict]:
    """Per stage of ``STAGES``: steps, seconds per step (first step excluded), wall seconds
    and peak RSS in GB, from the run's output, TensorBoard logs and metrics.json."""
    year = datetime.datetime.fromtimestamp(monitored.started).year
    boundaries = [(monitored.started, "source_only")]
    evaluated: dict[str, float] = {}
    for moment, line in monitored.lines:
        stage = _STAGE_LINE.search(line)
        if stage and stage_kind(stage.group(1)) != boundaries[-1][1]:
            boundaries.append((moment, stage_kind(stage.group(1))))
        done = _EVALUATED_LINE.search(line)
        if done:
            evaluated[stage_kind(done.group(1))] = moment
    boundaries.append((monitored.ended, ""))
    windows = {name: [(start, end)] for (start, name), (end, _) in
               zip(boundaries[:-1], boundaries[1:], strict=True)}
    metrics_path = os.path.join(run_dir, "metrics.json")
    wall = {}
    if os.path.isfile(metrics_path):
        with open(metrics_path) as f:
            wall = {stage_kind(k): v for k, v in json.load(f).get("wall_time_s", {}).items()}
    results: dict[str, dict] = {}
    for kind in ("translator", "segmenter"):
        log_dir = os.path.join(run_dir, "logs", f"round_01_{kind}")
        times = loss_times(log_dir) if os.path.isdir(log_dir) else {}
        steps = sorted(times)
        rate = ((times[steps[-1]] - times[steps[0]]) / (steps[-1] - steps[0])
                if len(steps) > 1 else None)
        results[kind] = {"steps": steps[-1] if steps else 0, "s_per_step": rate}
        if kind == "segmenter" and steps and kind in windows and kind in evaluated:
            (start, end), split = windows[kind][0], (times[steps[-1]], evaluated[kind])
            windows["evaluate"] = [split]
            windows[kind] = [(start, split[0]), (split[1], end)]
    for kind, name in PROGRESS_NAMES.items():
        if kind in windows:
            span = (windows[kind][0][0], windows[kind][-1][1])
            steps, rate = progress_rate(monitored.lines, name, span, year)
            results[kind] = {"steps": steps, "s_per_step": rate}
    if "export" in wall:
        results["export"] = {"steps": 1, "s_per_step": wall["export"]}
    for kind, result in results.items():
        spans = windows.get(kind, [])
        peak = peak_in(monitored.samples, spans, monitored.started) if spans else None
        result["seconds"] = wall.get(kind, round(sum(end - start for start, end in spans), 1))
        result["peak_rss_gb"] = None if peak is None else round(peak / GB, 2)
    return {kind: results[kind] for kind in STAGES if kind in results}


def _bound(configurable, parameter: str):
    """The value gin binds to ``configurable.parameter``, else its default."""
    import gin

    try:
        return gin.query_parameter(f"{configurable.__name__}.{parameter}")
    except ValueError:
        return inspect.signature(configurable).parameters[parameter].default


def prepare(config: str, bindings: Sequence[str], weights_path: str) -> dict:
    """In a fresh process (it imports TensorFlow): the config's paper schedule and domains,
    the machine, and a randomly initialised segmenter of the config's architecture and size
    (the config with ``bindings``) written to ``weights_path``."""
    import gin
    import keras

    from sait_tf.models import build_segmenter
    from sait_tf.tools.benchmark import machine_info
    from sait_tf.train import pipeline
    from sait_tf.train.__main__ import parse_gin

    parse_gin([config], [])
    schedule = {name: _bound(pipeline.run_pipeline, name) for name in (
        "source_only_steps", "translator_steps", "segmenter_steps", "max_rounds")}
    gin.clear_config()
    parse_gin([config], list(bindings))
    keras.utils.set_random_seed(0)
    segmenter = build_segmenter()
    os.makedirs(os.path.dirname(weights_path), exist_ok=True)
    segmenter.save_weights(weights_path)
    return {"schedule": schedule, "segmenter": type(segmenter).__name__,
            "segmenter_parameters": segmenter.count_params(),
            "source": dataclasses.asdict(pipeline.source_domain()),
            "target": dataclasses.asdict(pipeline.target_domain()),
            "translator_crop": _bound(pipeline.run_pipeline, "translator_crop"),
            "machine": machine_info()}


def available_gb() -> float:
    """MemAvailable of ``/proc/meminfo`` in GB."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / GB
    raise OSError("/proc/meminfo has no MemAvailable line")


def wait_for_memory(min_free_gb: float, poll_s: float = 30.0) -> float:
    """Waits until ``min_free_gb`` are available (other jobs share the machine); returns it."""
    free = available_gb()
    while free < min_free_gb:
        logging.info("paper_scale: %.1f GB available, waiting for %.1f GB", free, min_free_gb)
        time.sleep(poll_s)
        free = available_gb()
    return free


def ensure_pair(root: str, layout: str, source_size: tuple[int, int],
                target_size: tuple[int, int], images: int) -> None:
    """The synthetic pair at ``root`` (generated once, kept for the configs that share it)."""
    if os.path.isfile(os.path.join(root, synthetic.MANIFEST_NAME)):
        return
    staging = root + ".tmp"
    shutil.rmtree(staging, ignore_errors=True)
    synthetic.generate_pair(staging, seed=0, num_source=images, num_target_train=images,
                            num_target_val=images, size=target_size, source_layout=layout,
                            source_size=source_size)
    os.replace(staging, root)


def tool_bindings(source_root: str, target_root: str, weights: str, steps: int) -> list[str]:
    """The bindings added to a config: data, initial weights, one round of ``steps`` steps
    per trainer, and a loss summary every step (the step times)."""
    return [f"SOURCE_ROOT = {source_root!r}", f"TARGET_ROOT = {target_root!r}",
            f"run_pipeline.init_weights = {weights!r}", "run_pipeline.oracle_steps = 0",
            "run_pipeline.max_rounds = 1", f"run_pipeline.translator_steps = {steps}",
            f"run_pipeline.segmenter_steps = {steps}", "train_segmenter.summary_every = 1",
            "train_translator.summary_every = 1"]


def run_config(config: str, out_dir: str, steps: int, images: int,
               target_size: tuple[int, int], source_size: tuple[int, int] | None,
               extra_bindings: Sequence[str], min_free_gb: float) -> tuple[dict, dict]:
    """One config's dry run in ``out_dir/<config name>``; returns its JSON record and the
    machine it ran on."""
    name = os.path.splitext(os.path.basename(config))[0]
    work = os.path.join(out_dir, name)
    run_dir = os.path.join(work, "run")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    weights = os.path.join(work, "init.weights.h5")
    data_root = os.path.join(out_dir, "data")
    probe = tool_bindings("unused", "unused", weights, steps)
    # Helper processes keep TensorFlow and the generator's buffers out of this process's
    # memory while the run is measured.
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        info = pool.apply(prepare, (config, [*probe, *extra_bindings], weights))
        layout = info["source"]["dataset"]
        if layout not in SOURCE_SIZES or info["target"]["dataset"] != "cityscapes":
            raise ValueError(f"--config {config}: source_domain.dataset {layout!r} and "
                             f"target_domain.dataset {info['target']['dataset']!r}; the "
                             f"synthetic pair has sources {sorted(SOURCE_SIZES)} and target "
                             "cityscapes")
        size = tuple(source_size or SOURCE_SIZES[layout])
        pair = os.path.join(data_root, f"{layout}_{size[0]}x{size[1]}_{target_size[0]}x"
                                       f"{target_size[1]}_{images}")
        pool.apply(ensure_pair, (pair, layout, size, target_size, images))
    bindings = tool_bindings(os.path.join(pair, "source"), os.path.join(pair, "target"),
                             weights, steps)
    if info["schedule"]["source_only_steps"]:
        bindings.append(f"run_pipeline.source_only_steps = {steps}")
    bindings += list(extra_bindings)
    command = [sys.executable, "-m", "sait_tf.train", f"--gin_file={config}",
               *(f"--gin_param={binding}" for binding in bindings), f"--run_dir={run_dir}"]
    free = wait_for_memory(min_free_gb)
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(synthetic.__file__)))
    env = {**CHILD_ENV, **os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [os.path.dirname(package_root), os.environ.get("PYTHONPATH")]))}
    logging.info("paper_scale: %s (%s source %dx%d), %.1f GB available; log %s", config,
                 layout, size[1], size[0], free, os.path.join(work, "train.log"))
    monitored = run_monitored(command, os.path.join(work, "train.log"), cwd=work, env=env)
    stages = stage_results(monitored, run_dir)
    peaks = {kind: stage["peak_rss_gb"] for kind, stage in stages.items()
             if stage["peak_rss_gb"] is not None}
    export_dir = os.path.join(run_dir, "export")
    record = {
        "config": config, "exit_code": monitored.exit_code, "run_dir": run_dir,
        "log": os.path.join(work, "train.log"), "command": shlex.join(command),
        "segmenter": info["segmenter"], "segmenter_parameters": info["segmenter_parameters"],
        "source": {**info["source"], "root": os.path.join(pair, "source"),
                   "image_size": list(size)},
        "target": {**info["target"], "root": os.path.join(pair, "target"),
                   "image_size": list(target_size)},
        "translator_crop": info["translator_crop"], "paper_schedule": info["schedule"],
        "images_per_set": images, "steps_per_trainer": steps,
        "started_utc": _utc(monitored.started), "wall_time_s": round(
            monitored.ended - monitored.started, 1),
        "available_gb_at_start": round(free, 1), "memory_method": monitored.memory_method,
        "malloc_mmap_threshold": env.get("MALLOC_MMAP_THRESHOLD_"),
        "load_average_1min": _summary(monitored.load_averages),
        "exported": sorted(name for name in os.listdir(export_dir)
                           if os.path.isdir(os.path.join(export_dir, name)))
        if os.path.isdir(export_dir) else [],
        "stages": stages,
        "peak_rss_gb": max(peaks.values(), default=None),
        "peak_stage": max(peaks, key=peaks.get) if peaks else None,
    }
    if monitored.exit_code:
        last = [line for _, line in monitored.lines if line.strip()] or [""]
        record["error"] = next((line for line in reversed(last) if line.startswith("error")),
                               last[-1])
    return record, info["machine"]


def _utc(moment: float) -> str:
    return datetime.datetime.fromtimestamp(moment, datetime.timezone.utc).strftime(
        "%Y-%m-%d %H:%M:%S UTC")


def _summary(values: Sequence[float]) -> dict | None:
    if not values:
        return None
    return {"min": round(min(values), 2), "mean": round(sum(values) / len(values), 2),
            "max": round(max(values), 2)}


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(result: dict) -> str:
    """The result as a markdown table, one row per config and stage."""
    rows = ["| config | stage | steps | s/step | stage s | peak RSS GB |",
            "|---|---|---|---|---|---|"]
    for config, record in result["configs"].items():
        name = os.path.splitext(os.path.basename(config))[0]
        for kind, stage in record["stages"].items():
            rows.append(f"| {name} | {kind} | {stage['steps']} | "
                        f"{_number(stage['s_per_step'], 2)} | {_number(stage['seconds'], 0)} | "
                        f"{_number(stage['peak_rss_gb'], 2)} |")
    notes = [f"- {kind}: {what}" for kind, what in STAGES.items()]
    for config, record in result["configs"].items():
        load = record["load_average_1min"] or {}
        notes.append(f"- {config}: exit {record['exit_code']}, peak {record['peak_rss_gb']} GB "
                     f"in {record['peak_stage']}, {record['wall_time_s']:.0f} s, load average "
                     f"{load.get('min')}-{load.get('max')} (mean {load.get('mean')}), "
                     f"exported {', '.join(record['exported']) or 'nothing'}")
    machine = result.get("machine", {})
    header = (f"{machine.get('cpu_model')}, {machine.get('schedulable_cores')} cores, "
              f"{machine.get('memory_gb')} GB, SIMD flags: "
              f"{' '.join(simd_flags(machine.get('cpu_flags', [])))}")
    return "\n".join([f"`{result['command']}`", "", header, "", *rows, "", *notes, ""])


def write_outputs(out_dir: str, result: dict) -> None:
    files.write_json_atomically(os.path.join(out_dir, "paper_scale.json"), result)
    files.write_text_atomically(os.path.join(out_dir, "paper_scale.md"), markdown(result))


FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_string("out_dir", None, "Directory for paper_scale.json, paper_scale.md, the "
                        "synthetic data and one folder (run, log) per config.")
    flags.DEFINE_multi_string("config", list(PAPER_CONFIGS), "Gin config(s) to run, in order.")
    flags.DEFINE_integer("steps", 3, "Steps of each trainer (F, M); at least 2 for a step "
                         "time after the first step.")
    flags.DEFINE_integer("images", 4, "Images of each set (source, target train, target val): "
                         "translated, pseudo-labelled, evaluated; at least 2.")
    flags.DEFINE_list("target_size", list(map(str, CITYSCAPES_SIZE)), "HEIGHT,WIDTH of the "
                      "Cityscapes-layout images.")
    flags.DEFINE_list("source_size", None, "HEIGHT,WIDTH of the source images (default: "
                      "GTA5 1052,1914, SYNTHIA 760,1280).")
    flags.DEFINE_multi_string("gin_param", [], "Bindings applied after the tool's (tests).")
    flags.DEFINE_float("min_free_gb", 16.0, "Wait before each config until this much memory "
                       "is available (MemAvailable).")
    flags.mark_flag_as_required("out_dir")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise ValueError(f"unexpected arguments: {' '.join(argv[1:])}")
    configs = [os.path.abspath(config) for config in FLAGS.config]
    for given, config in zip(FLAGS.config, configs, strict=True):
        if not os.path.isfile(config):
            raise FileNotFoundError(f"--config {given} does not exist")
    for name in ("steps", "images"):
        if FLAGS[name].value < 2:
            raise ValueError(f"--{name} must be >= 2 (the first step is not timed), got "
                             f"{FLAGS[name].value}")
    target_size = cli.parse_size(FLAGS.target_size, "target_size")
    source_size = cli.parse_size(FLAGS.source_size, "source_size")
    out_dir = os.path.abspath(FLAGS.out_dir)
    os.makedirs(out_dir, exist_ok=True)
    result = {"command": "python -m sait_tf.tools.paper_scale " + shlex.join(sys.argv[1:]),
              "started_utc": _utc(time.time()), "configs": {}}
    for given, config in zip(FLAGS.config, configs, strict=True):
        record, machine = run_config(config, out_dir, FLAGS.steps, FLAGS.images, target_size,
                                     source_size, FLAGS.gin_param, FLAGS.min_free_gb)
        flag_list = cpu_flags()
        result["machine"] = {**machine, "cpu_flags": flag_list,
                             "simd_flags": simd_flags(flag_list),
                             "memory_gb": round(os.sysconf("SC_PHYS_PAGES")
                                                * os.sysconf("SC_PAGE_SIZE") / GB, 1)}
        result["configs"][given] = record
        result["ended_utc"] = _utc(time.time())
        write_outputs(out_dir, result)
        logging.info("paper_scale: %s done (exit %d), peak %s GB in %s", given,
                     record["exit_code"], record["peak_rss_gb"], record["peak_stage"])
    failed = [f"{config} (exit {record['exit_code']}: {record.get('error', '')[:200]}; log "
              f"{record['log']})" for config, record in result["configs"].items()
              if record["exit_code"]]
    print(markdown(result))
    if failed:
        raise RuntimeError("paper_scale: run(s) failed: " + "; ".join(failed))


def run() -> None:
    """The command's entry point (``python -m sait_tf.tools.paper_scale``)."""
    cli.run(main, define_flags)


if __name__ == "__main__":
    run()
