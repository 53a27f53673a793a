"""PyTorch segmenter checkpoints -> Keras ``.weights.h5`` for ``build_segmenter``.

The paper configs (gin/*.gin) start M from BDL's published models, the ``*_from_scratch``
configs from ``weights/deeplabv2_init.weights.h5`` and ``weights/fcn8s_init.weights.h5``;
these commands write them (``--output`` defaults to ``weights/<arch>_init.weights.h5``;
docs/checkpoints.md says where the inputs come from):

    python -m sait_tf.tools.convert_torch --arch deeplabv2 --num_classes 19 \\
        --input GTA5_deeplab.pth --output weights/bdl_gta5_deeplabv2.weights.h5
    python -m sait_tf.tools.convert_torch --arch deeplabv2 --num_classes 19 \\
        --input SYNTHIA_deeplab.pth --output weights/bdl_synthia_deeplabv2.weights.h5
    python -m sait_tf.tools.convert_torch --arch fcn8s --num_classes 19 \\
        --input GTA5_VGG.pth --output weights/bdl_gta5_fcn8s.weights.h5
    python -m sait_tf.tools.convert_torch --arch fcn8s --num_classes 19 \\
        --input SYNTHIA_VGG.pth --output weights/bdl_synthia_fcn8s.weights.h5
    python -m sait_tf.tools.convert_torch --arch deeplabv2 --num_classes 19 \\
        --input DeepLab_resnet_pretrained_init-f81d91e8.pth \\
        --output weights/deeplabv2_init.weights.h5
    python -m sait_tf.tools.convert_torch --arch fcn8s --num_classes 19 \\
        --keras_vgg16 vgg16_weights_tf_dim_ordering_tf_kernels.h5 \\
        --output weights/fcn8s_init.weights.h5

Reads state_dicts with the peers' key names (docs/checkpoints.md): plain, or wrapped as
``{"state_dict": ...}`` / ``{"model": ...}``, with or without a leading prefix such as
``Scale.`` or ``module.``. The classifier is skipped (keeping its initialisation) when the
checkpoint's class count differs from ``--num_classes``. Any other difference (missing keys,
unexpected keys, shape mismatches) stops the conversion with the full list. The output
loads with ``build_segmenter(arch, num_classes, **knobs).load_weights(OUTPUT)``.

torch is needed only to read ``.pth`` files (``--input``), and is imported only then.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping

import keras
import numpy as np
from absl import app, flags, logging

from sait_tf import cli
from sait_tf.models import Segmenter, build_segmenter
from sait_tf.models.deeplabv2 import FrozenBatchNorm

# Module prefixes of the class-dependent layers, and the key whose first dimension is the
# checkpoint's class count.
CLASSIFIER_PREFIXES = {
    "deeplabv2": ("layer5.",),
    "fcn8s": ("score_fr.", "score_pool4.", "score_pool3.", "upscore2.", "upscore_pool4.",
              "upscore8."),
}
CLASS_COUNT_KEY = {"deeplabv2": "layer5.conv2d_list.0.weight", "fcn8s": "score_fr.weight"}
IGNORED_SUFFIXES = (".num_batches_tracked",)
WRAPPER_KEYS = ("state_dict", "model")
# keras.applications.VGG16 layer -> FCN8s layer.
KERAS_VGG16_LAYERS = {f"block{stage}_conv{index}": f"conv{stage}_{index}"
                      for stage, convs in enumerate((2, 2, 3, 3, 3), start=1)
                      for index in range(1, convs + 1)}
KERAS_VGG16_FC = {"fc1": "fc6", "fc2": "fc7"}
MAX_LISTED = 30
# The files the paper configs (gin/*.gin, INIT_WEIGHTS) load.
DEFAULT_OUTPUT = "weights/{arch}_init.weights.h5"


class CheckpointMismatchError(ValueError):
    """The checkpoint does not fit the network; the message lists every difference."""


def _oihw_to_hwio(weight: np.ndarray) -> np.ndarray:
    """Conv (O, I, kh, kw) and transposed conv (I, O, kh, kw) -> Keras (kh, kw, ., .)."""
    return np.transpose(weight, (2, 3, 1, 0))


def _identity(value: np.ndarray) -> np.ndarray:
    return value


def _hwio_shape_to_torch(shape: tuple[int, ...]) -> tuple[int, ...]:
    kh, kw, second, first = shape
    return (first, second, kh, kw)


def _layer_parameters(module: str, layer: keras.layers.Layer):
    """(torch key, Keras variable, converter) for one conv, transposed conv or BN layer."""
    if isinstance(layer, FrozenBatchNorm):
        return [(f"{module}.weight", layer.gamma, _identity),
                (f"{module}.bias", layer.beta, _identity),
                (f"{module}.running_mean", layer.moving_mean, _identity),
                (f"{module}.running_var", layer.moving_variance, _identity)]
    if isinstance(layer, keras.layers.Conv2D | keras.layers.Conv2DTranspose):
        entries = [(f"{module}.weight", layer.kernel, _oihw_to_hwio)]
        if layer.use_bias:
            entries.append((f"{module}.bias", layer.bias, _identity))
        return entries
    raise TypeError(f"layer {layer.name!r} ({type(layer).__name__}) has weights the converter "
                    "does not know")


def torch_parameters(model: Segmenter) -> dict[str, tuple[keras.Variable, Callable]]:
    """Every peer state_dict key of ``model`` -> (Keras variable, torch-to-Keras converter).

    The modules are ``model.torch_layers``: the peers' module paths, e.g. ``layer3.5.conv2``
    or the DeepLabV2 classifier branches ``layer5.conv2d_list.i``.
    """
    parameters = {}
    for module, layer in model.torch_layers.items():
        for key, variable, convert in _layer_parameters(module, layer):
            parameters[key] = (variable, convert)
    return parameters


def _expected_torch_shape(variable: keras.Variable, convert: Callable) -> tuple[int, ...]:
    shape = tuple(variable.shape)
    return _hwio_shape_to_torch(shape) if convert is _oihw_to_hwio else shape


def _strip_prefixes(state_dict: dict[str, np.ndarray], top_level: set[str]) -> dict:
    """Drops leading components (``Scale.``, ``module.``) shared by all keys and unknown to
    the network. What stays must still be ``module.parameter``: in ``fc.weight``, ``fc`` is a
    layer, not a wrapper."""
    while state_dict:
        heads = {key.split(".", 1)[0] for key in state_dict}
        if len(heads) != 1 or heads <= top_level or not all(k.count(".") >= 2
                                                             for k in state_dict):
            break
        logging.info("Stripping the prefix %r from every checkpoint key.", f"{heads.pop()}.")
        state_dict = {key.split(".", 1)[1]: value for key, value in state_dict.items()}
    return state_dict


def _listing(title: str, lines: list[str]) -> str:
    shown = lines[:MAX_LISTED]
    more = [f"  ... and {len(lines) - MAX_LISTED} more"] if len(lines) > MAX_LISTED else []
    return "\n".join([f"{title} ({len(lines)}):", *(f"  {line}" for line in shown), *more])


def convert_state_dict(state_dict: Mapping[str, np.ndarray], arch: str, num_classes: int,
                       source: str = "state_dict", **size_knobs) -> Segmenter:
    """Builds ``build_segmenter(arch, num_classes, **size_knobs)`` and loads a peer state_dict.

    ``source`` names the checkpoint in messages. Raises ``CheckpointMismatchError`` listing
    missing keys, unexpected keys and shape mismatches before any weight is assigned.
    """
    model = build_segmenter(arch, num_classes, **size_knobs)
    parameters = torch_parameters(model)
    state = {key: np.asarray(value) for key, value in state_dict.items()
             if not key.endswith(IGNORED_SUFFIXES)}
    state = _strip_prefixes(state, {key.split(".", 1)[0] for key in parameters})

    class_key = CLASS_COUNT_KEY[arch]
    if class_key in state and state[class_key].shape[0] != num_classes:
        logging.warning("%s: classifier has %d classes, the network %d: skipping the classifier "
                        "(%s), which keeps its initialisation.", source,
                        state[class_key].shape[0], num_classes,
                        ", ".join(p.rstrip(".") for p in CLASSIFIER_PREFIXES[arch]))
        prefixes = CLASSIFIER_PREFIXES[arch]
        state = {k: v for k, v in state.items() if not k.startswith(prefixes)}
        parameters = {k: v for k, v in parameters.items() if not k.startswith(prefixes)}

    missing = [f"{key} {_expected_torch_shape(*parameters[key])}"
               for key in parameters if key not in state]
    unexpected = [f"{key} {tuple(state[key].shape)}" for key in state if key not in parameters]
    mismatched = [
        f"{key}: checkpoint {tuple(state[key].shape)}, network "
        f"{_expected_torch_shape(*parameters[key])}"
        for key in parameters
        if key in state and tuple(state[key].shape) != _expected_torch_shape(*parameters[key])
    ]
    if missing or unexpected or mismatched:
        sections = [_listing(title, lines) for title, lines in
                    (("missing keys", missing), ("unexpected keys", unexpected),
                     ("shape mismatches", mismatched)) if lines]
        knobs = ", ".join(f"{k}={v!r}" for k, v in size_knobs.items()) or "paper sizes"
        raise CheckpointMismatchError(
            f"{source} does not fit {arch} with {num_classes} classes ({knobs}):\n"
            + "\n".join(sections))

    for key, (variable, convert) in parameters.items():
        variable.assign(convert(state[key]).astype(np.float32))
    logging.info("%s: loaded %d tensors into %s.", source, len(parameters), arch)
    return model


def convert_keras_vgg16(weights_path: str, num_classes: int, **size_knobs) -> Segmenter:
    """FCN8s initialised from a user-supplied ``keras.applications.VGG16`` weights file (with
    top): conv layers copied, fc1/fc2 reshaped into the 7x7 fc6 and 1x1 fc7 convs."""
    if size_knobs.get("width_multiplier", 1.0) != 1.0:
        raise ValueError("--keras_vgg16 needs the full-width FCN8s (width_multiplier=1.0)")
    if not os.path.isfile(weights_path):
        raise FileNotFoundError(f"--keras_vgg16: no such file {weights_path!r}")
    vgg16 = keras.applications.VGG16(weights=None, include_top=True)
    try:
        vgg16.load_weights(weights_path)
    except Exception as error:
        raise ValueError(f"--keras_vgg16 {weights_path!r} is not a keras.applications.VGG16 "
                         f"weights file with top (fc1, fc2): {error}") from error
    model = build_segmenter("fcn8s", num_classes, **size_knobs)
    for source_name, target_name in KERAS_VGG16_LAYERS.items():
        model.torch_layers[target_name].set_weights(vgg16.get_layer(source_name).get_weights())
    for source_name, target_name in KERAS_VGG16_FC.items():
        kernel, bias = vgg16.get_layer(source_name).get_weights()
        target = model.torch_layers[target_name]
        # Keras flattens (h, w, c) row-major, so the Dense kernel reshapes straight to HWIO.
        target.set_weights([kernel.reshape(target.kernel.shape), bias])
    logging.info("%s: loaded VGG16 conv1_1..conv5_3, fc6, fc7; score layers keep their "
                 "initialisation.", weights_path)
    return model


def load_torch_state_dict(path: str) -> dict[str, np.ndarray]:
    """Reads a ``.pth`` state_dict (plain or wrapped in "state_dict"/"model") as numpy."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--input: no such file {path!r}")
    try:
        import torch
    except ImportError as error:
        raise ImportError("reading .pth checkpoints needs PyTorch: pip install torch") from error
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"--input {path!r}: cannot read it as a PyTorch state_dict: {error}"
                         ) from error
    for wrapper in WRAPPER_KEYS:
        if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get(wrapper), Mapping):
            checkpoint = checkpoint[wrapper]
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"--input {path!r} holds a {type(checkpoint).__name__}, "
                         "not a state_dict")
    tensors = {key: value for key, value in checkpoint.items() if isinstance(value, torch.Tensor)}
    if not tensors:
        raise ValueError(f"--input {path!r} holds no tensors; keys: {sorted(checkpoint)[:10]}")
    return {key: value.detach().cpu().float().numpy() for key, value in tensors.items()}


