"""The main job: ``python -m sait_tf.train --gin_file=FILE [--gin_param=B ...] [--run_dir=DIR]``.

Parses the gin files and bindings first (a bad binding exits non-zero with gin's message
before anything is written), then runs or resumes ``run_pipeline`` in the run directory.
Running the same command again continues a killed run where it stopped; SIGTERM or Ctrl-C
stops it after the current step, checkpointed. Errors are one line (``sait_tf.cli``).
"""

from __future__ import annotations

import logging as python_logging
import os
import re
import sys
import time

import gin
from absl import app, flags, logging
from gin import resource_reader

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


def _not_a_package_probe(record: python_logging.LogRecord) -> bool:
    """False for the records of gin's look-up of a config file as a Python package resource,
    which gin tries for every search path that does not hold the file and which logs "Path
    not found: FILE" as an error; a file found nowhere is still gin's IOError."""
    return record.pathname != resource_reader.__file__


def parse_gin(gin_files: list[str], gin_params: list[str]) -> None:
    """Parses the config. A relative ``include`` is looked up in the working directory, then
    next to the including file (and the other files of the include tree), without the false
    "Path not found" errors gin logs while it searches."""
    folders: list[str] = []
    for path in gin_files:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--gin_file {path} does not exist")
        _folders_of(path, folders)
    for folder in folders:
        gin.add_config_file_search_path(folder)
    root_logger = python_logging.getLogger()
    root_logger.addFilter(_not_a_package_probe)
    try:
        gin.parse_config_files_and_bindings(gin_files, gin_params)
    finally:
        root_logger.removeFilter(_not_a_package_probe)


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
