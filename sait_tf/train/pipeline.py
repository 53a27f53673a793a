"""The main job: source-only M, the oracle, then rounds of pixel- and feature-level alignment.

Round 0 trains M on the source (or loads converted weights); the oracle trains a second M on
the labelled target. Each round then (paper Sec. 4, "Bidirectional learning"; ``run_round``):
  1. trains F with M fixed,                        checkpoints/round_KK_translator
  2. translates the whole source set with F,       translated/round_KK (GTA5 layout)
  3. makes target pseudo-labels with M (Eq. 9),    pseudo_labels/round_KK
  4. trains M with L_seg + L_SSL + L_adv (Eq. 7),  checkpoints/round_KK_segmenter
  5. evaluates M on target val,
and the rounds stop when the target mIoU has not improved for ``patience`` rounds or after
``max_rounds``. Every step is idempotent (DONE markers, skipped existing files, metrics of
finished stages kept in metrics.json), so the same command resumes a killed run. The run
directory's layout belongs to ``sait_tf.run_dir``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

import gin
import keras
import tensorflow as tf
from absl import logging

from sait_tf import images, labels
from sait_tf import run_dir as layout
from sait_tf.data import readers, scan, synthetic
from sait_tf.evaluate import evaluate_segmenter, evaluation_dataset
from sait_tf.export import export_run
from sait_tf.models import build_segmenter
from sait_tf.models.discriminators import build_output_discriminator, build_patch_discriminator
from sait_tf.models.translator import DOMAINS, build_translator
from sait_tf.run_dir import RunDir
from sait_tf.runtime import files
from sait_tf.runtime.checkpoints import StageCheckpoint
from sait_tf.runtime.progress import format_duration
from sait_tf.runtime.workers import Workers
from sait_tf.train import optimizers, settings, step_guard, summaries
from sait_tf.train.distribute import make_strategy, set_precision
from sait_tf.train.pseudo_labels import generate_pseudo_labels
from sait_tf.train.segmentation import train_segmenter
from sait_tf.train.translation import train_translator
from sait_tf.translate import make_translate_fn, translate_dataset
from sait_tf.visualize import overview_grid

Size = tuple[int, int]


@dataclasses.dataclass(frozen=True)
class DomainData:
    """Where a domain's images are and the sizes M and F see them at (height, width).

    ``resize`` is the training resolution (also of the translated set and the pseudo-labels,
    and M's input size at evaluation); ``crop`` crops M's training images after resizing.
    """

    dataset: str
    root: str
    train_list: str | None = None
    val_list: str | None = None
    resize: Size | None = None
    crop: Size | None = None


@gin.configurable
def source_domain(dataset: str = "gta5", root: str = gin.REQUIRED,
                  train_list: str | None = None, resize: Size | None = (720, 1280),
                  crop: Size | None = (512, 1024)) -> DomainData:
    """The labelled source domain (``train_list`` selects a subset of its images)."""
    return DomainData(dataset, root, train_list, None, resize, crop)


@gin.configurable
def target_domain(dataset: str = "cityscapes", root: str = gin.REQUIRED,
                  train_list: str | None = None, val_list: str | None = None,
                  resize: Size | None = (512, 1024)) -> DomainData:
    """The target domain: its train split unlabelled (pseudo-labelled), val for evaluation."""
    return DomainData(dataset, root, train_list, val_list, resize, None)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Steps, batch sizes and stopping rule of a run (``run_pipeline``'s arguments)."""

    source_only_steps: int
    oracle_steps: int
    max_rounds: int
    translator_steps: int
    segmenter_steps: int
    patience: int
    batch_size: int
    translator_batch_size: int
    translator_crop: Size | None
    flip: bool
    seed: int


@gin.configurable(denylist=["run_dir", "accept_config_change"])
def run_pipeline(
    run_dir: str,
    synthetic_pair_root: str | None = None,
    translator_crop: Size | None = (512, 512),
    flip: bool = False,
    batch_size: int = 1,
    translator_batch_size: int = 1,
    on_size_mismatch: str = "error",
    init_weights: str | None = None,
    source_only_steps: int = 120000,
    oracle_steps: int = 0,
    max_rounds: int = 3,
    translator_steps: int = 1000000,
    segmenter_steps: int = 120000,
    patience: int = 1,
    adversarial: bool = True,
    num_classes_reported: int = labels.NUM_CLASSES,
    seed: int = 0,
    export: bool = True,
    accept_config_change: bool = False,
) -> dict:
    """Runs (or resumes) the whole method in ``run_dir``; returns the metrics.

    The domains come from ``source_domain`` and ``target_domain`` (gin); ``translator_crop``
    crops both domains for F. ``synthetic_pair_root`` generates the embedded pair there first
    (the demo). ``init_weights`` (a ``.weights.h5`` from ``sait_tf.tools.convert_torch``)
    starts M; with ``source_only_steps=0`` it is the source-only model. ``oracle_steps=0``
    skips the oracle. ``adversarial`` adds D_seg (``build_output_discriminator``) to M's
    rounds. Every stage trains under ``make_strategy`` (gin) in the precision of
    ``set_precision``; ``batch_size`` and ``translator_batch_size`` are global batches.

    Every check happens before the first write to ``run_dir``: the bindings of the job's
    configurables, the directory's lock (one job per run directory), the configuration
    against the one the run was started with (``accept_config_change`` records a change
    instead of refusing it), the data and the initial weights.

    Under ``MultiWorkerMirroredStrategy`` the chief writes ``run_dir``; every other worker
    writes only its ``RunDir.worker_dir``, deleted when the job ends, and follows the chief's
    records. The offline stages are split over the workers when they share ``run_dir``
    (``Job.offline``; docs/distribution.md).
    """
    schedule = Schedule(source_only_steps, oracle_steps, max_rounds, translator_steps,
                        segmenter_steps, patience, batch_size, translator_batch_size,
                        translator_crop, flip, seed)
    _check_settings(schedule, init_weights)
    settings.check_bindings(_job_configurables())
    started = time.monotonic()
    strategy = make_strategy()
    workers = Workers.of(strategy)
    chief_run = RunDir(run_dir)
    run = chief_run.for_worker(workers)
    config = gin.config_str()
    try:
        _check_batch_sizes(strategy.num_replicas_in_sync, batch_size=batch_size,
                           translator_batch_size=translator_batch_size)
        run.check_writable()
        run.lock()
        config_differences = run.check_config(config, accept_config_change)
    except Exception:
        workers.agree(False, "the start-up checks")
        raise
    workers.agree(True, "the start-up checks")
    files.remove_stale_temporaries(run.path, recursive=False)
    shared = chief_run.shared_by(workers)
    set_precision()
    if synthetic_pair_root:
        synthetic.ensure_synthetic_pair(synthetic_pair_root)
    job = Job(run, strategy, schedule, source_domain(), target_domain(), on_size_mismatch,
              num_classes_reported, init_weights,
              shared_run=chief_run if workers.count > 1 and shared else None)
    job.seed("segmenter")
    with strategy.scope():
        job.segmenter = _load_init(build_segmenter(), init_weights)
    run.record_config(config, config_differences)
    if config_differences:
        logging.warning("configuration changed on resume (accepted): %s",
                        "; ".join(config_differences))
    run.write_json(layout.FACTS_FILE, {"source": dataclasses.asdict(job.source),
                                       "target": dataclasses.asdict(job.target),
                                       "num_classes": job.segmenter.num_classes})
    job.write_config()

    job.train_source_only()
    if job.examples["target_train_labelled"]:
        job.train_oracle()
    best = {"round": 0, "segmenter_stage": layout.SOURCE_ONLY, "translator_stage": None,
            **job.metrics[layout.SOURCE_ONLY]}
    rounds_without_gain = 0
    for round_index in range(1, max_rounds + 1):
        record = run_round(job, round_index, adversarial)
        logging.info("round %d target-val mIoU %.2f (best so far %.2f)", round_index,
                     record["mIoU"], best["mIoU"])
        if record["mIoU"] > best["mIoU"]:
            best, rounds_without_gain = record, 0
        else:
            rounds_without_gain += 1
            if rounds_without_gain >= patience:
                logging.info("target mIoU did not improve for %d round(s): stopping", patience)
                break
    job.finish(best, export)
    chief_run.remove_worker_dirs(workers)
    logging.info("done in %.0f s: final target-val mIoU%d %.2f (%s); metrics in %s",
                 time.monotonic() - started, best["num_classes"], best["mIoU"],
                 best["segmenter_stage"], run.file(layout.METRICS_FILE))
    return job.metrics


def run_round(job: Job, round_index: int, adversarial: bool) -> dict:
    """One round of the method (steps 1-5 of the module docstring); returns its record in
    metrics.json: {"round", "segmenter_stage", "translator_stage", "mIoU", ...}."""
    run, schedule = job.run, job.schedule
    translator_stage = layout.translator_stage(round_index)
    segmenter_stage = layout.segmenter_stage(round_index)
    job.timed(translator_stage, train_translator, job.segmenter, job.translator(),
              job.discriminators,
              job.train_data("source", job.source.resize, schedule.translator_crop,
                             schedule.translator_batch_size, 2),
              job.train_data("target_train", job.target.resize, schedule.translator_crop,
                             schedule.translator_batch_size, 3),
              run.checkpoint_dir(translator_stage), run.log_dir(translator_stage),
              schedule.translator_steps, strategy=job.strategy)
    translate_fn = make_translate_fn(job.segmenter, job.translator())
    translated_dir = job.offline(
        f"{layout.round_name(round_index)}_translate",
        lambda directory: directory.translated_dir(round_index), job.examples["source"],
        lambda examples, out: translate_dataset(translate_fn, examples, out,
                                                resize=job.source.resize) if examples else 0)
    pseudo_label_dir = job.offline(
        f"{layout.round_name(round_index)}_pseudo_labels",
        lambda directory: directory.pseudo_label_dir(round_index), job.examples["target_train"],
        lambda examples, out: generate_pseudo_labels(job.segmenter, examples, out,
                                                     resize=job.target.resize))
    job.examples["translated"] = readers.list_examples("gta5", translated_dir)
    job.examples["pseudo_labelled"] = readers.list_examples(
        job.target.dataset, job.target.root, "train", job.target.train_list,
        labels_from=pseudo_label_dir)
    job.seed(f"{segmenter_stage}/output_discriminator")
    with job.strategy.scope():
        discriminator = build_output_discriminator() if adversarial else None
    result = job.train_segmenter_stage(
        job.segmenter, segmenter_stage, schedule.segmenter_steps,
        source_dataset=job.train_data("translated", None, job.source.crop,
                                      schedule.batch_size, 4),
        target_dataset=job.train_data("pseudo_labelled", job.target.resize, None,
                                      schedule.batch_size, 5),
        output_discriminator=discriminator)
    rounds = job.metrics["rounds"]
    if len(rounds) < round_index:
        evaluation = result or job.evaluate(job.segmenter)
        rounds.append({"round": round_index, "segmenter_stage": segmenter_stage,
                       "translator_stage": translator_stage, **evaluation})
        job.save_metrics()
    return rounds[round_index - 1]


class Job:
    """What the stages of one run share: its directory, strategy, data and models, and the
    metrics.json record (loaded when present, saved after every change).

    ``run`` is where this process writes: the run directory, or a worker's temporary
    ``RunDir.worker_dir`` when it is not the chief of a multi-worker job; the chief's
    metrics are every worker's. ``shared_run`` is the chief's run directory when the
    workers share it, and the offline stages are then split over them (``offline``).
    """

    def __init__(self, run: RunDir, strategy: tf.distribute.Strategy, schedule: Schedule,
                 source: DomainData, target: DomainData, on_size_mismatch: str,
                 num_classes_reported: int, init_weights: str | None,
                 shared_run: RunDir | None = None) -> None:
        self.run, self.strategy, self.schedule = run, strategy, schedule
        self.workers, self.shared_run = Workers.of(strategy), shared_run
        self.init_weights = init_weights
        self.started = time.monotonic()
        self.source, self.target = source, target
        self.num_classes_reported = num_classes_reported
        self.examples = _list_and_scan(source, target, schedule, on_size_mismatch)
        self.val_data = evaluation_dataset(self.examples["target_val"], input_size=target.resize)
        self.segmenter: keras.Model | None = None
        self._translator: keras.Model | None = None
        self.discriminators: dict[str, keras.Model] = {}
        self.metrics: dict[str, Any] = {"rounds": [], "wall_time_s": {}}
        if self.workers.is_chief and os.path.exists(run.file(layout.METRICS_FILE)):
            self.metrics.update(run.read_json(layout.METRICS_FILE))
        if self.workers.count > 1:
            self.metrics = self.workers.chief_json(self.metrics)
        self._config_writer = tf.summary.create_file_writer(run.log_dir("config"))
        self._config_step = 0

    def save_metrics(self) -> None:
        """metrics.json and the TensorBoard run logs/pipeline drawn from it."""
        self.run.write_json(layout.METRICS_FILE, self.metrics)
        summaries.write_pipeline_summary(self.run.log_dir(summaries.PIPELINE_RUN), self.metrics)

    def write_config(self) -> None:
        """RUN_DIR/config.gin and its TensorBoard text summary (logs/config). Gin's operative
        config lists only the configurables called so far, so it is rewritten after every
        stage; each rewrite is one more step of the text summary."""
        config = gin.operative_config_str()
        files.write_text_atomically(self.run.file(layout.CONFIG_FILE), config)
        with self._config_writer.as_default():
            markdown = "\n".join("    " + line for line in config.splitlines())
            tf.summary.text("operative_config", markdown, step=self._config_step)
        self._config_writer.flush()
        self._config_step += 1

    def seed(self, name: str) -> None:
        """Seeds Python, NumPy and TensorFlow from the run's seed and ``name`` (a stage, or
        the models it builds), so that what a stage draws does not depend on what ran before
        it in this process: a resumed run draws what an uninterrupted one did."""
        digest = hashlib.sha256(f"{self.schedule.seed}/{name}".encode()).digest()
        keras.utils.set_random_seed(int.from_bytes(digest[:4], "little"))

    def timed(self, stage: str, work: Callable[..., Any], *args, **kwargs) -> Any:
        """Runs ``work`` after ``seed(stage)``; records its wall time unless an earlier run
        finished ``stage``. A file that tf.data fails to decode mid-stage gets named."""
        self.seed(stage)
        self._log_stage(stage)
        started = time.monotonic()
        try:
            result = work(*args, **kwargs)
        except tf.errors.InvalidArgumentError as error:
            _name_undecodable_file(error, *self.examples.values())
        if stage not in self.metrics["wall_time_s"]:
            self.metrics["wall_time_s"][stage] = round(time.monotonic() - started, 1)
            self.save_metrics()
        return result

    def _log_stage(self, stage: str) -> None:
        """``stage k/N: NAME; run for M so far, the rest about T``, T from
        ``remaining_seconds``: "at least T" while some kind of stage left has not run yet
        (export runs once, at the end), "?" before any kind left has."""
        plan = [layout.SOURCE_ONLY] + (
            [layout.ORACLE] if self.examples["target_train_labelled"] else [])
        for round_index in range(1, self.schedule.max_rounds + 1):
            name = layout.round_name(round_index)
            plan += [layout.translator_stage(round_index), f"{name}_translate",
                     f"{name}_pseudo_labels", layout.segmenter_stage(round_index)]
        plan.append("export")
        if stage not in plan:
            return
        seconds, complete = remaining_seconds(plan, stage, self.metrics["wall_time_s"])
        rest = (format_duration(seconds) if complete
                else f"at least {format_duration(seconds)}" if seconds else "?")
        logging.info("stage %d/%d: %s; run for %s so far, the rest about %s (if all %d rounds "
                     "run)", plan.index(stage) + 1, len(plan), stage,
                     format_duration(time.monotonic() - self.started), rest,
                     self.schedule.max_rounds)

    def offline(self, stage: str, folder: Callable[[RunDir], str],
                examples: Sequence[readers.Example],
                write: Callable[[list[readers.Example], str], Any]) -> str:
        """Runs an offline stage: ``write(examples, out)`` writes a file per example into
        ``out``; returns ``folder(run)``, the folder the next stage reads.

        When the workers share the run directory, worker i writes files i::n into its
        ``worker_dir``; after all have finished, the chief moves them into the run's folder
        (each file is written once) and marks it done, and the next stage starts when it
        has. Otherwise every worker writes them all into its ``run``: the chief into the run
        directory, another worker into its temporary ``worker_dir``.
        """
        if self.shared_run is None:
            out = folder(self.run)
            self.timed(stage, write, list(examples), out)
            return out
        workers, out = self.workers, folder(self.shared_run)
        if not workers.chief_value(files.is_done(out)):
            with self.strategy.scope():
                self.timed(stage, write, workers.shard(examples),
                           folder(self.shared_run.worker_dir(workers.index)))
            workers.barrier()
            if workers.is_chief:
                for index in range(workers.count):
                    files.move_files(folder(self.shared_run.worker_dir(index)), out)
                files.mark_done(out)
            workers.barrier()
        return out

    def train_data(self, examples: str, resize: Size | None, crop: Size | None,
                   batch_size: int, seed_offset: int) -> tf.data.Dataset:
        """Shuffled, repeated, augmented batches of ``self.examples[examples]``."""
        return readers.make_dataset(
            self.examples[examples], resize=resize, crop=crop, flip=self.schedule.flip,
            shuffle=True, repeat=True, batch_size=batch_size,
            seed=self.schedule.seed + seed_offset, drop_remainder=True)

    def evaluate(self, segmenter: keras.Model) -> dict:
        """Target-val evaluation; in the strategy's scope, the workers share the images."""
        with self.strategy.scope():
            return evaluate_segmenter(segmenter, self.val_data, self.num_classes_reported)

    def train_segmenter_stage(self, segmenter: keras.Model, stage: str, steps: int,
                              **datasets) -> dict | None:
        result = self.timed(stage, train_segmenter, segmenter, self.run.checkpoint_dir(stage),
                            self.run.log_dir(stage), steps, eval_dataset=self.val_data,
                            num_classes_reported=self.num_classes_reported,
                            strategy=self.strategy, **datasets)
        self.write_config()
        return result

    def record(self, key: str, segmenter: keras.Model, result: dict | None) -> None:
        """Keeps the metrics of finished stages; evaluates only when the trainer did not."""
        if key not in self.metrics:
            self.metrics[key] = result or self.evaluate(segmenter)
            self.save_metrics()

    def train_source_only(self) -> None:
        """Round 0: M on the source, or the loaded weights stored as the source-only stage."""
        stage = layout.SOURCE_ONLY
        if self.schedule.source_only_steps == 0:
            if not self.run.is_done(stage):
                StageCheckpoint(self.run.checkpoint_dir(stage), segmenter=self.segmenter).save(0)
                files.mark_done(self.run.checkpoint_dir(stage))
            result = None
        else:
            result = self.train_segmenter_stage(
                self.segmenter, stage, self.schedule.source_only_steps,
                source_dataset=self.train_data("source", self.source.resize, self.source.crop,
                                               self.schedule.batch_size, 0))
        self.record(stage, self.segmenter, result)
        logging.info("source-only target-val mIoU %.2f", self.metrics[stage]["mIoU"])

    def train_oracle(self) -> None:
        """A second M trained on the labelled target train split (the upper reference)."""
        self.seed(layout.ORACLE)
        with self.strategy.scope():
            oracle = _load_init(build_segmenter(), self.init_weights)
        result = self.train_segmenter_stage(
            oracle, layout.ORACLE, self.schedule.oracle_steps,
            source_dataset=self.train_data("target_train_labelled", self.target.resize, None,
                                           self.schedule.batch_size, 1))
        self.record(layout.ORACLE, oracle, result)

    def translator(self) -> keras.Model:
        """F and D_S, D_T, built on first use and kept across rounds. Their variables are
        created here, in the strategy's scope (the trainer would otherwise create them on
        first call, outside it); the discriminators' do not depend on the input size."""
        if self._translator is None:
            self.seed("translator")
            with self.strategy.scope():
                self._translator = build_translator(self.segmenter.num_classes)
                self._translator.build()
                self.discriminators = {domain: build_patch_discriminator() for domain in DOMAINS}
                for discriminator in self.discriminators.values():
                    discriminator(tf.zeros([1, 64, 64, 3]))
        return self._translator

    def finish(self, best: dict, export: bool) -> None:
        """final.json, the export of the best models and the overview picture (the chief's)."""
        self.metrics["final"] = best
        self.save_metrics()
        self.run.write_json(layout.FINAL_FILE, {"segmenter_stage": best["segmenter_stage"],
                                                "translator_stage": best["translator_stage"]})
        if self.workers.is_chief:
            if export:
                self.timed("export", self._export, best)
            self._write_overview(best)
        self.write_config()

    def _export(self, best: dict) -> None:
        """Exports the best segmenter (and its round's translator) once, as version 1."""
        export_dir = self.run.export_dir
        if files.is_done(export_dir):
            return
        # A killed export leaves a temporary folder or a first model's version: start over, so
        # a resumed run ends with the same version 1 as an uninterrupted one.
        shutil.rmtree(export_dir, ignore_errors=True)
        translator = self.translator() if best["translator_stage"] else None
        export_run(self.run.path, version=1, segmenter=self.segmenter, translator=translator)
        files.mark_done(export_dir)

    def _write_overview(self, best: dict) -> None:
        """RUN_DIR/overview.png with the final M; the translations are those of the final
        round, or of the last round run when the source-only model stayed best."""
        path = self.run.file(layout.OVERVIEW_FILE)
        if os.path.isfile(path):
            return
        self.run.restore(best["segmenter_stage"], segmenter=self.segmenter)
        shown_round = best["round"] or len(self.metrics["rounds"])
        translated_dir = self.run.translated_dir(shown_round) if shown_round else None
        images.write_png(path, overview_grid(self.segmenter, self.examples["source"],
                                             translated_dir, self.val_data))
        logging.info("overview picture: %s", path)


def remaining_seconds(plan: Sequence[str], stage: str, done: Mapping[str, float]
                      ) -> tuple[float, bool]:
    """Seconds the stages of ``plan`` from ``stage`` on should take, each estimated by the
    wall time of a finished stage of its kind in ``done`` (round 1's translator predicts
    round 2's), and whether every kind left has such a time."""
    measured = {_stage_kind(name): seconds for name, seconds in done.items()}
    kinds = [_stage_kind(name) for name in plan[plan.index(stage):] if name not in done]
    return sum(measured.get(kind, 0.0) for kind in kinds), all(kind in measured for kind in kinds)


def _stage_kind(stage: str) -> str:
    """``translator`` for ``round_02_translator``; other names unchanged."""
    return re.sub(r"^round_\d+_", "", stage)


def _list_and_scan(source: DomainData, target: DomainData, schedule: Schedule,
                   on_size_mismatch: str) -> dict[str, list[readers.Example]]:
    """The examples of each stream, checked by the start-up scan (which names a bad file),
    and whether the batches of every stage can be formed from them.

    ``target_train_labelled`` is empty unless the oracle runs and the target train split has
    labels; ``target_train`` never carries labels, so no stage can use them by mistake.
    """
    want_oracle = schedule.oracle_steps > 0
    source_examples = readers.list_examples(source.dataset, source.root, "train",
                                            source.train_list)
    target_train = readers.list_examples(target.dataset, target.root, "train",
                                         target.train_list)
    target_val = readers.list_examples(target.dataset, target.root, "val", target.val_list)
    has_labels = all(ex.label is not None and os.path.isfile(ex.label) for ex in target_train)
    if want_oracle and not has_labels:
        logging.warning("oracle skipped: the target train split of %s has no labels",
                        target.root)
    if not (want_oracle and has_labels):
        target_train = [ex._replace(label=None) for ex in target_train]
    target_report = scan.scan_examples(target_train, on_size_mismatch=on_size_mismatch)
    source_report = scan.scan_examples(source_examples, on_size_mismatch=on_size_mismatch)
    for stream, report, batch, resize, crop, fix in (
            ("source", source_report, ("batch_size", schedule.batch_size), source.resize,
             source.crop, "source_domain.resize or source_domain.crop"),
            ("source", source_report, ("translator_batch_size", schedule.translator_batch_size),
             source.resize, schedule.translator_crop,
             "source_domain.resize or run_pipeline.translator_crop"),
            ("target train", target_report, ("batch_size", schedule.batch_size), target.resize,
             None, "target_domain.resize"),
            ("target train", target_report,
             ("translator_batch_size", schedule.translator_batch_size), target.resize,
             schedule.translator_crop, "target_domain.resize or run_pipeline.translator_crop")):
        _check_batchable(stream, report.image_sizes, batch, resize, crop, fix)
    target_train = target_report.examples
    return {
        "source": source_report.examples,
        "target_train_labelled": target_train if want_oracle and has_labels else [],
        "target_train": [ex._replace(label=None) for ex in target_train],
        "target_val": scan.scan_examples(target_val).examples,
    }


def _check_batchable(stream: str, image_sizes: dict[tuple[int, int], int],
                     batch: tuple[str, int], resize: Size | None, crop: Size | None,
                     fix: str) -> None:
    """Images of several sizes cannot share a batch unless they are resized or cropped."""
    name, size = batch
    if size > 1 and resize is None and crop is None and len(image_sizes) > 1:
        sizes = ", ".join(f"{h}x{w}" for h, w in sorted(image_sizes)[:3])
        more = ", ..." if len(image_sizes) > 3 else ""
        raise ValueError(f"run_pipeline.{name} = {size} batches {stream} images of "
                         f"{len(image_sizes)} sizes ({sizes}{more}) without resizing or "
                         f"cropping them: set {fix}")


def _job_configurables() -> list:
    """Every configurable the job calls, whose bindings ``settings.check_bindings`` checks."""
    return [run_pipeline, source_domain, target_domain, train_segmenter, train_translator,
            generate_pseudo_labels, build_segmenter, build_translator,
            build_patch_discriminator, build_output_discriminator, make_strategy,
            set_precision, step_guard.NonFiniteCounter, synthetic.ensure_synthetic_pair,
            optimizers.segmentation_optimizer, optimizers.deeplabv2_optimizer,
            optimizers.fcn8s_optimizer, optimizers.adam_optimizer, optimizers.adam,
            optimizers.discriminator_optimizer, readers.make_dataset, scan.scan_examples]


def _check_settings(schedule: Schedule, init_weights: str | None) -> None:
    """Settings errors, raised before any work."""
    if schedule.source_only_steps <= 0 and not init_weights:
        raise ValueError("run_pipeline: source_only_steps is 0 and init_weights is None; "
                         "train M on the source or give converted weights")
    if init_weights and not os.path.isfile(init_weights):
        raise FileNotFoundError(f"run_pipeline.init_weights: {init_weights} does not exist")
    if schedule.max_rounds < 0 or schedule.patience < 1:
        raise ValueError(f"run_pipeline: max_rounds must be >= 0 and patience >= 1, got "
                         f"{schedule.max_rounds} and {schedule.patience}")


def _check_batch_sizes(replicas: int, **batch_sizes: int) -> None:
    """Every replica needs the same share of each global batch."""
    for name, size in batch_sizes.items():
        if size % replicas:
            raise ValueError(f"run_pipeline.{name}: {size} does not split evenly over the "
                             f"{replicas} replicas of make_strategy; use a multiple of {replicas}")


def _name_undecodable_file(error: tf.errors.InvalidArgumentError,
                           *example_lists: Sequence[readers.Example]) -> NoReturn:
    """Raises the scan's error naming the file behind ``error``, else ``error`` itself.

    The start-up scan reads every header but decodes only a sample, and tf.data's decode
    errors name no file ("Invalid PNG data, size 1147"). Decoding everything once, when a
    stage has already stopped on such an error, finds the file to replace before resuming.
    """
    logging.error("stopped on %s; decoding every example to name the file",
                  " ".join(str(error.message).split())[:200])
    for examples in example_lists:
        scan.scan_examples(examples, max_decode=len(examples))
    raise error


def _load_init(segmenter: keras.Model, init_weights: str | None) -> keras.Model:
    """``segmenter.load_weights(init_weights)`` (when given) with an error that names the file
    and the network."""
    if not init_weights:
        return segmenter
    try:
        segmenter.load_weights(init_weights)
    except ValueError as error:
        # Keras: a summary line, then the first failing layer's message (with its values).
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        detail = lines[min(1, len(lines) - 1)].split(" Target variable:")[0][:200]
        raise ValueError(
            f"run_pipeline.init_weights {init_weights} does not fit the segmenter "
            f"({segmenter.name}, {segmenter.num_classes} classes; another architecture, "
            f"class count or size?): {detail}") from error
    return segmenter
