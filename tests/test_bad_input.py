"""Bad input stops `python -m sait_tf.train` before its first training step.

Each case runs the real command on a tiny synthetic pair that one defect spoils and checks
the contract of issue 8: exit code != 0, the last line of stderr is a one-line error naming
the culprit (file, parameter or value), no traceback, no training step, no checkpoint
written, and only seconds of CPU spent. The commands are independent, so they run two at a
time; most of each is TensorFlow's import. One case differs: a PNG corrupt inside, which
only a full decode finds, stops training when it is read and is named then.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import threading

import numpy as np
import pytest
from PIL import Image
from train_configs import REPO, SOURCE_ONLY_RUN, write_demo_config

from sait_tf import labels
from sait_tf.data.synthetic import generate_pair

# One real training command per defect (run with -m 'slow or not slow').
pytestmark = pytest.mark.slow

SIZE = (16, 32)
TINY_DEEPLAB = {"blocks": (1, 1, 1, 1), "width_multiplier": 0.125}
# A failing start-up imports TensorFlow and reads a few file headers: about 5-10 s of CPU
# (user + system) here. CPU time, unlike wall time, hardly depends on the machine's load.
MAX_CPU_SECONDS = 30.0
TIMEOUT_S = 600
SOURCE_IMAGE = "source/images/00002.png"
SOURCE_LABEL = "source/labels/00002.png"
VAL_IMAGE = "target/leftImg8bit/val/renderdorf/renderdorf_000000_000019_leftImg8bit.png"
VAL_LABEL = "target/gtFine/val/renderdorf/renderdorf_000000_000019_gtFine_labelIds.png"


@dataclasses.dataclass
class Launch:
    """One command to run and what its error line must name."""

    args: list[str]
    culprits: tuple[str, ...]
    run_dir: str = ""
    returncode: int | None = None
    stderr: str = ""
    cpu_seconds: float = 0.0
    checkpoints_before: dict[str, float] = dataclasses.field(default_factory=dict)


def _config(case_dir: str, pair: str, *extra: str) -> str:
    """demo.gin on ``pair``: one source-only step, no oracle, no rounds, no export; the
    ``extra`` lines from line 12 on."""
    blocks, width = TINY_DEEPLAB["blocks"], TINY_DEEPLAB["width_multiplier"]
    return write_demo_config(os.path.join(case_dir, "tiny.gin"), pair, *SOURCE_ONLY_RUN,
                             "run_pipeline.source_only_steps = 1",
                             f"build_segmenter.blocks = {blocks}",
                             f"build_segmenter.width_multiplier = {width}", *extra)


def _train(case_dir: str, pair: str, culprits: tuple[str, ...], *params: str,
           extra_config: tuple[str, ...] = (), run_dir: str | None = None) -> Launch:
    run_dir = run_dir or os.path.join(case_dir, "run")
    args = ["-m", "sait_tf.train", f"--gin_file={_config(case_dir, pair, *extra_config)}",
            f"--run_dir={run_dir}", *(f"--gin_param={p}" for p in params)]
    return Launch(args, culprits, run_dir)


def _checkpoint_files(run_dir: str) -> dict[str, float]:
    """Path -> modification time of every file under RUN_DIR/checkpoints."""
    found = {}
    for folder, _, files in os.walk(os.path.join(run_dir, "checkpoints")):
        for name in files:
            path = os.path.join(folder, name)
            found[path] = os.path.getmtime(path)
    return found


def _write_palette_label(path: str, label_ids: np.ndarray) -> None:
    image = Image.fromarray(label_ids.astype(np.uint8), mode="P")
    image.putpalette(labels.LABEL_ID_PALETTE.reshape(-1).tolist())
    image.save(path)


def _tiny_segmenter(arch: str, num_classes: int, **knobs):
    from sait_tf.models import build_segmenter

    model = build_segmenter(arch, num_classes, **knobs)
    model(np.zeros((1, *SIZE, 3), np.float32))
    return model


def _missing_dataset_root(case_dir, pair):
    missing = os.path.join(pair, "no_such_dir")
    return _train(case_dir, pair, (missing,), f"SOURCE_ROOT='{missing}'")


def _empty_split(case_dir, pair):
    split = os.path.join(pair, "target", "leftImg8bit", "val")
    shutil.rmtree(split)
    os.makedirs(split)
    return _train(case_dir, pair, (split, "no Cityscapes images"))


def _image_without_label(case_dir, pair):
    os.remove(os.path.join(pair, SOURCE_LABEL))
    return _train(case_dir, pair, (os.path.join(pair, SOURCE_IMAGE), "has no label"))


def _label_without_image(case_dir, pair):
    os.remove(os.path.join(pair, SOURCE_IMAGE))
    return _train(case_dir, pair, (os.path.join(pair, SOURCE_LABEL), "has no image"))


def _image_label_size_mismatch(case_dir, pair):
    _write_palette_label(os.path.join(pair, SOURCE_LABEL), np.full((8, 16), 7))
    return _train(case_dir, pair, (os.path.join(pair, SOURCE_IMAGE), "16x32",
                                   os.path.join(pair, SOURCE_LABEL), "8x16"))


def _truncated_png(case_dir, pair):
    path = os.path.join(pair, SOURCE_IMAGE)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    return _train(case_dir, pair, (path, "truncated PNG"))


def _non_image_with_png_name(case_dir, pair):
    path = os.path.join(pair, VAL_IMAGE)
    with open(path, "w") as f:
        f.write("<html>404 Not Found</html>\n")
    return _train(case_dir, pair, (path, "not a PNG or JPEG"))


def _label_values_outside_the_mapping(case_dir, pair):
    path = os.path.join(pair, VAL_LABEL)
    raw = np.asarray(Image.open(path)).copy()
    raw[0, 0] = 40  # Cityscapes labelIds end at 33 (and 255, the licence plate)
    Image.fromarray(raw, mode="L").save(path)
    return _train(case_dir, pair, (path, "values [40] are not cityscapes label values"))


def _png_corrupt_in_its_middle(case_dir, pair):
    """Header and end intact, so only decoding finds it; the start-up scan decodes a sample
    that misses this file, and training stops on it: the pipeline then names it."""
    from sait_tf.data import readers, scan

    shutil.rmtree(pair)
    generate_pair(pair, num_source=40, num_target_train=2, num_target_val=2, size=SIZE)
    examples = readers.list_examples("gta5", os.path.join(pair, "source"))
    not_decoded = sorted(set(range(40)) - set(scan._sample(40, None)))
    path = examples[not_decoded[0]].image
    with open(path, "rb") as f:
        data = bytearray(f.read())
    middle = len(data) // 2
    data[middle:middle + 16] = b"\xff" * 16
    with open(path, "wb") as f:
        f.write(bytes(data))
    return _train(case_dir, pair, (path, "cannot be decoded", "Invalid PNG data"),
                  "run_pipeline.source_only_steps = 80")


def _gin_parameter_typo(case_dir, pair):
    return _train(case_dir, pair, ("run_pipeline", "source_only_step"),
                  "run_pipeline.source_only_step = 1")


def _gin_configurable_typo_in_a_file(case_dir, pair):
    return _train(case_dir, pair, ("run_pipelin", "tiny.gin", "line 12"),
                  extra_config=("run_pipelin.max_rounds = 0",))


def _unknown_architecture(case_dir, pair):
    return _train(case_dir, pair, ("unknown arch 'deeplabv3'",), "ARCH = 'deeplabv3'")


def _init_weights_of_another_architecture(case_dir, pair):
    weights = os.path.join(case_dir, "fcn8s.weights.h5")
    _tiny_segmenter("fcn8s", labels.NUM_CLASSES, width_multiplier=0.0625).save_weights(weights)
    return _train(case_dir, pair, (weights, "does not fit"),
                  f"run_pipeline.init_weights = '{weights}'")


def _init_weights_of_another_class_count(case_dir, pair):
    weights = os.path.join(case_dir, "deeplabv2_5_classes.weights.h5")
    _tiny_segmenter("deeplabv2", 5, **TINY_DEEPLAB).save_weights(weights)
    return _train(case_dir, pair, (weights, "does not fit", "19 classes", "conv_d6"),
                  f"run_pipeline.init_weights = '{weights}'")


def _run_checkpoint_of_another_class_count(case_dir, pair):
    """A run directory whose finished source-only stage has 19 classes, resumed with 5."""
    from sait_tf.runtime import checkpoints, files

    stage_dir = os.path.join(case_dir, "run", "checkpoints", "source_only")
    segmenter = _tiny_segmenter("deeplabv2", labels.NUM_CLASSES, **TINY_DEEPLAB)
    checkpoints.StageCheckpoint(stage_dir, segmenter=segmenter).save(1)
    files.mark_done(stage_dir)
    launch = _train(case_dir, pair, (os.path.join(stage_dir, "ckpt-1"), "does not fit",
                                     "another architecture, class count"),
                    "build_segmenter.num_classes = 5")
    launch.checkpoints_before = _checkpoint_files(launch.run_dir)
    return launch


def _run_dir_under_a_regular_file(case_dir, pair):
    """Works as root too, where a read-only mode does not stop writes."""
    blocker = os.path.join(case_dir, "not_a_dir")
    with open(blocker, "w") as f:
        f.write("a file where the run directory's parent should be\n")
    run_dir = os.path.join(blocker, "run")
    return _train(case_dir, pair, (run_dir, "not a writable directory"), run_dir=run_dir)


def _run_dir_in_a_read_only_directory(case_dir, pair):
    parent = os.path.join(case_dir, "read_only")
    os.makedirs(parent)
    os.chmod(parent, 0o500)
    run_dir = os.path.join(parent, "run")
    return _train(case_dir, pair, (run_dir, "not a writable directory"), run_dir=run_dir)


def _converter_input_with_the_wrong_keys(case_dir, pair):
    import torch

    checkpoint = os.path.join(case_dir, "resnet50_classifier.pth")
    torch.save({"fc.weight": torch.zeros(10, 2048), "fc.bias": torch.zeros(10)}, checkpoint)
    output = os.path.join(case_dir, "out.weights.h5")
    return Launch(["-m", "sait_tf.tools.convert_torch", "--arch=deeplabv2", "--blocks=1,1,1,1",
                   "--width_multiplier=0.125", f"--input={checkpoint}", f"--output={output}"],
                  (checkpoint, "does not fit deeplabv2 with 19 classes"), run_dir=output)


CASES = {fn.__name__.lstrip("_"): fn for fn in (
    _missing_dataset_root, _empty_split, _image_without_label, _label_without_image,
    _image_label_size_mismatch, _truncated_png, _non_image_with_png_name,
    _label_values_outside_the_mapping, _png_corrupt_in_its_middle, _gin_parameter_typo,
    _gin_configurable_typo_in_a_file, _unknown_architecture, _init_weights_of_another_architecture,
    _init_weights_of_another_class_count, _run_checkpoint_of_another_class_count,
    _run_dir_under_a_regular_file, _run_dir_in_a_read_only_directory,
    _converter_input_with_the_wrong_keys)}


def _skip_reason(case: str) -> str | None:
    if case == "run_dir_in_a_read_only_directory" and os.geteuid() == 0:
        return ("root writes into read-only directories; run_dir_under_a_regular_file covers "
                "the check")
    if case == "converter_input_with_the_wrong_keys":
        try:
            import torch  # noqa: F401
        except ImportError:
            return "torch is not installed"
    return None


def _run(launch: Launch) -> Launch:
    """Runs the command; records its exit code, stderr and CPU time (from ``os.wait4``)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
    with tempfile.TemporaryFile("w+") as stderr:
        process = subprocess.Popen([sys.executable, *launch.args], env=env,
                                   stdout=subprocess.DEVNULL, stderr=stderr)
        watchdog = threading.Timer(TIMEOUT_S, process.kill)
        watchdog.start()
        _, status, usage = os.wait4(process.pid, 0)
        watchdog.cancel()
        process.returncode = launch.returncode = os.waitstatus_to_exitcode(status)
        stderr.seek(0)
        launch.stderr = stderr.read()
    launch.cpu_seconds = usage.ru_utime + usage.ru_stime
    return launch


