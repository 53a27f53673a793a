"""The speed benchmark: its FLOP counter, its timing arithmetic and a tiny complete run."""

import itertools
import json
import math
import os

import keras
import pytest
import tensorflow as tf

from sait_tf.runtime import files, machine
from sait_tf.tools import benchmark

TINY_DEEPLAB = {"blocks": (1, 1, 1, 1), "width_multiplier": 0.125}


def fake_clock(tick: float):
    """A clock that advances ``tick`` seconds every time it is read."""
    return itertools.count(start=0.0, step=tick).__next__


def test_count_flops_of_one_convolution_is_the_hand_count():
    batch, height, width, c_in, c_out, k = 2, 12, 20, 3, 8, 5
    model = keras.Sequential([keras.Input((height, width, c_in), batch_size=batch),
                              keras.layers.Conv2D(c_out, k, padding="same", use_bias=False)])
    forward = tf.function(lambda x: model(x)).get_concrete_function(
        tf.TensorSpec([batch, height, width, c_in]))
    assert benchmark.count_flops(forward) == 2 * batch * height * width * c_in * c_out * k * k


def test_count_flops_counts_executed_convolution_gradients_by_their_output():
    # A 'valid' 3x3 convolution of 10x12 images has 8x10 outputs: each gradient costs what the
    # forward pass does, F. TensorFlow's own registry would count the gradients from the
    # 10x12 input (1.5 F each).
    kernel = tf.Variable(tf.ones([3, 3, 4, 5]))
    spec = tf.TensorSpec([2, 10, 12, 4])
    forward_flops = 2 * 2 * 8 * 10 * 4 * 5 * 3 * 3

    def gradients(x, wrt_input):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.nn.conv2d(x, kernel, 1, "VALID"))
        return tape.gradient(loss, [x, kernel] if wrt_input else [kernel])

    kernel_only = tf.function(lambda x: gradients(x, False)).get_concrete_function(spec)
    both = tf.function(lambda x: gradients(x, True)).get_concrete_function(spec)
    # The gradient of a sum does not need the forward output, and an input gradient nobody
    # asks for is pruned: only the executed convolutions count.
    assert benchmark.count_flops(kernel_only) == forward_flops
    assert benchmark.count_flops(both) == 2 * forward_flops


