"""tf.distribute: one MirroredStrategy step over the 2 logical CPUs of conftest.py equals the
single-device step on the same global batch, for F and for M; checkpoints cross strategies;
float16 loss scales stay equal on the replicas; the cluster of a multi-worker run comes from
TF_CONFIG or Slurm. The whole pipeline distributed: tests/test_multiworker_*.py and
tests/test_mirrored_pipeline.py."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from tiny_models import HEIGHT, NUM_CLASSES, WIDTH, segmentation_batch, tiny_translation_step

from sait_tf.models import build_segmenter
from sait_tf.models.discriminators import OutputDiscriminator, build_patch_discriminator
from sait_tf.models.layers import SpectralNormalization
from sait_tf.models.translator import build_translator
from sait_tf.runtime import checkpoints, files
from sait_tf.runtime.workers import Workers
from sait_tf.train import distribute, optimizers
from sait_tf.train.segmentation import train_segmenter
from sait_tf.train.translation import DOMAINS, TranslationStep, train_translator

pytestmark = pytest.mark.usefixtures("skip_grappler")

DEVICES = ["/cpu:0", "/cpu:1"]


@pytest.fixture(scope="module")
def mirrored() -> tf.distribute.Strategy:
    return distribute.make_strategy("mirrored", DEVICES)


def _replica_copies(variable) -> list[np.ndarray]:
    return [np.asarray(copy) for copy in variable.value._values]


# One step on two replicas differs from the one-device step only by float32 summation order
# (each replica's gradient, then their all-reduce, against one sum over the batch). Measured
# largest differences: 5.7e-7 (F and D_S, D_T, SGD 0.1) and 6.0e-7 (M and D_seg).
RTOL, ATOL = 1e-5, 1e-6


def _assert_same_variables(got: list, want: list) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=RTOL, atol=ATOL, err_msg=a.path)


def _assert_replicas_agree(variables: list) -> None:
    for variable in variables:
        first, *others = _replica_copies(variable)
        for other in others:
            np.testing.assert_array_equal(first, other, err_msg=variable.path)


def test_make_strategy_kinds(mirrored, monkeypatch):
    assert distribute.make_strategy() is tf.distribute.get_strategy()
    assert mirrored.num_replicas_in_sync == 2
    with pytest.raises(ValueError, match="make_strategy.kind"):
        distribute.make_strategy("tpu")
    with pytest.raises(ValueError, match="make_strategy.devices"):
        distribute.make_strategy("default", DEVICES)
    for name in ("TF_CONFIG", *SLURM_STEP):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="needs its workers: set the TF_CONFIG"):
        distribute.make_strategy("multi_worker")


def test_tf_config_is_checked_before_the_cluster_starts():
    cluster = {"worker": ["host1:2222", "host2:2222"]}
    config = {"cluster": cluster, "task": {"type": "worker", "index": 1}}
    assert distribute.check_tf_config(json.dumps(config)) == config
    with_chief = {"cluster": {**cluster, "chief": ["host0:2222"]},
                  "task": {"type": "chief", "index": 0}}
    assert distribute.check_tf_config(json.dumps(with_chief)) == with_chief
    with pytest.raises(ValueError, match="not valid JSON"):
        distribute.check_tf_config("{cluster")
    with pytest.raises(ValueError, match="cluster.worker"):
        distribute.check_tf_config(json.dumps({"task": {"type": "worker", "index": 0}}))
    with pytest.raises(ValueError, match="0 <= i < 2"):
        distribute.check_tf_config(json.dumps({"cluster": cluster,
                                               "task": {"type": "worker", "index": 2}}))
    with pytest.raises(ValueError, match="0 <= i < 2"):
        distribute.check_tf_config(json.dumps({"cluster": cluster,
                                               "task": {"type": "chief", "index": 0}}))


SLURM_STEP = ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_STEP_NODELIST",
              "SLURM_STEP_TASKS_PER_NODE")


def test_the_cluster_comes_from_tf_config_or_the_slurm_step(monkeypatch):
    for name in ("TF_CONFIG", *SLURM_STEP):
        monkeypatch.delenv(name, raising=False)
    # SlurmClusterResolver sets CUDA_VISIBLE_DEVICES itself when the node has GPUs.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(ValueError, match="make_strategy.cluster: expected one of"):
        distribute.cluster_resolver("mpi")
    with pytest.raises(ValueError, match="SLURM_PROCID is not set; start each worker with srun"):
        distribute.cluster_resolver("slurm")
    for name, value in zip(SLURM_STEP, ("1", "3", "node[1-2]", "2,1"), strict=True):
        monkeypatch.setenv(name, value)
    resolver = distribute.cluster_resolver("auto", slurm_port_base=9000)
    assert isinstance(resolver, tf.distribute.cluster_resolver.SlurmClusterResolver)
    assert resolver.cluster_spec().as_dict() == {
        "worker": ["node1:9000", "node1:9001", "node2:9000"]}
    assert (resolver.task_type, resolver.task_id) == ("worker", 1)

    config = {"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 1}}
    monkeypatch.setenv("TF_CONFIG", json.dumps(config))
    resolver = distribute.cluster_resolver("auto")
    assert isinstance(resolver, tf.distribute.cluster_resolver.TFConfigClusterResolver)
    assert resolver.cluster_spec().as_dict() == config["cluster"]
    assert (resolver.task_type, resolver.task_id) == ("worker", 1)
    monkeypatch.setenv("TF_CONFIG", "{}")
    with pytest.raises(ValueError, match="cluster.worker"):
        distribute.cluster_resolver("auto")


def test_one_worker_exchanges_return_their_input(mirrored):
    for strategy in (tf.distribute.get_strategy(), mirrored):
        workers = Workers.of(strategy)
        assert (workers.index, workers.count, workers.is_chief) == (0, 1, True)
        assert workers.shard("abc") == ["a", "b", "c"]
        np.testing.assert_array_equal(workers.sum([1, 2]), [1, 2])
        assert workers.chief_json({"rounds": [1.5]}) == {"rounds": [1.5]}
    assert Workers(1, 3).shard(range(8)) == [1, 4, 7]
    assert not Workers(1, 3).is_chief


def test_a_workers_files_move_into_the_run(tmp_path):
    """The chief publishes a worker's offline files by renaming them; DONE markers and
    temporaries of the worker's folder stay behind and are deleted with it."""
    worker, run = tmp_path / "worker", tmp_path / "run"
    for name in ("aachen/a.png", "bremen/b.png", "DONE", ".c.png.x1.tmp"):
        (worker / name).parent.mkdir(parents=True, exist_ok=True)
        (worker / name).write_text(name)
    (run / "aachen").mkdir(parents=True)
    (run / "aachen" / "z.png").write_text("kept")
    assert files.move_files(str(worker), str(run)) == 2
    assert not worker.exists()
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()) == [
        "aachen/a.png", "aachen/z.png", "bremen/b.png"]
    assert (run / "bremen" / "b.png").read_text() == "bremen/b.png"


