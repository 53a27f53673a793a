"""This process's place among the workers of a multi-worker run, and what they exchange.

Under ``tf.distribute.MultiWorkerMirroredStrategy`` every worker runs the same program; the
chief (the ``chief`` task, or worker 0 when there is none) writes the run's results and the
others follow the chief's decisions, as TensorFlow's tutorial "Custom training loop with
Keras and MultiWorkerMirroredStrategy" (tensorflow.org/tutorials/distribute/
multi_worker_with_ctl) does. The exchanges are collective all-reduces on the strategy, so
every worker must make the same calls in the same order; they also serve as barriers. With
any other strategy there is one worker and every exchange returns its input.
"""

from __future__ import annotations

import dataclasses
import json
import socket
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

import numpy as np
import tensorflow as tf

T = TypeVar("T")


def free_loopback_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports free on localhost now, for a cluster of local workers.

    All sockets are held open until every port is chosen, so the ports differ.
    """
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("localhost", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@dataclasses.dataclass(frozen=True)
class Workers:
    """Worker ``index`` of ``count`` (0 is the chief) and the strategy they all-reduce on."""

    index: int = 0
    count: int = 1
    strategy: tf.distribute.Strategy | None = None

    @classmethod
    def of(cls, strategy: tf.distribute.Strategy | None = None) -> Workers:
        """The workers of ``strategy`` (default: the current one); one unless it is a
        ``MultiWorkerMirroredStrategy``."""
        strategy = strategy or tf.distribute.get_strategy()
        if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
            return cls()
        resolver = strategy.cluster_resolver
        tasks = resolver.cluster_spec().as_dict()
        has_chief = "chief" in tasks
        count = len(tasks.get("worker", [])) + (1 if has_chief else 0)
        if resolver.task_type == "chief":
            index = 0
        else:
            index = resolver.task_id + (1 if has_chief else 0)
        return cls(index, count, strategy)

    @property
    def is_chief(self) -> bool:
        return self.index == 0

    def shard(self, items: Iterable[T]) -> list[T]:
        """Items ``index``, ``index + count``, ...: this worker's share of ``items``."""
        return list(items)[self.index::self.count]

    def sum(self, value: Any) -> np.ndarray:
        """The sum of ``value`` (a number or array of the same shape everywhere) over the
        workers (integers and booleans as int64). Each worker contributes once, whatever its
        number of local replicas."""
        value = np.asarray(value)
        if value.dtype.kind in "biu":
            value = value.astype(np.int64)
        if self.count == 1:
            return value
        strategy = self.strategy
        local_replicas = strategy.num_replicas_in_sync // self.count
        tensor = tf.convert_to_tensor(value)
        per_replica = strategy.experimental_distribute_values_from_function(
            lambda context: tensor if context.replica_id_in_sync_group % local_replicas == 0
            else tf.zeros_like(tensor))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None).numpy()

    def chief_value(self, value: Any) -> np.ndarray:
        """The chief's ``value`` on every worker (the others' must have the same shape)."""
        value = np.asarray(value)
        return self.sum(value if self.is_chief else np.zeros_like(value))

    def chief_json(self, value: Any) -> Any:
        """The chief's JSON-serialisable ``value`` on every worker."""
        data = np.frombuffer(json.dumps(value).encode(), np.uint8)
        size = int(self.chief_value(len(data)))
        padded = np.zeros(size, np.int64)
        if self.is_chief:
            padded[:] = data
        received = self.chief_value(padded).astype(np.uint8).tobytes()
        return json.loads(received.decode())

    def barrier(self) -> None:
        """Returns once every worker has reached this call."""
        self.sum(np.zeros(1, np.int32))

    def agree(self, ok: bool, what: str) -> None:
        """Raises on every worker when ``ok`` is False on any (a failed check of ``what``),
        so that no worker waits for one that stopped."""
        failed = int(self.sum(0 if ok else 1))
        if failed and ok:
            raise RuntimeError(f"{failed} other worker(s) failed {what}; see their logs")

    def sync_variables(self, variables: Sequence[tf.Variable]) -> None:
        """Assigns the chief's values to ``variables`` on every worker (one all-reduce per
        dtype kind: floats as float32, or float64 when they are, integers as int64)."""
        if self.count == 1 or not variables:
            return
        groups: dict[tf.DType, list[tf.Variable]] = {}
        for variable in variables:
            dtype = tf.as_dtype(variable.dtype)  # Keras variables name theirs
            wire = (tf.float64 if dtype == tf.float64 else tf.float32) if dtype.is_floating \
                else tf.int64
            groups.setdefault(wire, []).append(variable)
        for wire, members in groups.items():
            flat = tf.concat([tf.reshape(tf.cast(tf.convert_to_tensor(v), wire), [-1])
                              for v in members], 0)
            values = self.chief_value(flat.numpy())
            offset = 0
            for variable in members:
                size = int(np.prod(variable.shape))
                value = values[offset:offset + size].reshape(variable.shape)
                variable.assign(tf.cast(value, tf.as_dtype(variable.dtype)))
                offset += size
