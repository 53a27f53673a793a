"""The one checkpoint helper: build optimiser slots, restore the latest, save atomically."""

from __future__ import annotations

import glob
import os
import shutil
from collections.abc import Callable

import keras
import tensorflow as tf
from absl import logging


class _VariableList(tf.Module):
    """Every variable of a Keras model, layer or optimiser, keyed by its position.

    ``tf.train.Checkpoint`` does not follow Keras 3's tracked lists (a layer holding its
    sub-layers in a Python list), so walking the object graph silently drops such weights.
    Variable paths are no key either: auto-generated layer and optimiser names ("adam_1")
    depend on how many were created before in the process. The order of ``.variables`` is
    fixed by the code that builds the object, so it is the key; shapes are checked on restore.
    """

    def __init__(self, owner_name: str, owner) -> None:
        super().__init__(name=None)
        if isinstance(owner, keras.layers.Layer) and not owner.built:
            raise ValueError(f"checkpoint entry {owner_name!r}: build the model (call it once) "
                             "before checkpointing it, or its variables do not exist yet")
        self.ordered = {f"v{index:05d}": variable for index, variable in enumerate(owner.variables)}


def _checkpointable(name: str, obj):
    """Wraps Keras objects (also in dicts) so every variable is saved; others pass through."""
    if isinstance(obj, dict):
        return {key: _checkpointable(f"{name}.{key}", value) for key, value in obj.items()}
    if isinstance(obj, (keras.layers.Layer, keras.optimizers.Optimizer)):
        return _VariableList(name, obj)
    return obj


def _remove_killed_saves(directory: str) -> None:
    """Deletes what a save killed halfway leaves behind and nothing reads: TensorFlow's
    ``checkpoint.tmp<hex>`` state file and ``ckpt-N_temp`` shard folders."""
    pattern = os.path.join(glob.escape(directory), "{}")
    for path in glob.glob(pattern.format("checkpoint.tmp*")):
        os.remove(path)
    for path in glob.glob(pattern.format("ckpt-*_temp")):
        shutil.rmtree(path, ignore_errors=True)


def _variable_lists(name: str, obj) -> list[tuple[str, _VariableList]]:
    """(checkpoint path prefix, variable list) of a ``_checkpointable`` result."""
    if isinstance(obj, dict):
        return [entry for key, value in obj.items()
                for entry in _variable_lists(f"{name}/{key}", value)]
    return [(name, obj)] if isinstance(obj, _VariableList) else []


def _check_fits(path: str, objects: dict) -> None:
    """Raises before restoring anything when the checkpoint at ``path`` holds other networks
    (another architecture, class count or size): TensorFlow would fail halfway through, with
    a message that names neither the checkpoint nor the likely cause."""
    stored = tf.train.load_checkpoint(path).get_variable_to_shape_map()
    problem = None
    for prefix, variables in (entry for name, obj in objects.items()
                              for entry in _variable_lists(name, obj)):
        keys = {key for key in stored if key.startswith(f"{prefix}/ordered/")}
        if len(keys) != len(variables.ordered):
            problem = (f"it holds {len(keys)} variables of '{prefix}', the model has "
                       f"{len(variables.ordered)}")
            break
        for key, variable in variables.ordered.items():
            shape = stored.get(f"{prefix}/ordered/{key}/.ATTRIBUTES/VARIABLE_VALUE")
            if shape is None or list(shape) != list(variable.shape):
                problem = (f"'{prefix}' variable {getattr(variable, 'path', variable.name)} has "
                           f"shape {shape and tuple(shape)} in it, {tuple(variable.shape)} in "
                           "the model")
                break
        if problem:
            break
    if problem:
        raise ValueError(f"checkpoint {path} does not fit the model: {problem}; it was written "
                         "with another architecture, class count or size (use another "
                         "--run_dir, or the configuration that wrote it)")


