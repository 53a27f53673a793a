"""A TF Serving PredictionService for machines that have no TF Serving.

``python -m sait_tf.serving.server --model_base_path BASE --port 8500`` serves the newest
intact version of every model under BASE (the layout ``sait_tf.export`` writes) through the
same gRPC protos as TF Serving, so ``sait_tf.serving.client`` works against either. It
implements Predict and GetModelMetadata. Every request is checked against its declared shapes
and the --max_* limits before anything is allocated for it; refused requests get NOT_FOUND,
INVALID_ARGUMENT or RESOURCE_EXHAUSTED and the server keeps serving.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import re
import signal
from collections.abc import Sequence
from concurrent import futures

import grpc
import tensorflow as tf
from absl import flags, logging
from PIL import Image
from tensorflow.core.framework import tensor_pb2
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from sait_tf import cli

DEFAULT_SIGNATURE = "serving_default"
# Twice a 2048x1024 Cityscapes frame.
DEFAULT_MAX_IMAGE_PIXELS = 2048 * 2048
DEFAULT_MAX_BATCH = 8
DEFAULT_MAX_CONCURRENT_REQUESTS = 8
# Responses carry labels, confidence and colour (11 bytes a pixel); grpc's 4 MB default is
# smaller than one Cityscapes frame. The client receives up to this much; the server's
# requests are bounded by Limits.max_request_bytes.
MAX_MESSAGE_BYTES = 1 << 30
GRPC_MESSAGE_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
# What tf.io.decode_image reads and PIL can size from the header.
ENCODED_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP")
# TensorProto's value fields (int_val, string_val, ...): one value each, but for complex dtypes.
_VALUE_FIELDS = [
    field.name for field in tensor_pb2.TensorProto.DESCRIPTOR.fields if field.name.endswith("_val")
]
# The parts of a TensorFlow error message that describe the graph, not the request.
_GRAPH_INTERNALS = re.compile(r"\[\[.*?\]\]|\[Op:[^\]]*\]|\{\{[^}]*\}\}")
_STATUS_BY_CODE = {status.value[0]: status for status in grpc.StatusCode}


class RequestError(Exception):
    """A request the server refuses, with the gRPC status it answers with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def _invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


@dataclasses.dataclass(frozen=True)
class Limits:
    """What the server accepts (the --max_* flags)."""

    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_batch: int = DEFAULT_MAX_BATCH
    max_concurrent_requests: int = DEFAULT_MAX_CONCURRENT_REQUESTS

    @property
    def max_request_bytes(self) -> int:
        """The largest valid request (a full batch of RGB pixels) and 1 MiB for the rest."""
        return self.max_batch * self.max_image_pixels * 3 + (1 << 20)


@dataclasses.dataclass
class ServedModel:
    """One loaded SavedModel version and its signatures."""

    name: str
    version: int
    path: str
    signatures: dict
    signature_defs: dict[str, meta_graph_pb2.SignatureDef]


def model_versions(model_base_path: str) -> dict[str, list[tuple[int, str]]]:
    """{model name: [(version, directory), newest first]} for BASE/NAME/VERSION/saved_model.pb."""
    if not os.path.isdir(model_base_path):
        raise FileNotFoundError(f"--model_base_path {model_base_path} is not a directory")
    found = {}
    for name in sorted(os.listdir(model_base_path)):
        model_dir = os.path.join(model_base_path, name)
        if not os.path.isdir(model_dir):
            continue
        versions = sorted(
            (int(v) for v in os.listdir(model_dir)
             if v.isdigit() and os.path.isfile(os.path.join(model_dir, v, "saved_model.pb"))),
            reverse=True,
        )
        if versions:
            found[name] = [(v, os.path.join(model_dir, str(v))) for v in versions]
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


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def load_newest_intact(name: str, versions: list[tuple[int, str]]) -> ServedModel:
    """The newest of ``versions`` (newest first) that loads; logs each one that does not."""
    damaged = []
    for version, path in versions:
        try:
            loaded = tf.saved_model.load(path)
            signature_defs = read_signature_defs(path)
        except Exception as e:  # damage shows as OSError, DecodeError, OpError, IndexError...
            logging.error("%s version %d at %s is damaged: %s", name, version, path, _first_line(e))
            damaged.append(version)
            continue
        if damaged:
            logging.warning("serving %s version %d from %s, the newest intact version "
                            "(damaged: %s)", name, version, path, damaged)
        else:
            logging.info("serving %s version %d from %s", name, version, path)
        return ServedModel(name, version, path, dict(loaded.signatures), signature_defs)
    raise OSError(f"no intact version of model '{name}' under --model_base_path "
                  f"{os.path.dirname(os.path.dirname(versions[0][1]))} (damaged versions "
                  f"{damaged}; the log above says why)")


