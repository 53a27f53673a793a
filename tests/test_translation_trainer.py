"""The trainer of F: losses, TensorBoard, checkpoints, resume, frozen M, spectral norm."""

import glob
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from sait_tf import images, labels
from sait_tf.data import synthetic
from sait_tf.models import build_segmenter
from sait_tf.models.discriminators import build_patch_discriminator
from sait_tf.models.translator import build_translator
from sait_tf.runtime import checkpoints, files
from sait_tf.train.translation import DOMAINS, TranslationStep, train_translator

pytestmark = pytest.mark.usefixtures("skip_grappler")

NUM_CLASSES = 3
SIZE = 16
STEPS = 4
LOSS_TAGS = {f"loss/{name}" for name in ("reconstruction", "gan", "image_cycle", "latent_cycle",
                                         "sce", "translator", "discriminators")}



def _segmenter() -> keras.Model:
    """A stand-in M: RGB [0, 255] -> logits at half resolution."""
    keras.utils.set_random_seed(7)
    inputs = keras.Input((None, None, 3))
    logits = keras.layers.Conv2D(NUM_CLASSES, 3, strides=2, padding="same")(inputs / 127.5 - 1.0)
    return keras.Model(inputs, logits)


def _models(segmenter: keras.Model) -> tuple[keras.Model, dict]:
    """F, D_S and D_T built the same way in every run: the same initial weights."""
    keras.utils.set_random_seed(1)
    translator = build_translator(num_classes=NUM_CLASSES, dim=4, num_downsamplings=1,
                                  num_residual_blocks=1, spade_hidden=4)
    discriminators = {d: build_patch_discriminator(dim=4, num_layers=2, num_scales=1)
                      for d in DOMAINS}
    pixels = tf.constant(np.full((1, SIZE, SIZE, 3), 100.0, np.float32))
    x_unit = pixels / 127.5 - 1.0
    for source, target in (("source", "target"), ("target", "source")):
        translator.translate(x_unit, segmenter(pixels), source, target)
    for discriminator in discriminators.values():
        discriminator(x_unit)
    return translator, discriminators


def _dataset(seed: int, size: tuple[int, int] = (SIZE, SIZE)) -> tf.data.Dataset:
    """Two batches of two images: an epoch divides the resume point (step 2)."""
    pixels = np.random.default_rng(seed).uniform(0, 255, (4, *size, 3)).astype(np.float32)
    return tf.data.Dataset.from_tensor_slices({"image": pixels}).batch(2)


def _train(stage_dir: str, log_dir: str, segmenter, translator, discriminators,
           log_images_every: int = 2):
    return train_translator(segmenter, translator, discriminators, _dataset(0), _dataset(1),
                            stage_dir, log_dir, STEPS, checkpoint_every=2, summary_every=1,
                            log_images_every=log_images_every)


def _u_vectors(*models) -> dict[str, np.ndarray]:
    return {f"{i}/{v.path}": v.numpy() for i, model in enumerate(models)
            for v in model.non_trainable_variables if "vector_u" in v.path}


@pytest.fixture(scope="module")
def continuous(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("continuous"))
    segmenter = _segmenter()
    translator, discriminators = _models(segmenter)
    initial_u = _u_vectors(translator, *discriminators.values())
    segmenter_before = [v.numpy() for v in segmenter.variables]
    result = _train(os.path.join(root, "stage"), os.path.join(root, "logs"), segmenter,
                    translator, discriminators)
    assert result is translator
    return dict(root=root, segmenter=segmenter, translator=translator,
                discriminators=discriminators, initial_u=initial_u,
                segmenter_before=segmenter_before)


