"""Speed benchmark: where the time of a training step goes, and how close it is to the machine.

    python -m sait_tf.tools.benchmark --model deeplabv2 --height 256 --width 512 --batch 1 \\
        --steps 5 --torch --json deeplabv2.json

Measures, in one process on the same input:
  train_step_s              median seconds of one compiled training step (``tf.function`` with a
                            ``GradientTape``): segmenters take cross-entropy on random labels with
                            their trainer's optimiser; the translator takes one discriminator and
                            one generator update with the five losses of Eq. 1, M frozen
                            (``train.translation.TranslationStep``, the trainer's own step);
  inference_*_s             the exported SavedModel's ``serving_default`` against the same
                            computation in process (uint8 images -> outputs at input size);
  input_pipeline_*          ``readers.make_dataset`` over a synthetic GTA5-layout set (decode,
                            resize, crop, flip), iterated without a model;
  train_step_trace_s, train_step_first_call_s
                            seconds to trace the step, and of its first call (Grappler's
                            graph optimisation, then the step): a stage's fixed cost;
  train_step_breakdown      counted GFLOP and executed ops by network part, forward and
                            backward (``step_breakdown``); train_step_ops their total;
  peak_rss_mb               the process's peak resident memory (``ru_maxrss``);
  *_gflops                  FLOPs counted by TensorFlow's profiler on the traced graphs, never
                            estimated, and the GFLOP/s achieved against a float32 matmul peak
                            measured in the same run;
  torch_train_step_s        with ``--torch``: the same network's step in PyTorch
                            (``tools/torch_reference.py``), same threads, same input.
With ``--train_only`` only the training step is measured (time, counted FLOPs, peak memory)
against the matmul rate: for F at the paper's size, where a step takes minutes.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import math
import os
import platform
import re
import resource
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence

import keras
import numpy as np
import tensorflow as tf
from absl import flags, logging

from sait_tf import cli, export, images, labels
from sait_tf.data import readers, synthetic
from sait_tf.models import build_segmenter
from sait_tf.models.discriminators import build_patch_discriminator
from sait_tf.models.translator import DOMAINS, build_translator, translate_pixels
from sait_tf.runtime import files
from sait_tf.runtime.machine import cpu_flags, onednn_enabled, simd_flags
from sait_tf.runtime.progress import Progress
from sait_tf.train import distribute
from sait_tf.train.optimizers import (
    SEGMENTATION_OPTIMIZERS,
    adam,
    discriminator_optimizer,
    loss_scaled,
    poly_schedule,
)
from sait_tf.train.segmentation import SegmentationStep
from sait_tf.train.translation import LOSS_TERMS, TranslationStep

MODELS = ("deeplabv2", "fcn8s", "translator")
SEGMENTERS = ("deeplabv2", "fcn8s")
PRECISIONS = ("none", "mixed_bfloat16", "mixed_float16")
# Keys every result has, each a positive finite number.
REQUIRED_KEYS = (
    "train_step_s", "images_per_s", "inference_saved_model_s", "inference_keras_s",
    "saved_model_over_keras", "input_pipeline_images_per_s", "input_pipeline_over_train",
    "peak_rss_mb", "forward_s", "forward_gflops", "achieved_gflops_per_s",
    "train_step_gflops", "train_achieved_gflops_per_s", "matmul_peak_gflops_per_s",
    "fraction_of_matmul_peak", "train_fraction_of_matmul_peak",
)
# The keys of a ``train_only`` result: the training step against the matmul rate.
TRAIN_ONLY_KEYS = (
    "train_step_s", "images_per_s", "peak_rss_mb", "train_step_gflops",
    "train_achieved_gflops_per_s", "matmul_peak_gflops_per_s", "train_fraction_of_matmul_peak",
)
# The pipeline reads PNGs twice the training size and resizes them to 1.25x before cropping,
# roughly the work of a GTA5 image (1914x1052 -> 1280x720 -> 1024x512 crop).
PIPELINE_FILE_SCALE = 2.0
PIPELINE_RESIZE_SCALE = 1.25
# The translator's loss weights do not change the work of a step.
TRANSLATION_WEIGHTS = dict.fromkeys(LOSS_TERMS, 1.0)

Clock = Callable[[], float]


def _median(values: Sequence[float]) -> float:
    return float(np.median(values))


@dataclasses.dataclass
class BenchmarkConfig:
    """What to measure. ``*_knobs`` are keyword arguments of the model builders."""

    model: str
    height: int
    width: int
    batch: int = 1
    steps: int = 5
    warmup: int = 2
    jit_compile: bool = False
    mixed_precision: str = "none"
    torch: bool = False
    segmenter_arch: str = "deeplabv2"
    segmenter_knobs: dict = dataclasses.field(default_factory=dict)
    translator_knobs: dict = dataclasses.field(default_factory=dict)
    discriminator_knobs: dict = dataclasses.field(default_factory=dict)
    num_classes: int = labels.NUM_CLASSES
    matmul_size: int = 2048
    pipeline_batches: int = 20
    serving_batches: tuple[int, ...] = (1, 4, 16)
    train_only: bool = False

    @property
    def arch(self) -> str:
        """The segmenter M: the benchmarked model, or the translator's guide."""
        return self.model if self.model in SEGMENTERS else self.segmenter_arch


