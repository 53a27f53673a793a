"""SavedModel export: signatures, served values, versions, core ops, fresh-process load, CLI."""

import json
import os
import subprocess
import sys

import gin
import keras
import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import text_format
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow.python.framework import op_def_registry
from tensorflow_serving.config import model_server_config_pb2

from sait_tf import export, labels
from sait_tf.images import resize_logits
from sait_tf.models import build_segmenter
from sait_tf.models.translator import build_translator
from sait_tf.runtime.checkpoints import StageCheckpoint

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_SEGMENTER = {"arch": "deeplabv2", "blocks": (1, 1, 1, 1), "width_multiplier": 0.125}
TINY_TRANSLATOR = {"dim": 8, "num_residual_blocks": 1, "spade_hidden": 8}
# Ops that run Python or are otherwise unavailable to TF Serving.
DENIED_OPS = {"PyFunc", "PyFuncStateless", "EagerPyFunc"}


def trained_tiny_segmenter() -> keras.Model:
    """The tiny DeepLabV2 after a few Adam steps on random images labelled by their colour."""
    model = build_segmenter(**TINY_SEGMENTER)
    rng = np.random.default_rng(0)
    pixels = rng.uniform(0, 255, (4, 32, 48, 3)).astype(np.float32)
    targets = (pixels[..., 0] // 64).astype(np.int32) + 4 * (pixels[..., 1] > 128)
    optimizer = keras.optimizers.Adam(1e-2)
    for _ in range(5):
        with tf.GradientTape() as tape:
            logits = resize_logits(model(pixels, training=True), (32, 48))
            loss = tf.reduce_mean(
                keras.losses.sparse_categorical_crossentropy(targets, logits, from_logits=True)
            )
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
    return model


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO_ROOT, env.get("PYTHONPATH")]))
    return env


def reference_segmentation(model: keras.Model, pixels: np.ndarray):
    """Probabilities at input size and the top-2 margin, straight from the Keras model."""
    logits = resize_logits(model(pixels.astype(np.float32)), pixels.shape[1:3])
    probabilities = tf.nn.softmax(logits).numpy()
    top2 = np.sort(probabilities, axis=-1)[..., -2:]
    return probabilities, top2[..., 1] - top2[..., 0]


def graph_op_types(saved_model_dir: str) -> tuple[set[str], set[str]]:
    """(op types of every node in the graph and its function library, library function names)."""
    saved_model = saved_model_pb2.SavedModel()
    with open(os.path.join(saved_model_dir, "saved_model.pb"), "rb") as f:
        saved_model.ParseFromString(f.read())
    ops, functions = set(), set()
    for meta_graph in saved_model.meta_graphs:
        ops.update(node.op for node in meta_graph.graph_def.node)
        for function in meta_graph.graph_def.library.function:
            functions.add(function.signature.name)
            ops.update(node.op for node in function.node_def)
    return ops, functions


def non_core_ops(saved_model_dir: str) -> set[str]:
    ops, functions = graph_op_types(saved_model_dir)
    unregistered = {op for op in ops - functions if op_def_registry.get(op) is None}
    return unregistered | (ops & DENIED_OPS)


@pytest.fixture(scope="module")
def models():
    keras.utils.set_random_seed(0)
    segmenter = trained_tiny_segmenter()
    translator = build_translator(segmenter.num_classes, **TINY_TRANSLATOR)
    translator.build()
    return segmenter, translator


@pytest.fixture(scope="module")
def exported(models, tmp_path_factory):
    base = str(tmp_path_factory.mktemp("export"))
    return base, export.export_models(*models, export_base=base)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(1).integers(0, 256, (2, 30, 45, 3), dtype=np.uint8)


def test_layout_is_tf_serving_base_name_version(exported):
    base, paths = exported
    assert paths == {
        "sait_segmenter": os.path.join(base, "sait_segmenter", "1"),
        "sait_translator": os.path.join(base, "sait_translator", "1"),
    }
    for path in paths.values():
        assert os.path.isfile(os.path.join(path, "saved_model.pb"))
        assert os.path.isdir(os.path.join(path, "variables"))
    assert not [n for n in os.listdir(os.path.join(base, "sait_segmenter")) if n.startswith(".")]


def test_each_variable_is_stored_once(models, exported):
    stored = tf.train.list_variables(
        os.path.join(exported[1]["sait_segmenter"], "variables", "variables"))
    stored_values = [name for name, _ in stored if name != "_CHECKPOINTABLE_OBJECT_GRAPH"]
    assert len(stored_values) == len(models[0].variables)