def save_weights(model: keras.Model, output: str) -> None:
    """Writes ``output`` (``*.weights.h5``) through a temporary name, so it appears complete."""
    directory, name = os.path.split(os.path.abspath(output))
    os.makedirs(directory, exist_ok=True)
    temporary = os.path.join(directory, f".{name[:-len('.weights.h5')]}.partial.weights.h5")
    model.save_weights(temporary)
    os.replace(temporary, output)


def _define_flags() -> flags.FlagValues:
    """The command line's own flags (a private FlagValues: no clash with other binaries)."""
    values = flags.FlagValues()
    flags.DEFINE_enum("arch", None, ["deeplabv2", "fcn8s"], "Segmenter architecture.",
                      flag_values=values)
    flags.DEFINE_integer("num_classes", 19, "Classes of the Keras segmenter.", flag_values=values)
    flags.DEFINE_string("input", None, "PyTorch checkpoint (.pth) with the peers' key names.",
                        flag_values=values)
    flags.DEFINE_string("keras_vgg16", None, "fcn8s only, instead of --input: "
                        "keras.applications.VGG16 weights file with top.", flag_values=values)
    flags.DEFINE_string("output", None, "Output Keras weights file, ending in .weights.h5. "
                        f"Default: {DEFAULT_OUTPUT.format(arch='<arch>')}, the file the "
                        "paper configs load.",
                        flag_values=values)
    flags.DEFINE_list("blocks", None, "deeplabv2 size knob: bottlenecks per layer, e.g. 1,1,1,1.",
                      flag_values=values)
    flags.DEFINE_float("width_multiplier", None, "Size knob: width multiplier (default 1.0).",
                       flag_values=values)
    return values