def check_config(config: BenchmarkConfig) -> None:
    """Fails before any work when a parameter cannot be benchmarked, naming it."""
    if config.model not in MODELS:
        raise ValueError(f"--model: expected one of {MODELS}, got {config.model!r}")
    if config.segmenter_arch not in SEGMENTERS:
        raise ValueError(f"--segmenter: expected one of {SEGMENTERS}, got "
                         f"{config.segmenter_arch!r}")
    if config.mixed_precision not in PRECISIONS:
        raise ValueError(f"--mixed_precision: expected one of {PRECISIONS}, got "
                         f"{config.mixed_precision!r}")
    for name in ("height", "width", "batch", "steps", "matmul_size", "pipeline_batches"):
        if getattr(config, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(config, name)}")
    if config.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {config.warmup}")
    if not config.serving_batches or min(config.serving_batches) < 1:
        raise ValueError(f"--serving_batches must be batch sizes >= 1, got "
                         f"{list(config.serving_batches)}")
    if min(config.height, config.width) < 8:
        raise ValueError(f"--height/--width must be >= 8 (the synthetic set's files are "
                         f"{PIPELINE_FILE_SCALE:g}x that and at least 16), got "
                         f"{config.height}x{config.width}")
    if config.model == "translator":
        if config.torch:
            raise ValueError("--torch: tools/torch_reference.py has no translator; use --model "
                             "deeplabv2 or fcn8s")
        multiple = 2 ** config.translator_knobs.get("num_downsamplings", 2)
        if config.height % multiple or config.width % multiple:
            raise ValueError(f"--height/--width must be multiples of {multiple} for the "
                             f"translator, got {config.height}x{config.width}")
    if config.torch and config.mixed_precision == "mixed_float16":
        raise ValueError("--torch: PyTorch's CPU autocast has no float16; use --mixed_precision "
                         "none or mixed_bfloat16")


# ---------------------------------------------------------------------------------------------
# Counting and timing.


CONV_BACKPROP_OPS = ("Conv2DBackpropInput", "Conv2DBackpropFilter")


def _live_ops(function: tf.types.experimental.ConcreteFunction) -> list[tf.Operation]:
    """The ops a call executes: those its outputs and side effects depend on.

    Gradients nobody consumes (e.g. the input gradient of the first convolution) stay in the
    traced graph but are pruned before it runs.
    """
    graph = function.graph
    pending = [t.op for t in function.outputs] + list(graph.control_outputs)
    live = {}
    while pending:
        op = pending.pop()
        if op.name in live:
            continue
        live[op.name] = op
        pending += [t.op for t in op.inputs] + list(op.control_inputs)
    return list(live.values())


def _conv_backprop_flops(op: tf.Operation) -> int:
    """2 x (gradient elements) x (kernel height x width x input channels): the forward work.

    TensorFlow's registry counts these ops from the convolution's input size, which is right
    only for 'SAME' padding; with explicit padding or dilation (space-to-batch) it counts up
    to k^2 times too much.
    """
    out_backprop = op.inputs[2].shape
    kernel = (op.inputs[1] if op.type == "Conv2DBackpropInput" else op.outputs[0]).shape
    if op.get_attr("data_format") != b"NHWC" or not (out_backprop.is_fully_defined()
                                                     and kernel.is_fully_defined()):
        raise ValueError(f"count_flops: {op.name} needs NHWC and static shapes")
    return 2 * out_backprop.num_elements() * kernel[0] * kernel[1] * kernel[2]


def _flops_per_op(function: tf.types.experimental.ConcreteFunction) -> dict[str, int]:
    """Counted FLOPs of every op a call executes, by op name (``count_flops``)."""
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    profile = tf.compat.v1.profiler.profile(graph=function.graph, options=options)
    registered = {}
    pending = list(profile.children)
    while pending:
        node = pending.pop()
        registered[node.name] = node.float_ops
        pending += node.children
    return {op.name: _conv_backprop_flops(op) if op.type in CONV_BACKPROP_OPS
            else registered.get(op.name, 0) for op in _live_ops(function)}


def count_flops(function: tf.types.experimental.ConcreteFunction) -> int:
    """Floating-point operations of one call, counted by TensorFlow's profiler on the graph.

    Counts the executed ops with registered FLOP statistics (convolutions, matmuls,
    element-wise arithmetic, reductions) as the graph runs them, e.g. dilated convolutions
    on their space-to-batch tensors. Convolution gradients are counted from their gradient
    tensor (``_conv_backprop_flops``). Ops inside nested functions (``tf.cond`` branches such
    as the guarded optimiser update) and resizes are not counted. Shapes must be static.
    """
    total = sum(_flops_per_op(function).values())
    if total <= 0:
        raise ValueError(f"count_flops: no countable operation in {function.name} (are all "
                         "input shapes static?)")
    return int(total)


