"""The run directory of ``python -m sait_tf.train``: its layout, its records, and its models.

Every other module reaches a run's files through ``RunDir``; the layout is written down in
docs/ARCHITECTURE.md ("Run directory"). Stages are named ``source_only``, ``oracle`` and
``round_KK_translator`` / ``round_KK_segmenter``; a stage is finished when its checkpoint
folder holds a DONE marker (``runtime.files``). ``run.json`` records facts of the run that
tools need later and that must not be read back from gin (the image sizes it trained at);
``bindings.gin`` the gin configuration the run was started with, against which a resumed
job's configuration is checked. One job at a time holds the directory (``lock``).

A multi-worker job has one set of results, written by its chief; every other worker writes
into its own ``RUN_DIR/.worker_tmp/worker_<i>`` (``worker_dir``, the same layout), which the
job deletes when it ends.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from typing import Any

import gin
import keras
import tensorflow as tf
from gin import config_parser

from sait_tf.models import build_segmenter
from sait_tf.models.translator import Translator, build_translator
from sait_tf.runtime import checkpoints, files
from sait_tf.runtime.lock import DirectoryLock
from sait_tf.runtime.workers import Workers

SOURCE_ONLY = "source_only"
ORACLE = "oracle"
CONFIG_FILE = "config.gin"
METRICS_FILE = "metrics.json"
FINAL_FILE = "final.json"
FACTS_FILE = "run.json"
OVERVIEW_FILE = "overview.png"
BINDINGS_FILE = "bindings.gin"
CONFIG_CHANGES_FILE = "config_changes.json"
WORKER_TMP = ".worker_tmp"
_SHARING_PROBE = "sharing_probe"
# What to do about a damaged record, by file name.
_REPAIR = {
    METRICS_FILE: "delete it and run the training command again: finished stages are kept "
                  "and evaluated again",
    FINAL_FILE: "delete it and run the training command again (it rewrites it), or export "
                "the stage you want with --run_dir after restoring the file",
}


def round_name(round_index: int) -> str:
    """``round_KK``: the name of round ``round_index`` (from 1) in stage and folder names."""
    if round_index < 1:
        raise ValueError(f"rounds are numbered from 1, got {round_index}")
    return f"round_{round_index:02d}"


def translator_stage(round_index: int) -> str:
    return f"{round_name(round_index)}_translator"


def segmenter_stage(round_index: int) -> str:
    return f"{round_name(round_index)}_segmenter"


def guide_stage(round_index: int) -> str:
    """The segmenter stage whose M guided round ``round_index``'s F (and made its pseudo-labels):
    ``source_only`` for round 1, the previous round's segmenter after."""
    return SOURCE_ONLY if round_index == 1 else segmenter_stage(round_index - 1)


