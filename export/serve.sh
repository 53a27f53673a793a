#!/bin/sh
# Serve an export base with the TF Serving container: gRPC on 8500, REST on 8501.
#   export/serve.sh RUN_DIR/export
# With both models, copies export/models.config next to them and serves that config; a run
# without a translator (source-only) serves sait_segmenter alone.
set -eu
if [ "$#" -ne 1 ] || [ ! -d "$1/sait_segmenter" ]; then
  echo "usage: $0 EXPORT_BASE   (a directory holding sait_segmenter/VERSION/saved_model.pb)" >&2
  exit 2
fi
export_base="$(cd "$1" && pwd)"
if [ -d "$export_base/sait_translator" ]; then
  cp "$(dirname "$0")/models.config" "$export_base/models.config"
  exec docker run --rm -p 8500:8500 -p 8501:8501 -v "$export_base":/models \
    tensorflow/serving --model_config_file=/models/models.config
fi
exec docker run --rm -p 8500:8500 -p 8501:8501 -v "$export_base":/models \
  tensorflow/serving --model_name=sait_segmenter --model_base_path=/models/sait_segmenter