# Ops that cost a call next to nothing: no kernel runs, or it returns a stored tensor.
BOOKKEEPING_OPS = frozenset({"Const", "NoOp", "Identity", "Placeholder"})
GRADIENT_SCOPE = "gradient_tape/"
OTHER_PART = "other (losses, optimisers)"


def step_breakdown(function: tf.types.experimental.ConcreteFunction,
                   parts: dict[str, str]) -> dict[str, dict]:
    """Counted GFLOP and executed ops of one call by network part and pass.

    ``parts`` maps the name of a model or layer to the label reported; the ops of its N-th
    call have the outermost name scope ``<name>_<N>`` (Keras' call scopes), and ops outside
    every part count as ``OTHER_PART``. A gradient's ops get the label of their forward op
    with " backward". ``ops`` leaves out ``BOOKKEEPING_OPS``. Time that FLOPs do not explain
    (many small ops at small sizes) shows up as ops per GFLOP.
    """
    flops = _flops_per_op(function)
    breakdown = {label + suffix: {"flops": 0, "ops": 0}
                 for label in (*parts.values(), OTHER_PART) for suffix in ("", " backward")}
    for op in _live_ops(function):
        name = op.name
        backward = name.startswith(GRADIENT_SCOPE)
        scope = name[len(GRADIENT_SCOPE):].split("/")[0] if backward else name.split("/")[0]
        called = re.sub(r"_\d+$", "", scope)
        label = parts.get(called, parts.get(scope, OTHER_PART)) + (" backward" if backward
                                                                  else "")
        breakdown[label]["flops"] += flops[op.name]
        breakdown[label]["ops"] += op.type not in BOOKKEEPING_OPS
    return {label: {"gflops": part["flops"] / 1e9, "ops": part["ops"]}
            for label, part in sorted(breakdown.items(), key=lambda item: -item[1]["flops"])
            if part["ops"]}


def model_parts(models: dict) -> dict[str, str]:
    """``step_breakdown``'s parts of the benchmarked models: M, F's four networks, D_S, D_T."""
    parts = {models["segmenter"].name: f"M ({models['segmenter'].name})"}
    if "translator" in models:
        translator = models["translator"]
        for domain in DOMAINS:
            parts[translator.encoder(domain).name] = f"F {translator.encoder(domain).name}"
            parts[translator.generator(domain).name] = f"F {translator.generator(domain).name}"
        for domain, discriminator in models["discriminators"].items():
            parts[discriminator.name] = f"D_{domain[0].upper()} ({discriminator.name})"
    return parts


