"""gRPC serving: the local PredictionService against the SavedModel in-process, the client,
and the server's limits: declared shapes, batch and image sizes, concurrency, damaged versions."""

import dataclasses
import os
import pathlib
import queue
import shutil
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent import futures

import grpc
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2
from tensorflow_serving.apis import get_model_metadata_pb2, predict_pb2
from test_export import subprocess_env, trained_tiny_segmenter

from sait_tf import export, labels
from sait_tf.runtime.workers import free_loopback_ports
from sait_tf.serving import client, server

MAX_IMAGE_PIXELS = 64 * 64
MAX_BATCH = 4
MAX_CONCURRENT_REQUESTS = 10
SERVER_START_TIMEOUT_S = 180
# A refused request is answered within this, whatever it declares (typically a few ms).
REFUSAL_S = 1.0


@pytest.fixture(scope="module")
def export_base(tmp_path_factory):
    """sait_segmenter versions 1 and 2 (a copy), a half-written 3 (no saved_model.pb), 4
    without its variables, 5 with a truncated saved_model.pb, and a temporary dir."""
    base = tmp_path_factory.mktemp("models")
    version_1 = export.export_models(trained_tiny_segmenter(), export_base=str(base))
    model_dir = base / "sait_segmenter"
    shutil.copytree(version_1["sait_segmenter"], model_dir / "2")
    (model_dir / "3").mkdir()
    (model_dir / "3" / "variables").mkdir()
    shutil.copytree(version_1["sait_segmenter"], model_dir / "4")
    shutil.rmtree(model_dir / "4" / "variables")
    shutil.copytree(version_1["sait_segmenter"], model_dir / "5")
    graph = (model_dir / "5" / "saved_model.pb").read_bytes()
    (model_dir / "5" / "saved_model.pb").write_bytes(graph[: len(graph) // 2])
    (model_dir / ".tmp-6-123").mkdir()
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


@dataclasses.dataclass
class Served:
    """The server process of the module."""

    address: str
    pid: int
    log_path: pathlib.Path


@pytest.fixture(scope="module")
def served(export_base, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "sait_tf.serving.server", "--model_base_path", export_base,
             "--port", "0", "--max_image_pixels", str(MAX_IMAGE_PIXELS),
             "--max_batch", str(MAX_BATCH),
             "--max_concurrent_requests", str(MAX_CONCURRENT_REQUESTS)],
            stdout=subprocess.PIPE, stderr=log, text=True, env=subprocess_env(),
        )
    try:
        port = _read_port(process, log_path)
        yield Served(f"127.0.0.1:{port}", process.pid, log_path)
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        process.stdout.close()


@pytest.fixture(scope="module")
def address(served):
    return served.address


@pytest.fixture(scope="module")
def stub(address):
    return client.connect(address)


def image_batch(seed: int, height: int = 32, width: int = 48, batch: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (batch, height, width, 3), np.uint8)


def request_for(images=None, model="sait_segmenter", signature="", **inputs):
    """A PredictRequest of arrays, or of TensorProtos as they are."""
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = signature
    if images is not None:
        inputs["images"] = images
    for key, value in inputs.items():
        proto = value if isinstance(value, tensor_pb2.TensorProto) else tf.make_tensor_proto(value)
        request.inputs[key].CopyFrom(proto)
    return request


def declared(shape, dtype=tf.uint8, **payload) -> tensor_pb2.TensorProto:
    """A TensorProto declaring ``shape`` whatever its payload (tensor_content, int_val...)."""
    dims = [tensor_shape_pb2.TensorShapeProto.Dim(size=size) for size in shape]
    return tensor_pb2.TensorProto(
        dtype=dtype.as_datatype_enum, tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=dims),
        **payload)


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


