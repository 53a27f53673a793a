"""Scaling benchmark: a train step on 1 and 2 workers, the offline stages on 1 and 2 shards.

    python -m sait_tf.tools.benchmark_scaling --json scaling.json

Every worker is a process of its own pinned to one core (``sched_setaffinity`` and one
TensorFlow thread for intra- and inter-op work), so two workers on a two-core machine are two
machines of one core each, talking over loopback:
  train      images/s of M's adaptation step (``train.segmentation.SegmentationStep``: L_seg,
             L_SSL, L_adv and the D_seg update, Adam) at the demo's sizes, ``--batch`` images per
             worker: alone under the default strategy, and two workers under
             ``MultiWorkerMirroredStrategy`` (global batch 2 x ``--batch``, gradients
             all-reduced every step); median of ``--steps`` steps after ``--warmup``;
  translate  images/s of ``translate.translate_dataset`` over ``--images`` source images,
  pseudo_labels  and of ``train.pseudo_labels.generate_pseudo_labels`` over as many target
             images, by one process or by two that each take every second file (the
             pipeline's sharding); a shard's time is from its first image after a warm-up
             file to its last, the stage's rate is the images over the slower shard's time.
Efficiency is the 2-worker rate over twice the 1-worker rate. The JSON also holds
``tools.benchmark.machine_info()`` and the CPU's flags (/proc/cpuinfo), to read the numbers by.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf
from absl import app, flags

from sait_tf.data import readers
from sait_tf.data.synthetic import generate_pair
from sait_tf.models import build_segmenter
from sait_tf.models.discriminators import build_output_discriminator
from sait_tf.models.translator import build_translator
from sait_tf.runtime.files import write_text_atomically
from sait_tf.runtime.workers import free_loopback_ports
from sait_tf.tools.benchmark import machine_info
from sait_tf.train import optimizers
from sait_tf.train.distribute import make_strategy
from sait_tf.train.pseudo_labels import generate_pseudo_labels
from sait_tf.train.segmentation import SegmentationStep
from sait_tf.translate import make_translate_fn, translate_dataset

FLAGS = flags.FLAGS
HEIGHT, WIDTH = 64, 128
NUM_CLASSES = 19


def _define_flags() -> None:
    flags.DEFINE_integer("batch", 2, "Images per worker and train step.")
    flags.DEFINE_integer("steps", 20, "Timed train steps (the median is reported).")
    flags.DEFINE_integer("warmup", 3, "Untimed train steps first (tracing).")
    flags.DEFINE_integer("images", 16, "Images each offline stage writes.")
    flags.DEFINE_string("json", None, "Write the result to this JSON file.")
    flags.DEFINE_enum("role", "driver", ["driver", "train", "offline"],
                      "Internal: the driver starts the other roles as pinned processes.")
    flags.DEFINE_integer("index", 0, "Internal: this worker's index.")
    flags.DEFINE_integer("count", 1, "Internal: number of workers or shards.")
    flags.DEFINE_integer("core", 0, "Internal: the core this process runs on.")
    flags.DEFINE_string("ports", "", "Internal: the workers' loopback ports.")
    flags.DEFINE_string("data", "", "Internal: the synthetic pair of the offline stages.")
    flags.DEFINE_string("stage", "translate", "Internal: offline stage.")


def cpu_flags() -> list[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty elsewhere)."""
    if not os.path.isfile("/proc/cpuinfo"):
        return []
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return line.split(":", 1)[1].split()
    return []


def _pin(core: int) -> None:
    """Runs this process, and TensorFlow's thread pools, on one core (before TensorFlow
    starts its runtime)."""
    os.sched_setaffinity(0, {core})
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)


def _segmenter():
    return build_segmenter("deeplabv2", num_classes=NUM_CLASSES, blocks=(1, 1, 1, 1),
                           width_multiplier=0.125)


def train_worker(batch: int, steps: int, warmup: int) -> dict:
    """Seconds of each timed train step of this worker (the strategy from ``TF_CONFIG``)."""
    strategy = make_strategy("multi_worker" if os.environ.get("TF_CONFIG") else "default")
    replicas = strategy.num_replicas_in_sync  # one per worker: a CPU each
    with strategy.scope():
        keras.utils.set_random_seed(0)
        step = SegmentationStep(_segmenter(), steps + warmup, build_output_discriminator(16),
                                1.0, 1.0, 1e-3, optimizers.adam_optimizer,
                                optimizers.discriminator_optimizer)
        for optimizer, variables in step.optimizers.values():
            optimizer.build(variables)
    rng = np.random.default_rng(0)
    stream = {"image": rng.uniform(0, 255, (batch * replicas, HEIGHT, WIDTH, 3)).astype(np.float32),
              "label": rng.integers(0, NUM_CLASSES, (batch * replicas, HEIGHT, WIDTH), np.int32)}
    dataset = tf.data.Dataset.from_tensors({"source": stream, "target": stream}).repeat()
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    iterator = iter(strategy.experimental_distribute_dataset(dataset.with_options(options)))
    train_step = tf.function(lambda batch: strategy.run(step.replica_step, args=(batch,)))
    times = []
    for index in range(warmup + steps):
        started = time.perf_counter()
        results = train_step(next(iterator))
        strategy.experimental_local_results(results["seg"])[0].numpy()
        if index >= warmup:
            times.append(time.perf_counter() - started)
    return {"step_s": times}