def test_step_breakdown_splits_flops_and_ops_by_layer_and_pass():
    batch, height, width, k = 2, 8, 10, 3
    alpha = keras.layers.Conv2D(4, k, padding="same", use_bias=False, name="alpha")
    beta = keras.layers.Conv2D(5, k, padding="same", use_bias=False, name="beta")
    x = tf.zeros([batch, height, width, 3])
    beta(alpha(x))

    def step(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(beta(alpha(x)))
        return loss, tape.gradient(loss, alpha.trainable_variables + beta.trainable_variables)

    function = tf.function(step).get_concrete_function(tf.TensorSpec(x.shape))
    breakdown = benchmark.step_breakdown(function, {"alpha": "A", "beta": "B"})
    alpha_flops = 2 * batch * height * width * 3 * 4 * k * k / 1e9
    beta_flops = 2 * batch * height * width * 4 * 5 * k * k / 1e9
    assert breakdown["A"]["gflops"] == pytest.approx(alpha_flops)
    assert breakdown["B"]["gflops"] == pytest.approx(beta_flops)
    # alpha's input gradient is never used (pruned); beta's reaches alpha.
    assert breakdown["A backward"]["gflops"] == pytest.approx(alpha_flops)
    assert breakdown["B backward"]["gflops"] == pytest.approx(2 * beta_flops)
    assert sum(part["gflops"] for part in breakdown.values()) == pytest.approx(
        benchmark.count_flops(function) / 1e9)
    assert breakdown["A"]["ops"] >= 1 and breakdown["B backward"]["ops"] >= 2


def test_matmul_peak_is_counted_flops_over_median_time():
    size = 64
    peak = benchmark.measure_matmul_peak(size, repeats=3, clock=fake_clock(0.25))
    assert peak["flops"] == 2 * size**3
    assert peak["median_s"] == pytest.approx(0.25)
    assert peak["gflops_per_s"] == pytest.approx(2 * size**3 / 0.25 / 1e9)


def test_time_calls_alternates_blocks_after_warmup():
    calls = []
    functions = {name: (lambda name=name: calls.append(name)) for name in "ab"}
    times = benchmark.time_calls(functions, steps=5, warmup=1, rounds=2, clock=fake_clock(0.5))
    assert "".join(calls) == "a" "b" "aaa" "bbb" "aa" "bb"
    assert times == {"a": [0.5] * 5, "b": [0.5] * 5}


@pytest.mark.parametrize("changes, parameter", [
    ({"model": "translator", "torch": True}, "--torch"),
    ({"model": "translator", "height": 30}, "--height/--width"),
    ({"mixed_precision": "float16"}, "--mixed_precision"),
    ({"steps": 0}, "--steps"),
    ({"serving_batches": (4, 0)}, "--serving_batches"),
])
def test_check_config_names_the_bad_parameter(changes, parameter):
    config = benchmark.BenchmarkConfig(**{"model": "deeplabv2", "height": 32, "width": 64,
                                          **changes})
    with pytest.raises(ValueError, match=parameter):
        benchmark.check_config(config)


@pytest.mark.slow
def test_tiny_deeplabv2_run_reports_every_number(tmp_path):
    pytest.importorskip("torch")
    config = benchmark.BenchmarkConfig(
        model="deeplabv2", height=32, width=64, batch=2, steps=3, warmup=1, torch=True,
        segmenter_knobs=TINY_DEEPLAB, matmul_size=256, pipeline_batches=3,
        serving_batches=(1, 3))
    result = benchmark.run_benchmark(config, str(tmp_path))
    files.write_json_atomically(str(tmp_path / "r.json"), result)
    with open(tmp_path / "r.json") as f:
        result = json.load(f)
    for key in (*benchmark.REQUIRED_KEYS, "torch_train_step_s", "train_step_over_torch"):
        assert math.isfinite(result[key]) and result[key] > 0, key
    assert result["images_per_s"] == pytest.approx(2 / result["train_step_s"])
    assert result["saved_model_over_keras"] == pytest.approx(
        result["inference_saved_model_s"] / result["inference_keras_s"])
    assert result["fraction_of_matmul_peak"] == pytest.approx(
        result["forward_gflops"] / result["forward_s"] / result["matmul_peak_gflops_per_s"])
    # Backward = two forward-sized convolutions per layer (minus the first layer's input
    # gradient), plus element-wise work: the step counts close to 3 forward passes.
    assert 2.7 < result["train_step_gflops"] / result["forward_gflops"] < 3.2
    assert sorted(result["serving_images_per_s_by_batch"]) == ["1", "3"]
    assert all(math.isfinite(rate) and rate > 0
               for rate in result["serving_images_per_s_by_batch"].values())
    assert result["machine"]["tensorflow_version"] == tf.__version__
    assert set(result["machine"]["simd_flags"]) <= set(machine.cpu_flags())
    assert result["machine"]["onednn_max_cpu_isa"] == os.environ.get("ONEDNN_MAX_CPU_ISA",
                                                                     "default")
    assert keras.mixed_precision.global_policy().name == "float32"


@pytest.mark.slow
def test_train_only_translator_run_reports_the_step_against_the_matmul_rate(tmp_path):
    config = benchmark.BenchmarkConfig(
        model="translator", height=32, width=32, steps=2, warmup=1,
        segmenter_knobs=TINY_DEEPLAB,
        translator_knobs={"dim": 4, "num_residual_blocks": 1, "spade_hidden": 4,
                          "num_downsamplings": 1},
        discriminator_knobs={"dim": 4, "num_layers": 2, "num_scales": 1},
        matmul_size=256, train_only=True)
    result = benchmark.run_benchmark(config, str(tmp_path))
    for key in benchmark.TRAIN_ONLY_KEYS:
        assert math.isfinite(result[key]) and result[key] > 0, key
    assert result["train_fraction_of_matmul_peak"] == pytest.approx(
        result["train_step_gflops"] / result["train_step_s"]
        / result["matmul_peak_gflops_per_s"])
    assert not {"forward_s", "inference_saved_model_s", "input_pipeline_images_per_s"} & set(result)
    breakdown = result["train_step_breakdown"]
    assert sum(part["gflops"] for part in breakdown.values()) == pytest.approx(
        result["train_step_gflops"])
    assert sum(part["ops"] for part in breakdown.values()) == result["train_step_ops"]
    # D_S's first call has the scope of D_T's name ("..._1"): the two must still split evenly.
    discriminators = sorted(label for label in breakdown if label.startswith("D_"))
    assert len(discriminators) == 4
    assert breakdown[discriminators[0]] == breakdown[discriminators[2]]
    assert breakdown[discriminators[1]] == breakdown[discriminators[3]]
    for network in ("source_encoder", "target_encoder", "source_generator", "target_generator"):
        assert breakdown[f"F {network} backward"]["gflops"] > 0, network
    # L_SCE's gradient reaches F through M.
    assert breakdown["M (deeplabv2) backward"]["gflops"] > 0
    assert result["train_step_trace_s"] > 0 and result["train_step_first_call_s"] > 0
