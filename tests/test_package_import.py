"""What importing sait_tf does to TensorFlow before any model is built."""

import os
import subprocess
import sys

PROBE = ("import os, {module}\n"
         "from tensorflow.python.util import _pywrap_util_port\n"
         "print(os.environ.get('TF_ENABLE_ONEDNN_OPTS'), _pywrap_util_port.IsMklEnabled())\n")


def _onednn_after_importing(module: str) -> list[str]:
    """``[TF_ENABLE_ONEDNN_OPTS, oneDNN on]`` in a fresh process that imported ``module``."""
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    result = subprocess.run([sys.executable, "-c", PROBE.format(module=module)], env=env,
                            capture_output=True, text=True, timeout=300, check=True)
    return result.stdout.split()


def test_importing_sait_tf_keeps_tensorflows_choice_of_onednn():
    # On AVX2-only CPUs oneDNN runs some full-size convolutions in its reference
    # implementation (docs/PERFORMANCE.md): the package must not turn it on there.
    with_sait_tf = _onednn_after_importing("sait_tf")
    assert with_sait_tf[0] == "None"
    assert with_sait_tf == _onednn_after_importing("tensorflow")
