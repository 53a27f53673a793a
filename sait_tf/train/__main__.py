"""The main job: ``python -m sait_tf.train --gin_file=FILE [--gin_param=B ...] [--run_dir=DIR]``.

Parses the gin files and bindings first (a bad binding exits non-zero with gin's message
before anything is written), then runs or resumes ``run_pipeline`` in the run directory.
Running the same command again continues a killed run where it stopped; SIGTERM or Ctrl-C
stops it after the current step, checkpointed. Errors are one line (``sait_tf.cli``).
"""

from __future__ import annotations

import os
import re
import sys
import time

import gin
from absl import app, flags, logging

from sait_tf import cli
from sait_tf.runtime import preemption
from sait_tf.train.pipeline import run_pipeline

FLAGS = flags.FLAGS
_INCLUDE = re.compile(r"""^\s*include\s+['"]([^'"]+)['"]""", re.MULTILINE)


def define_flags() -> None:
    """Defined here, not at import, so importing the package defines no global flags."""
    flags.DEFINE_multi_string("gin_file", None, "Gin config file(s), applied in order.")
    flags.DEFINE_multi_string("gin_param", [], "Gin bindings applied after the files, e.g. "
                              "\"SOURCE_ROOT='/data/gta5'\".")
    flags.DEFINE_string("run_dir", None, "Run directory; default runs/<timestamp>. Give it to "
                        "resume a killed run.")
    flags.DEFINE_bool("accept_config_change", False, "Resume a run with a configuration that "
                      "differs from the one it was started with (the change is recorded in "
                      "RUN_DIR/config_changes.json).")
    flags.mark_flag_as_required("gin_file")


def _folders_of(gin_file: str, folders: list[str]) -> None:
    """Appends the folder of ``gin_file`` and of every file it includes, recursively."""
    folder = os.path.dirname(os.path.abspath(gin_file))
    if folder in folders:
        return
    folders.append(folder)
    with open(gin_file) as f:
        for included in _INCLUDE.findall(f.read()):
            candidate = os.path.join(folder, included)
            if os.path.isfile(candidate):
                _folders_of(candidate, folders)


def parse_gin(gin_files: list[str], gin_params: list[str]) -> None:
    """Parses the config; ``include`` paths are also resolved next to the including file."""
    folders: list[str] = []
    for path in gin_files:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--gin_file {path} does not exist")
        _folders_of(path, folders)
    for folder in folders:
        gin.add_config_file_search_path(folder)
    gin.parse_config_files_and_bindings(gin_files, gin_params)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        parse_gin(FLAGS.gin_file, FLAGS.gin_param)
    except Exception as e:  # gin raises ValueError, SyntaxError, TokenError, OSError...
        if cli.verbose():
            raise
        sys.exit(f"error in the gin configuration: {cli.one_line(e)}")
    run_dir = FLAGS.run_dir or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    logging.info("run directory: %s", run_dir)
    preemption.install_handlers()
    run_pipeline(run_dir, accept_config_change=FLAGS.accept_config_change)


def run() -> None:
    """The ``sait-train`` command."""
    cli.run(main, define_flags)


if __name__ == "__main__":
    run()
