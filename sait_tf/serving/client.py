"""gRPC client for the exported models, against TF Serving or ``sait_tf.serving.server``.

    python -m sait_tf.serving.client --server HOST:8500 --model sait_segmenter \\
        --image in.png --out pred.png [--labels_out labels.png]
    python -m sait_tf.serving.client --server HOST:8500 --model sait_segmenter \\
        --image_dir DIR [--image more.png ...] --out_dir OUT [--labels_out_dir LABELS] \\
        [--batch_size 4]

``--out`` receives the model's image output (the colourised prediction of the segmenter,
the translated image of the translator); ``--labels_out`` the trainIds as an 8-bit PNG.
With several images (repeated ``--image``, image files as arguments, ``--image_dir`` searched
recursively) the outputs go to ``--out_dir`` / ``--labels_out_dir`` as ``<stem>.png``,
mirroring the input folders; images of equal size share a request of up to ``--batch_size``.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Sequence

import grpc
import numpy as np
import tensorflow as tf
from absl import app, flags
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from sait_tf import cli, images
from sait_tf.export import ENCODED_SIGNATURE, SEGMENTER_NAME
from sait_tf.predict import InputImage, batches_by_size, find_images, image_size, read_image
from sait_tf.runtime.progress import Progress
from sait_tf.serving.server import DEFAULT_MAX_BATCH, DEFAULT_SIGNATURE, GRPC_MESSAGE_OPTIONS

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


def image_output(outputs: dict[str, np.ndarray]) -> np.ndarray:
    """The one uint8 [B, H, W, 3] output (``color`` or ``translated``)."""
    candidates = [
        key for key, value in outputs.items() if value.dtype == np.uint8 and value.ndim == 4
    ]
    if len(candidates) != 1:
        raise ValueError(f"expected one uint8 image output, the response has {sorted(outputs)}")
    return outputs[candidates[0]]


@dataclasses.dataclass(frozen=True)
class Job:
    """An image file and where its image output and its trainIds go (None: not written)."""

    image: str
    out: str | None = None
    labels_out: str | None = None


def process_batch(
    stub: prediction_service_pb2_grpc.PredictionServiceStub,
    model: str,
    jobs: Sequence[Job],
    encoded: bool = False,
    timeout_s: float = 30.0,
) -> dict[str, np.ndarray]:
    """Sends the images of ``jobs`` (all of one size) in one request and writes their outputs;
    returns the outputs.

    ``encoded`` sends the files' bytes to the ``predict_encoded`` signature (smaller requests)
    instead of decoded pixels to ``serving_default``.
    """
    if encoded:
        encoded_images = []
        for job in jobs:
            with open(job.image, "rb") as f:
                encoded_images.append(f.read())
        inputs = {"image_bytes": np.array(encoded_images, dtype=object)}
        signature = ENCODED_SIGNATURE
    else:
        inputs = {"images": np.stack([read_image(job.image) for job in jobs])}
        signature = DEFAULT_SIGNATURE
    outputs = predict(stub, model, inputs, signature, timeout_s)
    if any(job.labels_out for job in jobs) and "labels" not in outputs:
        raise ValueError(f"--labels_out: model '{model}' returns no labels")
    image = image_output(outputs) if any(job.out for job in jobs) else None
    for index, job in enumerate(jobs):
        if job.out:
            images.write_png(job.out, image[index])
        if job.labels_out:
            images.write_png(job.labels_out, outputs["labels"][index].astype(np.uint8))
    return outputs


def process_image(
    stub: prediction_service_pb2_grpc.PredictionServiceStub,
    model: str,
    image_path: str,
    out_path: str | None,
    labels_path: str | None = None,
    encoded: bool = False,
    timeout_s: float = 30.0,
) -> dict[str, np.ndarray]:
    """``process_batch`` of one image file."""
    return process_batch(stub, model, [Job(image_path, out_path, labels_path)], encoded,
                         timeout_s)


class BatchError(Exception):
    """A request that failed: ``images`` are its files, ``__cause__`` the error."""

    def __init__(self, paths: Sequence[str]) -> None:
        super().__init__(", ".join(paths))
        self.images = list(paths)


def send(
    stub: prediction_service_pb2_grpc.PredictionServiceStub,
    model: str,
    jobs: Sequence[Job],
    batch_size: int = 4,
    encoded: bool = False,
    timeout_s: float = 30.0,
) -> int:
    """Processes ``jobs`` in requests of up to ``batch_size`` images of equal size (sized from
    their headers first, so a file that is no image stops it before any request), logging
    progress; returns the number of requests. A failed request raises BatchError."""
    sizes = [image_size(job.image) for job in jobs]
    batches = batches_by_size(jobs, sizes, batch_size)
    progress = Progress("client", total=len(jobs))
    done = 0
    for batch in batches:
        try:
            process_batch(stub, model, batch, encoded, timeout_s)
        except (grpc.RpcError, OSError, ValueError) as error:
            raise BatchError([job.image for job in batch]) from error
        done += len(batch)
        progress.update(done)
    return len(batches)


FLAGS = flags.FLAGS


def _define_flags() -> None:
    flags.DEFINE_string("server", "localhost:8500", "HOST:PORT of the gRPC prediction service.")
    flags.DEFINE_string("model", SEGMENTER_NAME, "Model name (sait_segmenter or sait_translator).")
    flags.DEFINE_multi_string("image", [], "Input image (PNG or JPEG); repeatable, and image "
                              "files given as arguments count too (a shell glob).")
    flags.DEFINE_string("out", None, "Output PNG of the one image: colourised prediction or "
                        "translated image.")
    flags.DEFINE_string("labels_out", None, "Output PNG of trainIds of the one image "
                        "(segmenter only).")
    flags.DEFINE_multi_string("image_dir", [], "Folder searched recursively for PNG/JPEG "
                              "files; repeatable.")
    flags.DEFINE_string("out_dir", None, "Output PNGs <stem>.png, mirroring the input folders.")
    flags.DEFINE_string("labels_out_dir", None, "trainId PNGs <stem>.png (segmenter only).")
    flags.DEFINE_integer("batch_size", 4, "Images of equal size per request; at most the "
                         "server's --max_batch.", lower_bound=1, upper_bound=DEFAULT_MAX_BATCH)
    flags.DEFINE_bool("encoded", False, "Send the file bytes to the predict_encoded signature.")
    flags.DEFINE_float("timeout_s", 30.0, "Deadline of each request in seconds.")


def _jobs(files: list[str]) -> list[Job]:
    """Jobs of the flags' images and ``files``, checked before any request."""
    for path in files:
        if not os.path.isfile(path):
            raise app.UsageError(f"--image {path} does not exist")
    for folder in FLAGS.image_dir:
        if not os.path.isdir(folder):
            raise app.UsageError(f"--image_dir {folder} is not a directory")
    if not (files or FLAGS.image_dir):
        raise app.UsageError("give --image (repeatable, or image files as arguments) and/or "
                             "--image_dir")
    found = find_images([*files, *FLAGS.image_dir], exclude=[FLAGS.out_dir, FLAGS.labels_out_dir])
    if FLAGS.out or FLAGS.labels_out:
        if FLAGS.out_dir or FLAGS.labels_out_dir:
            raise app.UsageError("give --out/--labels_out (one image) or --out_dir/"
                                 "--labels_out_dir, not both")
        if len(found) != 1:
            raise app.UsageError(f"--out and --labels_out take one image, got {len(found)}; "
                                 "use --out_dir and/or --labels_out_dir")
        return [Job(found[0].path, FLAGS.out, FLAGS.labels_out)]
    if not (FLAGS.out_dir or FLAGS.labels_out_dir):
        raise app.UsageError("give --out_dir and/or --labels_out_dir (or --out and/or "
                             "--labels_out for one image)")

    def under(folder: str | None, image: InputImage) -> str | None:
        return os.path.join(folder, image.stem + ".png") if folder else None

    return [Job(image.path, under(FLAGS.out_dir, image), under(FLAGS.labels_out_dir, image))
            for image in found]


def main(argv: list[str]) -> None:
    jobs = _jobs([*FLAGS.image, *argv[1:]])
    try:
        send(connect(FLAGS.server), FLAGS.model, jobs, FLAGS.batch_size, FLAGS.encoded,
             FLAGS.timeout_s)
    except BatchError as error:
        cause = error.__cause__
        if not isinstance(cause, grpc.RpcError):
            sys.exit(f"error: {error}: {cause}")
        if cause.code() in UNREACHABLE_CODES:
            print(f"error: no answer from the prediction server at {FLAGS.server} within "
                  f"{FLAGS.timeout_s:g} s ({cause.code().name}); is it running? "
                  "(--server, --timeout_s)", file=sys.stderr)
            sys.exit(2)
        sys.exit(f"error: {FLAGS.server} refused {error}: {cause.code().name}: "
                 f"{cause.details()}")


def run() -> None:
    """The ``sait-client`` console script; exit status 2 when the server does not answer, 1
    for other errors (one line ``error: ...``, ``cli.run``)."""
    cli.run(main, _define_flags)


if __name__ == "__main__":
    run()
