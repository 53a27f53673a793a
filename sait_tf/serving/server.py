"""A TF Serving PredictionService for machines that have no TF Serving.

``python -m sait_tf.serving.server --model_base_path BASE --port 8500`` serves the highest
version of every model under BASE (the layout ``sait_tf.export`` writes) through the same
gRPC protos as TF Serving, so ``sait_tf.serving.client`` works against either. It implements
Predict and GetModelMetadata; malformed requests get NOT_FOUND or INVALID_ARGUMENT and the
server keeps serving. Requests run on a thread pool (SavedModel calls are thread-safe).
"""

from __future__ import annotations

import dataclasses
import io
import os
import signal
import sys
from concurrent import futures

import grpc
import numpy as np
import tensorflow as tf
from absl import app, flags, logging
from PIL import Image
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    predict_pb2,
    prediction_service_pb2_grpc,
)

DEFAULT_SIGNATURE = "serving_default"
DEFAULT_MAX_IMAGE_PIXELS = 2048 * 2048
# Responses carry labels, confidence and colour (11 bytes a pixel); grpc's 4 MB default is
# smaller than one Cityscapes frame. Image sizes are bounded by --max_image_pixels instead.
MAX_MESSAGE_BYTES = 1 << 30
GRPC_MESSAGE_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
_STATUS_BY_CODE = {status.value[0]: status for status in grpc.StatusCode}