@pytest.fixture(scope="module")
def launches(tmp_path_factory) -> dict[str, Launch]:
    """Every case prepared in its own folder, then run two at a time."""
    clean = str(tmp_path_factory.mktemp("clean") / "pair")
    generate_pair(clean, num_source=3, num_target_train=2, num_target_val=2, size=SIZE)
    prepared = {}
    for case, prepare in CASES.items():
        if _skip_reason(case):
            continue
        case_dir = str(tmp_path_factory.mktemp(case))
        pair = os.path.join(case_dir, "pair")
        shutil.copytree(clean, pair)
        prepared[case] = prepare(case_dir, pair)
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(prepared, pool.map(_run, prepared.values()), strict=True))


@pytest.mark.parametrize("case", list(CASES))
def test_fails_fast_naming_the_culprit(case, launches):
    if _skip_reason(case):
        pytest.skip(_skip_reason(case))
    launch = launches[case]
    stderr = launch.stderr
    assert launch.returncode != 0, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    error = [line for line in stderr.splitlines() if line.strip()][-1]
    if case == "converter_input_with_the_wrong_keys":
        # The first line names the file; the lines after list every difference.
        error = stderr[stderr.rindex("convert_torch: "):].splitlines()[0]
    for culprit in launch.culprits:
        assert culprit in error, f"{culprit!r} is not in the error line {error!r}"
    if case == "converter_input_with_the_wrong_keys":
        assert "unexpected keys (2):\n  fc.weight (10, 2048)\n  fc.bias (10,)" in stderr
        assert "missing keys" in stderr and "conv1.weight (8, 3, 7, 7)" in stderr
        assert not os.path.exists(launch.run_dir)  # no output file
        assert launch.cpu_seconds < MAX_CPU_SECONDS
        return
    training_lines = [line for line in stderr.splitlines()
                      if "] step " in line and "[scan]" not in line]
    # The one file the scan did not decode stops training when read; it is named then.
    assert bool(training_lines) == (case == "png_corrupt_in_its_middle")
    if case != "png_corrupt_in_its_middle":
        assert launch.cpu_seconds < MAX_CPU_SECONDS
    assert _checkpoint_files(launch.run_dir) == launch.checkpoints_before
    if case.startswith("gin_"):
        assert not os.path.exists(launch.run_dir)  # gin is parsed before anything is written


def test_the_label_values_error_names_a_binding_that_works(tmp_path):
    """Unknown label values are an error by default; the binding the message names turns
    them into ignored pixels (255) instead."""
    import gin

    from sait_tf.data import readers, scan

    pair = str(tmp_path / "pair")
    generate_pair(pair, num_source=1, num_target_train=1, num_target_val=2, size=SIZE)
    _label_values_outside_the_mapping(str(tmp_path), pair)
    examples = readers.list_examples("cityscapes", os.path.join(pair, "target"), "val")
    with pytest.raises(scan.DatasetError, match=r"values \[40\] .*\(the binding "
                                                r"scan_examples.check_values = False maps"):
        scan.scan_examples(examples)
    gin.parse_config("scan_examples.check_values = False")
    try:
        report = scan.scan_examples(examples)
    finally:
        gin.clear_config()
    assert report.label_value_counts[40] == 1
    bad = [ex for ex in examples if ex.label == os.path.join(pair, VAL_LABEL)]
    label = next(iter(readers.make_dataset(bad)))["label"][0].numpy()
    assert label[0, 0] == labels.IGNORE_INDEX
