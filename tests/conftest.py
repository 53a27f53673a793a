"""Shared test setup: quiet TensorFlow, small thread pools, a deterministic seed."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

# sait_tf before TensorFlow: it sets the log level, which TensorFlow reads once, at import.
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


# The longest test files (slow tests included), longest first: the first eight took 110-240 s
# each in the full run of docs/PERFORMANCE.md ("Tests"), the rest under 70 s. README's command
# hands whole files to the pytest-xdist workers in collection order, so these start first and
# the short files fill in around them. pytest-xdist would otherwise reorder the files by their
# number of tests, and these few-test files would start last.
LONGEST_FILES_FIRST = (
    "test_translation_trainer.py",
    "test_multiworker_shared_dir.py",
    "test_mirrored_pipeline.py",
    "test_resume_equality.py",
    "test_crash_resume.py",
    "test_reliability.py",
    "test_multiworker_local_dirs.py",
    "test_train_main.py",
    "test_paper_scale.py",
    "test_bad_input.py",
)


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    rank = {name: index for index, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


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


@pytest.fixture(scope="session")
def tiny_run_config(tmp_path_factory) -> str:
    """The distributed whole-pipeline tests' gin file (tests/multiworker_runs.py)."""
    from multiworker_runs import shared_config

    return shared_config(tmp_path_factory)


@pytest.fixture(scope="session")
def one_process_run(tiny_run_config, tmp_path_factory) -> str:
    """That run by one process on one device, made once per session for all their files."""
    from multiworker_runs import shared_reference

    return shared_reference(tiny_run_config, tmp_path_factory)
