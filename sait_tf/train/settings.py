"""Every gin binding of the job checked before the first step, whatever stage uses it.

A wrong value must not surface hours later when the stage that reads it starts: the job
checks each bound parameter of its configurables against the parameter's type hint (a
string where an integer is expected, ``flip = 'no'``) and against the range its name implies
(steps, batch sizes and intervals of at least 1, positive learning rates, non-negative loss
weights, sizes of positive sides). Errors name the binding.
"""

from __future__ import annotations

import collections.abc
import re
import types
import typing
from collections.abc import Callable
from typing import Any

import gin

# (name pattern, predicate, what it must be); the first matching pattern applies.
RANGES: list[tuple[str, Callable[[Any], bool], str]] = [
    (r"^(source_only_steps|oracle_steps|max_rounds)$", lambda v: v >= 0, ">= 0"),
    (r"(^|_)(steps|every|batch_size|patience|max_consecutive|dim|width|hidden|num_scales|"
     r"num_layers|num_residual_blocks)$", lambda v: v >= 1, ">= 1"),
    (r"(_lr|learning_rate)$", lambda v: v > 0, "> 0"),
    (r"(_weight|^lambda_\w+)$", lambda v: v >= 0, ">= 0"),
    (r"^th_ssl$", lambda v: 0 < v <= 1, "in (0, 1]"),
    (r"(resize|crop|size)$", lambda v: v is None or min(v) >= 1, "sides >= 1"),
]


def matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` fits the type hint ``hint`` (unknown hints accept everything)."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(matches(value, arm) for arm in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is tuple or origin is collections.abc.Sequence or hint in (tuple, list):
        if not isinstance(value, (tuple, list)):
            return False
        args = typing.get_args(hint)
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(map(matches, value, args))
        return all(matches(item, args[0]) for item in value) if args else True
    if origin is collections.abc.Callable:
        return callable(value)
    return True


def _describe(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def check_bindings(configurables: list[Callable]) -> None:
    """Raises ValueError naming the first bound parameter of ``configurables`` (gin-decorated
    functions or classes) whose value has the wrong type or is out of range."""
    for configurable in configurables:
        name = configurable.__name__
        target = configurable.__init__ if isinstance(configurable, type) else configurable
        hints = typing.get_type_hints(target)
        for param, value in gin.get_bindings(configurable).items():
            if isinstance(value, gin.config.ConfigurableReference):
                continue
            binding = f"{name}.{param} = {value!r}"
            if param in hints and not matches(value, hints[param]):
                raise ValueError(f"binding {binding}: expected {_describe(hints[param])}")
            for pattern, valid, expected in RANGES:
                if re.search(pattern, param) and isinstance(value, (int, float, tuple, list)):
                    if not valid(value):
                        raise ValueError(f"binding {binding}: must be {expected}")
                    break
