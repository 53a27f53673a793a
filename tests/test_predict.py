"""``python -m sait_tf.predict``: a Cityscapes-layout folder segmented by an export and by a
run directory, the mirrored outputs, resuming, and one-line errors."""

import configparser
import importlib
import inspect
import logging
import os
import shutil
import subprocess
import sys

import gin
import numpy as np
import pytest
import tensorflow as tf
from fixture_trees import make_cityscapes_tree
from PIL import Image
from test_export import (
    REPO_ROOT,
    TINY_TRANSLATOR,
    subprocess_env,
    trained_tiny_segmenter,
    write_run_dir,
)

from sait_tf import cli, export, images, predict
from sait_tf.models.translator import build_translator

SIZES = ((32, 48), (24, 40))
KINDS = ("trainIds", "color", "overlay")


@pytest.fixture(scope="module")
def segmenter():
    return trained_tiny_segmenter()


@pytest.fixture(scope="module")
def saved_model_dir(segmenter, tmp_path_factory):
    base = tmp_path_factory.mktemp("export")
    return export.export_models(segmenter, export_base=str(base))[export.SEGMENTER_NAME]


@pytest.fixture(scope="module")
def val_dir(tmp_path_factory):
    """leftImg8bit/val of two cities, each with images of both SIZES."""
    root = tmp_path_factory.mktemp("cityscapes")
    make_cityscapes_tree(str(root), splits=("val",), cities=("frankfurt", "lindau"),
                         per_city=2, size=SIZES[0])
    val = root / "leftImg8bit" / "val"
    rng = np.random.default_rng(7)
    for city in ("frankfurt", "lindau"):
        image = rng.integers(0, 256, (*SIZES[1], 3), np.uint8)
        Image.fromarray(image).save(val / city / f"{city}_000001_000019_leftImg8bit.png")
    return val


def run_predict(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sait_tf.predict", *args],
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)


def stems(folder) -> list[str]:
    return sorted(os.path.relpath(os.path.join(root, name), folder)[:-len(".png")]
                  for root, _, names in os.walk(folder) for name in names)


def read_png(path) -> np.ndarray:
    return np.asarray(Image.open(path))