def test_segmenter_signatures_match_the_keras_model(models, exported, images):
    loaded = tf.saved_model.load(exported[1]["sait_segmenter"])
    assert set(loaded.signatures) == {"serving_default", "predict_encoded"}
    served = loaded.signatures["serving_default"](images=tf.constant(images))
    probabilities, margin = reference_segmentation(models[0], images)
    expected_labels = probabilities.argmax(-1)
    assert served["labels"].dtype == tf.int32 and served["labels"].shape == (2, 30, 45)
    decided = margin > 1e-4
    np.testing.assert_array_equal(served["labels"].numpy()[decided], expected_labels[decided])
    assert len(np.unique(expected_labels)) >= 2
    np.testing.assert_allclose(served["confidence"], probabilities.max(-1), atol=1e-5)
    np.testing.assert_array_equal(served["color"], labels.PALETTE[served["labels"].numpy()])
    assert served["color"].dtype == tf.uint8


def test_encoded_signature_decodes_png_and_jpeg(exported, images):
    loaded = tf.saved_model.load(exported[1]["sait_segmenter"])
    by_pixels = loaded.signatures["serving_default"]
    by_bytes = loaded.signatures["predict_encoded"]
    pngs = tf.stack([tf.io.encode_png(image) for image in images])
    np.testing.assert_array_equal(
        by_bytes(image_bytes=pngs)["labels"], by_pixels(images=tf.constant(images))["labels"]
    )
    jpeg = tf.io.encode_jpeg(images[0], quality=90)
    jpeg_pixels = tf.io.decode_jpeg(jpeg, channels=3)[None]
    np.testing.assert_array_equal(
        by_bytes(image_bytes=jpeg[None])["labels"], by_pixels(images=jpeg_pixels)["labels"]
    )
    mixed_sizes = tf.stack([pngs[0], tf.io.encode_png(images[1, :16])])
    with pytest.raises(tf.errors.InvalidArgumentError):
        by_bytes(image_bytes=mixed_sizes)


def test_translator_serves_uint8_at_input_size(models, exported, images):
    segmenter, translator = models
    loaded = tf.saved_model.load(exported[1]["sait_translator"])
    translated = loaded.signatures["serving_default"](images=tf.constant(images))["translated"]
    pixels = images.astype(np.float32)
    unit = translator.translate(pixels / 127.5 - 1.0, segmenter(pixels), "source", "target")
    expected = np.clip(np.round((unit.numpy() + 1.0) * 127.5), 0, 255).astype(np.uint8)
    assert translated.dtype == tf.uint8 and translated.shape == images.shape
    assert np.abs(translated.numpy().astype(int) - expected).max() <= 1


def test_served_graphs_hold_only_core_ops(exported):
    for path in exported[1].values():
        ops, _ = graph_op_types(path)
        assert "Conv2D" in ops, path
        assert non_core_ops(path) == set(), path
    assert {"DecodeImage", "ArgMax"} <= graph_op_types(exported[1]["sait_segmenter"])[0]


def test_core_op_check_catches_python_functions(tmp_path):
    module = tf.Module()
    module.serve = tf.function(
        lambda x: tf.numpy_function(np.square, [x], tf.float32),
        input_signature=[tf.TensorSpec([None], tf.float32)],
    )
    tf.saved_model.save(module, str(tmp_path))
    assert non_core_ops(str(tmp_path)) & DENIED_OPS


def test_next_version_is_one_more_than_any_integer_version(tmp_path):
    segmenter_dir, translator_dir = tmp_path / "sait_segmenter", tmp_path / "sait_translator"
    assert export.next_version(str(segmenter_dir)) == 1
    for name in ("1", "3", ".tmp-9-123", "notes"):
        (segmenter_dir / name).mkdir(parents=True)
    (translator_dir / "5").mkdir(parents=True)
    assert export.next_version(str(segmenter_dir)) == 4
    assert export.next_version(str(segmenter_dir), str(translator_dir)) == 6