def _events(log_dir: str) -> dict[str, dict[int, np.ndarray]]:
    values: dict[str, dict[int, np.ndarray]] = {}
    for path in glob.glob(os.path.join(log_dir, "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                values.setdefault(value.tag, {})[event.step] = tf.make_ndarray(value.tensor)
    return values


@pytest.mark.slow
def test_trainer_writes_checkpoints_and_marks_the_stage_done(continuous):
    stage = os.path.join(continuous["root"], "stage")
    assert files.is_done(stage)
    assert tf.train.latest_checkpoint(stage).endswith("ckpt-4")
    assert os.path.exists(os.path.join(stage, "ckpt-2.index"))


@pytest.mark.slow
def test_tensorboard_has_every_loss_term_and_poly_learning_rates(continuous):
    events = _events(os.path.join(continuous["root"], "logs"))
    assert LOSS_TAGS <= set(events)
    for tag in LOSS_TAGS:
        assert sorted(events[tag]) == [1, 2, 3, 4]
        assert all(np.isfinite(v) for v in events[tag].values())
    for tag, base in (("learning_rate/translator", 1e-4), ("learning_rate/discriminators", 4e-4)):
        for step, value in events[tag].items():
            assert float(value) == pytest.approx(base * (1 - step / STEPS) ** 0.9, abs=1e-9)
    for domain in DOMAINS:
        grids = events[f"{domain}/image_prediction_translated_cycled"]
        assert sorted(grids) == [2, 4]
        width, height, *pngs = grids[4]
        assert (int(width), int(height), len(pngs)) == (4 * SIZE, SIZE, 2)


@pytest.mark.slow
def test_training_steps_run_spectral_normalisation_and_keep_m_frozen(continuous):
    after = _u_vectors(continuous["translator"], *continuous["discriminators"].values())
    assert after.keys() == continuous["initial_u"].keys()
    unchanged = [k for k, v in continuous["initial_u"].items() if np.array_equal(v, after[k])]
    assert not unchanged
    for before, variable in zip(continuous["segmenter_before"], continuous["segmenter"].variables,
                                strict=True):
        np.testing.assert_array_equal(before, variable.numpy())


class _Interrupted(Exception):
    pass


@pytest.mark.slow
def test_resuming_continues_the_same_run(continuous, tmp_path, monkeypatch):
    stage, logs = str(tmp_path / "stage"), str(tmp_path / "logs")
    save = checkpoints.StageCheckpoint.save

    def save_then_stop(self, step):
        path = save(self, step)
        raise _Interrupted(path)

    monkeypatch.setattr(checkpoints.StageCheckpoint, "save", save_then_stop)
    segmenter = _segmenter()
    with pytest.raises(_Interrupted, match="ckpt-2"):
        _train(stage, logs, segmenter, *_models(segmenter), log_images_every=STEPS)
    monkeypatch.setattr(checkpoints.StageCheckpoint, "save", save)
    assert not files.is_done(stage)

    _train(stage, logs, segmenter, *_models(segmenter), log_images_every=STEPS)
    resumed = tf.train.latest_checkpoint(stage)
    reference = tf.train.latest_checkpoint(os.path.join(continuous["root"], "stage"))
    names = [name for name, _ in tf.train.list_variables(reference)
             if name != "_CHECKPOINTABLE_OBJECT_GRAPH"]
    assert [name for name, _ in tf.train.list_variables(resumed)
            if name != "_CHECKPOINTABLE_OBJECT_GRAPH"] == names
    assert any("translator_optimizer" in name for name in names)
    for name in names:
        np.testing.assert_allclose(tf.train.load_variable(resumed, name),
                                   tf.train.load_variable(reference, name),
                                   rtol=1e-5, atol=1e-7, err_msg=name)


@pytest.mark.slow
def test_a_finished_stage_only_restores_the_translator_and_discriminators(continuous):
    """The next round goes on from both, as in an uninterrupted run."""
    segmenter = _segmenter()
    translator, discriminators = _models(segmenter)
    stage = os.path.join(continuous["root"], "stage")
    train_translator(segmenter, translator, discriminators, _dataset(0), _dataset(1), stage,
                     os.path.join(continuous["root"], "logs_again"), STEPS)
    restored = translator.variables + [
        v for d in DOMAINS for v in discriminators[d].variables]
    trained = continuous["translator"].variables + [
        v for d in DOMAINS for v in continuous["discriminators"][d].variables]
    for got, want in zip(restored, trained, strict=True):
        np.testing.assert_array_equal(got.numpy(), want.numpy())
    assert tf.train.latest_checkpoint(stage).endswith("ckpt-4")


@pytest.mark.parametrize("use_sce", [True, False])
def test_sce_gradient_reaches_the_translator_through_the_frozen_segmenter(use_sce):
    segmenter = _segmenter()
    translator, discriminators = _models(segmenter)
    weights = dict(reconstruction=0.0, gan=0.0, image_cycle=0.0, latent_cycle=0.0, sce=1.0)
    step = TranslationStep(segmenter, translator, discriminators, keras.optimizers.Adam(0.1),
                           keras.optimizers.Adam(0.1), weights, use_sce)
    # Spectral normalisation rewrites kernels in every training call; the others only move
    # when a gradient arrives.
    watched = [v for v in translator.trainable_variables if not v.path.endswith("kernel")]
    before = [v.numpy() for v in watched]
    segmenter_before = [v.numpy() for v in segmenter.variables]
    pixels = next(iter(_dataset(0)))["image"]
    terms = step.replica_step({"source": pixels, "target": pixels[::-1]})
    assert ("sce" in terms) == use_sce
    moved = [not np.array_equal(b, v.numpy()) for b, v in zip(before, watched, strict=True)]
    assert any(moved) == use_sce
    for b, v in zip(segmenter_before, segmenter.variables, strict=True):
        np.testing.assert_array_equal(b, v.numpy())


def test_translator_update_equals_one_tape_over_both_directions():
    """The step takes F's gradient one direction at a time, with M's L_SCE pass recomputed in
    the backward pass; its update must equal the gradient of Eq. 1 taken on one tape."""
    segmenter = _segmenter()
    translator, discriminators = _models(segmenter)
    weights = dict(reconstruction=10.0, gan=1.0, image_cycle=10.0, latent_cycle=1.0, sce=10.0)
    # SGD(1) makes the update the gradient itself; D's rate 0 keeps D where the reference has it.
    step = TranslationStep(segmenter, translator, discriminators, keras.optimizers.SGD(1.0),
                           keras.optimizers.SGD(0.0), weights, use_sce=True)
    models = [translator, *discriminators.values()]
    state = [(v, v.numpy()) for model in models for v in model.variables]
    pixels = next(iter(_dataset(0)))["image"]
    batch = {"source": pixels, "target": pixels[::-1]}

    x = {d: images.pixels_to_unit(batch[d]) for d in DOMAINS}
    seg = {d: segmenter(batch[d], training=False) for d in DOMAINS}
    other = {"source": "target", "target": "source"}
    with tf.GradientTape() as tape:
        z, recon, translated = {}, {}, {}
        for d in DOMAINS:
            z[d] = translator.encode(x[d], d, training=True)
            recon[d] = translator.decode(z[d], seg[d], d, training=True)
            translated[d] = translator.decode(z[d], seg[d], other[d], training=True)
        with tape.stop_recording():
            step._discriminator_update(x, {other[d]: translated[d] for d in DOMAINS}, 1.0)
        total = tf.add_n([weights[name] * value for d in DOMAINS for name, value in
                          step._direction_terms(d, x[d], seg[d], z[d], recon[d],
                                                translated[d]).items()])
    variables = translator.trainable_variables
    gradients = tape.gradient(total, variables)
    # Spectral normalisation rewrote the kernels during the forward pass; SGD starts there.
    expected = [v.numpy() - (0.0 if g is None else g.numpy())
                for v, g in zip(variables, gradients, strict=True)]
    for variable, value in state:
        variable.assign(value)

    results = tf.function(step.replica_step)(batch)

    np.testing.assert_allclose(float(results["translator"]), float(total), rtol=1e-5)
    assert sum(g is not None for g in gradients) > len(variables) // 2
    for variable, value in zip(variables, expected, strict=True):
        np.testing.assert_allclose(variable.numpy(), value, rtol=1e-4, atol=1e-5,
                                   err_msg=variable.path)


def test_image_sides_must_fit_the_translator(tmp_path):
    segmenter = _segmenter()
    translator, discriminators = _models(segmenter)
    with pytest.raises(ValueError, match="source_dataset images are 15x16"):
        train_translator(segmenter, translator, discriminators, _dataset(0, (15, 16)),
                         _dataset(1), str(tmp_path / "stage"), str(tmp_path / "logs"), STEPS)


def _class_means(pixels: np.ndarray, train_ids: np.ndarray) -> np.ndarray:
    """Mean RGB [19, 3] of each trainId over all images; NaN for rare classes."""
    means = np.full((labels.NUM_CLASSES, 3), np.nan)
    for class_id in range(labels.NUM_CLASSES):
        mask = train_ids == class_id
        if mask.sum() > 50:
            means[class_id] = pixels[mask].mean(axis=0)
    return means


@pytest.mark.slow
def test_translation_moves_source_colours_toward_the_target_on_the_synthetic_pair(tmp_path):
    """Demo-sized F (M an untrained small DeepLabV2), 240 steps at 32x64: per-class colours."""
    size, count, steps = (32, 64), 32, 240
    pairs = {domain: [synthetic.sample_example(0, domain, "train", i, size) for i in range(count)]
             for domain in DOMAINS}
    source = np.stack([image for image, _ in pairs["source"]]).astype(np.float32)
    source_ids = labels.LABEL_ID_TO_TRAIN_ID[np.stack([layout for _, layout in pairs["source"]])]
    target = np.stack([image for image, _ in pairs["target"]]).astype(np.float32)

    def dataset(pixels: np.ndarray) -> tf.data.Dataset:
        return tf.data.Dataset.from_tensor_slices({"image": pixels}).shuffle(
            count, seed=0).batch(4, drop_remainder=True)

    keras.utils.set_random_seed(0)
    segmenter = build_segmenter("deeplabv2", blocks=(1, 1, 1, 1), width_multiplier=0.125)

    def demo_translator() -> keras.Model:
        keras.utils.set_random_seed(0)
        return build_translator(segmenter.num_classes, dim=16, num_residual_blocks=2,
                                spade_hidden=32)

    def translate(translator: keras.Model) -> np.ndarray:
        return np.concatenate([images.unit_to_pixels(translator.translate(
            images.pixels_to_unit(source[i:i + 8]), segmenter(source[i:i + 8]), "source",
            "target")).numpy() for i in range(0, count, 8)])

    untrained = translate(demo_translator())
    translator = demo_translator()
    discriminators = {d: build_patch_discriminator(dim=16, num_layers=3, num_scales=2)
                      for d in DOMAINS}
    train_translator(segmenter, translator, discriminators, dataset(source), dataset(target),
                     str(tmp_path / "stage"), str(tmp_path / "logs"), steps,
                     checkpoint_every=steps, summary_every=steps, log_images_every=steps)

    target_colours = synthetic.domain_class_colors("target", 64, size)
    source_colours = synthetic.domain_class_colors("source", 64, size)
    before = _class_means(source, source_ids)
    after = _class_means(translate(translator), source_ids)
    baseline = _class_means(untrained, source_ids)
    drawn = ~np.isnan(before[:, 0]) & ~np.isnan(after[:, 0]) & ~np.isnan(target_colours[:, 0])
    assert drawn.sum() >= 8

    def distance(colours: np.ndarray, reference: np.ndarray) -> np.ndarray:
        return np.linalg.norm(colours[drawn] - reference[drawn], axis=1)

    to_target = distance(after, target_colours)
    # Measured at 240 steps: 74 -> 50 RGB units (ratio 0.68), untrained F 148; an F that
    # does not translate stays at ratio 1.
    assert to_target.mean() < 0.75 * distance(before, target_colours).mean()
    assert to_target.mean() < 0.8 * distance(baseline, target_colours).mean()
    assert (to_target < distance(after, source_colours)).mean() >= 2 / 3
