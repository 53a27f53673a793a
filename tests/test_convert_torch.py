"""PyTorch checkpoint conversion: parity with independent PyTorch networks, and the errors."""

from __future__ import annotations

import logging

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from sait_tf.models import build_segmenter  # noqa: E402
from sait_tf.tools import convert_torch, torch_reference  # noqa: E402

TINY_DEEPLAB = {"blocks": (1, 1, 1, 1), "width_multiplier": 0.125}
ODD_SIZE = (65, 97)
# Even stem output in both dimensions (32 x 50), so the ceil-mode max-pool adds a window.
DEEPLAB_PARITY_SIZE = (64, 99)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _image(seed: int, size=ODD_SIZE) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (1, *size, 3)).astype(np.float32)


def _relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def _numpy_state(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {key: value.numpy() for key, value in module.state_dict().items()}


def test_deeplabv2_parity_through_the_cli(tmp_path):
    reference = torch_reference.randomize_(torch_reference.DeepLabV2(19), seed=1,
                                           input_scale=64.0)
    checkpoint = tmp_path / "deeplab.pth"
    torch.save({f"Scale.{k}": v for k, v in reference.state_dict().items()}, checkpoint)
    output = tmp_path / "deeplab.weights.h5"

    convert_torch.main(["convert_torch", "--arch=deeplabv2", "--num_classes=19",
                        f"--input={checkpoint}", f"--output={output}"])

    model = build_segmenter("deeplabv2", 19)
    model.load_weights(str(output))
    image = _image(0, DEEPLAB_PARITY_SIZE)
    expected = torch_reference.run(reference, torch_reference.caffe_input(image))
    actual = model(image).numpy()
    assert actual.shape == expected.shape == (1, 9, 13, 19)
    assert expected.std() > 0.1
    assert _relative_error(actual, expected) < 1e-4


def test_fcn8s_parity_with_wrapped_module_checkpoint(tmp_path):
    # A quarter of VGG16's widths keeps the file small; the layout (pad 100, ceil-mode pools,
    # scaled skips, crops 5/9/31) is the full one.
    reference = torch_reference.randomize_(torch_reference.FCN8s(19, width_multiplier=0.25),
                                           seed=2, input_scale=64.0)
    with torch.no_grad():  # make both skips as strong as the fc7 path despite their scaling
        reference.score_pool4.weight.mul_(100.0)
        reference.score_pool3.weight.mul_(10000.0)
    state = {f"module.{k}": v for k, v in reference.state_dict().items()}
    checkpoint = tmp_path / "fcn8s.pth"
    torch.save({"state_dict": state, "epoch": 3}, checkpoint)
    output = tmp_path / "fcn8s.weights.h5"

    convert_torch.main(["convert_torch", "--arch=fcn8s", "--num_classes=19",
                        "--width_multiplier=0.25", f"--input={checkpoint}", f"--output={output}"])

    model = build_segmenter("fcn8s", 19, width_multiplier=0.25)
    model.load_weights(str(output))
    image = _image(1)
    expected = torch_reference.run(reference, torch_reference.caffe_input(image))
    actual = model(image).numpy()
    assert actual.shape == expected.shape == (1, *ODD_SIZE, 19)
    assert _relative_error(actual, expected) < 1e-4


def test_classifier_skipped_when_class_count_differs(caplog):
    reference = torch_reference.randomize_(
        torch_reference.DeepLabV2(21, **TINY_DEEPLAB), seed=3, input_scale=64.0)
    state = _numpy_state(reference)

    with caplog.at_level(logging.WARNING):
        model = convert_torch.convert_state_dict(state, "deeplabv2", 19, source="init.pth",
                                                 **TINY_DEEPLAB)

    warning = " ".join(record.getMessage() for record in caplog.records)
    assert "init.pth" in warning and "21 classes" in warning and "layer5" in warning
    conv2 = model.torch_layers["layer3.0.conv2"].kernel.numpy()
    np.testing.assert_array_equal(conv2, state["layer3.0.conv2.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(model.torch_layers["layer2.0.downsample.1"].moving_variance,
                                  state["layer2.0.downsample.1.running_var"])
    for i in range(4):  # still the N(0, 0.01) initialisation
        conv = model.torch_layers[f"layer5.conv2d_list.{i}"]
        assert conv.kernel.shape[-1] == 19
        assert 0.008 < float(np.std(conv.kernel.numpy())) < 0.012
        np.testing.assert_array_equal(conv.bias.numpy(), 0.0)


def test_torch_layers_are_the_peers_modules_with_their_names():
    """``torch_layers``: exactly the peers' state_dict modules, read-only; a layer's Keras name
    is the last component of its module path (``layer5`` is named ``classifier``)."""
    for model, reference in (
            (build_segmenter("deeplabv2", 19, **TINY_DEEPLAB),
             torch_reference.DeepLabV2(19, **TINY_DEEPLAB)),
            (build_segmenter("fcn8s", 19, width_multiplier=0.0625),
             torch_reference.FCN8s(19, width_multiplier=0.0625))):
        modules = {key.rsplit(".", 1)[0] for key in reference.state_dict()}
        assert set(model.torch_layers) == modules
        with pytest.raises(TypeError):
            model.torch_layers["extra"] = None
        for path, layer in model.torch_layers.items():
            if not path.startswith("layer5."):
                assert path == layer.name or path.endswith(f".{layer.name}"), path


def test_mismatch_lists_missing_unexpected_and_shapes():
    reference = torch_reference.DeepLabV2(19, **TINY_DEEPLAB)
    state = _numpy_state(reference)
    del state["layer2.0.bn1.running_var"]
    state["layer9.0.conv1.weight"] = np.zeros((4, 4, 1, 1), np.float32)
    state["layer3.0.conv2.weight"] = np.zeros((32, 32, 1, 1), np.float32)

    with pytest.raises(convert_torch.CheckpointMismatchError) as error:
        convert_torch.convert_state_dict(state, "deeplabv2", 19, source="broken.pth",
                                         **TINY_DEEPLAB)

    message = str(error.value)
    assert "broken.pth" in message
    assert "missing keys (1):\n  layer2.0.bn1.running_var (16,)" in message
    assert "unexpected keys (1):\n  layer9.0.conv1.weight (4, 4, 1, 1)" in message
    assert ("layer3.0.conv2.weight: checkpoint (32, 32, 1, 1), network (32, 32, 3, 3)"
            in message)


def test_fcn8s_from_keras_vgg16(tmp_path):
    keras = pytest.importorskip("keras")
    vgg16 = keras.applications.VGG16(weights=None, include_top=True)
    vgg_file = tmp_path / "vgg16.weights.h5"
    vgg16.save_weights(str(vgg_file))

    model = convert_torch.convert_keras_vgg16(str(vgg_file), 19)

    np.testing.assert_array_equal(model.torch_layers["conv3_2"].kernel.numpy(),
                                  vgg16.get_layer("block3_conv2").kernel.numpy())
    # fc6 on a 7x7 pool5 window computes exactly VGG16's fc1 on the flattened window.
    pool5 = np.random.default_rng(4).normal(size=(1, 7, 7, 512)).astype(np.float32)
    fc1 = vgg16.get_layer("fc1")(pool5.reshape(1, -1)).numpy()
    fc6 = model.torch_layers["fc6"](pool5).numpy().reshape(1, -1)
    np.testing.assert_allclose(fc6, fc1, rtol=1e-4, atol=1e-4)
    fc2 = vgg16.get_layer("fc2")(fc1).numpy()
    fc7 = model.torch_layers["fc7"](fc6.reshape(1, 1, 1, -1)).numpy().reshape(1, -1)
    np.testing.assert_allclose(fc7, fc2, rtol=1e-4, atol=1e-4)


def test_cli_rejects_bad_output_name_before_work(tmp_path):
    with pytest.raises(Exception, match="must end in .weights.h5"):
        convert_torch.main(["convert_torch", "--arch=fcn8s", "--input=missing.pth",
                            f"--output={tmp_path / 'out.h5'}"])