def time_calls(functions: dict[str, Callable[[], object]], steps: int, warmup: int,
               rounds: int = 1, clock: Clock = time.perf_counter,
               stage: str = "benchmark") -> dict[str, list[float]]:
    """Seconds of each of ``steps`` calls of every function, after ``warmup`` untimed calls.

    With several functions the timed calls run in ``rounds`` blocks that alternate between
    the functions (A A B B A A B B; ``rounds=steps`` gives A B A B), so a change of machine
    load affects all of them alike.
    Results must be materialised by the functions themselves (e.g. ``.numpy()``).
    """
    for function in functions.values():
        for _ in range(warmup):
            function()
    times = {name: [] for name in functions}
    blocks = [steps // rounds + (i < steps % rounds) for i in range(rounds)]
    progress = Progress(stage, steps * len(functions))
    done = 0
    for block in blocks:
        for name, function in functions.items():
            for _ in range(block):
                start = clock()
                function()
                times[name].append(clock() - start)
                done += 1
                progress.update(done)
    return times


def matmul_call(size: int = 2048) -> tuple[Callable[[], np.ndarray], int]:
    """A float32 ``size`` x ``size`` matmul to time, and its counted FLOPs (2 size^3)."""
    generator = tf.random.Generator.from_seed(0)
    a = generator.uniform([size, size])
    b = generator.uniform([size, size])
    matmul = tf.function(lambda: tf.matmul(a, b)).get_concrete_function()
    return (lambda: matmul().numpy()), count_flops(matmul)


def measure_matmul_peak(size: int = 2048, repeats: int = 5,
                        clock: Clock = time.perf_counter) -> dict[str, float]:
    """The machine's float32 matmul peak: counted FLOPs, median seconds of ``repeats``, GFLOP/s."""
    matmul, flops = matmul_call(size)
    seconds = _median(time_calls({"matmul": matmul}, repeats, warmup=1, clock=clock,
                                 stage="benchmark/matmul")["matmul"])
    return {"flops": flops, "median_s": seconds, "gflops_per_s": flops / seconds / 1e9}


# ---------------------------------------------------------------------------------------------
# TensorFlow steps.


def _random_inputs(config: BenchmarkConfig) -> tuple[np.ndarray, np.ndarray]:
    """Float32 RGB [0, 255] images [B, H, W, 3] and int32 trainIds [B, H, W]."""
    rng = np.random.default_rng(0)
    shape = (config.batch, config.height, config.width)
    pixels = rng.uniform(0.0, 255.0, (*shape, 3)).astype(np.float32)
    train_ids = rng.integers(0, config.num_classes, shape).astype(np.int32)
    return pixels, train_ids


def _build_optimizers(optimizers: Iterable[tuple[keras.optimizers.Optimizer, list]]) -> None:
    """Creates the optimisers' slots and loss scales before tracing, as ``StageCheckpoint``."""
    for optimizer, variables in optimizers:
        if not optimizer.built:
            optimizer.build(variables)


def segmenter_train_step(segmenter: keras.Model, config: BenchmarkConfig
                         ) -> tf.types.experimental.ConcreteFunction:
    """The compiled step of M's trainer (``SegmentationStep``, the trainer's own step) on
    (images, labels) of the configured static shape: source-only cross-entropy (Eq. 8) with
    the architecture's optimiser recipe (DeepLabV2: SGD momentum, classifier at 10x; FCN8s:
    Adam), loss-scaled for float16 and applied through the step guard.
    """
    trainer = SegmentationStep(segmenter, 1_000_000, None, 1.0, 1.0, 0.0,
                               SEGMENTATION_OPTIMIZERS[config.arch], discriminator_optimizer)
    _build_optimizers(trainer.optimizers.values())

    def step(pixels: tf.Tensor, train_ids: tf.Tensor) -> tf.Tensor:
        return trainer.replica_step({"source": {"image": pixels, "label": train_ids}})["total"]

    return tf.function(step, autograph=False, jit_compile=config.jit_compile).get_concrete_function(
        tf.TensorSpec([config.batch, config.height, config.width, 3], tf.float32),
        tf.TensorSpec([config.batch, config.height, config.width], tf.int32))


def translator_train_step(segmenter: keras.Model, translator: keras.Model,
                          discriminators: dict[str, keras.Model], config: BenchmarkConfig
                          ) -> tf.types.experimental.ConcreteFunction:
    """The compiled step of F's trainer (``TranslationStep``) on source and target images.

    Adam (0.9, 0.99) with poly decay for F and for D_S + D_T, loss-scaled for float16, as in
    ``train.translation``; the learning rates do not change the work.
    """
    def optimizer(name: str, model: keras.Model, variables: list) -> keras.optimizers.Optimizer:
        return loss_scaled(adam(poly_schedule(1e-4, 1_000_000), 0.9, 0.99, name), model,
                           variables)

    d_variables = [v for d in DOMAINS for v in discriminators[d].trainable_variables]
    trainer = TranslationStep(segmenter, translator, discriminators,
                              optimizer("translator", translator, translator.trainable_variables),
                              optimizer("discriminators", discriminators["source"], d_variables),
                              TRANSLATION_WEIGHTS, use_sce=True)
    _build_optimizers(trainer.optimizers.values())
    spec = tf.TensorSpec([config.batch, config.height, config.width, 3], tf.float32)

    def step(source: tf.Tensor, target: tf.Tensor) -> dict[str, tf.Tensor]:
        return trainer.replica_step({"source": source, "target": target})

    return tf.function(step, autograph=False,
                       jit_compile=config.jit_compile).get_concrete_function(spec, spec)


def _build_models(config: BenchmarkConfig) -> dict[str, keras.Model]:
    """M, and for the translator F, D_S and D_T with every variable created."""
    models = {"segmenter": build_segmenter(config.arch, config.num_classes,
                                           **config.segmenter_knobs)}
    if config.model == "translator":
        translator = build_translator(num_classes=config.num_classes, **config.translator_knobs)
        translator.build()
        discriminators = {d: build_patch_discriminator(**config.discriminator_knobs)
                          for d in DOMAINS}
        x_unit = tf.zeros([1, config.height, config.width, 3])
        for discriminator in discriminators.values():
            discriminator(x_unit)
        models.update(translator=translator, discriminators=discriminators)
    return models


def _forward(models: dict, config: BenchmarkConfig, pixels: np.ndarray
             ) -> tuple[tf.types.experimental.ConcreteFunction, list[tf.Tensor]]:
    """The inference forward pass and its inputs: M(x), or F's x_{S->T} given M's logits."""
    segmenter = models["segmenter"]
    pixel_spec = tf.TensorSpec(pixels.shape, tf.float32)
    if config.model in SEGMENTERS:
        function = tf.function(lambda x: segmenter(x, training=False), autograph=False,
                               jit_compile=config.jit_compile)
        return function.get_concrete_function(pixel_spec), [tf.constant(pixels)]
    x_unit = images.pixels_to_unit(tf.constant(pixels))
    seg_logits = segmenter(tf.constant(pixels), training=False)
    translator = models["translator"]

    def translate(x: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
        return translator.translate(x, logits, "source", "target")

    function = tf.function(translate, autograph=False, jit_compile=config.jit_compile)
    concrete = function.get_concrete_function(tf.TensorSpec(x_unit.shape, tf.float32),
                                              tf.TensorSpec(seg_logits.shape, seg_logits.dtype))
    return concrete, [x_unit, seg_logits]


def _inference_functions(models: dict, config: BenchmarkConfig, work_dir: str
                         ) -> tuple[Callable, Callable]:
    """(SavedModel ``serving_default``, the same computation in process), uint8 in.

    Both take the exported signature (uint8 images of any size) and return the outputs at
    the input size, so they differ only in how the graph got there.
    """
    segmenter = models["segmenter"]
    translator = models.get("translator")
    written = export.export_models(segmenter, translator, export_base=work_dir)
    if translator is None:
        name = export.SEGMENTER_NAME

        def in_process(pixels: tf.Tensor) -> dict[str, tf.Tensor]:
            return export.segment_pixels(segmenter, pixels)
    else:
        name = export.TRANSLATOR_NAME

        def in_process(pixels: tf.Tensor) -> dict[str, tf.Tensor]:
            translated = translate_pixels(segmenter, translator, tf.cast(pixels, tf.float32))
            return {"translated": images.to_uint8(translated)}
    serving = tf.saved_model.load(written[name]).signatures["serving_default"]
    keras_call = tf.function(in_process, input_signature=[export.IMAGES_SPEC], autograph=False)
    return serving, keras_call


def measure_serving_throughput(serving: Callable, pixels: np.ndarray, config: BenchmarkConfig
                               ) -> dict[str, float]:
    """Images per second of the SavedModel signature at each of ``config.serving_batches``
    (the first image repeated), the batches alternating call by call: what batching requests
    (``sait_tf.serving.client`` sends folders in batches) buys over one image a call."""
    def serve(batch: tf.Tensor) -> dict[str, np.ndarray]:
        return {key: value.numpy() for key, value in serving(images=batch).items()}

    first = pixels[:1].astype(np.uint8)
    calls = {str(size): functools.partial(serve, tf.constant(np.repeat(first, size, axis=0)))
             for size in config.serving_batches}
    times = time_calls(calls, config.steps, config.warmup, rounds=config.steps,
                       stage="benchmark/serving_batches")
    return {size: int(size) / _median(seconds) for size, seconds in times.items()}


def measure_input_pipeline(config: BenchmarkConfig, work_dir: str,
                           clock: Clock = time.perf_counter) -> float:
    """Images per second of ``readers.make_dataset`` at the training size, without a model.

    The files are a synthetic GTA5-layout set ``PIPELINE_FILE_SCALE`` times the training
    size (palette label PNGs, decoded like GTA5's); each example is resized (bicubic) to
    ``PIPELINE_RESIZE_SCALE`` times the size, randomly cropped to it and flipped.
    """
    file_size = (round(config.height * PIPELINE_FILE_SCALE),
                 round(config.width * PIPELINE_FILE_SCALE))
    source_root, _ = synthetic.ensure_synthetic_pair(
        os.path.join(work_dir, "synthetic"), num_source=max(8, config.batch),
        num_target_train=0, num_target_val=0, size=file_size)
    dataset = readers.make_dataset(
        readers.list_examples("gta5", source_root),
        resize=(math.ceil(config.height * PIPELINE_RESIZE_SCALE),
                math.ceil(config.width * PIPELINE_RESIZE_SCALE)),
        crop=(config.height, config.width), flip=True, shuffle=True, repeat=True,
        batch_size=config.batch, seed=0)
    iterator = iter(dataset)
    for _ in range(config.warmup + 1):
        next(iterator)
    start = clock()
    for _ in range(config.pipeline_batches):
        batch = next(iterator)
    batch["image"].numpy()
    return config.pipeline_batches * config.batch / (clock() - start)


# ---------------------------------------------------------------------------------------------
# PyTorch.


def torch_train_step(config: BenchmarkConfig, pixels: np.ndarray, train_ids: np.ndarray,
                     threads: int) -> Callable[[], float]:
    """The same network's step in PyTorch: the same loss, optimiser recipe and frozen layers.

    DeepLabV2: BN frozen (statistics and affine, like ``FrozenBatchNorm``), SGD momentum 0.9,
    weight decay 5e-4, classifier (``layer5``) at 10x. FCN8s: dropout active, Adam (0.9, 0.99),
    biases at 2x, the bilinear up-sampling kernels not trained. The Caffe preprocessing runs
    inside the step, as in the Keras models.
    """
    try:
        import torch

        from sait_tf.tools import torch_reference as reference
    except ImportError as e:
        raise ImportError("--torch needs PyTorch: pip install torch==2.13.0") from e
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    knobs = config.segmenter_knobs
    if config.arch == "deeplabv2":
        model = reference.DeepLabV2(config.num_classes, **knobs).eval()
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.requires_grad_(False)
        classifier = list(model.layer5.parameters())
        base = [p for n, p in model.named_parameters()
                if p.requires_grad and not n.startswith("layer5.")]
        optimizer = torch.optim.SGD([{"params": base, "lr": 2.5e-4},
                                     {"params": classifier, "lr": 2.5e-3}],
                                    momentum=0.9, weight_decay=5e-4)
    else:
        model = reference.FCN8s(config.num_classes, **knobs).train()
        for name in ("upscore2", "upscore_pool4", "upscore8"):
            getattr(model, name).requires_grad_(False)
        trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(
            [{"params": [p for n, p in trained if not n.endswith(".bias")], "lr": 1e-5},
             {"params": [p for n, p in trained if n.endswith(".bias")], "lr": 2e-5}],
            betas=(0.9, 0.99), eps=1e-8)
    rgb = torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))
    target = torch.from_numpy(train_ids.astype(np.int64))
    mean = torch.tensor(images.CAFFE_BGR_MEAN, dtype=torch.float32).reshape(1, 3, 1, 1)
    autocast = config.mixed_precision == "mixed_bfloat16"

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(rgb.flip(1) - mean)
        logits = torch.nn.functional.interpolate(
            logits.float(), size=target.shape[1:], mode="bilinear", align_corners=True)
        loss = torch.nn.functional.cross_entropy(logits, target, ignore_index=labels.IGNORE_INDEX)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


