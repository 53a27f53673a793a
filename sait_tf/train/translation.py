"""Trainer of the translation network F with the segmenter M frozen (paper Sec. 3.1, Eq. 1-5).

Each step updates the discriminators D_S, D_T on real images and the current translations
(Eq. 3), then the translator on

    L = l_recon L_recon + l_GAN L_GAN + l_CC_I L_CC_I + l_CC_H L_CC_H + l_SCE L_SCE   (Eq. 1)

with every term summed over both domains. M's variables never change, but L_SCE's gradient
flows through M(x_{A->B}) into F. Both optimisers are Adam (0.9, 0.99) with poly decay to 0
over the stage and separate learning rates (TTUR). Spectral normalisation is active because
every model is called with ``training=True`` inside the step.
"""

from __future__ import annotations

import gin
import keras
import tensorflow as tf

from sait_tf import images, losses
from sait_tf.models.translator import DOMAINS, translate_pixels
from sait_tf.train import distribute, loop
from sait_tf.train.optimizers import adam, loss_scaled, poly_schedule

OTHER = {"source": "target", "target": "source"}
LOSS_TERMS = ("reconstruction", "gan", "image_cycle", "latent_cycle", "sce")


class TranslationStep:
    """The per-replica training step of F and its discriminators (a ``loop.StageStep``).

    Knows the models only through ``translator.encode/decode/conditioned``, discriminators
    that map an image to a list of score maps, and a segmenter that maps RGB [0, 255] to
    logits.
    """

    def __init__(self, segmenter: keras.Model, translator: keras.Model,
                 discriminators: dict[str, keras.Model],
                 generator_optimizer: keras.optimizers.Optimizer,
                 discriminator_optimizer: keras.optimizers.Optimizer,
                 weights: dict[str, float], use_sce: bool) -> None:
        self.segmenter = segmenter
        self.translator = translator
        self.discriminators = discriminators
        self.generator_optimizer = generator_optimizer
        self.discriminator_optimizer = discriminator_optimizer
        self.weights = weights
        self.use_sce = use_sce
        self.trackables = {"translator": translator, "discriminators": discriminators}
        self.optimizers = {
            "translator_optimizer": (generator_optimizer, self.generator_variables),
            "discriminators_optimizer": (discriminator_optimizer, self.discriminator_variables)}
        self.guarded = ("translator", "discriminators")

    @property
    def generator_variables(self) -> list:
        return self.translator.trainable_variables

    @property
    def discriminator_variables(self) -> list:
        return [v for domain in DOMAINS for v in self.discriminators[domain].trainable_variables]

    def _segment(self, x_unit: tf.Tensor) -> tf.Tensor:
        return self.segmenter(images.unit_to_pixels(x_unit), training=False)

    def _discriminator_update(self, real: dict, fake: dict, share: tf.Tensor) -> dict:
        """One D_S + D_T update on real images and stopped-gradient translations (Eq. 3).

        ``share`` is this replica's fraction of the global batch (``distribute.replica_share``).
        """
        with tf.GradientTape() as tape:
            loss = tf.add_n([
                losses.lsgan_discriminator_loss(
                    self.discriminators[domain](real[domain], training=True),
                    self.discriminators[domain](tf.stop_gradient(fake[domain]), training=True))
                for domain in DOMAINS])
            scaled = self.weights["gan"] * loss * share
            grads_of = distribute.scale_loss(self.discriminator_optimizer, scaled)
        variables = self.discriminator_variables
        grads = tape.gradient(grads_of, variables)
        applied = distribute.apply_gradients(self.discriminator_optimizer, grads, variables,
                                             scaled)
        return {"discriminators": loss, "discriminators_applied": applied}

    def replica_step(self, batch: dict[str, tf.Tensor]) -> dict:
        """Discriminator update, then translator update, on ``batch`` {"source", "target"} of
        float32 RGB [0, 255] images; returns the unweighted loss terms.

        Eq. 1 is a sum of one term per direction (source->target->source and back), so F's
        gradient is taken one direction at a time: the second direction's M pass, cycle pass
        and discriminator scores are computed only after the first direction's gradient, and
        M's pass for L_SCE is recomputed in the backward pass instead of being kept. The
        update equals that of one tape over both directions; peak memory is about half.
        Losses are float32 (the loss functions cast 16-bit model outputs). Under a
        tf.distribute strategy each replica weights its losses by its share of the global
        batch, so the all-reduced update is that of one device on the whole batch.
        """
        source_pixels, target_pixels = batch["source"], batch["target"]
        share = distribute.replica_share(tf.shape(source_pixels)[0])
        tf.debugging.assert_equal(
            tf.shape(source_pixels)[0], tf.shape(target_pixels)[0],
            message="train_translator: source and target batches must have the same size")
        x = {"source": images.pixels_to_unit(source_pixels),
             "target": images.pixels_to_unit(target_pixels)}
        seg = {"source": tf.stop_gradient(self.segmenter(source_pixels, training=False)),
               "target": tf.stop_gradient(self.segmenter(target_pixels, training=False))}
        translator = self.translator
        tapes = {d: tf.GradientTape() for d in DOMAINS}
        z, recon, translated = {}, {}, {}
        for d in DOMAINS:
            with tapes[d]:
                z[d] = translator.encode(x[d], d, training=True)
                recon[d] = translator.decode(z[d], seg[d], d, training=True)
                # translated[d] is x_{d->other}; it is judged by the other domain's discriminator.
                translated[d] = translator.decode(z[d], seg[d], OTHER[d], training=True)
        results = self._discriminator_update(
            x, {OTHER[d]: translated[d] for d in DOMAINS}, share)
        variables = self.generator_variables
        terms = {name: [] for name in LOSS_TERMS}
        grads, total = None, []
        for d in DOMAINS:
            with tapes[d]:
                after = [] if grads is None else [g for g in grads if g is not None]
                with tf.control_dependencies(after):
                    translated_d = tf.identity(translated[d])
                direction = self._direction_terms(d, x[d], seg[d], z[d], recon[d], translated_d)
                weighted = tf.add_n([self.weights[name] * value
                                     for name, value in direction.items()])
                grads_of = distribute.scale_loss(self.generator_optimizer, weighted * share)
            direction_grads = tapes[d].gradient(grads_of, variables)
            grads = direction_grads if grads is None else [
                loop.add_gradients(a, b) for a, b in zip(grads, direction_grads, strict=True)]
            total.append(weighted)
            for name, value in direction.items():
                terms[name].append(value)
        terms = {name: tf.add_n(values) for name, values in terms.items() if values}
        total = tf.add_n(total)
        applied = distribute.apply_gradients(self.generator_optimizer, grads, variables,
                                             total * share)
        results.update(terms)
        results.update({"translator": total, "translator_applied": applied})
        return results

    def _direction_terms(self, domain: str, x: tf.Tensor, seg: tf.Tensor, z: tf.Tensor,
                         recon: tf.Tensor, translated: tf.Tensor) -> dict[str, tf.Tensor]:
        """The unweighted Eq. 1 terms of one direction, ``domain`` -> other -> ``domain``."""
        other = OTHER[domain]
        terms = {}
        seg_translated = None
        if self.use_sce:
            seg_translated = tf.recompute_grad(self._segment)(translated)
            terms["sce"] = losses.symmetric_cross_entropy(seg, seg_translated)
        elif self.translator.conditioned:
            seg_translated = self._segment(tf.stop_gradient(translated))
        guide = None if seg_translated is None else tf.stop_gradient(seg_translated)
        z_cycle = self.translator.encode(translated, other, training=True)
        x_cycle = self.translator.decode(z_cycle, guide, domain, training=True)
        terms["reconstruction"] = losses.l1_loss(recon, x)
        terms["gan"] = losses.lsgan_generator_loss(
            self.discriminators[other](translated, training=True))
        terms["image_cycle"] = losses.l1_loss(x_cycle, x)
        terms["latent_cycle"] = losses.l1_loss(z_cycle, z)
        return terms

    def learning_rates(self) -> dict[str, float]:
        return {"translator": float(self.generator_optimizer.learning_rate),
                "discriminators": float(self.discriminator_optimizer.learning_rate)}

    def progress_text(self, results: dict[str, tf.Tensor]) -> str:
        return (f"G {float(results['translator']):.4f}  "
                f"D {float(results['discriminators']):.4f}")