def test_replica_share_is_the_fraction_of_the_global_count(mirrored):
    assert float(distribute.replica_share(5)) == 1.0

    def share() -> tf.Tensor:
        replica = tf.distribute.get_replica_context().replica_id_in_sync_group
        return distribute.replica_share(1 + 2 * replica)  # counts 1 and 3

    shares = mirrored.experimental_local_results(mirrored.run(tf.function(share)))
    np.testing.assert_allclose([float(s) for s in shares], [0.25, 0.75])


def test_spectral_norm_u_follows_the_first_replica(mirrored):
    with mirrored.scope():
        layer = SpectralNormalization(keras.layers.Conv2D(2, 3))
        layer(tf.zeros([1, 4, 4, 3]))

    @tf.function
    def write_replica_id():
        replica = tf.distribute.get_replica_context().replica_id_in_sync_group
        layer.vector_u.assign(tf.fill([1, 2], tf.cast(replica, tf.float32) + 1.0))

    mirrored.run(write_replica_id)
    for copy in _replica_copies(layer.vector_u):
        np.testing.assert_array_equal(copy, [[1.0, 1.0]])


def _translation_step(strategy: tf.distribute.Strategy) -> TranslationStep:
    """Tiny F, D_S, D_T and a stand-in M with the same initial weights in every call; SGD,
    whose update, unlike Adam's first one, shows a wrongly scaled gradient."""
    with strategy.scope():
        return tiny_translation_step(segmenter_seed=7, translator_seed=1)