def flags_help() -> str:
    """The converter's flags, as ``--help`` lists them."""
    listing = _define_flags().get_help(prefix="  ", include_special_flags=False)
    # Drops the defining module's name: every flag here is the converter's.
    return "\n".join(["flags:", *(line[2:] for line in listing.splitlines()
                                   if line.startswith("    "))])


def parse_flags(argv: list[str]) -> flags.FlagValues:
    """Parses and checks the converter's flags; ``--output`` gets its default here."""
    values = _define_flags()
    try:
        unparsed = values(argv)
    except flags.Error as error:
        raise app.UsageError(f"{error}\n{flags_help()}") from error
    if len(unparsed) > 1:
        raise app.UsageError(f"unexpected arguments: {unparsed[1:]}")
    if values.arch is None:
        raise app.UsageError("--arch is required")
    if values.output is None:
        values.output = DEFAULT_OUTPUT.format(arch=values.arch)
    if not values.output.endswith(".weights.h5"):
        raise app.UsageError(f"--output must end in .weights.h5, got {values.output!r}")
    if (values.input is None) == (values.keras_vgg16 is None):
        raise app.UsageError("give exactly one of --input and --keras_vgg16")
    if values.keras_vgg16 is not None and values.arch != "fcn8s":
        raise app.UsageError("--keras_vgg16 initialises fcn8s only")
    return values