class StageCheckpoint:
    """A ``tf.train.CheckpointManager`` over named trackables plus a step counter.

    Keras 3 optimisers create their slots lazily, so optimisers are built on the variables
    they train before restoring; otherwise their state would be silently dropped.
    ``CheckpointManager`` writes to temporary names and renames, so a kill never leaves a
    checkpoint that looks complete but is not.
    """

    def __init__(
        self,
        directory: str,
        max_to_keep: int = 3,
        optimizers: dict[str, tuple[keras.optimizers.Optimizer, list]] | None = None,
        **trackables,
    ) -> None:
        for opt, variables in (optimizers or {}).values():
            if not opt.built:
                opt.build(variables)
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        objects = dict(trackables)
        objects.update({name: opt for name, (opt, _) in (optimizers or {}).items()})
        objects = {name: _checkpointable(name, obj) for name, obj in objects.items()}
        self.objects = objects
        self.checkpoint = tf.train.Checkpoint(step=self.step, **objects)
        self.directory = directory
        _remove_killed_saves(directory)
        self.manager = tf.train.CheckpointManager(self.checkpoint, directory, max_to_keep)

    def restore_latest(self) -> int:
        """Restores the newest intact checkpoint if there is one; returns its step.

        A damaged checkpoint (truncated or corrupted files) gets a warning naming it and the
        one before it is tried.
        """

        def restore(path: str) -> None:
            _check_fits(path, self.objects)
            self.checkpoint.restore(path).assert_existing_objects_matched()

        restored = restore_newest_intact(self.manager.checkpoints, restore, self.directory)
        if restored:
            logging.info("Resumed %s at step %d", restored, int(self.step.numpy()))
        return int(self.step.numpy())

    @property
    def variables(self) -> list[tf.Variable]:
        """Every variable the checkpoint holds: the step, then the entries' in order."""
        return [self.step] + [variable for name, obj in self.objects.items()
                              for _, entries in _variable_lists(name, obj)
                              for variable in entries.ordered.values()]

    def save(self, step: int) -> str:
        self.step.assign(step)
        return self.manager.save(checkpoint_number=step)

    @property
    def latest(self) -> str | None:
        return self.manager.latest_checkpoint


def restore_for_inference(stage_dir: str, **trackables) -> str:
    """Restores only ``trackables`` (e.g. ``segmenter=model``) from a stage's newest intact
    checkpoint; returns its path."""
    state = tf.train.get_checkpoint_state(stage_dir)
    paths = list(state.all_model_checkpoint_paths) if state else []
    objects = {name: _checkpointable(name, obj) for name, obj in trackables.items()}

    def restore(path: str) -> None:
        _check_fits(path, objects)
        tf.train.Checkpoint(**objects).restore(path).expect_partial() \
            .assert_existing_objects_matched()

    restored = restore_newest_intact(paths, restore, stage_dir)
    if restored is None:
        raise FileNotFoundError(f"no checkpoint in {stage_dir}")
    return restored


def restore_newest_intact(paths: list[str], restore: Callable[[str], None],
                          directory: str) -> str | None:
    """Calls ``restore`` on ``paths`` from the newest until one succeeds; returns it (None
    without paths). TensorFlow's read errors (a truncated file, a checksum mismatch, a
    missing shard) mark a checkpoint as damaged; other errors, such as a checkpoint of
    another network, propagate."""
    for path in reversed(paths):
        try:
            restore(path)
            return path
        except (tf.errors.OpError, IndexError) as error:  # IndexError: a truncated file
            reason = " ".join(str(getattr(error, "message", error)).split())[:200]
            logging.warning("checkpoint %s is damaged (%s); trying the one before it", path,
                            reason)
    if paths:
        raise ValueError(f"no intact checkpoint in {directory} (damaged: "
                         f"{', '.join(os.path.basename(p) for p in paths)}); delete the folder "
                         "to train that stage again")
    return None