@pytest.mark.slow
def test_translation_step_mirrored_equals_single_device(mirrored):
    rng = np.random.default_rng(0)
    batch = {d: rng.uniform(0, 255, (2, 16, 16, 3)).astype(np.float32) for d in DOMAINS}
    steps = {}
    for name, strategy in (("single", tf.distribute.get_strategy()), ("mirrored", mirrored)):
        step = _translation_step(strategy)
        inputs = next(iter(strategy.experimental_distribute_dataset(
            tf.data.Dataset.from_tensors(batch))))
        strategy.run(step.replica_step, args=(inputs,))  # eager: no tracing, faster here
        steps[name] = step

    def variables(step: TranslationStep) -> list:
        return step.translator.variables + [
            v for d in DOMAINS for v in step.discriminators[d].variables]

    untrained = _translation_step(tf.distribute.get_strategy())
    moved = [not np.allclose(a.numpy(), b.numpy(), rtol=1e-3) for a, b in zip(
        variables(steps["single"]), variables(untrained), strict=True)]
    assert np.mean(moved) > 0.9
    _assert_same_variables(variables(steps["mirrored"]), variables(steps["single"]))
    _assert_replicas_agree(variables(steps["mirrored"]))


@pytest.mark.slow
def test_train_translator_creates_variables_in_the_strategy_scope(mirrored, tmp_path):
    """F, D_S and D_T given unbuilt get mirrored variables: one copy per replica."""
    keras.utils.set_random_seed(7)
    inputs = keras.Input((None, None, 3))
    segmenter = keras.Model(inputs, keras.layers.Conv2D(NUM_CLASSES, 3, strides=2,
                                                        padding="same")(inputs))
    translator = build_translator(num_classes=NUM_CLASSES, dim=4, num_downsamplings=1,
                                  num_residual_blocks=1, spade_hidden=4)
    discriminators = {d: build_patch_discriminator(dim=4, num_layers=2, num_scales=1)
                      for d in DOMAINS}
    images = np.random.default_rng(0).uniform(0, 255, (2, 16, 16, 3)).astype(np.float32)
    dataset = tf.data.Dataset.from_tensors({"image": images})
    train_translator(segmenter, translator, discriminators, dataset, dataset,
                     str(tmp_path / "stage"), str(tmp_path / "logs"), 1, strategy=mirrored)
    variables = translator.variables + [v for d in DOMAINS for v in discriminators[d].variables]
    assert variables and all(len(_replica_copies(v)) == 2 for v in variables)
    _assert_replicas_agree(variables)


def _segmentation_models(strategy: tf.distribute.Strategy) -> tuple[keras.Model, keras.Model]:
    with strategy.scope():
        keras.utils.set_random_seed(3)
        segmenter = build_segmenter("deeplabv2", num_classes=NUM_CLASSES, blocks=(1, 1, 1, 1),
                                    width_multiplier=0.125)
        keras.utils.set_random_seed(4)
        discriminator = OutputDiscriminator(width=4)
    return segmenter, discriminator


def _sgd_discriminator(total_steps: int) -> optimizers.GroupedOptimizer:
    return optimizers.GroupedOptimizer([("all", None, keras.optimizers.SGD(0.1))])


def _train_one_step(strategy: tf.distribute.Strategy, stage_dir: str) -> tuple:
    segmenter, discriminator = _segmentation_models(strategy)
    train_segmenter(segmenter, stage_dir, stage_dir + "_logs", 1,
                    source_dataset=segmentation_batch(1), target_dataset=segmentation_batch(2),
                    output_discriminator=discriminator, lambda_adv=0.1,
                    optimizer_factory=lambda steps: optimizers.deeplabv2_optimizer(
                        steps, learning_rate=0.01),
                    discriminator_optimizer_factory=_sgd_discriminator, strategy=strategy)
    return segmenter, discriminator


@pytest.fixture(scope="module")
def segmentation_runs(mirrored, tmp_path_factory):
    root = tmp_path_factory.mktemp("segmentation")
    return {name: (*_train_one_step(strategy, str(root / name)), str(root / name))
            for name, strategy in (("single", tf.distribute.get_strategy()),
                                   ("mirrored", mirrored))}