def _png_header(height: int, width: int) -> bytes:
    """The start of a PNG (signature, IHDR, a bit of IDAT) declaring height x width pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", bytes(16))


def _encoded(*images: bytes) -> predict_pb2.PredictRequest:
    return request_for(signature="predict_encoded", image_bytes=np.array(images))


# name: (request, status, a part of the message)
MALFORMED = {
    "unknown model": (
        lambda: request_for(image_batch(0), model="resnet"), "NOT_FOUND", "'resnet' is not served"),
    "unknown signature": (
        lambda: request_for(image_batch(0), signature="x"), "NOT_FOUND", "no signature 'x'"),
    "unserved version": (_wrong_version, "NOT_FOUND", "version 3 is not served"),
    "float pixels": (
        lambda: request_for(image_batch(0).astype(np.float32)), "INVALID_ARGUMENT",
        "inputs['images'] has dtype float32, expected uint8"),
    "rank 3": (
        lambda: request_for(image_batch(0)[0]), "INVALID_ARGUMENT",
        "declared shape [32, 48, 3], expected [None, None, None, 3]"),
    "4 channels": (
        lambda: request_for(np.zeros((1, 8, 8, 4), np.uint8)), "INVALID_ARGUMENT",
        "declared shape [1, 8, 8, 4]"),
    "missing input": (
        lambda: request_for(pixels=image_batch(0)), "INVALID_ARGUMENT", "missing ['images']"),
    "too many pixels": (
        lambda: request_for(image_batch(0, 65, 64)), "INVALID_ARGUMENT",
        "65x64 = 4,160 pixels, more than --max_image_pixels 4,096"),
    "unknown output": (_unknown_output, "INVALID_ARGUMENT", "output_filter names ['logits']"),
    "undecodable bytes": (
        lambda: _encoded(b"GIF8 no"), "INVALID_ARGUMENT", "inputs['image_bytes'][0] is not a PNG"),
    "too large encoded": (
        lambda: _encoded(_png(80, 60)), "INVALID_ARGUMENT",
        "[0]: the PNG header declares 80x60 = 4,800 pixels, more than --max_image_pixels"),
    "mixed sizes": (
        lambda: _encoded(_png(32, 48), _png(16, 48)), "INVALID_ARGUMENT",
        "images 0 and 1 differ in size (32x48 and 16x48)"),
    "truncated PNG, in the request's terms": (
        lambda: _encoded(_png(32, 48)[:60]), "INVALID_ARGUMENT",
        "model 'sait_segmenter' failed on this request: Invalid PNG data, size 60"),
}
OVER_LIMITS = {
    "declared shape larger than the bytes": (
        lambda: request_for(declared(
            [2, 32, 48, 3], tensor_content=image_batch(0).tobytes())), "INVALID_ARGUMENT",
        "inputs['images']: payload has 4,608 bytes, declared shape [2, 32, 48, 3] of uint8 "
        "needs 9,216"),
    "one value for a whole image": (
        lambda: request_for(declared([1, 32, 48, 3], int_val=[7])), "INVALID_ARGUMENT",
        "payload has 1 values, declared shape [1, 32, 48, 3] needs 4,608"),
    "negative dimension": (
        lambda: request_for(declared([1, -1, 8, 3], tensor_content=bytes(192))),
        "INVALID_ARGUMENT", "declared shape [1, -1, 8, 3] has a negative dimension"),
    "huge declared image, 12 bytes": (
        lambda: request_for(declared([1, 100_000, 100_000, 3], tensor_content=bytes(12))),
        "INVALID_ARGUMENT",
        "declared shape [1, 100000, 100000, 3] has images of 100000x100000 = "
        "10,000,000,000 pixels, more than --max_image_pixels 4,096"),
    "over max_batch": (
        lambda: request_for(image_batch(0, 8, 8, batch=MAX_BATCH + 1)), "INVALID_ARGUMENT",
        "declared shape [5, 8, 8, 3] is a batch of 5 images, more than --max_batch 4"),
    "encoded, over max_batch": (
        lambda: _encoded(*[_png(8, 8)] * (MAX_BATCH + 1)), "INVALID_ARGUMENT",
        "inputs['image_bytes']: declared shape [5] is a batch of 5 images"),
    "encoded, declared shape larger than the images": (
        lambda: request_for(signature="predict_encoded", image_bytes=declared(
            [3], tf.string, string_val=[_png(8, 8)])), "INVALID_ARGUMENT",
        "payload has 1 values, declared shape [3] needs 3"),
    "encoded, header of 100000x100000": (
        lambda: _encoded(_png_header(100_000, 100_000)), "INVALID_ARGUMENT",
        "inputs['image_bytes'][0]: the header declares more than"),
    "encoded, over the request bytes": (
        lambda: _encoded(b"x" * 600_000, b"x" * 600_000), "RESOURCE_EXHAUSTED",
        "larger than max"),
}


def _refusal(stub, request, code: str, message_part: str) -> float:
    """Seconds until ``request`` is refused with ``code`` and a message with ``message_part``."""
    start = time.perf_counter()
    with pytest.raises(grpc.RpcError) as error:
        stub.Predict(request, timeout=60)
    elapsed = time.perf_counter() - start
    assert error.value.code().name == code, error.value.details()
    assert message_part in error.value.details()
    for internal in ("[[", "{{", "node ", "Op:", "Traceback"):
        assert internal not in error.value.details()
    return elapsed


def _assert_still_serving(stub) -> None:
    response = stub.Predict(request_for(image_batch(0)), timeout=60)
    assert tf.make_ndarray(response.outputs["labels"]).shape == (1, 32, 48)


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_requests_get_their_status_and_the_server_keeps_serving(stub, case):
    make_request, code, message_part = MALFORMED[case]
    _refusal(stub, make_request(), code, message_part)
    _assert_still_serving(stub)


@pytest.mark.parametrize("case", sorted(OVER_LIMITS))
def test_requests_over_the_limits_are_refused_at_once(stub, case):
    make_request, code, message_part = OVER_LIMITS[case]
    request = make_request()
    assert _refusal(stub, request, code, message_part) < REFUSAL_S
    _assert_still_serving(stub)


def _peak_rss_growth_mb(pid: int, send) -> float:
    """How far the peak resident memory of process ``pid`` rises above its current memory
    while ``send()`` runs (Linux: writing 5 to clear_refs resets the peak, VmHWM)."""

    def status_kb(field: str) -> int:
        with open(f"/proc/{pid}/status") as f:
            line = next(line for line in f if line.startswith(field + ":"))
        return int(line.split()[1])

    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")
    before = status_kb("VmRSS")
    send()
    return (status_kb("VmHWM") - before) / 1024


def test_huge_declared_shapes_leave_the_server_memory_bounded(served, stub):
    # Filled from one value, each of these is 2.7e9 uint8 values (2.5 GiB).
    huge = [declared([1, 30_000, 30_000, 3], int_val=[7]), declared([1, 30_000, 30_000, 3])]

    def send():
        for proto in huge:
            _refusal(stub, request_for(proto), "INVALID_ARGUMENT", "--max_image_pixels")

    assert _peak_rss_growth_mb(served.pid, send) < 200
    _assert_still_serving(stub)


def test_requests_over_max_concurrent_requests_get_resource_exhausted(address, stub):
    """MAX_CONCURRENT_REQUESTS + 1 calls that have not sent their request yet: one is refused,
    and so is any other until they finish."""
    release = threading.Event()

    def held_request():
        release.wait()
        yield request_for(image_batch(0))

    channel = grpc.insecure_channel(address)
    hold = channel.stream_unary(
        "/tensorflow.serving.PredictionService/Predict",
        request_serializer=predict_pb2.PredictRequest.SerializeToString,
        response_deserializer=predict_pb2.PredictResponse.FromString)
    try:
        held = [hold.future(held_request(), timeout=60)
                for _ in range(MAX_CONCURRENT_REQUESTS + 1)]
        deadline = time.monotonic() + 10
        while not any(call.done() for call in held) and time.monotonic() < deadline:
            time.sleep(0.01)
        refused = [call for call in held if call.done()]
        assert len(refused) == 1
        assert refused[0].code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert _refusal(stub, request_for(image_batch(0)), "RESOURCE_EXHAUSTED", "") < REFUSAL_S
    finally:
        release.set()
    for call in held:
        if call is not refused[0]:
            assert tf.make_ndarray(call.result().outputs["labels"]).shape == (1, 32, 48)
    _assert_still_serving(stub)
    channel.close()


def test_damaged_newer_versions_are_logged_and_the_newest_intact_one_served(
        served, export_base, stub):
    log = served.log_path.read_text()
    model_dir = os.path.join(export_base, "sait_segmenter")
    for version in (5, 4):
        assert f"sait_segmenter version {version} at {os.path.join(model_dir, str(version))} " \
               "is damaged" in log
    assert (f"serving sait_segmenter version 2 from {os.path.join(model_dir, '2')}, the newest "
            "intact version (damaged: [5, 4])") in log
    request = get_model_metadata_pb2.GetModelMetadataRequest()
    request.model_spec.name = "sait_segmenter"
    request.metadata_field.append("signature_def")
    assert stub.GetModelMetadata(request, timeout=30).model_spec.version.value == 2


def test_no_intact_version_stops_the_server_with_one_line(export_base, tmp_path):
    for damaged, copy in ((4, 6), (5, 7)):
        shutil.copytree(os.path.join(export_base, "sait_segmenter", str(damaged)),
                        tmp_path / "sait_segmenter" / str(copy))
    result = subprocess.run(
        [sys.executable, "-m", "sait_tf.serving.server", "--model_base_path", str(tmp_path),
         "--port", "0"],
        env=subprocess_env(), capture_output=True, text=True, timeout=SERVER_START_TIMEOUT_S)
    assert result.returncode == 1
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: no intact version of model 'sait_segmenter' under --model_base_path "
        f"{tmp_path} (damaged versions [7, 6]; the log above says why)")


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


def run_client(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sait_tf.serving.client", *args],
        env=subprocess_env(), capture_output=True, text=True, timeout=180,
    )


def test_client_reports_an_unreachable_server_in_one_line(tmp_path):
    Image.fromarray(image_batch(4)[0]).save(tmp_path / "in.png")
    target = f"127.0.0.1:{free_loopback_ports(1)[0]}"
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
        server.model_versions(str(tmp_path))


class CountingStub:
    """A stub that records the batch size of every Predict request it forwards."""

    def __init__(self, stub) -> None:
        self.stub, self.batches = stub, []

    def Predict(self, request, timeout=None):  # noqa: N802 (the gRPC method name)
        (proto,) = request.inputs.values()
        self.batches.append(proto.tensor_shape.dim[0].size)
        return self.stub.Predict(request, timeout=timeout)


def test_client_batches_a_folder_and_writes_what_single_requests_write(stub, tmp_path):
    from sait_tf import predict

    for index in range(5):
        folder = tmp_path / "in" / ("sub" if index % 2 else "")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image_batch(20 + index)[0]).save(folder / f"frame_{index}.png")
    found = predict.find_images([str(tmp_path / "in")])
    for encoded in (False, True):
        batched, single = tmp_path / f"batched_{encoded}", tmp_path / f"single_{encoded}"
        jobs = [client.Job(image.path, str(batched / f"{image.stem}.png"),
                           str(batched / f"{image.stem}_labels.png")) for image in found]
        counting = CountingStub(stub)
        assert client.send(counting, "sait_segmenter", jobs, batch_size=2, encoded=encoded) == 3
        assert counting.batches == [2, 2, 1]
        for image in found:
            client.process_image(stub, "sait_segmenter", image.path,
                                 str(single / f"{image.stem}.png"),
                                 str(single / f"{image.stem}_labels.png"), encoded=encoded)
        written = sorted(str(path.relative_to(batched)) for path in batched.rglob("*.png"))
        assert len(written) == 10 and any(name.startswith("sub/") for name in written)
        for name in written:
            np.testing.assert_array_equal(np.asarray(Image.open(batched / name)),
                                          np.asarray(Image.open(single / name)))


def test_client_takes_every_file_of_a_shell_glob(address, saved_model, tmp_path):
    paths = []
    for index, (height, width) in enumerate([(32, 48), (24, 40), (32, 48)]):
        paths.append(str(tmp_path / f"frame_{index}.png"))
        Image.fromarray(image_batch(30 + index, height, width)[0]).save(paths[-1])
    result = run_client("--server", address, "--image", *paths, "--labels_out_dir",
                        str(tmp_path / "labels"), "--batch_size", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    for path in paths:
        pixels = np.asarray(Image.open(path))[None]
        expected = saved_model.signatures["serving_default"](images=tf.constant(pixels))
        np.testing.assert_array_equal(
            np.asarray(Image.open(tmp_path / "labels" / os.path.basename(path))),
            expected["labels"][0])
    result = run_client("--server", address, "--image", *paths, "--out", str(tmp_path / "p.png"))
    assert result.returncode == 1
    assert "--out and --labels_out take one image, got 3" in result.stderr