class RequestError(Exception):
    """A request the server refuses, with the gRPC status it answers with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclasses.dataclass
class ServedModel:
    """One loaded SavedModel version and its signatures."""

    name: str
    version: int
    path: str
    signatures: dict
    signature_defs: dict[str, meta_graph_pb2.SignatureDef]


def latest_versions(model_base_path: str) -> dict[str, tuple[int, str]]:
    """{model name: (highest version, its directory)} for BASE/NAME/VERSION/saved_model.pb."""
    if not os.path.isdir(model_base_path):
        raise FileNotFoundError(f"--model_base_path {model_base_path} is not a directory")
    found = {}
    for name in sorted(os.listdir(model_base_path)):
        model_dir = os.path.join(model_base_path, name)
        if not os.path.isdir(model_dir):
            continue
        versions = [
            int(v)
            for v in os.listdir(model_dir)
            if v.isdigit() and os.path.isfile(os.path.join(model_dir, v, "saved_model.pb"))
        ]
        if versions:
            found[name] = (max(versions), os.path.join(model_dir, str(max(versions))))
    if not found:
        raise FileNotFoundError(
            f"no BASE/NAME/VERSION/saved_model.pb under --model_base_path {model_base_path}"
        )
    return found


def read_signature_defs(saved_model_dir: str) -> dict[str, meta_graph_pb2.SignatureDef]:
    """The user-facing SignatureDefs stored in ``saved_model_dir/saved_model.pb``."""
    saved_model = saved_model_pb2.SavedModel()
    with open(os.path.join(saved_model_dir, "saved_model.pb"), "rb") as f:
        saved_model.ParseFromString(f.read())
    signature_defs = saved_model.meta_graphs[0].signature_def
    return {key: signature_defs[key] for key in signature_defs if not key.startswith("__")}


def load_models(model_base_path: str) -> dict[str, ServedModel]:
    """Loads the highest version of every model under ``model_base_path``."""
    models = {}
    for name, (version, path) in latest_versions(model_base_path).items():
        loaded = tf.saved_model.load(path)
        models[name] = ServedModel(
            name=name,
            version=version,
            path=path,
            signatures=dict(loaded.signatures),
            signature_defs=read_signature_defs(path),
        )
        logging.info("loaded %s version %d from %s", name, version, path)
    return models


def _image_sizes(array: np.ndarray, spec: tf.TensorSpec) -> list[tuple[int, int]]:
    """(height, width) of every image an input holds: uint8 NHWC pixels or encoded bytes."""
    if spec.dtype == tf.uint8 and spec.shape.rank == 4:
        return [array.shape[1:3]] * array.shape[0]
    if spec.dtype == tf.string:
        sizes = []
        for index, encoded in enumerate(array.reshape(-1)):
            try:
                width, height = Image.open(io.BytesIO(encoded)).size
            except Image.DecompressionBombError as e:
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"image {index}: {e}") from e
            except (OSError, ValueError) as e:
                raise RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"image {index} is not a decodable PNG or JPEG ({type(e).__name__})",
                ) from e
            sizes.append((height, width))
        return sizes
    return []


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    """Predict and GetModelMetadata of tensorflow_serving.apis.PredictionService."""

    def __init__(self, models: dict[str, ServedModel], max_image_pixels: int) -> None:
        self.models = models
        self.max_image_pixels = max_image_pixels

    def _model(self, model_spec) -> ServedModel:
        model = self.models.get(model_spec.name)
        if model is None:
            raise RequestError(
                grpc.StatusCode.NOT_FOUND,
                f"model '{model_spec.name}' is not served; models: {sorted(self.models)}",
            )
        if model_spec.version_label:
            raise RequestError(grpc.StatusCode.NOT_FOUND, "version labels are not supported")
        if model_spec.HasField("version") and model_spec.version.value != model.version:
            raise RequestError(
                grpc.StatusCode.NOT_FOUND,
                f"model '{model.name}' version {model_spec.version.value} is not served; "
                f"serving version {model.version}",
            )
        return model

    def _inputs(self, request, specs: dict[str, tf.TensorSpec]) -> dict[str, tf.Tensor]:
        """Checks names, dtypes, ranks and image sizes, then converts to tensors."""
        missing = sorted(set(specs) - set(request.inputs))
        unknown = sorted(set(request.inputs) - set(specs))
        if missing or unknown:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"inputs must be {sorted(specs)}; missing {missing}, unknown {unknown}",
            )
        tensors = {}
        for key, spec in specs.items():
            proto = request.inputs[key]
            if proto.dtype != spec.dtype.as_datatype_enum:
                raise RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"input '{key}' has dtype {tf.dtypes.as_dtype(proto.dtype).name}, "
                    f"expected {spec.dtype.name}",
                )
            try:
                array = tf.make_ndarray(proto)
            except (ValueError, TypeError) as e:
                raise RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT, f"input '{key}' is not a valid tensor: {e}"
                ) from e
            if not spec.shape.is_compatible_with(array.shape):
                raise RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"input '{key}' has shape {list(array.shape)}, expected {spec.shape}",
                )
            for index, (height, width) in enumerate(_image_sizes(array, spec)):
                if height * width > self.max_image_pixels:
                    raise RequestError(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"input '{key}' image {index} is {height}x{width} pixels, more than "
                        f"--max_image_pixels {self.max_image_pixels}",
                    )
                if height == 0 or width == 0:
                    raise RequestError(
                        grpc.StatusCode.INVALID_ARGUMENT, f"input '{key}' image {index} is empty"
                    )
            tensors[key] = tf.constant(array, dtype=spec.dtype)
        return tensors

    def _predict(self, request) -> predict_pb2.PredictResponse:
        model = self._model(request.model_spec)
        signature_name = request.model_spec.signature_name or DEFAULT_SIGNATURE
        function = model.signatures.get(signature_name)
        if function is None:
            raise RequestError(
                grpc.StatusCode.NOT_FOUND,
                f"model '{model.name}' has no signature '{signature_name}'; "
                f"signatures: {sorted(model.signatures)}",
            )
        outputs = list(request.output_filter) or sorted(function.structured_outputs)
        unknown_outputs = sorted(set(outputs) - set(function.structured_outputs))
        if unknown_outputs:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"output_filter names {unknown_outputs}; outputs: "
                f"{sorted(function.structured_outputs)}",
            )
        inputs = self._inputs(request, function.structured_input_signature[1])
        try:
            results = function(**inputs)
        except tf.errors.OpError as e:
            raise RequestError(_STATUS_BY_CODE[e.error_code], e.message) from e
        response = predict_pb2.PredictResponse()
        response.model_spec.name = model.name
        response.model_spec.version.value = model.version
        response.model_spec.signature_name = signature_name
        for key in outputs:
            response.outputs[key].CopyFrom(tf.make_tensor_proto(results[key].numpy()))
        return response

    def Predict(self, request, context):  # noqa: N802 (the gRPC method name)
        try:
            return self._predict(request)
        except RequestError as e:
            logging.warning("Predict refused: %s %s", e.code.name, e)
            context.abort(e.code, str(e))

    def GetModelMetadata(self, request, context):  # noqa: N802 (the gRPC method name)
        try:
            model = self._model(request.model_spec)
            if list(request.metadata_field) != ["signature_def"]:
                raise RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"metadata_field must be ['signature_def'], got {list(request.metadata_field)}",
                )
        except RequestError as e:
            logging.warning("GetModelMetadata refused: %s %s", e.code.name, e)
            context.abort(e.code, str(e))
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        for key, signature_def in model.signature_defs.items():
            signature_map.signature_def[key].CopyFrom(signature_def)
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = model.name
        response.model_spec.version.value = model.version
        response.metadata["signature_def"].Pack(signature_map)
        return response


def start_server(
    model_base_path: str,
    host: str = "127.0.0.1",
    port: int = 8500,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    workers: int = 8,
) -> tuple[grpc.Server, int]:
    """Loads the models and starts serving; returns the server and the bound port."""
    servicer = PredictionServicer(load_models(model_base_path), max_image_pixels)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers), options=GRPC_MESSAGE_OPTIONS
    )
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(servicer, server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound_port = server.add_insecure_port(address)
    except RuntimeError as e:
        raise OSError(f"cannot listen on {address} (--host/--port): {e}") from e
    server.start()
    return server, bound_port


FLAGS = flags.FLAGS


def _define_flags() -> None:
    flags.DEFINE_string("model_base_path", None, "Export base holding NAME/VERSION/saved_model.pb.")
    flags.DEFINE_string("host", "127.0.0.1", "Address to bind; 0.0.0.0 serves other machines.")
    flags.DEFINE_integer("port", 8500, "gRPC port; 0 picks a free one (printed at start).")
    flags.DEFINE_integer(
        "max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS, "Larger images get INVALID_ARGUMENT."
    )
    flags.DEFINE_integer("workers", 8, "Threads answering requests concurrently.")


def main(argv: list[str]) -> None:
    del argv
    try:
        server, port = start_server(
            FLAGS.model_base_path, FLAGS.host, FLAGS.port, FLAGS.max_image_pixels, FLAGS.workers
        )
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: server.stop(grace=2))
    print(f"listening on {FLAGS.host}:{port}", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    _define_flags()
    flags.mark_flag_as_required("model_base_path")
    app.run(main)