def _size_knobs(values: flags.FlagValues) -> dict:
    knobs = {}
    if values.blocks is not None:
        try:
            knobs["blocks"] = tuple(int(b) for b in values.blocks)
        except ValueError as error:
            raise app.UsageError(f"--blocks must be integers, got {values.blocks}") from error
    if values.width_multiplier is not None:
        knobs["width_multiplier"] = values.width_multiplier
    return knobs


def main(argv: list[str]) -> None:
    """Converts ``--input`` (or ``--keras_vgg16``) into ``--output``."""
    values = parse_flags(argv)
    knobs = _size_knobs(values)
    try:
        if values.keras_vgg16 is not None:
            model = convert_keras_vgg16(values.keras_vgg16, values.num_classes, **knobs)
        else:
            state_dict = load_torch_state_dict(values.input)
            model = convert_state_dict(state_dict, values.arch, values.num_classes,
                                       source=values.input, **knobs)
    except (CheckpointMismatchError, FileNotFoundError) as error:
        raise SystemExit(f"convert_torch: {error}") from error
    save_weights(model, values.output)
    logging.info("Wrote %s", values.output)


def _parse_absl_flags(argv: list[str]) -> list[str]:
    """Lets app.run parse absl's own flags (logging) and hands the rest to ``main``; ``--help``
    prints this module's usage and the converter's flags."""
    if any(arg in ("-h", "-?", "--help", "--helpshort") for arg in argv[1:]):
        print(f"{__doc__}\n{flags_help()}")
        sys.exit(0)
    return flags.FLAGS(argv, known_only=True)


if __name__ == "__main__":
    app.run(cli.guarded(main), flags_parser=_parse_absl_flags)