# ---------------------------------------------------------------------------------------------
# The whole benchmark.


def tensorflow_threads() -> int:
    """Intra-op threads TensorFlow uses (its default, 0, means one per schedulable core)."""
    configured = tf.config.threading.get_intra_op_parallelism_threads()
    return configured or len(os.sched_getaffinity(0))


def machine_info() -> dict:
    """CPU model, cores, load average and library versions, to read a number by."""
    cpu_model = platform.processor() or "unknown"
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f
                     if line.startswith("model name")]
        cpu_model = names[0] if names else cpu_model
    return {
        "cpu_model": cpu_model,
        "cores": os.cpu_count(),
        "schedulable_cores": len(os.sched_getaffinity(0)),
        "tensorflow_threads": tensorflow_threads(),
        "tensorflow_version": tf.__version__,
        "keras_version": keras.__version__,
        "python_version": platform.python_version(),
        "load_average_1_5_15": list(os.getloadavg()),
        "simd_flags": simd_flags(cpu_flags()),
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "default"),
        "tensorflow_onednn": onednn_enabled(),
    }


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def device_peak_mb() -> float | None:
    """Peak memory of the first accelerator, when TensorFlow tracks one (None on CPU)."""
    for device in tf.config.list_logical_devices():
        if device.device_type in ("GPU", "TPU"):
            return tf.config.experimental.get_memory_info(device.name)["peak"] / 2**20
    return None