def offline_worker(data: str, stage: str, index: int, count: int) -> dict:
    """Seconds this shard of ``stage`` took over its files, after one warm-up file."""
    keras.utils.set_random_seed(0)
    segmenter = _segmenter()
    if stage == "translate":
        examples = readers.list_examples("gta5", os.path.join(data, "source"))
        translator = build_translator(NUM_CLASSES, dim=16, num_residual_blocks=2,
                                      spade_hidden=32)
        translate_fn = make_translate_fn(segmenter, translator)

        def write(part, out):
            return translate_dataset(translate_fn, part, out)
    else:
        examples = readers.list_examples("cityscapes", os.path.join(data, "target"), "train")

        def write(part, out):
            return generate_pseudo_labels(segmenter, part, out)
    shard = examples[index::count]
    with tempfile.TemporaryDirectory() as out:
        write(shard[:1], os.path.join(out, "warmup"))
        started = time.perf_counter()
        write(shard, os.path.join(out, "shard"))
        return {"images": len(shard), "seconds": time.perf_counter() - started}


def _run_workers(count: int, role_flags: list[str], cluster: bool) -> list[dict]:
    """Starts ``count`` pinned processes of ``role_flags``; returns their JSON results."""
    ports = free_loopback_ports(count)
    processes = []
    for index in range(count):
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2")
        env.pop("TF_CONFIG", None)
        if cluster and count > 1:
            env["TF_CONFIG"] = json.dumps({
                "cluster": {"worker": [f"localhost:{port}" for port in ports]},
                "task": {"type": "worker", "index": index}})
        command = [sys.executable, "-m", "sait_tf.tools.benchmark_scaling", *role_flags,
                   f"--index={index}", f"--count={count}",
                   f"--core={index % len(os.sched_getaffinity(0))}"]
        processes.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True))
    results = []
    for process in processes:
        out, err = process.communicate()
        if process.returncode:
            raise RuntimeError(f"benchmark worker failed ({process.returncode}): {err[-2000:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def run_benchmark(batch: int, steps: int, warmup: int, images: int) -> dict:
    """The measurements of the module docstring, with the machine they were taken on."""
    result = {"machine": {**machine_info(), "cpu_flags": cpu_flags()},
              "settings": {"batch_per_worker": batch, "steps": steps, "warmup": warmup,
                           "images": images, "height": HEIGHT, "width": WIDTH}}
    train = {}
    for count in (1, 2):
        workers = _run_workers(count, ["--role=train", f"--batch={batch}", f"--steps={steps}",
                                       f"--warmup={warmup}"], cluster=True)
        step_s = statistics.median(workers[0]["step_s"])
        train[f"{count}_workers"] = {"step_s": step_s, "images_per_s": count * batch / step_s}
    train["efficiency"] = train["2_workers"]["images_per_s"] / (
        2 * train["1_workers"]["images_per_s"])
    result["train"] = train
    with tempfile.TemporaryDirectory() as data:
        generate_pair(data, num_source=images, num_target_train=images, num_target_val=1,
                      size=(HEIGHT, WIDTH))
        for stage in ("translate", "pseudo_labels"):
            rates = {}
            for count in (1, 2):
                shards = _run_workers(count, ["--role=offline", f"--data={data}",
                                              f"--stage={stage}"], cluster=False)
                seconds = max(shard["seconds"] for shard in shards)
                rates[f"{count}_shards"] = {
                    "seconds": seconds, "images_per_s": images / seconds,
                    "shard_seconds": [shard["seconds"] for shard in shards]}
            rates["efficiency"] = rates["2_shards"]["images_per_s"] / (
                2 * rates["1_shards"]["images_per_s"])
            result[stage] = rates
    result["machine"]["load_average_1_5_15_at_end"] = list(os.getloadavg())
    return result


def main(argv: list[str]) -> None:
    del argv
    if FLAGS.role == "train":
        _pin(FLAGS.core)
        print(json.dumps(train_worker(FLAGS.batch, FLAGS.steps, FLAGS.warmup)))
        return
    if FLAGS.role == "offline":
        _pin(FLAGS.core)
        print(json.dumps(offline_worker(FLAGS.data, FLAGS.stage, FLAGS.index, FLAGS.count)))
        return
    result = run_benchmark(FLAGS.batch, FLAGS.steps, FLAGS.warmup, FLAGS.images)
    text = json.dumps(result, indent=1)
    if FLAGS.json:
        write_text_atomically(FLAGS.json, text)
    summary = {key: value for key, value in result.items() if key not in ("machine",)}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    _define_flags()
    app.run(main)
