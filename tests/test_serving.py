"""gRPC serving: the local PredictionService against the SavedModel in-process, and the client."""

import os
import queue
import shutil
import socket
import subprocess
import sys
import threading
from concurrent import futures

import grpc
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from tensorflow_serving.apis import get_model_metadata_pb2, predict_pb2
from test_export import subprocess_env, trained_tiny_segmenter

from sait_tf import export, labels
from sait_tf.serving import client, server

MAX_IMAGE_PIXELS = 64 * 64
SERVER_START_TIMEOUT_S = 180


@pytest.fixture(scope="module")
def export_base(tmp_path_factory):
    """sait_segmenter versions 1 and 2 (a copy), a half-written 3 and a temporary dir."""
    base = tmp_path_factory.mktemp("models")
    version_1 = export.export_models(trained_tiny_segmenter(), export_base=str(base))
    model_dir = base / "sait_segmenter"
    shutil.copytree(version_1["sait_segmenter"], model_dir / "2")
    (model_dir / "3").mkdir()
    (model_dir / "3" / "variables").mkdir()
    (model_dir / ".tmp-4-123").mkdir()
    return str(base)


@pytest.fixture(scope="module")
def saved_model(export_base):
    return tf.saved_model.load(os.path.join(export_base, "sait_segmenter", "2"))


def _read_port(process: subprocess.Popen, log_path) -> int:
    """Waits for the server's 'listening on HOST:PORT' line; its logs go to ``log_path``."""
    lines = queue.Queue()
    threading.Thread(target=lambda: lines.put(process.stdout.readline()), daemon=True).start()
    try:
        line = lines.get(timeout=SERVER_START_TIMEOUT_S)
    except queue.Empty:
        line = ""
    if not line.startswith("listening on "):
        raise RuntimeError(f"server did not start: {line!r}\n{log_path.read_text()[-3000:]}")
    return int(line.rsplit(":", 1)[1])


@pytest.fixture(scope="module")
def address(export_base, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "sait_tf.serving.server", "--model_base_path", export_base,
             "--port", "0", "--max_image_pixels", str(MAX_IMAGE_PIXELS)],
            stdout=subprocess.PIPE, stderr=log, text=True, env=subprocess_env(),
        )
    try:
        yield f"127.0.0.1:{_read_port(process, log_path)}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        process.stdout.close()


@pytest.fixture(scope="module")
def stub(address):
    return client.connect(address)


def image_batch(seed: int, height: int = 32, width: int = 48, batch: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (batch, height, width, 3), np.uint8)


def request_for(images=None, model="sait_segmenter", signature="", **inputs):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = signature
    if images is not None:
        inputs["images"] = images
    for key, value in inputs.items():
        request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
    return request


def test_round_trip_returns_the_labels_of_the_saved_model(stub, saved_model):
    images = image_batch(0, batch=2)
    response = stub.Predict(request_for(images), timeout=60)
    assert response.model_spec.name == "sait_segmenter"
    assert response.model_spec.version.value == 2
    assert response.model_spec.signature_name == "serving_default"
    expected = saved_model.signatures["serving_default"](images=tf.constant(images))
    assert set(response.outputs) == {"labels", "confidence", "color"}
    for key in ("labels", "confidence", "color"):
        np.testing.assert_array_equal(tf.make_ndarray(response.outputs[key]), expected[key])
    assert response.outputs["labels"].dtype == tf.int32.as_datatype_enum


def test_output_filter_and_model_version(stub):
    request = request_for(image_batch(1))
    request.output_filter.append("labels")
    request.model_spec.version.value = 2
    response = stub.Predict(request, timeout=60)
    assert list(response.outputs) == ["labels"]


def test_client_writes_colour_and_train_ids_by_pixels_and_by_bytes(stub, saved_model, tmp_path):
    image = image_batch(2)[0]
    Image.fromarray(image).save(tmp_path / "in.png")
    expected = saved_model.signatures["serving_default"](images=tf.constant(image[None]))
    for encoded in (False, True):
        out, labels_out = tmp_path / f"pred_{encoded}.png", tmp_path / f"labels_{encoded}.png"
        client.process_image(
            stub, "sait_segmenter", str(tmp_path / "in.png"), str(out), str(labels_out),
            encoded=encoded,
        )
        written_labels = np.asarray(Image.open(labels_out))
        np.testing.assert_array_equal(written_labels, expected["labels"][0])
        np.testing.assert_array_equal(
            np.asarray(Image.open(out)), labels.PALETTE[written_labels]
        )


def test_metadata_describes_the_signatures(stub):
    request = get_model_metadata_pb2.GetModelMetadataRequest()
    request.model_spec.name = "sait_segmenter"
    request.metadata_field.append("signature_def")
    response = stub.GetModelMetadata(request, timeout=30)
    assert response.model_spec.version.value == 2
    signatures = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(signatures)
    assert set(signatures.signature_def) == {"serving_default", "predict_encoded"}
    images_input = signatures.signature_def["serving_default"].inputs["images"]
    assert images_input.dtype == tf.uint8.as_datatype_enum
    assert [d.size for d in images_input.tensor_shape.dim] == [-1, -1, -1, 3]
    assert set(signatures.signature_def["predict_encoded"].outputs) == {
        "labels", "confidence", "color"}
    request.model_spec.name = "no_such_model"
    with pytest.raises(grpc.RpcError) as error:
        stub.GetModelMetadata(request, timeout=30)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


