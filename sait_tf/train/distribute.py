"""Distribution strategy, global-batch loss shares, mixed precision and loss scaling.

The trainers run one replica step per device under a ``tf.distribute`` strategy chosen by
gin (``make_strategy.kind``). Each replica's losses are means over its own examples (or
labelled pixels); weighting them by the replica's share of the global count makes the sum
of the replicas' gradients, which the optimisers all-reduce, the gradient of the mean over
the global batch: the update one device makes on the whole batch.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence

import gin
import keras
import tensorflow as tf

from sait_tf.runtime import machine
from sait_tf.train import step_guard

STRATEGY_KINDS = ("default", "mirrored", "multi_worker")
CLUSTERS = ("auto", "tf_config", "slurm")
PRECISION_POLICIES = ("float32", "mixed_bfloat16", "mixed_float16")


@gin.configurable
def make_strategy(kind: str = "default",
                  devices: Sequence[str] | None = None,
                  cluster: str = "auto",
                  slurm_port_base: int = 8888) -> tf.distribute.Strategy:
    """The ``tf.distribute`` strategy the trainers run under.

    ``default``: one device (TensorFlow's default strategy). ``mirrored``: one replica per
    device of this machine, ``devices`` (e.g. ``["/gpu:0", "/gpu:1"]``) or all GPUs (the CPU
    when there is none). ``multi_worker``: ``MultiWorkerMirroredStrategy`` over the workers
    that ``cluster`` names (``cluster_resolver``), one replica per local GPU; it must be
    created before TensorFlow runs any operation, which is why the pipeline calls this first.
    """
    if kind not in STRATEGY_KINDS:
        raise ValueError(f"make_strategy.kind: expected one of {STRATEGY_KINDS}, got {kind!r}")
    if kind == "default":
        if devices:
            raise ValueError("make_strategy.devices: the default strategy uses one device; "
                             "set make_strategy.kind='mirrored' to use several")
        return tf.distribute.get_strategy()
    if kind == "mirrored":
        devices = list(devices) if devices else None
        # Across CPU devices, reduce through one device: collective all-reduce there depends
        # on collective keys other strategies of the process have used.
        cpu_only = bool(devices) and all("cpu" in device.lower() for device in devices)
        return tf.distribute.MirroredStrategy(
            devices, cross_device_ops=tf.distribute.ReductionToOneDevice() if cpu_only else None)
    if devices:
        raise ValueError("make_strategy.devices: multi_worker uses every local GPU; restrict "
                         "them with CUDA_VISIBLE_DEVICES instead")
    return tf.distribute.MultiWorkerMirroredStrategy(
        cluster_resolver=cluster_resolver(cluster, slurm_port_base))


def cluster_resolver(cluster: str, slurm_port_base: int = 8888
                     ) -> tf.distribute.cluster_resolver.ClusterResolver:
    """The resolver that tells ``MultiWorkerMirroredStrategy`` the workers and this one's task.

    ``tf_config``: the ``TF_CONFIG`` environment variable (checked by ``check_tf_config``).
    ``slurm``: TensorFlow's ``SlurmClusterResolver`` for ``srun python -m sait_tf.train``:
    one worker per Slurm task, task ``SLURM_PROCID``, ports from ``slurm_port_base`` on each
    node, each task's share of the node's GPUs in ``CUDA_VISIBLE_DEVICES``. ``auto``:
    ``tf_config`` when ``TF_CONFIG`` is set, else ``slurm`` inside a Slurm job step.
    """
    environ = os.environ
    if cluster not in CLUSTERS:
        raise ValueError(f"make_strategy.cluster: expected one of {CLUSTERS}, got {cluster!r}")
    if cluster == "auto":
        if environ.get("TF_CONFIG"):
            cluster = "tf_config"
        elif environ.get("SLURM_PROCID") is not None and environ.get("SLURM_STEP_NUM_TASKS"):
            cluster = "slurm"
        else:
            raise ValueError(
                "make_strategy.kind='multi_worker' needs its workers: set the TF_CONFIG "
                "environment variable, e.g. {\"cluster\": {\"worker\": [\"host1:12345\", "
                "\"host2:12345\"]}, \"task\": {\"type\": \"worker\", \"index\": 0}}, or "
                "start every worker with srun inside a Slurm allocation")
    if cluster == "tf_config":
        check_tf_config(environ.get("TF_CONFIG"))
        return tf.distribute.cluster_resolver.TFConfigClusterResolver()
    for name in ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_STEP_NODELIST",
                 "SLURM_STEP_TASKS_PER_NODE"):
        if not environ.get(name):
            raise ValueError(f"make_strategy.cluster='slurm': {name} is not set; start each "
                             "worker with srun (one task per worker) inside the allocation")
    resolver = tf.distribute.cluster_resolver.SlurmClusterResolver
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible == "" or (visible is None and shutil.which("nvidia-smi") is None):
        # TensorFlow's resolver gives each task a port per group of GPUs, which it counts
        # from CUDA_VISIBLE_DEVICES or nvidia-smi: on nodes without GPUs, count one group
        # per task and leave CUDA_VISIBLE_DEVICES alone.
        tasks_per_node = max(int(count.split("(")[0]) for count in
                             environ["SLURM_STEP_TASKS_PER_NODE"].split(","))
        return resolver(port_base=slurm_port_base, gpus_per_node=tasks_per_node,
                        gpus_per_task=1, auto_set_gpu=False)
    try:
        return resolver(port_base=slurm_port_base)
    except RuntimeError as error:
        raise ValueError(f"make_strategy.cluster='slurm': {error}") from error


def check_tf_config(tf_config: str | None) -> dict:
    """Parses the ``TF_CONFIG`` JSON of a multi-worker run; raises naming what is wrong."""
    if not tf_config:
        raise ValueError("make_strategy.cluster='tf_config' needs the TF_CONFIG environment "
                         "variable, e.g. {\"cluster\": {\"worker\": [\"host1:12345\", "
                         "\"host2:12345\"]}, \"task\": {\"type\": \"worker\", \"index\": 0}}")
    try:
        config = json.loads(tf_config)
    except json.JSONDecodeError as e:
        raise ValueError(f"TF_CONFIG is not valid JSON: {e}") from e
    tasks = config.get("cluster", {}) if isinstance(config, dict) else {}
    workers = tasks.get("worker") if isinstance(tasks, dict) else None
    if not workers or not isinstance(workers, list):
        raise ValueError(f"TF_CONFIG: cluster.worker must list the workers' host:port, got "
                         f"{tf_config}")
    chiefs = tasks.get("chief", [])
    if not isinstance(chiefs, list) or len(chiefs) > 1:
        raise ValueError(f"TF_CONFIG: cluster.chief must list one host:port, got {chiefs}")
    task = config.get("task", {})
    task_type, index = task.get("type"), task.get("index")
    sizes = {"worker": len(workers), "chief": len(chiefs)}
    if task_type not in ("worker", "chief") or not sizes[task_type] or not isinstance(
            index, int) or not 0 <= index < sizes[task_type]:
        raise ValueError(f"TF_CONFIG: task must be {{\"type\": \"worker\", \"index\": i}} with "
                         f"0 <= i < {len(workers)}" + (" or {\"type\": \"chief\", \"index\": 0}"
                                                      if chiefs else "") + f", got {task}")
    return config


def check_jit_compile(strategy: tf.distribute.Strategy, jit_compile: bool, param: str) -> None:
    """XLA compiles a step for one device: raises before training when ``strategy`` has more."""
    if jit_compile and strategy.num_replicas_in_sync > 1:
        raise ValueError(f"{param}: XLA cannot compile a step that spans "
                         f"{strategy.num_replicas_in_sync} replicas; use jit_compile with one "
                         "device (make_strategy.kind='default') or turn it off")


def replica_share(count: tf.Tensor | int) -> tf.Tensor:
    """This replica's ``count`` (examples, labelled pixels) over the sum on all replicas.

    Multiply a per-replica mean loss by it before taking gradients: summed over replicas
    this is the mean over the global batch, also when the replicas' batches or numbers of
    labelled pixels differ. 1 without a strategy. Call it in replica context.
    """
    count = tf.cast(count, tf.float32)
    total = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, count)
    return count / tf.maximum(total, 1.0)


@gin.configurable
def set_precision(policy: str = "float32") -> None:
    """Sets Keras' global dtype policy; models built afterwards compute in it.

    ``mixed_bfloat16`` and ``mixed_float16`` keep variables in float32 and compute in 16
    bits; the trainers then take losses in float32 and, for float16, scale them with a
    ``keras.optimizers.LossScaleOptimizer``. Call before building the models: a layer keeps
    the policy it was created with. ``mixed_bfloat16`` is refused where oneDNN's kernels run
    but cannot compute in bfloat16 (``machine.onednn_bfloat16_missing``).
    """
    if policy not in PRECISION_POLICIES:
        raise ValueError(f"set_precision.policy: expected one of {PRECISION_POLICIES}, got "
                         f"{policy!r}")
    missing = machine.onednn_bfloat16_missing() if policy == "mixed_bfloat16" else None
    if missing:
        raise ValueError(f"set_precision.policy = 'mixed_bfloat16': TensorFlow's oneDNN kernels "
                         f"have no bfloat16 convolutions here ({missing}); use 'float32', or "
                         "TF_ENABLE_ONEDNN_OPTS=0 for TensorFlow's own, emulated ones")
    keras.mixed_precision.set_global_policy(policy)


def computes_in_float16(model: keras.layers.Layer) -> bool:
    """True when ``model`` was built under ``mixed_float16`` and so needs loss scaling."""
    return model.dtype_policy.compute_dtype == "float16"


def loss_scale_optimizers(optimizer) -> list[keras.optimizers.LossScaleOptimizer]:
    """The ``LossScaleOptimizer`` s in ``optimizer`` (itself, or the groups of a grouped one)."""
    candidates = list(optimizer.optimizers.values()) if hasattr(optimizer, "optimizers") else [
        optimizer]
    return [opt for opt in candidates if isinstance(opt, keras.optimizers.LossScaleOptimizer)]


def scale_loss(optimizer, loss: tf.Tensor) -> tf.Tensor:
    """``loss`` times the current loss scale of ``optimizer`` (unchanged without scaling).

    A grouped optimiser's loss-scale optimisers are updated together by ``apply_gradients``,
    so they hold the same scale; the first one's is used.
    """
    scaled = loss_scale_optimizers(optimizer)
    return scaled[0].scale_loss(loss) if scaled else loss


def apply_gradients(optimizer, grads: Sequence[tf.Tensor], variables: Sequence[tf.Variable],
                    loss: tf.Tensor) -> tf.Tensor:
    """``step_guard.apply_if_finite``, plus dynamic loss scaling when ``optimizer`` has it.

    ``grads`` are of ``scale_loss(optimizer, loss)``; loss-scale optimisers must be built
    (``StageCheckpoint`` builds the trainers' optimisers). When all are finite, the
    loss-scale optimisers unscale them, update and count the step (the scale doubles after
    ``dynamic_growth_steps`` such steps). When the guard skips the step, it never reaches
    them, so their scale is halved here (as they would do): an overflowing float16 scale
    keeps falling until the gradients are finite. Returns whether the update was applied.
    """
    applied = step_guard.apply_if_finite(optimizer, grads, variables, loss)
    scaled = loss_scale_optimizers(optimizer)
    if scaled:
        def halve() -> tf.Tensor:
            for opt in scaled:
                opt.step_counter.assign(0)
                opt.dynamic_scale.assign(opt.dynamic_scale * 0.5)
            return tf.constant(False)

        tf.cond(applied, lambda: tf.constant(True), halve)
    return applied