def preview_grids(segmenter: keras.Model, translator: keras.Model, source_pixels: tf.Tensor,
                  target_pixels: tf.Tensor) -> dict[str, tf.Tensor]:
    """Per domain, uint8 rows [x, colourised argmax M(x), x_{A->B}, x_{A->B->A}]."""
    grids = {}
    for d, pixels in (("source", source_pixels), ("target", target_pixels)):
        translated = translate_pixels(segmenter, translator, pixels, d, OTHER[d])
        cycled = translate_pixels(segmenter, translator, translated, OTHER[d], d)
        logits = images.resize_logits(segmenter(pixels, training=False), tf.shape(pixels)[1:3])
        row = [images.to_uint8(pixels), images.colorize(tf.argmax(logits, axis=-1)),
               images.to_uint8(translated), images.to_uint8(cycled)]
        grids[d] = tf.concat(row, axis=2)
    return grids


def _images_of(dataset: tf.data.Dataset, param: str) -> tf.data.Dataset:
    spec = dataset.element_spec
    if not isinstance(spec, dict) or "image" not in spec:
        raise ValueError(f"train_translator: {param} must yield dicts with an 'image' key, "
                         f"got {spec}")
    return dataset.map(lambda example: example["image"])


def _check_image_size(pixels: tf.Tensor, multiple: int, param: str) -> None:
    height, width = int(pixels.shape[1]), int(pixels.shape[2])
    if height % multiple or width % multiple:
        raise ValueError(f"train_translator: {param} images are {height}x{width}; the translator "
                         f"needs sides that are multiples of {multiple} (set the crop size)")