def test_versions_grow_and_a_failed_write_leaves_no_version(models, exported, monkeypatch):
    base, _ = exported
    assert export.export_models(models[0], export_base=base) == {
        "sait_segmenter": os.path.join(base, "sait_segmenter", "2")
    }
    with pytest.raises(FileExistsError, match="sait_segmenter/2"):
        export.export_models(models[0], export_base=base, version=2)

    def killed_mid_write(self, filepath, **kwargs):
        os.makedirs(filepath)
        open(os.path.join(filepath, "saved_model.pb"), "wb").close()
        raise KeyboardInterrupt

    archive_class = type(keras.export.ExportArchive())  # the backend's subclass
    monkeypatch.setattr(archive_class, "write_out", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        export.export_models(models[0], export_base=base)
    versions = [n for n in os.listdir(os.path.join(base, "sait_segmenter")) if n.isdigit()]
    assert sorted(versions) == ["1", "2"]


@pytest.mark.slow
def test_exports_load_in_a_fresh_process_without_sait_tf(exported, images, tmp_path):
    expected_labels = tf.saved_model.load(exported[1]["sait_segmenter"]).signatures[
        "serving_default"](images=tf.constant(images))["labels"].numpy()
    expected_translated = tf.saved_model.load(exported[1]["sait_translator"]).signatures[
        "serving_default"](images=tf.constant(images))["translated"].numpy()
    np.save(tmp_path / "images.npy", images)
    script = (
        "import sys, numpy as np, tensorflow as tf\n"
        "x = tf.constant(np.load('images.npy'))\n"
        "seg = tf.saved_model.load(sys.argv[1]).signatures['serving_default']\n"
        "tr = tf.saved_model.load(sys.argv[2]).signatures['serving_default']\n"
        "np.save('labels.npy', seg(images=x)['labels'].numpy())\n"
        "np.save('translated.npy', tr(images=x)['translated'].numpy())\n"
        "assert not any(m.startswith('sait_tf') for m in sys.modules)\n"
    )
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("PYTHONPATH", None)
    subprocess.run(
        [sys.executable, "-c", script, exported[1]["sait_segmenter"],
         exported[1]["sait_translator"]],
        cwd=tmp_path, env=env, check=True, timeout=120,
    )
    np.testing.assert_array_equal(np.load(tmp_path / "labels.npy"), expected_labels)
    np.testing.assert_array_equal(np.load(tmp_path / "translated.npy"), expected_translated)


def write_run_dir(run_dir, models, translator_stage="round_01_translator") -> None:
    """A finished training run: operative config, final.json, stage checkpoints."""
    segmenter, translator = models
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, "config.gin"), "w") as f:
        f.write(
            "SOURCE_ROOT = '/data/gta5'\n"
            "build_segmenter.arch = 'deeplabv2'\n"
            "build_segmenter.blocks = (1, 1, 1, 1)\n"
            "build_segmenter.width_multiplier = 0.125\n"
            "build_translator.dim = 8\n"
            "build_translator.num_residual_blocks = 1\n"
            "build_translator.spade_hidden = 8\n"
            "run_rounds.max_rounds = 3\n"
        )
    with open(os.path.join(run_dir, "final.json"), "w") as f:
        json.dump(
            {"segmenter_stage": "round_01_segmenter", "translator_stage": translator_stage}, f
        )
    checkpoints = os.path.join(run_dir, "checkpoints")
    StageCheckpoint(os.path.join(checkpoints, "round_01_segmenter"), segmenter=segmenter).save(7)
    StageCheckpoint(os.path.join(checkpoints, "round_01_translator"), translator=translator).save(7)


@pytest.mark.slow
def test_cli_exports_the_final_models_of_a_run(models, exported, images, tmp_path):
    run_dir = str(tmp_path / "run")
    write_run_dir(run_dir, models)
    result = subprocess.run(
        [sys.executable, "-m", "sait_tf.export", "--run_dir", run_dir],
        env=subprocess_env(), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("sait_segmenter", "sait_translator"):
        from_cli = tf.saved_model.load(os.path.join(run_dir, "export", name, "1"))
        in_process = tf.saved_model.load(exported[1][name])
        output = "labels" if name == "sait_segmenter" else "translated"
        np.testing.assert_array_equal(
            from_cli.signatures["serving_default"](images=tf.constant(images))[output],
            in_process.signatures["serving_default"](images=tf.constant(images))[output],
        )


def test_cli_names_the_missing_file_before_building_anything(models, tmp_path):
    run_dir = str(tmp_path / "run")
    write_run_dir(run_dir, models, translator_stage="round_02_translator")
    with pytest.raises(FileNotFoundError, match="round_02_translator"):
        export.export_run(run_dir)
    os.remove(os.path.join(run_dir, "final.json"))
    with pytest.raises(FileNotFoundError, match="final.json"):
        export.export_run(run_dir)
    assert not os.path.exists(os.path.join(run_dir, "export"))


def test_cli_refuses_a_config_that_cannot_rebuild_the_segmenter(models, tmp_path):
    run_dir = str(tmp_path / "run")
    write_run_dir(run_dir, models)
    with open(os.path.join(run_dir, "config.gin"), "w") as f:
        f.write("build_translator.dim = 8\n")
    try:
        with pytest.raises(ValueError, match="config.gin binds no build_segmenter.arch"):
            export.export_run(run_dir)
    finally:
        gin.clear_config()
    assert not os.path.exists(os.path.join(run_dir, "export"))


def test_models_config_serves_both_exported_names_from_models():
    config = model_server_config_pb2.ModelServerConfig()
    with open(os.path.join(REPO_ROOT, "export", "models.config")) as f:
        text_format.Parse(f.read(), config)
    served = {c.name: (c.base_path, c.model_platform) for c in config.model_config_list.config}
    assert served == {
        export.SEGMENTER_NAME: ("/models/sait_segmenter", "tensorflow"),
        export.TRANSLATOR_NAME: ("/models/sait_translator", "tensorflow"),
    }