def test_segmenter_step_mirrored_equals_single_device(segmentation_runs):
    single_m, single_d, _ = segmentation_runs["single"]
    mirrored_m, mirrored_d, _ = segmentation_runs["mirrored"]
    initial_m, initial_d = _segmentation_models(tf.distribute.get_strategy())
    initial_d(tf.zeros([1, HEIGHT, WIDTH, NUM_CLASSES]))
    for trained, initial in ((single_m, initial_m), (single_d, initial_d)):
        moved = [not np.allclose(a.numpy(), b.numpy(), rtol=1e-3)
                 for a, b in zip(trained.trainable_variables, initial.trainable_variables,
                                 strict=True)]
        assert all(moved)
    _assert_same_variables(mirrored_m.variables + mirrored_d.variables,
                           single_m.variables + single_d.variables)
    _assert_replicas_agree(mirrored_m.variables + mirrored_d.variables)


def test_checkpoints_restore_across_strategies(segmentation_runs, mirrored):
    mirrored_m, _, mirrored_dir = segmentation_runs["mirrored"]
    restored, _ = _segmentation_models(tf.distribute.get_strategy())
    checkpoints.restore_for_inference(mirrored_dir, segmenter=restored)
    _assert_same_variables(restored.variables, mirrored_m.variables)

    single_m, single_d, single_dir = segmentation_runs["single"]
    segmenter, discriminator = _segmentation_models(mirrored)
    with mirrored.scope():
        discriminator(tf.zeros([1, HEIGHT, WIDTH, NUM_CLASSES]))
        seg_optimizer = optimizers.deeplabv2_optimizer(1)
        d_optimizer = _sgd_discriminator(1)
        items = seg_optimizer.checkpoint_items("segmenter_optimizer",
                                               segmenter.trainable_variables)
        items.update(d_optimizer.checkpoint_items("output_discriminator_optimizer",
                                                  discriminator.trainable_variables))
        ckpt = checkpoints.StageCheckpoint(single_dir, optimizers=items, segmenter=segmenter,
                                           output_discriminator=discriminator)
    assert ckpt.restore_latest() == 1
    _assert_same_variables(segmenter.variables + discriminator.variables,
                           single_m.variables + single_d.variables)
    _assert_replicas_agree(segmenter.variables + discriminator.variables)
    for optimizer in seg_optimizer.optimizers.values():
        assert [int(copy) for copy in _replica_copies(optimizer.iterations)] == [1, 1]
        velocities = [v for v in optimizer.variables if "momentum" in v.path]
        assert velocities and all(np.abs(copy).max() > 0 for v in velocities
                                  for copy in _replica_copies(v))


@pytest.mark.slow
def test_float16_loss_scales_stay_equal_on_every_replica(mirrored, tmp_path, monkeypatch):
    """Tiny DeepLabV2 in mixed_float16 under MirroredStrategy: the first steps overflow at the
    initial scale 2^15 and are skipped on both replicas together, which halve their scale."""
    previous = keras.mixed_precision.global_policy()
    distribute.set_precision("mixed_float16")
    try:
        segmenter, discriminator = _segmentation_models(mirrored)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    grouped = []
    with_loss_scaling = optimizers.GroupedOptimizer.with_loss_scaling

    def keep(self, variables):
        grouped.append(with_loss_scaling(self, variables))
        return grouped[-1]

    monkeypatch.setattr(optimizers.GroupedOptimizer, "with_loss_scaling", keep)
    train_segmenter(segmenter, str(tmp_path / "stage"), str(tmp_path / "logs"), 6,
                    source_dataset=segmentation_batch(1), target_dataset=segmentation_batch(2),
                    output_discriminator=discriminator, lambda_adv=0.1,
                    optimizer_factory=optimizers.adam_optimizer, strategy=mirrored)
    segmenter_optimizer = grouped[0].optimizers["all"]
    scales = _replica_copies(segmenter_optimizer.dynamic_scale)
    updates = _replica_copies(segmenter_optimizer.iterations)
    assert scales[0] == scales[1] < 2.0**15
    assert updates[0] == updates[1] == 6 - round(np.log2(2.0**15 / scales[0]))
    _assert_replicas_agree(segmenter.variables + discriminator.variables)
    assert all(np.isfinite(v.numpy()).all() for v in segmenter.variables)