@gin.configurable(denylist=["segmenter", "translator", "discriminators", "source_dataset",
                            "target_dataset", "stage_dir", "log_dir", "strategy"])
def train_translator(
    segmenter: keras.Model,
    translator: keras.Model,
    discriminators: dict[str, keras.Model],
    source_dataset: tf.data.Dataset,
    target_dataset: tf.data.Dataset,
    stage_dir: str,
    log_dir: str,
    steps: int,
    generator_lr: float = 1e-4,
    discriminator_lr: float = 4e-4,
    beta_1: float = 0.9,
    beta_2: float = 0.99,
    poly_power: float = 0.9,
    reconstruction_weight: float = 10.0,
    gan_weight: float = 1.0,
    image_cycle_weight: float = 10.0,
    latent_cycle_weight: float = 1.0,
    sce_weight: float = 10.0,
    use_sce: bool = True,
    checkpoint_every: int = 1000,
    summary_every: int = 50,
    log_images_every: int = 1000,
    num_preview_images: int = 2,
    strategy: tf.distribute.Strategy | None = None,
    jit_compile: bool = False,
) -> keras.Model:
    """Trains ``translator`` (F) for ``steps`` iterations in ``stage_dir``; resumable, idempotent.

    ``discriminators`` is ``{"source": D_S, "target": D_T}``. The datasets yield batches
    {"image": float32 RGB [0, 255] [B, H, W, 3], ...} of the same batch size and are
    repeated here; image sides must be multiples of ``translator.size_multiple``. TTUR:
    ``generator_lr`` 1e-4 as in the paper, ``discriminator_lr`` 4e-4 following Heusel et al.
    (the paper gives only 1e-4 and "TTUR"). ``use_sce`` False drops L_SCE (Table 3).
    A new run resumes from the newest checkpoint of ``stage_dir`` (step, weights, optimiser
    state); the data streams restart from their first batch. A stage with a DONE marker
    only restores the weights of the translator and the discriminators (the next round
    goes on from them, as an uninterrupted run does). Returns ``translator``.

    ``strategy`` (default: the current one) runs a replica step per device on its slice of
    each batch; the batch sizes are global. Models built under ``mixed_float16``
    (``distribute.set_precision``) train with loss-scaled optimisers. ``jit_compile``
    compiles the whole step (updates included) with XLA.
    """
    if set(discriminators) != set(DOMAINS):
        raise ValueError(f"train_translator: discriminators must have keys {DOMAINS}, "
                         f"got {sorted(discriminators)}")
    weights = {"reconstruction": reconstruction_weight, "gan": gan_weight,
               "image_cycle": image_cycle_weight, "latent_cycle": latent_cycle_weight,
               "sce": sce_weight}
    streams = {"source": _images_of(source_dataset, "source_dataset"),
               "target": _images_of(target_dataset, "target_dataset")}
    first = {domain: next(iter(stream.take(1))) for domain, stream in streams.items()}
    for domain, pixels in first.items():
        _check_image_size(pixels, translator.size_multiple, f"{domain}_dataset")
    # Models not built yet get their variables here, in the strategy's scope: created outside
    # it, they would be plain variables instead of one mirrored copy per replica.
    with (strategy or tf.distribute.get_strategy()).scope():
        for domain, pixels in first.items():
            discriminators[domain](images.pixels_to_unit(pixels))
        translator.build()

    def make_step() -> TranslationStep:
        def optimizer(learning_rate: float, model: keras.Model, variables: list, name: str):
            schedule = poly_schedule(learning_rate, steps, poly_power)
            return loss_scaled(adam(schedule, beta_1, beta_2, name), model, variables)

        d_variables = [v for domain in DOMAINS for v in discriminators[domain].trainable_variables]
        return TranslationStep(
            segmenter, translator, discriminators,
            optimizer(generator_lr, translator, translator.trainable_variables, "translator"),
            optimizer(discriminator_lr, discriminators["source"], d_variables, "discriminators"),
            weights, use_sce)

    previews = tf.function(lambda source, target: preview_grids(segmenter, translator, source,
                                                                target), autograph=False)

    def log_previews(step: int, writer: tf.summary.SummaryWriter) -> None:
        grids = previews(first["source"][:num_preview_images],
                         first["target"][:num_preview_images])
        with writer.as_default(step=step):
            for domain, grid in grids.items():
                tf.summary.image(f"{domain}/image_prediction_translated_cycled", grid,
                                 max_outputs=num_preview_images)

    loop.run_stage(
        stage_dir, log_dir, steps, tf.data.Dataset.zip(streams), make_step,
        inference_models={"translator": translator, "discriminators": discriminators},
        configurable="train_translator",
        strategy=strategy,
        checkpoint_every=checkpoint_every, summary_every=summary_every,
        triggers=[loop.Trigger(log_images_every, log_previews, "log_images")],
        jit_compile=jit_compile)
    return translator
