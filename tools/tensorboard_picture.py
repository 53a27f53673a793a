"""Takes README's picture of a run's TensorBoard pipeline summary (the Custom Scalars tab).

    python tools/tensorboard_picture.py --run_dir runs/demo \
        --out docs/images/tensorboard_pipeline.png [--port 6016] [--chromium chromium]

Starts TensorBoard on RUN_DIR/logs/pipeline alone (so its run gets the first colour) on
localhost, has headless Chromium load the Custom Scalars tab with smoothing 0 (the
pipeline's curves have one point per round), crops the charts and stops TensorBoard. Needs
a Chromium (Debian: ``apt install chromium``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

from PIL import Image

WINDOW = (1100, 520)  # width, height: the pipeline category with both charts
CROP = (285, 75, 1100, 400)  # left, top, right, bottom: the charts without the side panel


def wait_for(url: str, text: str, timeout_s: float = 180.0) -> None:
    """Returns once ``url`` answers with ``text`` in its body (TensorBoard has loaded the
    run); raises naming it after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if text in response.read().decode():
                    return
        except OSError:
            pass
        time.sleep(1.0)
    raise TimeoutError(f"{url} did not list {text!r} within {timeout_s:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run_dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--port", type=int, default=6016)
    parser.add_argument("--chromium", default="chromium")
    args = parser.parse_args()
    log_dir = os.path.join(args.run_dir, "logs", "pipeline")
    if not os.path.isdir(log_dir):
        sys.exit(f"--run_dir: {log_dir} does not exist; run the main job first")
    if shutil.which(args.chromium) is None:
        sys.exit(f"--chromium: {args.chromium} not found (Debian: apt install chromium)")
    server = subprocess.Popen(
        ["tensorboard", "--logdir_spec", f"pipeline:{log_dir}", "--host", "localhost",
         "--port", str(args.port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://localhost:{args.port}"
    try:
        wait_for(f"{base}/data/plugin/scalars/tags", "pipeline/mIoU")
        with tempfile.TemporaryDirectory() as scratch:
            full = os.path.join(scratch, "full.png")
            subprocess.run(
                [args.chromium, "--headless=new", "--no-sandbox", "--disable-gpu",
                 "--hide-scrollbars", f"--window-size={WINDOW[0]},{WINDOW[1]}",
                 "--virtual-time-budget=20000", f"--screenshot={full}",
                 f"{base}/?darkMode=false#custom_scalars&_smoothingWeight=0"],
                check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            Image.open(full).crop(CROP).save(args.out)
    finally:
        server.terminate()
        server.wait()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