class RunDir:
    """Paths, records and model restoring of one run directory."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = DirectoryLock(path)

    def lock(self) -> None:
        """Holds the directory for this process (``DirectoryLocked`` naming the holder when
        another live process has it); released when the process ends."""
        self._lock.acquire()

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def checkpoint_dir(self, stage: str) -> str:
        return os.path.join(self.path, "checkpoints", stage)

    def log_dir(self, stage: str) -> str:
        return os.path.join(self.path, "logs", stage)

    def translated_dir(self, round_index: int) -> str:
        return os.path.join(self.path, "translated", round_name(round_index))

    def pseudo_label_dir(self, round_index: int) -> str:
        return os.path.join(self.path, "pseudo_labels", round_name(round_index))

    def worker_dir(self, index: int) -> RunDir:
        """The temporary run directory of worker ``index`` (> 0) of a multi-worker job."""
        return RunDir(os.path.join(self.path, WORKER_TMP, f"worker_{index}"))

    def for_worker(self, workers: Workers) -> RunDir:
        """Where this worker writes: the run directory for the chief, else its worker_dir."""
        return self if workers.is_chief else self.worker_dir(workers.index)

    def shared_by(self, workers: Workers) -> bool:
        """Whether every worker sees the chief's run directory at its ``path`` (a shared file
        system), rather than a local directory of its own. The chief writes a random token
        in its WORKER_TMP, the others look for it; collective, so every worker calls it."""
        if workers.count == 1:
            return True
        probe = os.path.join(self.path, WORKER_TMP, _SHARING_PROBE)
        token = str(int(workers.chief_value(secrets.randbits(62) if workers.is_chief else 0)))
        if workers.is_chief:
            files.write_text_atomically(probe, token)
        workers.barrier()
        seen = workers.is_chief
        if not seen and os.path.isfile(probe):
            with open(probe) as f:
                seen = f.read() == token
        shared = not workers.sum(not seen)
        workers.barrier()
        if workers.is_chief:
            os.remove(probe)
        return shared

    def remove_worker_dirs(self, workers: Workers) -> None:
        """Deletes the workers' temporary directories at the end of a job; collective."""
        if workers.count == 1:
            return
        if not workers.is_chief:
            shutil.rmtree(self.for_worker(workers).path, ignore_errors=True)
        workers.barrier()
        shutil.rmtree(os.path.join(self.path, WORKER_TMP), ignore_errors=True)

    @property
    def export_dir(self) -> str:
        return os.path.join(self.path, "export")

    def is_done(self, stage: str) -> bool:
        return files.is_done(self.checkpoint_dir(stage))

    def require_done(self, *stages: str) -> None:
        """Raises FileNotFoundError naming the first of ``stages`` that has not finished."""
        for stage in stages:
            if not self.is_done(stage):
                raise FileNotFoundError(f"stage {stage} of {self.path!r} has not finished: no "
                                        f"DONE marker in {self.checkpoint_dir(stage)}")

    def check_writable(self) -> None:
        """Creates the folder and writes a probe file in it, so an unusable directory fails
        before any work (``os.access`` is no test: it says yes to root on a read-only mount)."""
        try:
            files.write_text_atomically(self.file(".write_test"), "ok\n")
            os.remove(self.file(".write_test"))
        except OSError as error:
            raise OSError(f"--run_dir {self.path} is not a writable directory: "
                          f"{error.strerror or error}") from error

    def read_json(self, name: str) -> dict:
        """A JSON record of the run; FileNotFoundError naming it when it is missing."""
        path = self.file(name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} does not exist; is {self.path!r} a training run?")
        try:
            with open(path) as f:
                return json.load(f)
        except ValueError as error:
            repair = _REPAIR.get(name, "delete it and run the command that wrote it again")
            raise ValueError(f"{path} is damaged ({error}); {repair}") from None

    def write_json(self, name: str, value: Any) -> None:
        files.write_json_atomically(self.file(name), value)

    def read_final(self) -> dict:
        """final.json ({"segmenter_stage", "translator_stage"}), checked: the stages it names
        must have checkpoints."""
        final = self.read_json(FINAL_FILE)
        if not final.get("segmenter_stage"):
            raise ValueError(f"{self.file(FINAL_FILE)}: 'segmenter_stage' is missing")
        for key in ("segmenter_stage", "translator_stage"):
            stage = final.get(key)
            if stage and tf.train.latest_checkpoint(self.checkpoint_dir(stage)) is None:
                raise FileNotFoundError(f"{self.file(FINAL_FILE)}: {key} '{stage}' has no "
                                        f"checkpoint in {self.checkpoint_dir(stage)}")
        return final

    def check_config(self, config: str, accept_change: bool) -> list[str]:
        """Compares ``config`` (``gin.config_str()`` of this start) with the bindings the run
        was started with; returns the differences. Raises ValueError naming every differing
        binding unless ``accept_change``. Writes nothing."""
        path = self.file(BINDINGS_FILE)
        if not os.path.isfile(path):
            return []
        with open(path) as f:
            differences = config_differences(f.read(), config)
        if differences and not accept_change:
            raise ValueError(
                f"{self.path} was started with another configuration ({path}); "
                f"{len(differences)} binding(s) differ: {'; '.join(differences)}. Use the "
                "run's configuration, another --run_dir, or --accept_config_change to go on "
                f"with the new one (recorded in {CONFIG_CHANGES_FILE})")
        return differences

    def record_config(self, config: str, differences: list[str]) -> None:
        """Stores ``config`` as the run's bindings on its first start, or after an accepted
        change, which is appended to config_changes.json."""
        if differences:
            changes = []
            if os.path.isfile(self.file(CONFIG_CHANGES_FILE)):
                changes = self.read_json(CONFIG_CHANGES_FILE)
            changes.append({"time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                            "differences": differences})
            self.write_json(CONFIG_CHANGES_FILE, changes)
        if differences or not os.path.isfile(self.file(BINDINGS_FILE)):
            files.write_text_atomically(self.file(BINDINGS_FILE), config)

    def load_config(self) -> None:
        """Parses RUN_DIR/config.gin, so the model builders get the run's architecture and sizes.

        This module imports every builder a restore needs, so their bindings are known to gin;
        bindings of the trainers' configurables are skipped.
        """
        path = self.file(CONFIG_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"run directory {self.path!r} has no {CONFIG_FILE}")
        gin.parse_config_file(path, skip_unknown=True)
        try:
            gin.query_parameter("build_segmenter.arch")
        except ValueError as error:
            raise ValueError(f"{path} binds no build_segmenter.arch") from error

    def restore(self, stage: str, **models: keras.Model) -> str:
        """Restores ``models`` (``segmenter=M``, ``translator=F``) from ``stage``'s newest
        checkpoint; returns its path."""
        return checkpoints.restore_for_inference(self.checkpoint_dir(stage), **models)

    def restore_segmenter(self, stage: str) -> keras.Model:
        """M of ``stage``, built from the run's config (``load_config`` first)."""
        segmenter = build_segmenter()
        self.restore(stage, segmenter=segmenter)
        return segmenter

    def restore_translator(self, stage: str, num_classes: int) -> Translator:
        """F of ``stage`` for a segmenter of ``num_classes`` (``load_config`` first)."""
        translator = build_translator(num_classes)
        translator.build()
        self.restore(stage, translator=translator)
        return translator


class _LiteralDelegate(config_parser.ParserDelegate):
    """Keeps references and macros as their text, so two configs compare as written."""

    def configurable_reference(self, scoped_name: str, evaluate: bool) -> str:
        return f"@{scoped_name}{'()' if evaluate else ''}"

    def macro(self, name: str) -> str:
        return f"%{name}"


def binding_values(config: str) -> dict[str, str]:
    """{"[scope/]configurable.parameter" or macro name: value as text} of a gin config."""
    values = {}
    for statement in config_parser.ConfigParser(config, _LiteralDelegate()):
        if isinstance(statement, config_parser.BindingStatement):
            key = "/".join(part for part in (statement.scope, statement.selector) if part)
            if statement.arg_name:
                key += f".{statement.arg_name}"
            values[key] = repr(statement.value)
    return values


def config_differences(recorded: str, current: str) -> list[str]:
    """"binding: old -> new" for every binding that differs between two gin configs."""
    old, new = binding_values(recorded), binding_values(current)
    return [f"{key}: {old.get(key, '(unset)')} -> {new.get(key, '(unset)')}"
            for key in sorted(old.keys() | new.keys()) if old.get(key) != new.get(key)]