def load_models(model_base_path: str) -> dict[str, ServedModel]:
    """Loads the newest intact version of every model under ``model_base_path``."""
    return {
        name: load_newest_intact(name, versions)
        for name, versions in model_versions(model_base_path).items()
    }


def _declared_shape(where: str, proto: tensor_pb2.TensorProto, spec: tf.TensorSpec) -> list[int]:
    """The shape ``proto`` declares, once its dtype and rank fit ``spec``."""
    if proto.dtype != spec.dtype.as_datatype_enum:
        raise _invalid(f"{where} has dtype {tf.dtypes.as_dtype(proto.dtype).name}, "
                       f"expected {spec.dtype.name}")
    shape = [dim.size for dim in proto.tensor_shape.dim]
    if any(size < 0 for size in shape):
        raise _invalid(f"{where}: declared shape {shape} has a negative dimension")
    if proto.tensor_shape.unknown_rank or not spec.shape.is_compatible_with(shape):
        raise _invalid(f"{where}: declared shape {shape}, expected {spec.shape.as_list()}")
    return shape


def _pixel_problem(height: int, width: int, limits: Limits) -> str | None:
    """What is wrong with an image of this size, or None."""
    if height * width > limits.max_image_pixels:
        return (f"{height}x{width} = {height * width:,} pixels, more than --max_image_pixels "
                f"{limits.max_image_pixels:,}")
    if height == 0 or width == 0:
        return f"{height}x{width} pixels, empty"
    return None


def _check_payload(where: str, shape: list[int], proto: tensor_pb2.TensorProto) -> None:
    """The payload must hold exactly the values the declared shape needs."""
    needed = math.prod(shape)
    dtype = tf.dtypes.as_dtype(proto.dtype)
    if proto.tensor_content:
        if len(proto.tensor_content) != needed * dtype.size:
            raise _invalid(f"{where}: payload has {len(proto.tensor_content):,} bytes, declared "
                           f"shape {shape} of {dtype.name} needs {needed * dtype.size:,}")
        return
    values = sum(len(getattr(proto, field)) for field in _VALUE_FIELDS)
    if values != needed:
        raise _invalid(f"{where}: payload has {values:,} values, declared shape {shape} "
                       f"needs {needed:,}")


def _check_encoded(where: str, images: Sequence[bytes], limits: Limits) -> None:
    """Sizes every image from its header, without decoding it."""
    sizes = []
    for index, encoded in enumerate(images):
        try:
            with Image.open(io.BytesIO(encoded), formats=ENCODED_FORMATS) as image:
                (width, height), image_format = image.size, image.format
        except Image.DecompressionBombError as e:
            raise _invalid(f"{where}[{index}]: the header declares more than "
                           f"{2 * Image.MAX_IMAGE_PIXELS:,} pixels; --max_image_pixels is "
                           f"{limits.max_image_pixels:,}") from e
        except (OSError, ValueError) as e:
            raise _invalid(f"{where}[{index}] is not a PNG, JPEG, GIF, BMP or WebP image "
                           f"({_first_line(e)})") from e
        problem = _pixel_problem(height, width, limits)
        if problem:
            raise _invalid(f"{where}[{index}]: the {image_format} header declares {problem}")
        sizes.append((height, width))
        if sizes[index] != sizes[0]:
            raise _invalid(f"{where}: images 0 and {index} differ in size ({sizes[0][0]}x"
                           f"{sizes[0][1]} and {height}x{width}); send them in separate requests")


