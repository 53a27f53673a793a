"""gRPC client for the exported models, against TF Serving or ``sait_tf.serving.server``.

    python -m sait_tf.serving.client --server HOST:8500 --model sait_segmenter \\
        --image in.png --out pred.png [--labels_out labels.png]
    python -m sait_tf.serving.client --server HOST:8500 --model sait_segmenter \\
        --image_dir DIR --out_dir OUT [--labels_out_dir LABELS]

``--out`` receives the model's image output (the colourised prediction of the segmenter,
the translated image of the translator); ``--labels_out`` the trainIds as an 8-bit PNG.
"""

from __future__ import annotations

import os
import sys

import grpc
import numpy as np
import tensorflow as tf
from absl import app, flags
from PIL import Image
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from sait_tf import images
from sait_tf.export import ENCODED_SIGNATURE, SEGMENTER_NAME
from sait_tf.serving.server import DEFAULT_SIGNATURE, GRPC_MESSAGE_OPTIONS
from sait_tf.train.progress import Progress

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
UNREACHABLE_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def connect(server: str) -> prediction_service_pb2_grpc.PredictionServiceStub:
    """A PredictionService stub over an insecure channel to ``HOST:PORT``."""
    channel = grpc.insecure_channel(server, options=GRPC_MESSAGE_OPTIONS)
    return prediction_service_pb2_grpc.PredictionServiceStub(channel)


def predict(
    stub: prediction_service_pb2_grpc.PredictionServiceStub,
    model: str,
    inputs: dict[str, np.ndarray],
    signature: str = DEFAULT_SIGNATURE,
    timeout_s: float = 30.0,
) -> dict[str, np.ndarray]:
    """One Predict call; raises grpc.RpcError with the server's status on failure."""
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = signature
    for key, value in inputs.items():
        request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
    response = stub.Predict(request, timeout=timeout_s)
    return {key: tf.make_ndarray(proto) for key, proto in response.outputs.items()}


def read_rgb(path: str) -> np.ndarray:
    """An image file as uint8 RGB [H, W, 3]."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


def image_output(outputs: dict[str, np.ndarray]) -> np.ndarray:
    """The one uint8 [B, H, W, 3] output (``color`` or ``translated``)."""
    candidates = [
        key for key, value in outputs.items() if value.dtype == np.uint8 and value.ndim == 4
    ]
    if len(candidates) != 1:
        raise ValueError(f"expected one uint8 image output, the response has {sorted(outputs)}")
    return outputs[candidates[0]]


def process_image(
    stub: prediction_service_pb2_grpc.PredictionServiceStub,
    model: str,
    image_path: str,
    out_path: str | None,
    labels_path: str | None = None,
    encoded: bool = False,
    timeout_s: float = 30.0,
) -> dict[str, np.ndarray]:
    """Sends one image file, writes the image output and/or the trainIds; returns the outputs.

    ``encoded`` sends the file's bytes to the ``predict_encoded`` signature (smaller requests)
    instead of decoded pixels to ``serving_default``.
    """
    if encoded:
        with open(image_path, "rb") as f:
            inputs = {"image_bytes": np.array([f.read()], dtype=object)}
        signature = ENCODED_SIGNATURE
    else:
        inputs = {"images": read_rgb(image_path)[None]}
        signature = DEFAULT_SIGNATURE
    outputs = predict(stub, model, inputs, signature, timeout_s)
    if out_path:
        images.write_png(out_path, image_output(outputs)[0])
    if labels_path:
        if "labels" not in outputs:
            raise ValueError(f"--labels_out: model '{model}' returns no labels")
        images.write_png(labels_path, outputs["labels"][0].astype(np.uint8))
    return outputs


FLAGS = flags.FLAGS


def _define_flags() -> None:
    flags.DEFINE_string("server", "localhost:8500", "HOST:PORT of the gRPC prediction service.")
    flags.DEFINE_string("model", SEGMENTER_NAME, "Model name (sait_segmenter or sait_translator).")
    flags.DEFINE_string("image", None, "One input image (PNG or JPEG).")
    flags.DEFINE_string("out", None, "Output PNG: colourised prediction or translated image.")
    flags.DEFINE_string("labels_out", None, "Output PNG of trainIds (segmenter only).")
    flags.DEFINE_string("image_dir", None, "Directory mode: every PNG/JPEG in this directory.")
    flags.DEFINE_string("out_dir", None, "Directory mode: output PNGs named after the inputs.")
    flags.DEFINE_string("labels_out_dir", None, "Directory mode: trainId PNGs (segmenter only).")
    flags.DEFINE_bool("encoded", False, "Send the file bytes to the predict_encoded signature.")
    flags.DEFINE_float("timeout_s", 30.0, "Deadline of each request in seconds.")


def _jobs() -> list[tuple[str, str | None, str | None]]:
    """(image, output, labels output) triples from the flags, checked before any request."""
    if bool(FLAGS.image) == bool(FLAGS.image_dir):
        raise app.UsageError("give exactly one of --image and --image_dir")
    if FLAGS.image:
        if not (FLAGS.out or FLAGS.labels_out):
            raise app.UsageError("--image needs --out and/or --labels_out")
        if not os.path.isfile(FLAGS.image):
            raise app.UsageError(f"--image {FLAGS.image} does not exist")
        return [(FLAGS.image, FLAGS.out, FLAGS.labels_out)]
    if not (FLAGS.out_dir or FLAGS.labels_out_dir):
        raise app.UsageError("--image_dir needs --out_dir and/or --labels_out_dir")
    if not os.path.isdir(FLAGS.image_dir):
        raise app.UsageError(f"--image_dir {FLAGS.image_dir} is not a directory")
    names = sorted(n for n in os.listdir(FLAGS.image_dir) if n.lower().endswith(IMAGE_SUFFIXES))
    if not names:
        raise app.UsageError(f"--image_dir {FLAGS.image_dir} holds no PNG or JPEG files")
    jobs = []
    for name in names:
        out_name = os.path.splitext(name)[0] + ".png"
        jobs.append((
            os.path.join(FLAGS.image_dir, name),
            os.path.join(FLAGS.out_dir, out_name) if FLAGS.out_dir else None,
            os.path.join(FLAGS.labels_out_dir, out_name) if FLAGS.labels_out_dir else None,
        ))
    return jobs


def main(argv: list[str]) -> int:
    del argv
    jobs = _jobs()
    stub = connect(FLAGS.server)
    progress = Progress("client", total=len(jobs))
    for done, (image_path, out_path, labels_path) in enumerate(jobs, start=1):
        try:
            process_image(
                stub, FLAGS.model, image_path, out_path, labels_path, FLAGS.encoded,
                FLAGS.timeout_s,
            )
        except grpc.RpcError as e:
            if e.code() in UNREACHABLE_CODES:
                print(
                    f"error: no answer from the prediction server at {FLAGS.server} within "
                    f"{FLAGS.timeout_s:g} s ({e.code().name}); is it running? "
                    "(--server, --timeout_s)",
                    file=sys.stderr,
                )
                return 2
            print(
                f"error: {FLAGS.server} refused {image_path}: {e.code().name}: {e.details()}",
                file=sys.stderr,
            )
            return 1
        except (OSError, ValueError) as e:
            print(f"error: {image_path}: {e}", file=sys.stderr)
            return 1
        progress.update(done)
    return 0


if __name__ == "__main__":
    _define_flags()
    app.run(main)