def _png(height: int, width: int) -> bytes:
    return tf.io.encode_png(image_batch(3, height, width)[0]).numpy()


def _wrong_version():
    request = request_for(image_batch(0))
    request.model_spec.version.value = 3
    return request


def _unknown_output():
    request = request_for(image_batch(0))
    request.output_filter.append("logits")
    return request


MALFORMED = {
    "unknown model": (lambda: request_for(image_batch(0), model="resnet"), "NOT_FOUND"),
    "unknown signature": (lambda: request_for(image_batch(0), signature="x"), "NOT_FOUND"),
    "unserved version": (_wrong_version, "NOT_FOUND"),
    "float pixels": (lambda: request_for(image_batch(0).astype(np.float32)), "INVALID_ARGUMENT"),
    "rank 3": (lambda: request_for(image_batch(0)[0]), "INVALID_ARGUMENT"),
    "4 channels": (lambda: request_for(np.zeros((1, 8, 8, 4), np.uint8)), "INVALID_ARGUMENT"),
    "missing input": (lambda: request_for(pixels=image_batch(0)), "INVALID_ARGUMENT"),
    "too many pixels": (lambda: request_for(image_batch(0, 65, 64)), "INVALID_ARGUMENT"),
    "unknown output": (_unknown_output, "INVALID_ARGUMENT"),
    "undecodable bytes": (
        lambda: request_for(signature="predict_encoded", image_bytes=np.array([b"GIF8 no"])),
        "INVALID_ARGUMENT",
    ),
    "too large encoded": (
        lambda: request_for(signature="predict_encoded", image_bytes=np.array([_png(80, 60)])),
        "INVALID_ARGUMENT",
    ),
    "mixed sizes": (
        lambda: request_for(
            signature="predict_encoded", image_bytes=np.array([_png(32, 48), _png(16, 48)])),
        "INVALID_ARGUMENT",
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_requests_get_their_status_and_the_server_keeps_serving(stub, case):
    make_request, code = MALFORMED[case]
    with pytest.raises(grpc.RpcError) as error:
        stub.Predict(make_request(), timeout=60)
    assert error.value.code().name == code, error.value.details()
    assert error.value.details()
    response = stub.Predict(request_for(image_batch(0)), timeout=60)
    assert tf.make_ndarray(response.outputs["labels"]).shape == (1, 32, 48)


def test_eight_concurrent_clients_times_25_requests(address, saved_model):
    batches = [image_batch(10 + i) for i in range(8)]
    expected = [
        saved_model.signatures["serving_default"](images=tf.constant(b))["labels"].numpy()
        for b in batches
    ]

    def one_client(index: int) -> int:
        own_stub = client.connect(address)
        for _ in range(25):
            outputs = client.predict(own_stub, "sait_segmenter", {"images": batches[index]})
            np.testing.assert_array_equal(outputs["labels"], expected[index])
        return index

    with futures.ThreadPoolExecutor(max_workers=8) as pool:
        assert sorted(pool.map(one_client, range(8))) == list(range(8))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_client(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sait_tf.serving.client", *args],
        env=subprocess_env(), capture_output=True, text=True, timeout=180,
    )


def test_client_reports_an_unreachable_server_in_one_line(tmp_path):
    Image.fromarray(image_batch(4)[0]).save(tmp_path / "in.png")
    target = f"127.0.0.1:{_free_port()}"
    result = run_client("--server", target, "--image", str(tmp_path / "in.png"),
                        "--out", str(tmp_path / "pred.png"), "--timeout_s", "5")
    assert result.returncode == 2
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"error: no answer from the prediction server at {target}")
    assert "UNAVAILABLE" in last_line or "DEADLINE_EXCEEDED" in last_line
    assert not (tmp_path / "pred.png").exists()


def test_client_directory_mode(address, saved_model, tmp_path):
    images = {"a": image_batch(5, 32, 48)[0], "b": image_batch(6, 24, 40)[0]}
    (tmp_path / "in").mkdir()
    for name, image in images.items():
        Image.fromarray(image).save(tmp_path / "in" / f"{name}.png")
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    result = run_client("--server", address, "--image_dir", str(tmp_path / "in"),
                        "--out_dir", str(tmp_path / "out"),
                        "--labels_out_dir", str(tmp_path / "labels"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "out")) == ["a.png", "b.png"]
    for name, image in images.items():
        expected = saved_model.signatures["serving_default"](images=tf.constant(image[None]))
        np.testing.assert_array_equal(
            np.asarray(Image.open(tmp_path / "labels" / f"{name}.png")), expected["labels"][0])
        np.testing.assert_array_equal(
            np.asarray(Image.open(tmp_path / "out" / f"{name}.png")), expected["color"][0])


def test_server_refuses_a_base_path_without_models(tmp_path):
    (tmp_path / "sait_segmenter" / "1").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        server.latest_versions(str(tmp_path))