def check_input(
    key: str, proto: tensor_pb2.TensorProto, spec: tf.TensorSpec, limits: Limits
) -> None:
    """Refuses an input whose shape, payload or images are wrong or over ``limits``."""
    where = f"inputs['{key}']"
    shape = _declared_shape(where, proto, spec)
    is_pixels = spec.dtype == tf.uint8 and len(shape) == 4
    if (is_pixels or spec.dtype == tf.string) and shape and shape[0] > limits.max_batch:
        raise _invalid(f"{where}: declared shape {shape} is a batch of {shape[0]:,} images, "
                       f"more than --max_batch {limits.max_batch}")
    problem = _pixel_problem(*shape[1:3], limits) if is_pixels else None
    if problem:
        raise _invalid(f"{where}: declared shape {shape} has images of {problem}")
    _check_payload(where, shape, proto)
    if spec.dtype == tf.string:
        _check_encoded(where, proto.string_val, limits)


def _request_terms(error: tf.errors.OpError) -> str:
    """A TensorFlow error message without the node, function and op names."""
    lines = [_GRAPH_INTERNALS.sub("", line).strip() for line in error.message.splitlines()]
    lines = [line for line in lines if line]
    return lines[-1] if lines else type(error).__name__


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    """Predict and GetModelMetadata of tensorflow_serving.apis.PredictionService."""

    def __init__(self, models: dict[str, ServedModel], limits: Limits) -> None:
        self.models = models
        self.limits = limits

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
        """Checks every input against its spec and the limits, then converts it to a tensor."""
        missing = sorted(set(specs) - set(request.inputs))
        unknown = sorted(set(request.inputs) - set(specs))
        if missing or unknown:
            raise _invalid(f"inputs must be {sorted(specs)}; missing {missing}, unknown {unknown}")
        for key, spec in specs.items():
            check_input(key, request.inputs[key], spec, self.limits)
        tensors = {}
        for key, spec in specs.items():
            try:
                tensors[key] = tf.constant(tf.make_ndarray(request.inputs[key]), dtype=spec.dtype)
            except (ValueError, TypeError) as e:
                raise _invalid(f"inputs['{key}'] is not a valid tensor: {e}") from e
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
            raise _invalid(f"output_filter names {unknown_outputs}; outputs: "
                           f"{sorted(function.structured_outputs)}")
        inputs = self._inputs(request, function.structured_input_signature[1])
        try:
            results = function(**inputs)
        except tf.errors.OpError as e:
            raise RequestError(
                _STATUS_BY_CODE[e.error_code],
                f"model '{model.name}' failed on this request: {_request_terms(e)}",
            ) from e
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
                raise _invalid(f"metadata_field must be ['signature_def'], got "
                               f"{list(request.metadata_field)}")
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
    model_base_path: str, host: str = "127.0.0.1", port: int = 8500, limits: Limits = Limits()
) -> tuple[grpc.Server, int]:
    """Loads the models and starts serving; returns the server and the bound port.

    gRPC itself answers RESOURCE_EXHAUSTED to a request over ``limits.max_request_bytes``
    and to one that arrives while ``limits.max_concurrent_requests`` are in progress, so
    nothing waits in a queue.
    """
    servicer = PredictionServicer(load_models(model_base_path), limits)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=limits.max_concurrent_requests),
        maximum_concurrent_rpcs=limits.max_concurrent_requests,
        options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", limits.max_request_bytes),
        ],
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
    flags.DEFINE_string("host", "127.0.0.1", "Address to bind; see docs/serving.md before 0.0.0.0.")
    flags.DEFINE_integer("port", 8500, "gRPC port; 0 picks a free one (printed at start).")
    flags.DEFINE_integer("max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS,
                         "Larger images (height x width) get INVALID_ARGUMENT.", lower_bound=1)
    flags.DEFINE_integer("max_batch", DEFAULT_MAX_BATCH,
                         "Requests with more images get INVALID_ARGUMENT.", lower_bound=1)
    flags.DEFINE_integer("max_concurrent_requests", DEFAULT_MAX_CONCURRENT_REQUESTS,
                         "Requests beyond this many in progress get RESOURCE_EXHAUSTED.",
                         lower_bound=1)
    flags.mark_flag_as_required("model_base_path")


def main(argv: list[str]) -> None:
    del argv
    limits = Limits(FLAGS.max_image_pixels, FLAGS.max_batch, FLAGS.max_concurrent_requests)
    server, port = start_server(FLAGS.model_base_path, FLAGS.host, FLAGS.port, limits)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: server.stop(grace=2))
    print(f"listening on {FLAGS.host}:{port}", flush=True)
    server.wait_for_termination()


def run() -> None:
    """The ``sait-serve`` command."""
    cli.run(main, _define_flags)


if __name__ == "__main__":
    run()