def run_benchmark(config: BenchmarkConfig, work_dir: str | None = None) -> dict:
    """Runs every measurement of ``config``; returns the result dict (see ``REQUIRED_KEYS``).

    Files (the export, the synthetic set) go to ``work_dir``, a temporary directory when None.
    The Keras dtype policy is set for the run and restored afterwards.
    """
    check_config(config)
    if work_dir is None:
        with tempfile.TemporaryDirectory(prefix="sait_benchmark_") as tmp:
            return run_benchmark(config, tmp)
    previous_policy = keras.mixed_precision.global_policy()
    distribute.set_precision(
        "float32" if config.mixed_precision == "none" else config.mixed_precision)
    try:
        return _run(config, work_dir)
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)


def _run(config: BenchmarkConfig, work_dir: str) -> dict:
    result = {"config": dataclasses.asdict(config), "machine": machine_info(),
              "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    pixels, train_ids = _random_inputs(config)
    models = _build_models(config)

    logging.info("benchmark: tracing the training step")
    started = time.perf_counter()
    if config.model in SEGMENTERS:
        train_step = segmenter_train_step(models["segmenter"], config)
        train_args = (tf.constant(pixels), tf.constant(train_ids))
    else:
        train_step = translator_train_step(models["segmenter"], models["translator"],
                                           models["discriminators"], config)
        target_pixels = np.ascontiguousarray(pixels[:, ::-1])
        train_args = (tf.constant(pixels), tf.constant(target_pixels))
    result["train_step_trace_s"] = time.perf_counter() - started
    result["train_step_gflops"] = count_flops(train_step) / 1e9
    result["train_step_breakdown"] = step_breakdown(train_step, model_parts(models))
    result["train_step_ops"] = sum(part["ops"] for part in result["train_step_breakdown"].values())

    steps = {"tensorflow": lambda: tf.nest.map_structure(lambda t: t.numpy(),
                                                         train_step(*train_args))}
    if config.torch:
        steps["torch"] = torch_train_step(config, pixels, train_ids, tensorflow_threads())
    warmup = config.warmup
    if warmup:
        # The first call optimises the graph (Grappler) before running it: timed on its own,
        # as the first of the warm-up calls of every framework.
        started = time.perf_counter()
        steps["tensorflow"]()
        result["train_step_first_call_s"] = time.perf_counter() - started
        if config.torch:
            steps["torch"]()
        warmup -= 1
    times = time_calls(steps, config.steps, warmup, rounds=config.steps,
                       stage="benchmark/train_step")
    result["train_step_s"] = _median(times["tensorflow"])
    result["train_step_times_s"] = times["tensorflow"]
    result["images_per_s"] = config.batch / result["train_step_s"]
    if config.torch:
        import torch

        result["torch_train_step_s"] = _median(times["torch"])
        result["torch_train_step_times_s"] = times["torch"]
        result["train_step_over_torch"] = result["train_step_s"] / result["torch_train_step_s"]
        result["machine"]["torch_version"] = torch.__version__
        result["machine"]["torch_threads"] = torch.get_num_threads()
    result["peak_rss_mb_after_train"] = peak_rss_mb()
    if config.train_only:
        matmul, matmul_flops = matmul_call(config.matmul_size)
        times = time_calls({"matmul": matmul}, config.steps, config.warmup,
                           rounds=config.steps, stage="benchmark/matmul")
        result["matmul_peak_gflops_per_s"] = matmul_flops / _median(times["matmul"]) / 1e9
        _add_train_rates(result)
        return _finish(result)

    # The forward pass and the matmul alternate call by call, so that both see the same load.
    forward, forward_args = _forward(models, config, pixels)
    result["forward_gflops"] = count_flops(forward) / 1e9
    matmul, matmul_flops = matmul_call(config.matmul_size)
    times = time_calls({"forward": lambda: forward(*forward_args).numpy(), "matmul": matmul},
                       config.steps, config.warmup, rounds=config.steps,
                       stage="benchmark/forward_and_matmul")
    result["forward_s"] = _median(times["forward"])
    result["matmul_peak_gflops_per_s"] = matmul_flops / _median(times["matmul"]) / 1e9
    result["achieved_gflops_per_s"] = result["forward_gflops"] / result["forward_s"]
    result["fraction_of_matmul_peak"] = (result["achieved_gflops_per_s"]
                                         / result["matmul_peak_gflops_per_s"])
    _add_train_rates(result)

    logging.info("benchmark: exporting the SavedModel")
    serving, keras_call = _inference_functions(models, config, os.path.join(work_dir, "export"))
    uint8_pixels = tf.constant(pixels.astype(np.uint8))
    inference = time_calls(
        {"saved_model": lambda: {k: v.numpy() for k, v in serving(images=uint8_pixels).items()},
         "keras": lambda: {k: v.numpy() for k, v in keras_call(uint8_pixels).items()}},
        config.steps, config.warmup, rounds=config.steps, stage="benchmark/inference")
    result["inference_saved_model_s"] = _median(inference["saved_model"])
    result["inference_keras_s"] = _median(inference["keras"])
    result["saved_model_over_keras"] = (result["inference_saved_model_s"]
                                        / result["inference_keras_s"])
    result["serving_images_per_s_by_batch"] = measure_serving_throughput(serving, pixels, config)

    logging.info("benchmark: input pipeline")
    result["input_pipeline_images_per_s"] = measure_input_pipeline(config, work_dir)
    result["input_pipeline_over_train"] = (result["input_pipeline_images_per_s"]
                                           / result["images_per_s"])
    return _finish(result)


def _add_train_rates(result: dict) -> None:
    """The training step's counted GFLOP/s and its fraction of the measured matmul rate."""
    result["train_achieved_gflops_per_s"] = result["train_step_gflops"] / result["train_step_s"]
    result["train_fraction_of_matmul_peak"] = (result["train_achieved_gflops_per_s"]
                                               / result["matmul_peak_gflops_per_s"])


def _finish(result: dict) -> dict:
    """Adds what is read at the end of every run: peak memory and the load average."""
    result["peak_rss_mb"] = peak_rss_mb()
    result["device_peak_mb"] = device_peak_mb()
    result["machine"]["load_average_1_5_15_end"] = list(os.getloadavg())
    return result


# ---------------------------------------------------------------------------------------------
# Command line.

FLAGS = flags.FLAGS


def _define_flags() -> None:
    flags.DEFINE_enum("model", None, list(MODELS), "Network to benchmark.")
    flags.DEFINE_integer("height", None, "Input height in pixels.")
    flags.DEFINE_integer("width", None, "Input width in pixels.")
    flags.DEFINE_integer("batch", 1, "Images per step.")
    flags.DEFINE_integer("steps", 5, "Timed calls of each measurement (the median is reported).")
    flags.DEFINE_integer("warmup", 2, "Untimed calls before timing (tracing, allocation).")
    flags.DEFINE_string("json", None, "Also write the result to this JSON file.")
    flags.DEFINE_bool("torch", False, "Also time the same network's step in PyTorch.")
    flags.DEFINE_bool("jit_compile", False, "Compile the step and forward pass with XLA.")
    flags.DEFINE_enum("mixed_precision", "none", list(PRECISIONS), "Keras dtype policy.")
    flags.DEFINE_integer("threads", 0, "Intra-op threads for TensorFlow and PyTorch "
                         "(0: TensorFlow's default, one per core).")
    flags.DEFINE_enum("segmenter", "deeplabv2", list(SEGMENTERS),
                      "M inside the translator benchmark.")
    flags.DEFINE_list("blocks", None, "DeepLabV2 bottlenecks per layer, e.g. 3,4,23,3.")
    flags.DEFINE_float("width_multiplier", None, "Segmenter width multiplier.")
    flags.DEFINE_integer("translator_dim", None, "Translator base width (paper: 64).")
    flags.DEFINE_integer("num_residual_blocks", None, "Translator residual blocks (paper: 4).")
    flags.DEFINE_integer("spade_hidden", None, "SPADE hidden width (paper: 128).")
    flags.DEFINE_integer("num_downsamplings", None, "Translator down-samplings (paper: 2).")
    flags.DEFINE_integer("discriminator_dim", None, "Patch discriminator base width (64).")
    flags.DEFINE_integer("discriminator_layers", None, "Patch discriminator layers (4).")
    flags.DEFINE_integer("discriminator_scales", None, "Patch discriminator scales (3).")
    flags.DEFINE_integer("matmul_size", 2048, "Side of the square matmul of the peak.")
    flags.DEFINE_integer("pipeline_batches", 20, "Timed batches of the input pipeline.")
    flags.DEFINE_list("serving_batches", ["1", "4", "16"],
                      "Batch sizes at which the SavedModel's images per second are measured.")
    flags.DEFINE_bool("train_only", False, "Measure only the training step (time, FLOPs, "
                      "memory) against the matmul rate: no forward pass, export or pipeline.")
    flags.mark_flags_as_required(["model", "height", "width"])


def _given(**values) -> dict:
    return {name: value for name, value in values.items() if value is not None}


def config_from_flags() -> BenchmarkConfig:
    """The ``BenchmarkConfig`` the command line asks for."""
    blocks = None if FLAGS.blocks is None else tuple(int(b) for b in FLAGS.blocks)
    segmenter_arch = FLAGS.model if FLAGS.model in SEGMENTERS else FLAGS.segmenter
    segmenter_knobs = _given(width_multiplier=FLAGS.width_multiplier)
    if blocks is not None:
        if segmenter_arch != "deeplabv2":
            raise ValueError("--blocks applies to deeplabv2 only")
        segmenter_knobs["blocks"] = blocks
    return BenchmarkConfig(
        model=FLAGS.model, height=FLAGS.height, width=FLAGS.width, batch=FLAGS.batch,
        steps=FLAGS.steps, warmup=FLAGS.warmup, jit_compile=FLAGS.jit_compile,
        mixed_precision=FLAGS.mixed_precision, torch=FLAGS.torch,
        segmenter_arch=FLAGS.segmenter, segmenter_knobs=segmenter_knobs,
        translator_knobs=_given(dim=FLAGS.translator_dim,
                                num_residual_blocks=FLAGS.num_residual_blocks,
                                spade_hidden=FLAGS.spade_hidden,
                                num_downsamplings=FLAGS.num_downsamplings),
        discriminator_knobs=_given(dim=FLAGS.discriminator_dim,
                                   num_layers=FLAGS.discriminator_layers,
                                   num_scales=FLAGS.discriminator_scales),
        matmul_size=FLAGS.matmul_size, pipeline_batches=FLAGS.pipeline_batches,
        serving_batches=tuple(int(size) for size in FLAGS.serving_batches),
        train_only=FLAGS.train_only)


def main(argv: list[str]) -> None:
    del argv
    if FLAGS.threads:
        tf.config.threading.set_intra_op_parallelism_threads(FLAGS.threads)
        tf.config.threading.set_inter_op_parallelism_threads(FLAGS.threads)
    config = config_from_flags()
    check_config(config)
    result = run_benchmark(config)
    result["command"] = "python -m sait_tf.tools.benchmark " + shlex.join(sys.argv[1:])
    if FLAGS.json:
        files.write_json_atomically(FLAGS.json, result)
    summary = {key: result[key] for key in (*REQUIRED_KEYS, "peak_rss_mb_after_train",
                                            "torch_train_step_s", "train_step_over_torch",
                                            "train_step_trace_s", "train_step_first_call_s",
                                            "train_step_ops") if key in result}
    print(json.dumps(summary, indent=1))
    print(format_breakdown(result["train_step_breakdown"]))


def format_breakdown(breakdown: dict[str, dict]) -> str:
    """``step_breakdown`` as a table: part, GFLOP, share of the FLOPs, executed ops."""
    total = sum(part["gflops"] for part in breakdown.values()) or 1.0
    lines = [f"{'part of the training step':48s} {'GFLOP':>9s} {'share':>6s} {'ops':>6s}"]
    lines += [f"{name:48s} {part['gflops']:9.2f} {part['gflops'] / total:6.1%} {part['ops']:6d}"
              for name, part in breakdown.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    cli.run(main, _define_flags)