@pytest.fixture(scope="module")
def predicted(saved_model_dir, val_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("predicted") / "out"
    result = run_predict("--saved_model", saved_model_dir, "--input", str(val_dir),
                         "--out_dir", str(out), "--batch_size", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == f"segmented 6 images into {out}"
    return out


def test_outputs_mirror_the_folders_and_equal_the_saved_model(saved_model_dir, val_dir,
                                                               predicted):
    assert stems(predicted) == sorted(f"{stem}_{kind}" for stem in stems(val_dir)
                                      for kind in KINDS)
    assert len({os.path.dirname(stem) for stem in stems(predicted)}) == 2
    serving = tf.saved_model.load(saved_model_dir).signatures["serving_default"]
    sizes = set()
    for stem in stems(val_dir):
        image = read_png(val_dir / f"{stem}.png")
        sizes.add(image.shape[:2])
        expected = serving(images=tf.constant(image[None]))["labels"][0].numpy()
        train_ids = read_png(predicted / f"{stem}_trainIds.png")
        assert train_ids.dtype == np.uint8
        np.testing.assert_array_equal(train_ids, expected)
        color = read_png(predicted / f"{stem}_color.png")
        np.testing.assert_array_equal(color, images.colorize(train_ids).numpy())
        blend = 0.5 * image.astype(np.float64) + 0.5 * color
        assert np.abs(read_png(predicted / f"{stem}_overlay.png") - blend).max() <= 1
    assert sizes == set(SIZES)


def test_a_second_run_skips_every_image(saved_model_dir, val_dir, predicted, caplog):
    mtimes = {stem: os.stat(predicted / f"{stem}.png").st_mtime_ns for stem in stems(predicted)}
    with caplog.at_level(logging.INFO, logger="absl"):
        count = predict.predict_files([str(val_dir)], str(predicted),
                                      saved_model=saved_model_dir)
    assert count == 0
    assert "6 of 6 images already segmented" in caplog.text
    assert {stem: os.stat(predicted / f"{stem}.png").st_mtime_ns
            for stem in stems(predicted)} == mtimes


def test_a_run_directory_gives_the_saved_model_outputs(segmenter, val_dir, predicted, tmp_path,
                                                       caplog):
    translator = build_translator(segmenter.num_classes, **TINY_TRANSLATOR)
    translator.build()
    run_dir = tmp_path / "run"
    write_run_dir(str(run_dir), (segmenter, translator))
    out = tmp_path / "out"
    try:  # the run's config.gin rebuilds its segmenter: it binds gin for this process
        with caplog.at_level(logging.INFO, logger="absl"):
            assert predict.predict_files([str(val_dir)], str(out), run_dir=str(run_dir)) == 6
    finally:
        gin.clear_config()
    assert "segmenting with M of stage round_01_segmenter" in caplog.text
    assert stems(out) == stems(predicted)
    for stem in stems(out):
        np.testing.assert_array_equal(read_png(out / f"{stem}.png"),
                                      read_png(predicted / f"{stem}.png"))


def test_a_run_directory_prefers_its_newest_export(segmenter, saved_model_dir, tmp_path):
    model_dir = tmp_path / "run" / "export" / export.SEGMENTER_NAME
    shutil.copytree(saved_model_dir, model_dir / "3")
    (model_dir / "2").mkdir()  # an older version, never loaded: it has no saved_model.pb
    pixels = tf.constant(np.random.default_rng(3).integers(0, 256, (2, 24, 40, 3), np.uint8))
    served = tf.saved_model.load(saved_model_dir).signatures["serving_default"](images=pixels)
    # No final.json and no checkpoints: only the export can answer.
    np.testing.assert_array_equal(predict.load_run(str(tmp_path / "run"))(pixels)["labels"],
                                  served["labels"])


# name: (predict_files's arguments in tmp_path, the error line of tmp_path)
ERRORS = {
    "no such input": (
        lambda d: {"inputs": [d / "nowhere"]},
        lambda d: f"error: no such image file or folder: {d / 'nowhere'}"),
    "no images found": (
        lambda d: {"inputs": [d / "notes"]},
        lambda d: f"error: no .png, .jpg or .jpeg images in {d / 'notes'} (searched recursively)"),
    "run dir without final.json": (
        lambda d: {"inputs": [d / "images"], "run_dir": d / "run"},
        lambda d: f"error: {d / 'run' / 'final.json'} does not exist; is '{d / 'run'}' a "
                  "training run?"),
    "unreadable image": (
        lambda d: {"inputs": [d / "images", d / "notes" / "fake.jpg"]},
        lambda d: f"error: cannot read {d / 'notes' / 'fake.jpg'}: not a PNG or JPEG image "
                  f"(cannot identify image file '{d / 'notes' / 'fake.jpg'}')"),
}


def _error_case(case: str, saved_model_dir: str, tmp_path) -> tuple[dict, str]:
    """predict_files's arguments for ERRORS[case] (the SavedModel unless the case names a run
    directory) with its files in ``tmp_path``, and the error line the command must print."""
    for folder in ("images", "notes", "run"):
        (tmp_path / folder).mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "frame.png")
    (tmp_path / "notes" / "readme.txt").write_text("no images here")
    if case == "unreadable image":
        (tmp_path / "notes" / "fake.jpg").write_text("not a JPEG")
    arguments, error_line = ERRORS[case]
    options = {"saved_model": saved_model_dir, **arguments(tmp_path),
               "out_dir": tmp_path / "out"}
    if "run_dir" in options:
        del options["saved_model"]
    options = {name: [str(path) for path in value] if name == "inputs" else str(value)
               for name, value in options.items()}
    return options, error_line(tmp_path)


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_user_errors_are_explained_in_one_line(saved_model_dir, tmp_path, case):
    """In process: the line ``cli.guarded`` prints after ``error: `` for the program's error."""
    options, error_line = _error_case(case, saved_model_dir, tmp_path)
    with pytest.raises(cli.EXPLAINED_ERRORS) as raised:
        predict.predict_files(**options)
    assert f"error: {cli.one_line(raised.value)}" == error_line
    assert not (tmp_path / "out").exists()


def test_the_command_ends_a_user_error_with_one_line_and_exit_1(saved_model_dir, tmp_path):
    options, error_line = _error_case("unreadable image", saved_model_dir, tmp_path)
    args = [argument for path in options.pop("inputs") for argument in ("--input", path)]
    args += [f"--{name}={value}" for name, value in options.items()]
    result = run_predict(*args)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == error_line
    assert not (tmp_path / "out").exists()


def test_a_truncated_image_is_named(tmp_path):
    Image.new("RGB", (16, 16), "red").save(tmp_path / "frame.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "frame.png").read_bytes()[:60])
    assert predict.image_size(str(tmp_path / "cut.png")) == (16, 16)
    with pytest.raises(ValueError, match=f"cannot decode {tmp_path / 'cut.png'}: the file is "):
        predict.read_image(str(tmp_path / "cut.png"))


def test_find_images_skips_the_output_folder_and_refuses_shared_output_names(tmp_path):
    for name in ("a/x.png", "a/out/y.png", "a/b/z.JPG", "a/notes.txt", "c.jpeg"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    found = predict.find_images([str(tmp_path / "a"), str(tmp_path / "c.jpeg")],
                                exclude=[str(tmp_path / "a" / "out"), None])
    assert [(image.path, image.relative) for image in found] == [
        (str(tmp_path / "a" / "x.png"), "x.png"),
        (str(tmp_path / "a" / "b" / "z.JPG"), os.path.join("b", "z.JPG")),
        (str(tmp_path / "c.jpeg"), "c.jpeg"),
    ]
    with pytest.raises(ValueError, match="is both an input and an output folder"):
        predict.find_images([str(tmp_path / "a")], exclude=[str(tmp_path / "a")])
    (tmp_path / "a" / "x.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="x.jpg and .*x.png would write the same outputs"):
        predict.find_images([str(tmp_path / "a")])


def test_batches_hold_images_of_one_size_in_order():
    sizes = [(2, 3), (4, 5), (2, 3), (2, 3), (4, 5)]
    assert predict.batches_by_size("abcde", sizes, 2) == [["a", "c"], ["d"], ["b", "e"]]


def test_console_scripts_name_zero_argument_functions():
    config = configparser.ConfigParser()
    config.read(os.path.join(REPO_ROOT, "setup.cfg"))
    scripts = dict(line.split(" = ") for line in
                   config["options.entry_points"]["console_scripts"].strip().splitlines())
    assert {"sait-train", "sait-evaluate", "sait-predict", "sait-export", "sait-serve",
            "sait-translate"} <= set(scripts)
    missing = []
    for script, target in scripts.items():
        module, function = target.split(":")
        function = getattr(importlib.import_module(module), function, None)
        if not callable(function) or any(
                parameter.default is inspect.Parameter.empty
                for parameter in inspect.signature(function).parameters.values()):
            missing.append(f"{script}: {target}")
    assert not missing, f"console scripts without their zero-argument function: {missing}"


def test_the_console_script_help_shows_the_docstring_and_the_flags():
    """As ``sait-predict --help``: the main module is the script, not sait_tf.predict."""
    script = "import sys; from sait_tf.predict import run; sys.argv[0] = 'sait-predict'; run()"
    result = subprocess.run([sys.executable, "-c", script, "--help"], env=subprocess_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.stdout.startswith(predict.__doc__), result.stdout  # (absl's --help exits 1)
    for flag in ("--saved_model", "--run_dir", "--input", "--out_dir", "--batch_size",
                 "--overlay_alpha", "--overwrite"):
        assert flag in result.stdout
