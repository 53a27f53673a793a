"""Shared test setup: quiet TensorFlow, small thread pools, a deterministic seed."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

# sait_tf before TensorFlow: it turns on oneDNN, which TensorFlow reads once, at import.
import sait_tf  # noqa: E402, F401

# isort: split
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

# Two logical CPUs, so tf.distribute tests can compare MirroredStrategy with one device.
# This must happen before TensorFlow initialises its devices, i.e. before any test runs.
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0],
    [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])


@pytest.fixture(autouse=True)
def _seed():
    import keras

    keras.utils.set_random_seed(0)
    np.random.seed(0)
    yield


@pytest.fixture(scope="module")
def skip_grappler():
    """For modules of tiny training steps, whose graphs Grappler rewrites for longer than the
    steps run (``pytestmark = pytest.mark.usefixtures("skip_grappler")``); restored after."""
    previous = tf.config.optimizer.get_experimental_options().get("disable_meta_optimizer", False)
    tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})
    yield
    tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": previous})


@pytest.fixture
def one_torch_thread():
    """PyTorch on one thread while a parity test runs (its sums then have one fixed order)."""
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
